"""Which states a causal trace restores (`KindSpec`, `parse_kinds`) and the tracing errors, torch-free so
that `editlab trace` checks its options before torch is imported."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import EditlabError

KINDS = ("hidden", "mlp", "attn")
DEFAULT_WINDOWS = {"hidden": 1, "mlp": 10, "attn": 10}


class TracingError(EditlabError, ValueError):
    """Causal tracing was asked for something it cannot do (the message names the option or input)."""


class UnknownFactError(TracingError):
    """The model gives the answer too low a probability for a trace to mean anything."""


@dataclass(frozen=True)
class KindSpec:
    """A state kind and how many consecutive layers one restoration puts back."""

    kind: str
    window: int

    @property
    def label(self) -> str:
        return self.kind if self.window == 1 else f"{self.kind}:{self.window}"


def parse_kinds(spec: str | Sequence[str | KindSpec], window: int | None = None,
                n_layers: int | None = None) -> list[KindSpec]:
    """`"hidden,mlp,attn"` or `["mlp:5", ...]` to `KindSpec`s. A bare `hidden` restores one layer and
    bare `mlp` / `attn` restore `window` layers (default 10), as in the ROME paper's figures; `kind:w`
    sets the window of one kind explicitly. Given `n_layers`, a default window wider than the model is
    narrowed to the whole model (an explicit one is left for `CausalTracer.check_kinds` to refuse)."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out: list[KindSpec] = []
    for item in items:
        if isinstance(item, KindSpec):
            out.append(item)
            continue
        if not item:
            continue
        name, _, w = item.partition(":")
        name = name.strip().lower()
        if name not in KINDS:
            raise TracingError(f"unknown trace kind {name!r}; choose from {', '.join(KINDS)} (optionally kind:window)")
        if w:
            try:
                win = int(w)
            except ValueError:
                raise TracingError(f"window in {item!r} must be an integer") from None
        elif name == "hidden":
            win = DEFAULT_WINDOWS["hidden"]
        elif window is not None:
            win = int(window)
        else:
            win = DEFAULT_WINDOWS[name] if n_layers is None else min(DEFAULT_WINDOWS[name], n_layers)
        if win < 1:
            raise TracingError(f"window of {name!r} must be at least 1, got {win}")
        out.append(KindSpec(name, win))
    if not out:
        raise TracingError("no trace kinds given; choose from " + ", ".join(KINDS))
    labels = [k.label for k in out]
    if len(set(labels)) != len(labels):
        raise TracingError(f"trace kinds repeated: {', '.join(labels)}")
    return out
