"""Pitfall suites: the survey's failure modes as benchmark suites (data + editing protocol + metrics),
registered by name. `editlab suites` lists them; `editlab eval --suite NAME --method M` runs one.

    base.py       Suite, Unit, Editing (applies and undoes a protocol's edits), record-field errors
    scoring.py    g(o|x), fact probability over prompt sets, JS/KL, answer matching
    metrics.py    every metric's metadata (direction, range, unit, source)
    runner.py     plan (checked before the model loads) and run, rows in the result store
    one module per suite

Definitions and protocols: docs/pitfalls.md.
"""

from __future__ import annotations

from ..errors import EditlabError
from ..registry import Registry, lazy
from .base import Suite, SuiteError, Unit
from .metrics import METRICS, MetricInfo, metric_info

SUITES: Registry[type[Suite]] = Registry("suite", SuiteError)
SUITES.register("specificity-plus", "CounterFact+: neighbourhood score with the edit statement prefixed (NS+), "
                "neighbourhood KL of the next-token distribution", lazy("editlab.suites.specificity_plus:SpecificityPlus"),
                aliases=("cfplus",), metrics=("ES", "PS", "NS", "NS+", "NM", "NM+", "NKL", "NKL+", "Score", "Score+"))

SUITES.register("conflict", "ConflictEdit: two logically tied edits in a row (coverage, reverse, composite); does the later "
                "fact win, and what does it cost the earlier and the tied fact", lazy("editlab.suites.conflict:Conflict"),
                metrics=("coverage.CS", "coverage.CM", "coverage.Succ_single", "reverse.CS_exp", "reverse.CS_imp",
                         "reverse.CM", "composite.CS_exp", "composite.CS_imp", "composite.CM", "composite.TFD"))
SUITES.register("distortion", "RoundEdit: edit a->b then back b->a; JS divergence over the subject's true objects, "
                "ignore and failure rates", lazy("editlab.suites.distortion:Distortion"), aliases=("roundedit",),
                metrics=tuple(f"{s}.{m}" for s in ("easy", "hard") for m in ("Succ", "D", "D_repo", "IR", "FR")))
SUITES.register("distortion-mle", "RoundEdit with Multi-Label Edit: the way back is one batch edit to every true object "
                "(batch methods only)", lazy("editlab.suites.distortion:DistortionMLE"), aliases=("roundedit-mle",),
                metrics=tuple(f"{s}.{m}" for s in ("easy", "hard") for m in ("Succ", "D", "D_repo", "IR", "FR")))


def get_suite(name: str) -> Suite:
    """An instance of the suite registered under `name` (or an alias)."""
    return SUITES.get(name)()


__all__ = ["EditlabError", "METRICS", "MetricInfo", "SUITES", "Suite", "SuiteError", "Unit", "get_suite", "metric_info"]
