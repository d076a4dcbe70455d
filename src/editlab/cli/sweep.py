"""`editlab sweep`: run a method over a grid of hyper-parameters and print the Pareto front.

Every grid point is one ordinary run in the result store (the run `editlab eval --set ...` would make,
so `--resume` skips finished points and `editlab report` draws them); the sweep itself is recorded in
the store as `sweep:<id>` (its grid, objectives, runs and front) for the report's Pareto plot. Checked
before the model loads: the grid syntax, every grid point against the method's hyper-parameters, the
objectives, the data and the executor options."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from . import options
from .common import check_model_options, check_positive, console, user_warnings_reported
from .options import DataOptions, ExecutorOptions, HparamOptions, ModelOptions, OptionGroup, RunOptions, with_option_groups

Grid = Annotated[Optional[list[str]], typer.Option(
    "--grid", help="Hyper-parameter and its values, key=v1,v2,... (repeatable; lists in brackets: layers=[3,4],[4,5])")]
Samples = Annotated[Optional[int], typer.Option(help="Draw this many grid points at random (seeded by --seed) instead of all")]
Objectives = Annotated[str, typer.Option(
    "--objective", help="Comma-separated objectives for the Pareto front: efficacy, paraphrase, neighborhood, rewrite, "
                        "rephrase, locality, portability, edit_time")]


@dataclass(frozen=True)
class SweepOptions(OptionGroup):
    """The grid and what its points are scored on."""

    grid: Grid = None
    samples: Samples = None
    objective: Objectives = "efficacy,neighborhood"


@with_option_groups
def sweep(method: options.Method = options.DEFAULT_METHOD, points_: SweepOptions = SweepOptions(),
          data: DataOptions = DataOptions(), model: ModelOptions = ModelOptions(), hp: HparamOptions = HparamOptions(),
          run: RunOptions = RunOptions(), executor: ExecutorOptions = ExecutorOptions()) -> None:
    """Run METHOD over a grid of hyper-parameters on a tuning split; print every point and the Pareto front."""
    grid, samples, objective = points_.grid, points_.samples, points_.objective
    from ..errors import HparamsError, OptionError
    from ..methods.catalogue import METHODS, hparams_class
    from ..sweep import grid_points, parse_grid, parse_objectives, sweep_id
    from .run import execute_runs, run_configs

    if data.suite is not None:
        raise OptionError("sweep runs on --data records; pitfall suites are run with `editlab eval --suite`")
    name = METHODS.resolve(method)
    points = grid_points(parse_grid(grid), samples, seed=run.seed)
    objectives = parse_objectives(objective)
    base = run_configs([name], data, hp, run)[0]
    cls = hparams_class(name)
    seen: dict[str, dict[str, str]] = {}
    for point in points:
        try:
            resolved = json.dumps(cls.from_dict({**base.hparams, **point}).to_dict(), sort_keys=True, default=str)
        except HparamsError as e:
            raise HparamsError(f"--grid point {_show(point)}: {e}") from None
        if resolved in seen:  # e.g. lr=1e-2,0.01: one run twice
            raise OptionError(f"--grid points {_show(seen[resolved])} and {_show(point)} are the same hyper-parameters; "
                              "give each value once")
        seen[resolved] = point
    check_model_options(model)
    spec = executor.spec(model)
    if data.limit is not None:
        check_positive("--limit", data.limit)
    from ..data import load_requests
    from ..runner import Store

    with user_warnings_reported():
        requests = load_requests(data.data, limit=data.limit, format=data.format)
    configs = [dataclasses.replace(base, hparams={**base.hparams, **point}, checkpoints=list(base.checkpoints))
               for point in points]
    for cfg in configs:
        cfg.validate(len(requests))
    store = Store(run.db)
    console.print(f"sweep of {name} on {len(requests)} records of {data.data}: {len(points)} point(s), "
                  f"objectives {', '.join(o.name for o in objectives)}")
    run_ids = execute_runs(model, requests, configs, store, spec, run,
                           labels=[f"{name} {_show(p)}" for p in points])
    sid = sweep_id(name, run_ids, [o.name for o in objectives])
    record = summarize_sweep(store, run_ids, points, objectives)
    store.put_record(f"sweep:{sid}", {"method": name, "dataset": data.data, "n_requests": len(requests),
                                      "mode": base.mode, "base_hparams": base.hparams, "grid_keys": list(points[0]),
                                      "objectives": [o.name for o in objectives], **record})
    console.print(sweep_table(record, [o.name for o in objectives], f"sweep {sid}: {name} on {data.data} ({model.model})"))
    console.print(f"results in {run.db} (record sweep:{sid}); Pareto plot: editlab report {run.db} -o report.html")


def _show(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items())


def summarize_sweep(store: Any, run_ids: list[str], points: list[dict[str, str]], objectives: list[Any]) -> dict[str, Any]:
    """Each point's objective values and whether it is on the Pareto front."""
    from ..sweep import objective_values, pareto_front

    modes = {r["run_id"]: r["mode"] for r in store.runs()}
    values = [objective_values(store.rows(rid), modes[rid], objectives) for rid in run_ids]
    front = pareto_front(values, objectives)
    return {"trials": [{"run_id": rid, "point": p, "values": v, "front": f}
                       for rid, p, v, f in zip(run_ids, points, values, front)]}


def sweep_table(record: dict[str, Any], objectives: list[str], title: str) -> Table:
    from ..sweep import OBJECTIVES

    trials = record["trials"]
    keys = list(trials[0]["point"]) if trials else []
    t = Table(title=title, caption="* on the Pareto front (no other point is at least as good on every objective "
                                   "and better on one); ↑ higher is better, ↓ lower")
    t.add_column("front", justify="center")
    for k in keys:
        t.add_column(k, justify="right")
    for o in objectives:
        t.add_column(o + (" ↑" if OBJECTIVES[o].maximize else " ↓"), justify="right")
    order = sorted(range(len(trials)), key=lambda i: (not trials[i]["front"], i))
    for i in order:
        tr = trials[i]
        t.add_row("*" if tr["front"] else "", *[str(tr["point"][k]) for k in keys],
                  *[("" if tr["values"][o] is None else f"{tr['values'][o]:.3f}") for o in objectives])
    return t
