"""`editlab suites` and the `--suite` path of `eval` / `compare`: pitfall suites run with their own
protocol (`editlab.suites`), every metric printed beside the unedited model's value on the same records.

Everything a user can get wrong (unknown suite or method, a method the protocol cannot use, options that
do not apply to a suite, a missing data file, a record lacking a field) is reported before the model loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.table import Table

from ..errors import EditlabError, OptionError
from .common import check_hparams_early, check_model_options, check_positive, console, exit_interrupted, \
    hparam_overrides, load_model, model_args, progress_bar, user_warnings_reported
from .listing import _table, registry_entries

if TYPE_CHECKING:
    from .options import DataOptions, ExecutorOptions, HparamOptions, ModelOptions, RunOptions


def suites() -> None:
    """List pitfall suites and their metrics (direction, range, unit, source)."""
    from ..suites import METRICS, SUITES, suite_options

    rows = [(e.name, ", ".join(e.aliases), ", ".join(f"{k}={v!r}" for k, v in suite_options(e.name).items()), e.description)
            for e in registry_entries(SUITES)]
    console.print(_table("suites (editlab eval --suite NAME --method M [--suite-set key=value])",
                         ["name", "aliases", "options", "description"], rows))
    arrow = {True: "↑", False: "↓", None: ""}

    def bound(x: Any) -> str:
        return "" if x is None else f"{x:g}"

    mrows = [(e.name, arrow[e.meta["higher_is_better"]], f"{bound(e.meta['lo'])}…{bound(e.meta['hi'])}", e.meta["unit"],
              e.description, e.meta["source"]) for e in registry_entries(METRICS)]
    console.print(_table("metrics", ["metric", "better", "range", "unit", "description", "source"], mrows))


def _check_suite_options(data: DataOptions, run: RunOptions) -> None:
    """Options of plain runs that a suite (which fixes its own data and protocol) cannot honour."""
    from .options import DataOptions as D, RunOptions as R

    clashes = [("--data", data.data != D.data), ("--format", data.format is not None), ("--mode", run.mode != R.mode),
               ("--batch-size", run.batch_size != R.batch_size), ("--checkpoints", run.checkpoints is not None),
               ("--generation", run.generation), ("--fluency (use --suite-set fluency=true)", run.fluency),
               ("--ppl-text", run.ppl_text is not None)]
    bad = [name for name, clash in clashes if clash]
    if bad:
        raise OptionError(f"{', '.join(bad)} cannot be combined with --suite (a suite fixes its own data and protocol); "
                          "drop them, or run without --suite")


def run_suite_methods(methods: list[str], data: DataOptions, model: ModelOptions, hp: HparamOptions, run: RunOptions,
                      executor: ExecutorOptions | None = None) -> None:
    """`eval --suite` / `compare --suite`: plan (all checks), then the model, then the suite, then a table."""
    from ..runner import Store
    from ..suites.runner import plan_suite

    assert data.suite is not None
    from .options import ExecutorOptions

    _check_suite_options(data, run)
    check_model_options(model)
    spec = (executor or ExecutorOptions()).spec(model)
    if data.limit is not None:
        check_positive("--limit", data.limit)
    if data.on_bad not in ("stop", "skip"):
        raise OptionError(f"--on-bad must be stop or skip, got {data.on_bad!r}")
    overrides = hparam_overrides(hp)
    for m in methods:
        check_hparams_early(m, overrides)
    options = {}
    for item in data.suite_set or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise OptionError(f"--suite-set expects key=value, got {item!r}")
        options[key.strip()] = value
    from ..suites import suite_options

    if "seed" in suite_options(data.suite) and "seed" not in options:
        options["seed"] = run.seed  # the run's --seed drives the suite's own sampling (fluency)
    with user_warnings_reported():
        plan = plan_suite(data.suite, methods, limit=data.limit, on_bad=data.on_bad, options=options)
    store = Store(run.db)
    label = f"{plan.suite.name}: {', '.join(methods)}"
    try:
        with user_warnings_reported():  # a unit a method failed on, a fallback: one line each, as they happen
            run_ids = _run_plan(plan, store, spec, model, methods, overrides, run, label)
    except KeyboardInterrupt:
        exit_interrupted(run.db)
    console.print(suite_table(store, run_ids, f"suite {plan.suite.name} on {model.model}"))
    console.print(f"results in {run.db}; HTML report: editlab report {run.db} -o report.html")


def _run_plan(plan: Any, store: Any, spec: Any, model: Any, methods: list[str], overrides: dict[str, Any], run: Any,
              label: str) -> dict[str, str]:
    """Run a checked suite plan on Ray or here, with a progress bar; the run ids per method."""
    hparams = {m: overrides for m in methods}
    if spec.is_ray:
        from ..distributed.driver import run_suite_on_ray

        with progress_bar(label, len(plan.units), show_message=True) as tick:
            return run_suite_on_ray(model_args(model), plan, store, spec, hparams=hparams, seed=run.seed,
                                    resume=run.resume, progress=tick)
    from ..suites.runner import run_suite

    lm = load_model(model)
    with progress_bar(label, len(plan.units)) as tick:
        return run_suite(lm, plan, store, hparams=hparams, seed=run.seed, resume=run.resume, progress=tick)


def suite_table(store: Any, run_ids: dict[str, str], title: str) -> Table:
    """One row per metric, one column per run (the unedited model first), with each metric's direction."""
    from ..suites import get_suite, metric_info
    from ..suites.runner import format_with_se, metric_rows, suite_standard_errors, suite_summary

    runs = {r["run_id"]: r for r in store.runs()}
    first = runs[next(iter(run_ids.values()))]
    suite = get_suite(first["dataset"], (first.get("config") or {}).get("options"))
    summaries = {m: suite_summary(store, rid, suite) for m, rid in run_ids.items()}
    errors = {m: suite_standard_errors(store, rid) for m, rid in run_ids.items()}
    names = metric_rows(list(summaries.values()))
    t = Table(title=title, caption="↑ higher is better, ↓ lower; ± the standard error over records; "
                                   "'unedited' is the same records on the unedited model")
    t.add_column("metric", no_wrap=True)
    for m in summaries:
        t.add_column(m, justify="right")
    for name in names:
        try:
            better = {True: " ↑", False: " ↓", None: ""}[metric_info(name).higher_is_better]
        except EditlabError:  # a metric without metadata still prints
            better = ""
        t.add_row(name + better, *[("" if name not in s else format_with_se(s[name], errors[m].get(name)))
                                   for m, s in summaries.items()])
    t.add_row("records", *[f"{int(s['n'])}" for s in summaries.values()])
    if any("errors" in s for s in summaries.values()):
        t.add_row("errors (left out)", *[f"{int(s.get('errors', 0))}" for s in summaries.values()])
    t.add_row("s/edit (median)", *[("" if "s_per_edit" not in s else f"{s['s_per_edit']:.2f}") for s in summaries.values()])
    return t


__all__ = ["run_suite_methods", "suite_table", "suites"]
