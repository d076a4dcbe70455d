"""Probes: measurements of the model itself taken at each checkpoint of a sequential run
(`editlab eval --mode sequential --checkpoints 0,10,50 --probes perplexity,downstream,nkl,norm`),
registered by name. See `base.py` for the life cycle and docs/pitfalls.md for the definitions.

    base.py        Probe, ProbeError, budgets
    perplexity.py  WikiText-2 test and the default corpus, 512-token windows
    downstream.py  SST-2, RTE, BoolQ, NQ-open, GSM8K (Model-Editing-Hurt prompts)
    nkl.py         KL(edited || unedited) of the next-token distribution on fixed unrelated prompts
    norm.py        growth of every weight matrix the edits changed
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..registry import Registry, lazy
from .base import BUDGET_NAMES, Probe, ProbeError

PROBES: Registry[type[Probe]] = Registry("probe", ProbeError)
PROBES.register("perplexity", "perplexity of WikiText-2 test and of the default corpus in 512-token windows "
                "(collapse: more than twice the unedited value)", lazy("editlab.probes.perplexity:Perplexity"))
PROBES.register("downstream", "general ability: SST-2, RTE, BoolQ, NQ-open and GSM8K answer extraction with the "
                "Model-Editing-Hurt prompts, beside each task's chance level", lazy("editlab.probes.downstream:Downstream"))
PROBES.register("nkl", "neighbourhood KL: KL(edited || unedited) of the next-token distribution on 100 fixed unrelated "
                "prompts", lazy("editlab.probes.nkl:NeighbourhoodKL"))
PROBES.register("norm", "norm growth: |W_c - W_0|_F / |W_0|_F of every weight matrix the edits changed (max and mean)",
                lazy("editlab.probes.norm:NormGrowth"))

DEFAULT_PROBES = ("perplexity", "nkl", "norm")


def parse_probes(text: str | Sequence[str] | None) -> list[str]:
    """Probe names from `a,b,c` (or a list), resolved and checked against the registry (torch-free);
    an unknown or repeated name raises `ProbeError`."""
    if text is None:
        return []
    names = [p.strip() for p in text.split(",")] if isinstance(text, str) else [str(p).strip() for p in text]
    names = [n for n in names if n]
    out: list[str] = []
    for n in names:
        canonical = PROBES.resolve(n)
        if canonical in out:
            raise ProbeError(f"probe {canonical!r} is named twice in --probes")
        out.append(canonical)
    return out


def headline_metrics() -> list[str]:
    """Every registered probe's headline metrics (what reports plot against the number of edits), in
    registry order: the one list the run report and the pitfalls report both read."""
    return [m for name in PROBES.names() for m in PROBES.get(name).headline]


def chance_metric(metric: str) -> str | None:
    """The metric holding `metric`'s chance level (`sst2` -> `sst2_chance`), where it has one."""
    from ..suites.metrics import METRICS

    return f"{metric}_chance" if f"{metric}_chance" in METRICS else None


def get_probes(names: Sequence[str], budget: str = "quick", data_root: Path | None = None) -> list[Probe]:
    """Instances of the named probes with `budget`, each checked for its data (`ProbeError` if missing)."""
    if budget not in BUDGET_NAMES:
        raise ProbeError(f"unknown probe budget {budget!r}; use one of {', '.join(BUDGET_NAMES)}")
    probes = [PROBES.get(n)(budget=budget, data_root=data_root) for n in names]
    for p in probes:
        p.check()
    return probes


__all__ = ["BUDGET_NAMES", "DEFAULT_PROBES", "PROBES", "Probe", "ProbeError", "chance_metric", "get_probes", "headline_metrics",
           "parse_probes"]
