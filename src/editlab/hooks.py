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


def capture(
    model: torch.nn.Module,
    run: Callable[[], Any],
    inputs: Mapping[str, Callable[[torch.Tensor], None]] | None = None,
    outputs: Mapping[str, Callable[[torch.Tensor], None]] | None = None,
    stop_after: str | None = None,
) -> None:
    """Call `run()` (a forward pass) with each named module's first input (`inputs`) or output tensor
    (`outputs`) handed to its callback, and end the pass as soon as module `stop_after` has been seen,
    so nothing deeper is computed. The hooks are removed whatever happens."""

    def make(path: str, fn: Callable[[torch.Tensor], None], is_input: bool) -> Callable[..., None]:
        def pre(_m: Any, args: tuple[Any, ...]) -> None:
            fn(args[0])
            if path == stop_after:
                raise StopForward

        def fwd(_m: Any, _args: Any, out: Any) -> None:
            fn(output_tensor(out))
            if path == stop_after:
                raise StopForward

        return pre if is_input else fwd

    pre_hooks = {p: make(p, f, True) for p, f in (inputs or {}).items()}
    fwd_hooks = {p: make(p, f, False) for p, f in (outputs or {}).items()}
    with hooks(model, forward=fwd_hooks, pre=pre_hooks):
        try:
            run()
        except StopForward:
            pass


class ReplayBlock(torch.nn.Module):
    """Stands in for a transformer block whose output is known: returns `output` (in the block's own
    output structure) whatever it is given."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


@contextmanager
def blocks_replayed(model: torch.nn.Module, layers_path: str, n: int, output: Any) -> Iterator[None]:
    """For the duration of the block, blocks 0 … n-1 of the ModuleList at `layers_path` return `output`
    instead of computing: the model's forward then starts at block n with `output` as its input (the
    blocks in between hand on the same value, which only the last one's successor reads). The original
    blocks are put back whatever happens."""
    blocks = model.get_submodule(layers_path)
    originals = [blocks[j] for j in range(n)]
    try:
        for j in range(n):
            blocks[j] = ReplayBlock(output)
        yield
    finally:
        for j, module in enumerate(originals):
            blocks[j] = module
