"""Forward hooks as context managers that always clean up (even when the forward pass raises)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch


class StopForward(Exception):
    """Raised from a hook to end a forward pass once the needed activations are captured."""


def output_tensor(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def replace_output(out: Any, new: torch.Tensor) -> Any:
    if isinstance(out, torch.Tensor):
        return new
    return (new, *out[1:])


@contextmanager
def hooks(
    model: torch.nn.Module,
    forward: Mapping[str, Callable[..., Any]] | None = None,
    pre: Mapping[str, Callable[..., Any]] | None = None,
) -> Iterator[None]:
    """Register forward hooks (`fn(module, inputs, output)`) and pre-hooks (`fn(module, inputs)`) on
    modules named by path for the duration of the block."""
    handles = []
    try:
        for path, fn in (forward or {}).items():
            handles.append(model.get_submodule(path).register_forward_hook(fn))
        for path, fn in (pre or {}).items():
            handles.append(model.get_submodule(path).register_forward_pre_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()
