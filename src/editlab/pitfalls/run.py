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
    notes: dict[str, str] = field(default_factory=dict)  # suite -> why it (or a method of it) did not run


def _no_progress(label: str, total: int) -> ContextManager[Callable[[int, int, str], None]]:
    from contextlib import nullcontext

    return nullcontext(lambda i, n, msg: None)


def run_pitfalls(lm: Any, plan: PitfallsPlan, store: Store, *, resume: bool = False,
                 progress: ProgressFactory | None = None) -> PitfallsRuns:
    from ..runner import run
    from ..suites.runner import run_suite

    bar = progress or _no_progress
    out = PitfallsRuns(notes=dict(plan.notes))
    if plan.stream:  # a probe that cannot run on this model says so now, not after every suite has run
        from ..probes import get_probes

        for probe in get_probes(list(plan.budget.probes), plan.budget.probe_budget):
            probe.check_model(lm)
    hparams = {m: dict(plan.hparams) for m in plan.methods}
    for name, sp in plan.suite_plans.items():
        with bar(f"{name}: {', '.join(plan.methods)}", len(sp.units)) as tick:
            out.suites[name] = run_suite(lm, sp, store, hparams=hparams, seed=plan.seed, resume=resume, progress=tick)
    if plan.stream:
        for m in plan.methods:
            with bar(f"collapse: {m}, {len(plan.stream)} sequential edits", len(plan.stream)) as tick:
                out.collapse[m] = run(lm, plan.stream, _collapse_config(plan, m), store, progress=tick, resume=resume)
    return out


def run_pitfalls_on_ray(model: dict[str, Any], plan: PitfallsPlan, store: Store, spec: Any, *, resume: bool = False,
                        progress: ProgressFactory | None = None) -> PitfallsRuns:
    """`run_pitfalls` on Ray workers (`editlab.distributed`): each suite's units in shards across the
    workers, then the methods' collapse runs side by side (one sequence per task: their order matters).
    The driver is the only writer of `store`, so rows, run ids and `resume` are those of a local run.
    `model` holds `load_lm`'s arguments; the probes are checked against the model by the workers."""
    from ..distributed.driver import run_on_ray, run_suite_on_ray

    bar = progress or _no_progress
    out = PitfallsRuns(notes=dict(plan.notes))
    hparams = {m: dict(plan.hparams) for m in plan.methods}
    for name, sp in plan.suite_plans.items():
        with bar(f"{name}: {', '.join(plan.methods)}", len(sp.units)) as tick:
            out.suites[name] = run_suite_on_ray(model, sp, store, spec, hparams=hparams, seed=plan.seed, resume=resume,
                                                progress=tick)
    if plan.stream:
        configs = [_collapse_config(plan, m) for m in plan.methods]
        with bar(f"collapse: {', '.join(plan.methods)}, {len(plan.stream)} sequential edits each", len(plan.stream)) as tick:
            out.collapse = dict(zip(plan.methods, run_on_ray(model, plan.stream, configs, store, spec, resume, progress=tick)))
    return out


def _collapse_config(plan: PitfallsPlan, method: str) -> Any:
    from ..runner import RunConfig

    b = plan.budget
    return RunConfig(method=method, mode="sequential", dataset=b.stream_data, checkpoints=list(b.checkpoints),
                     hparams=dict(plan.hparams), seed=plan.seed, probes=list(b.probes), probe_budget=b.probe_budget)


__all__ = ["PitfallsRuns", "run_pitfalls", "run_pitfalls_on_ray"]
