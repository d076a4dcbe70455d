"""Runs a suite for one or several methods, writing one row per (method, unit) to the result store.

Order of work: units outer, methods inner. For each unit the unedited model is scored once
(`suite.unedited`), stored as a row of the suite's `unedited` run and reused by every method; each
method's protocol then runs on the same unit and the model is restored (every edit undone, newest
first) before the next method. So pre-edit values are computed once per unit, whatever the number of
methods, and a resumed run (`resume=True`) skips the (method, unit) rows already stored.

Rows: `kind="suite"` (or `"error"` with the message, when the method raised an `EditlabError` on that
unit, or the suite refuses the unit for that method without editing, `Suite.refuses_unit`: the run goes
on, the unit is left out of that method's means and counted), `row_key` = the unit's key, `n_edits` = edit calls the protocol made, `edit_s` =
seconds spent inside them, `eval_s` = the rest of the protocol's time (scoring). Runs: `mode="suite"`,
`dataset` = the suite name; the run's config records the suite's files with their SHA-256, the limit
and `on_bad`.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

from ..errors import EditlabError
from ..paths import data_dir
from ..runner.store import Row, Store
from .base import Editing, Suite, SuiteError, Unit

UNEDITED = "unedited"
EXTRAS = ("n", "errors", "s_per_edit")  # what suite_summary adds beside the metrics
Progress = Callable[[int, int, str], None]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _TimedEditing(Editing):
    """`Editing` that adds up the seconds spent inside edit calls."""

    edit_s = 0.0

    def _apply(self, reqs: list[Any]) -> None:
        t0 = time.perf_counter()
        try:
            super()._apply(reqs)
        finally:
            self.edit_s += time.perf_counter() - t0


@dataclass
class SuitePlan:
    """Everything checked before the model loads: the suite, its data (read and parsed), the methods."""

    suite: Suite
    units: list[Unit]
    methods: list[str]
    data: dict[str, dict[str, str]]  # split -> {"path": ..., "sha256": ...}
    limit: int | None
    on_bad: str
    options: dict[str, Any] = field(default_factory=dict)


def plan_suite(name: str, methods: Sequence[str], *, limit: int | None = None, root: Path | None = None,
               on_bad: str = "stop", options: Mapping[str, Any] | None = None) -> SuitePlan:
    """Resolve the suite (built with `options`, see `editlab.suites.get_suite`) and methods, check the
    protocol against each method and read the data. Raises the named errors (unknown suite, option or
    method, missing file, record lacking a field) without a model."""
    from . import get_suite

    suite = get_suite(name, options)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise SuiteError(f"limit must be a positive integer, got {limit!r}")
    if not methods:
        raise SuiteError("no method given; name at least one (see `editlab methods`)")
    if len(set(methods)) != len(methods):
        raise SuiteError(f"a method is named twice in {list(methods)}; name each once")
    if UNEDITED in methods:
        raise SuiteError(f"{UNEDITED!r} is the suite's own baseline row and always computed; it is not a method")
    from ..methods import get_editor  # torch: the checks above are answered without it

    for m in methods:
        suite.check_method(get_editor(m))
    root = root or data_dir()
    paths = suite.data_paths(root)
    units = suite.load(root, limit, on_bad=on_bad)
    if not units:
        raise SuiteError(f"suite {suite.name!r}: no usable records in {', '.join(str(p) for p in paths.values())}")
    keys = [u.key for u in units]
    if len(set(keys)) != len(keys):
        raise SuiteError(f"suite {suite.name!r} produced duplicate unit keys (a bug in the suite)")
    data = {s: {"path": str(p), "sha256": file_sha256(p)} for s, p in paths.items()}
    return SuitePlan(suite, units, list(methods), data, limit, on_bad, dict(options or {}))


def _run_id(lm: Any, plan: SuitePlan, method: str, hparams: Mapping[str, Any], seed: int) -> str:
    key = {"model": lm.base_fingerprint, "suite": plan.suite.name, "method": method, "hparams": dict(hparams),
           "data": {s: d["sha256"] for s, d in plan.data.items()}, "limit": plan.limit, "on_bad": plan.on_bad, "seed": seed,
           **({"options": plan.options} if plan.options else {})}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{method}-suite-{plan.suite.name}-{digest}"


def suite_runs(lm: Any, plan: SuitePlan, hparams: Mapping[str, Mapping[str, Any]] | None = None,
               seed: int = 0) -> tuple[dict[str, tuple[str, dict[str, Any]]], dict[str, Any]]:
    """The runs a suite fills, without running anything: ({method or "unedited": (run id, the fields
    of its runs row)}, {method: resolved Hparams}). The same ids wherever it is computed."""
    from ..methods import get_editor
    from ..runner.runner import versions

    suite, units = plan.suite, plan.units
    hparams = hparams or {}
    hps = {m: get_editor(m).hparams(lm, **dict(hparams.get(m, {}))) for m in plan.methods}
    config = {"suite": suite.name, "data": plan.data, "limit": plan.limit, "on_bad": plan.on_bad,
              "options": plan.options, "protocol": suite.protocol}
    vers = versions()
    runs: dict[str, tuple[str, dict[str, Any]]] = {}
    for m in [UNEDITED, *plan.methods]:
        hp = hps[m].to_dict() if m in hps else {}
        runs[m] = (_run_id(lm, plan, m, hps[m].identity() if m in hps else {}, seed),
                   dict(model=lm.name, model_fingerprint=lm.base_fingerprint, method=m, mode="suite", dataset=suite.name,
                        n_requests=len(units), seed=seed, hparams=hp, config=config, versions=vers))
    return runs, hps


def units_left(units: Sequence[Any], done: Collection[str]) -> bool:
    """Whether some of `units` lacks its row in `done` (one method's done keys): the rule that makes a
    suite method need its editor."""
    return any(u.key not in done for u in units)


def check_resume(store: Any, runs: Mapping[str, tuple[str, dict[str, Any]]], resume: bool) -> dict[str, str]:
    """Create the suite's runs in `store`; without `resume`, refuse a method run that already has rows.
    Returns {method or "unedited": run id}."""
    run_ids: dict[str, str] = {}
    for m, (rid, fields) in runs.items():
        existed = store.ensure_run(rid, **fields)
        if existed and not resume and m != UNEDITED and store.done_keys(rid):
            raise EditlabError(f"run {rid} already has rows in {store.path}; pass --resume to continue it")
        run_ids[m] = rid
    return run_ids


def run_suite(lm: Any, plan: SuitePlan, store: Store, *, hparams: Mapping[str, Mapping[str, Any]] | None = None,
              seed: int = 0, resume: bool = True, progress: Progress | None = None,
              only: Collection[str] | None = None) -> dict[str, str]:
    """Run `plan` on `lm`; returns {method or "unedited": run id}. `hparams` maps a method to its
    overrides. `only` restricts the work to the units with these keys (the runs stay the whole
    suite's, so shards run anywhere fill the same runs). The model is restored after every unit; it
    must carry no edits when called."""
    from ..methods import get_editor, restore_all

    if lm.active_edits:
        raise EditlabError("the model carries active edits; restore them before running a suite")
    suite = plan.suite
    keys = None if only is None else set(only)
    units = plan.units if keys is None else [u for u in plan.units if u.key in keys]
    runs, hps = suite_runs(lm, plan, hparams, seed)
    editors = {m: get_editor(m) for m in plan.methods}
    for m in plan.methods:  # e.g. a learned editor never trained: one error now, before the store is touched
        if units_left(units, store.done_keys(runs[m][0])):
            editors[m].check_ready(lm, hps[m])
    run_ids = check_resume(store, runs, resume)
    for m in plan.methods:
        for note in suite.method_notes(m, hps[m], plan.units):
            warnings.warn(note, stacklevel=2)
    done = {m: store.done_keys(rid) for m, rid in run_ids.items()}
    refused: set[tuple[str, str]] = set()
    tick = progress or (lambda i, n, msg: None)
    try:
        for n, unit in enumerate(units, 1):
            todo = [m for m in plan.methods if unit.key not in done[m]]
            if not todo and unit.key in done[UNEDITED]:
                tick(n, len(units), "skipped (done)")
                continue
            t0 = time.perf_counter()
            pre_metrics, state = suite.unedited(lm, unit)
            if unit.key not in done[UNEDITED]:
                store.add_row(Row(run_ids[UNEDITED], unit.key, unit.key, "suite", 0, None, time.perf_counter() - t0,
                                  pre_metrics))
            for m in todo:
                refusal = suite.refuses_unit(editors[m], unit)
                if refusal is not None:  # recorded like a failure, without touching the model
                    if (m, unit.split) not in refused:
                        refused.add((m, unit.split))
                        warnings.warn(f"{m} is not run on {suite.name} {unit.split} units: {refusal} (recorded, "
                                      "left out of the means)", stacklevel=2)
                    store.add_row(Row(run_ids[m], unit.key, unit.key, "error", 0, None, 0.0,
                                      {"error": f"not run: {refusal}"}))  # type: ignore[dict-item]
                    continue
                editing = _TimedEditing(lm, m, hps[m])
                t1 = time.perf_counter()
                failure = None
                try:
                    metrics = suite.edited(editing, unit, state)
                except EditlabError as e:  # this method cannot edit this unit (e.g. KN finds no neuron)
                    failure = f"{type(e).__name__}: {e}"
                finally:
                    editing.undo(0)
                total = time.perf_counter() - t1
                if lm.active_edits:
                    raise EditlabError(f"suite {suite.name!r} left edits on the model after unit {unit.key} (a bug)")
                per_edit = editing.edit_s / editing.n_edits if editing.n_edits else None
                if failure is not None:
                    warnings.warn(f"{m} failed on {suite.name} unit {unit.key}: {failure} (recorded, left out of the means)",
                                  stacklevel=2)
                    store.add_row(Row(run_ids[m], unit.key, unit.key, "error", editing.n_edits, per_edit,
                                      total - editing.edit_s, {"error": failure}))  # type: ignore[dict-item]
                    continue
                store.add_row(Row(run_ids[m], unit.key, unit.key, "suite", editing.n_edits, per_edit,
                                  total - editing.edit_s, metrics))
            tick(n, len(units), f"{suite.name} {n}/{len(units)}")
    finally:
        restore_all(lm)
    return run_ids


def suite_summary(store: Store, run_id: str, suite: Suite | None = None) -> dict[str, float]:
    """Dataset values of one suite run (the suite's own aggregation), plus `n` (units scored), `errors`
    (units the method could not edit, recorded as error rows and left out of every mean) and, for edited
    runs, the median seconds per edit call."""
    from . import get_suite

    run = next((r for r in store.runs() if r["run_id"] == run_id), None)
    if run is None:
        raise EditlabError(f"no run {run_id!r} in {store.path}")
    suite = suite or get_suite(run["dataset"], (run.get("config") or {}).get("options"))
    everything = list(store.rows(run_id))
    rows = [r for r in everything if r.kind != "error"]
    out = suite.summarize([r.metrics for r in rows])
    out["n"] = float(len(rows))
    if len(rows) < len(everything):
        out["errors"] = float(len(everything) - len(rows))
    times = [r.edit_s for r in rows if r.edit_s is not None]
    if times:
        out["s_per_edit"] = statistics.median(times)
    return out


def suite_standard_errors(store: Store, run_id: str) -> dict[str, float]:
    """Standard error sd/√n of every metric the run's units hold (sample sd over the units that have it,
    at least two), as the spec's aggregation rule asks beside each mean. Dataset-level values that are
    not a mean over units (harmonic-mean Scores) have none."""
    import math

    values: dict[str, list[float]] = {}
    for r in store.rows(run_id):
        if r.kind == "error":
            continue
        for k, v in r.metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values.setdefault(k, []).append(float(v))
    out = {}
    for k, xs in values.items():
        if len(xs) >= 2 and all(math.isfinite(x) for x in xs):  # an infinite mean has no standard error
            mean = sum(xs) / len(xs)
            out[k] = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
    return out


def format_with_se(value: float, se: float | None) -> str:
    """`0.8438 ± 0.031`: a dataset value and its standard error, as suite tables print them."""
    return f"{value:.4g}" if se is None else f"{value:.4g} ± {se:.2g}"


def metric_rows(summaries: Sequence[Mapping[str, float]]) -> list[str]:
    """The metric names of several summaries in first-seen order, without the `EXTRAS`."""
    return [k for k in dict.fromkeys(k for s in summaries for k in s) if k not in EXTRAS]


__all__ = ["EXTRAS", "SuitePlan", "UNEDITED", "format_with_se", "metric_rows", "plan_suite", "run_suite",
           "suite_standard_errors", "suite_summary"]
