"""The CPU's floating-point environment around hot loops.

Subnormal ("denormal") float32 values, |x| < 1.2e-38, are computed in microcode on x86 CPUs, tens of
times slower than normal ones. A healthy model rarely makes any, but a model broken by many edits does:
on SmolLM2 after 100 sequential KN edits (perplexity ~10^17) one KN edit took 111 s, and 14 s with
subnormals flushed to zero (same machine, same edit; docs/pitfalls.md, collapse section), so hot loops
run with flushing on. On a healthy model nothing there gets that small and the results are bit-identical
(tests/test_numerics.py). On a broken model flushing can change a result: where the probability KN
attributes is itself below 1.2e-38, its gradients flush to zero, KN finds no neuron with a positive
attribution and refuses the edit, where without flushing it would rank neurons by subnormal gradients.

`flush_denormals()` turns flushing on for the block and restores the previous state after it, read by
multiplying a subnormal (PyTorch has no getter). Where the CPU cannot flush (`torch.set_flush_denormal`
returns False) the block runs unchanged. The setting is per thread (the CPU's control register) and
covers the thread that runs the block, which is where PyTorch runs single-threaded ops; multi-threaded
kernels may still see subnormals in their worker threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_SUBNORMAL = 1e-39  # below float32's smallest normal (1.18e-38), above its smallest subnormal (1.4e-45)


def flushing_denormals() -> bool:
    """True when subnormal float32 values are flushed to zero on this thread."""
    return float(torch.tensor([_SUBNORMAL], dtype=torch.float32).mul(1.0).item()) == 0.0


@contextmanager
def flush_denormals() -> Iterator[bool]:
    """Flush subnormal floats to zero inside the block; yields whether flushing is on there."""
    if flushing_denormals():
        yield True
        return
    if not torch.set_flush_denormal(True):
        yield False
        return
    try:
        yield True
    finally:
        torch.set_flush_denormal(False)
