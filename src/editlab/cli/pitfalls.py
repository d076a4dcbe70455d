"""`editlab pitfalls`: every pitfall suite and the sequential-collapse probes for one or more methods, in
one HTML report (`editlab.pitfalls`). Every check (methods, hyper-parameters, budget, sections, every
suite's data, the probes' data, the output paths, the database) is answered before the model loads."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import OptionError
from . import options
from .common import (check_hparams_early, check_model_options, check_output_file, console, exit_interrupted,
                     hparam_overrides, load_model, model_args, progress_bar, user_warnings_reported)
from .options import ExecutorOptions, HparamOptions, ModelOptions, OptionGroup, with_option_groups


@dataclass(frozen=True)
class PitfallsOptions(OptionGroup):
    """What `editlab pitfalls` runs (budget, sections) and where its results go."""

    budget: Annotated[str, typer.Option(help="quick (about 15 min for ROME on an idle 2-core CPU) or full (hours; docs/pitfalls.md)")] = "quick"
    only: Annotated[Optional[str], typer.Option(
        help="Comma-separated sections to run (portability, multihop, conflict, distortion, specificity, dialogue, "
             "collapse); default all")] = None
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML report to write")] = Path("pitfalls.html")
    on_bad: Annotated[str, typer.Option(
        "--on-bad", help="Suite records lacking a field a metric needs: skip them (default: counted, warned) or stop")] = "skip"
    db: options.Db = Path("pitfalls.db")
    resume: options.Resume = False
    seed: options.Seed = 0


@with_option_groups
def pitfalls(
    methods: Annotated[str, typer.Option("--method", "--methods", help="Editing method(s), comma-separated")] = options.DEFAULT_METHOD,
    run: PitfallsOptions = PitfallsOptions(),
    model: ModelOptions = ModelOptions(),
    hp: HparamOptions = HparamOptions(),
    executor: ExecutorOptions = ExecutorOptions(),
) -> None:
    """Run every pitfall suite and the collapse probes for METHODS; write one HTML report."""
    from ..pitfalls.plan import plan_pitfalls

    budget, only, out, db, resume, seed = run.budget, run.only, run.out, run.db, run.resume, run.seed
    names = [m.strip() for m in methods.split(",") if m.strip()]
    sections = [s.strip() for s in only.split(",") if s.strip()] if only is not None else None
    if sections is not None and not sections:
        raise OptionError("--only is empty; name at least one section")
    check_model_options(model)
    spec = executor.spec(model)
    overrides = hparam_overrides(hp)
    for m in names:
        check_hparams_early(m, overrides)
    check_output_file(out, "--out")
    with user_warnings_reported():
        plan = plan_pitfalls(names, budget, only=sections, hparams=overrides, seed=seed, on_bad=run.on_bad)
    from ..pitfalls.report import write_pitfalls_report
    from ..pitfalls.run import run_pitfalls, run_pitfalls_on_ray
    from ..runner import Store

    store = Store(db)
    t0 = time.perf_counter()
    try:
        if spec.is_ray:  # rows/s and the workers in the bars' messages
            with user_warnings_reported():
                runs = run_pitfalls_on_ray(model_args(model), plan, store, spec, resume=resume,
                                           progress=lambda label, total: progress_bar(label, total, show_message=True))
        else:
            lm = load_model(model)
            with user_warnings_reported():
                runs = run_pitfalls(lm, plan, store, resume=resume, progress=progress_bar)
    except KeyboardInterrupt:
        exit_interrupted(db)
    path = write_pitfalls_report(db, runs, out, budget=budget, model=model.model, seconds=time.perf_counter() - t0)
    console.print(f"results in {db}; report: {path}")
