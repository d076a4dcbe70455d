"""The model without and with its newest edit in one forward pass.

Comparing an edit's before and after (the playground's probes, its greedy continuations) costs two
passes of the same rows: on CPU most of a short pass is reading the weights, so one pass of twice the
rows costs much less than two. Inside `without_and_with_top(lm)` every forward of `lm.model` takes a
batch of 2B rows as two halves: rows [:B] see the weights as they were before the newest edit, rows
[B:] the weights as they are. Each module owning a parameter that edit changed computes its output
again for the first half with the parameter's value without the edit — built by the same arithmetic
as `Edit.restore` (the original plus the deltas of the edits below, in order), so the first half sees
exactly the weights a restore would leave — and nothing else changes. Run the same rows twice
(`LM.paired_next_token_and_score`, or generation of the same prompt twice) and the halves are the
before and after of the separate passes, up to the float noise of a different batch size.

Only an edit made of weight deltas (ROME, MEMIT, FT, AlphaEdit, MEND, ...; a solver state beside
them changes nothing in the model) can be compared this way; `pairable` says whether the newest edit
is one. Inside the block every forward is read as two halves, so run only the same rows twice there;
an odd batch is an error. A parameter held by several modules (tied embeddings and LM head) is
replaced in each of them."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .patches import SolverState, WeightDelta, WeightLedger


def pairable(lm: Any) -> bool:
    """Whether `lm`'s newest active edit changes the model by weight deltas only (and there is one)."""
    top = lm.active_edits[-1] if lm.active_edits else None
    return bool(top is not None and any(isinstance(p, WeightDelta) for p in top.patches)
                and all(isinstance(p, (WeightDelta, SolverState)) for p in top.patches) and top.lm is lm)


def _owners(model: torch.nn.Module, params: dict[int, torch.nn.Parameter]) -> dict[int, list[tuple[torch.nn.Module, str]]]:
    """Parameter identity -> every (module holding it, its attribute name there): a tied parameter has
    several."""
    out: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) in params:
                out.setdefault(id(p), []).append((module, name))
    return out


@contextmanager
def without_and_with_top(lm: Any) -> Iterator[None]:
    """See the module's docstring. Raises ValueError where the newest edit is not `pairable`."""
    if not pairable(lm):
        raise ValueError("the newest edit is not made of weight deltas only: measure before and after apart")
    top = lm.active_edits[-1]
    ledger = WeightLedger.of(lm)
    deltas = [p for p in top.patches if isinstance(p, WeightDelta)]
    mine = {id(p) for p in deltas}
    without: dict[int, torch.Tensor] = {}
    for key in {p._key for p in deltas}:
        stack = ledger.applied[key]
        below = [d for d in stack if id(d) not in mine]
        if len(below) + sum(id(d) in mine for d in stack) != len(stack) or stack[: len(below)] != below:
            raise ValueError("the newest edit's weight deltas are not the last ones on their parameters")
        without[key] = ledger.replay_into(key, torch.empty_like(ledger.originals[key]), below)
    owners = _owners(lm.model, {k: ledger.params[k] for k in without})
    per_module: dict[int, tuple[torch.nn.Module, dict[str, torch.Tensor]]] = {}
    for key, held in owners.items():
        for module, name in held:
            per_module.setdefault(id(module), (module, {}))[1][name] = without[key]
    inside = [False]

    def hook_for(module: torch.nn.Module, values: dict[str, torch.Tensor]) -> Any:
        def hook(_m: Any, args: tuple[Any, ...], out: Any) -> Any:
            if inside[0]:
                return None  # the recomputation below
            if not isinstance(out, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
                raise RuntimeError(f"{type(module).__name__} cannot be run without and with an edit in one pass")
            x = args[0]
            if x.shape[0] % 2:
                raise RuntimeError(f"a pass without and with the newest edit needs an even batch, got {x.shape[0]} rows")
            half = x.shape[0] // 2
            inside[0] = True
            try:
                first = torch.func.functional_call(module, values, (x[:half],) + tuple(args[1:]))
            finally:
                inside[0] = False
            return torch.cat([first, out[half:]])
        return hook

    handles = [m.register_forward_hook(hook_for(m, v)) for m, v in per_module.values()]
    shared, lm.min_shared_prefix = lm.min_shared_prefix, 0  # a shared prefix runs as one row: no halves
    try:
        yield
    finally:
        lm.min_shared_prefix = shared
        for h in handles:
            h.remove()
