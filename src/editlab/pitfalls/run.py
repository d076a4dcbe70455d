"""Runs a `PitfallsPlan`: each suite for every method (with its unedited row), then, per method, the
collapse run (sequential edits with probes at the checkpoints). Every row goes to one result store as it
is finished, so an interrupted run continues with `resume=True` and re-runs nothing it finished."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

from ..runner.store import Store
from .plan import PitfallsPlan

# progress(label, total) -> a context manager yielding the `tick(done, total, message)` callback
ProgressFactory = Callable[[str, int], ContextManager[Callable[[int, int, str], None]]]


@dataclass
class PitfallsRuns:
    """The run ids of one `editlab pitfalls`: per suite {method or "unedited": run id}, per method the
    collapse run's id."""

    suites: dict[str, dict[str, str]] = field(default_factory=dict)
    collapse: dict[str, str] = field(default_factory=dict)


def _no_progress(label: str, total: int) -> ContextManager[Callable[[int, int, str], None]]:
    from contextlib import nullcontext

    return nullcontext(lambda i, n, msg: None)


def run_pitfalls(lm: Any, plan: PitfallsPlan, store: Store, *, resume: bool = False,
                 progress: ProgressFactory | None = None) -> PitfallsRuns:
    from ..runner import RunConfig, run
    from ..suites.runner import run_suite

    bar = progress or _no_progress
    out = PitfallsRuns()
    if plan.stream:  # a probe that cannot run on this model says so now, not after every suite has run
        from ..probes import get_probes

        for probe in get_probes(list(plan.budget.probes), plan.budget.probe_budget):
            probe.check_model(lm)
    hparams = {m: dict(plan.hparams) for m in plan.methods}
    for name, sp in plan.suite_plans.items():
        with bar(f"{name}: {', '.join(plan.methods)}", len(sp.units)) as tick:
            out.suites[name] = run_suite(lm, sp, store, hparams=hparams, seed=plan.seed, resume=resume, progress=tick)
    if plan.stream:
        b = plan.budget
        for m in plan.methods:
            cfg = RunConfig(method=m, mode="sequential", dataset=b.stream_data, checkpoints=list(b.checkpoints),
                            hparams=dict(plan.hparams), seed=plan.seed, probes=list(b.probes), probe_budget=b.probe_budget)
            with bar(f"collapse: {m}, {len(plan.stream)} sequential edits", len(plan.stream)) as tick:
                out.collapse[m] = run(lm, plan.stream, cfg, store, progress=tick, resume=resume)
    return out


__all__ = ["PitfallsRuns", "run_pitfalls"]
