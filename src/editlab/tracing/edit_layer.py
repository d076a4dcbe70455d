"""The edit layer ROME's paper reads off causal tracing: where the MLP indirect effect at the last subject
token, averaged over facts the model knows, peaks (the centre of the restored window).

`editlab trace --data knowns` keeps its averages per model in the user cache (`traces/`); an edit
method's `layer=auto` (ROME and every method with one `layer`) reads them through
`edit_layer_from_trace`. Nothing is traced implicitly: an averaged trace costs minutes to hours on a
CPU, so a missing one is an error that names the command that makes it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..fileio import write_text_atomic
from ..paths import cache_dir
from .kinds import TracingError

if TYPE_CHECKING:
    from ..models import LM
    from .knowns import AverageTrace

AUTO = "auto"  # the value of a `layer` hyper-parameter that asks for the traced layer
PEAK_CLASS = "last subject token"
FORMAT = 1


def is_auto(value: object) -> bool:
    """Whether a hyper-parameter value asks for the traced layer ("auto", any case)."""
    return isinstance(value, str) and value.strip().lower() == AUTO


class NoTraceError(TracingError):
    """`layer=auto` asked for, but no averaged MLP trace of this model is cached."""


@dataclass(frozen=True)
class TracedLayer:
    layer: int  # the window's centre where the averaged MLP effect at the last subject token peaks
    effect: float  # that average indirect effect
    window: int
    n_facts: int
    samples: int


def _stem(model_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_") or "model"


def trace_cache_path(lm: LM) -> Path:
    """The cached averages of `lm` (keyed by its name and its unedited weights' fingerprint)."""
    return cache_dir("traces") / f"{_stem(lm.name)}-{lm.base_fingerprint[:16]}.json"


def has_cached_trace(model_name: str) -> bool:
    """Whether some averaged trace of a model of this name is cached (a check before the model loads;
    the weights' fingerprint is checked once it has)."""
    return any(cache_dir("traces").glob(f"{_stem(model_name)}-*.json"))


def save_averages(lm: LM, averages: Mapping[str, AverageTrace]) -> Path:
    """Keep `averages` (label -> average) as this model's cached traces, replacing the same labels."""
    path = trace_cache_path(lm)
    kept = _read(path) if path.exists() else {}
    kept.update({label: avg.to_dict() for label, avg in averages.items()})
    write_text_atomic(path, json.dumps({"format": FORMAT, "model": lm.name, "fingerprint": lm.base_fingerprint,
                                        "averages": kept}, indent=1))
    return path


def _read(path: Path) -> dict[str, Any]:
    """The cached averages, each checked to hold what `edit_layer_from_trace` reads."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        averages = data["averages"]
        if data.get("format") != FORMAT or not isinstance(averages, dict):
            raise ValueError("unknown format")
        for label, a in averages.items():
            if not (isinstance(a, dict) and isinstance(a.get("kind"), str) and isinstance(a.get("n_facts"), int)
                    and isinstance(a.get("window"), int) and isinstance(a.get("classes"), list)
                    and isinstance(a.get("effect"), list) and len(a["effect"]) == len(a["classes"])):
                raise ValueError(f"entry {label!r} is not an averaged trace")
        return averages
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TracingError(f"the cached trace {path} cannot be read ({e}); delete it and trace again") from None


def edit_layer_from_trace(lm: LM) -> TracedLayer:
    """The layer where this model's cached averaged MLP trace peaks at the last subject token (the trace
    over the most facts when several windows are cached). Raises `NoTraceError` when none is cached."""
    path = trace_cache_path(lm)
    mlp = [a for a in (_read(path) if path.exists() else {}).values() if a.get("kind") == "mlp"]
    if not mlp:
        raise NoTraceError(
            f"layer=auto reads the averaged MLP trace of {lm.name}, and none is cached: run `editlab trace --model "
            f"{lm.name} --data knowns --kinds mlp --limit 50` first (or give the layer)")
    best = max(mlp, key=lambda a: (a["n_facts"], -a["window"]))
    try:
        row = best["classes"].index(PEAK_CLASS)
        effects = [float(x) for x in best["effect"][row]]
    except (KeyError, ValueError, IndexError, TypeError):
        raise TracingError(f"the cached trace {path} has no '{PEAK_CLASS}' row; delete it and trace again") from None
    layer = max(range(len(effects)), key=effects.__getitem__)
    return TracedLayer(layer=layer, effect=effects[layer], window=int(best["window"]), n_facts=int(best["n_facts"]),
                       samples=int(best.get("samples", 0)))
