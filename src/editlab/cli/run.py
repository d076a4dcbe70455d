"""`editlab eval | compare | demo`: runs of one or several methods over a dataset, stored in SQLite.

Order of work, cheapest first, so that any user mistake is reported before the model is loaded:
options and hyper-parameters, the data file, the run plan against the number of requests, the
database; then the model, then (with the model) the prompts' length against its context."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import EditlabError, OptionError
from . import options
from .common import (check_hparams_early, check_model_options, exit_interrupted, check_output_file, check_positive, console, err_console,
                     hparam_overrides, load_model, model_args, progress_bar, run_with_progress, summary_table, user_warnings_reported)
from .options import DataOptions, ExecutorOptions, HparamOptions, ModelOptions, RunOptions, with_option_groups

if TYPE_CHECKING:
    from ..runner import RunConfig


def parse_checkpoints(text: str | None) -> list[int]:
    """`--checkpoints` as numbers of edits: integers, increasing, each once, >= 0 (checked against the
    number of requests once the data is read)."""
    from ..runner.config import check_checkpoints

    if not text:
        return []
    try:
        points = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OptionError(f"--checkpoints expects comma-separated integers, got {text!r}") from None
    try:
        check_checkpoints(points)
    except EditlabError as e:
        raise OptionError(f"--checkpoints: {e}") from None
    return points


def parse_probe_options(run: RunOptions) -> list[str]:
    """`--probes` and `--probe-budget`, checked against the probe registry and the data folder (each
    probe's files) before any model loads."""
    from ..probes import BUDGET_NAMES, get_probes, parse_probes

    if run.probe_budget not in BUDGET_NAMES:
        raise OptionError(f"--probe-budget must be one of {', '.join(BUDGET_NAMES)}, got {run.probe_budget!r}")
    if run.probes is None:
        return []
    if run.mode != "sequential":
        raise OptionError("--probes are measured at the checkpoints of a sequential run; add --mode sequential")
    names = parse_probes(run.probes)
    if not names:
        raise OptionError("--probes is empty; name at least one probe (see `editlab probes`)")
    get_probes(names, run.probe_budget)  # data files present
    return names


def read_ppl_text(path: Path | None) -> str:
    """The text whose perplexity a sequential run tracks: the file given, else the built-in corpus."""
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EditlabError(f"cannot read --ppl-text {path}: {getattr(e, 'strerror', None) or e}") from None
        if not text.strip():
            raise EditlabError(f"--ppl-text {path} is empty")
        return text
    from ..stats import get_corpus

    return "\n\n".join(get_corpus().texts[:5])


MAX_BATCH_SIZE = 100_000


def run_configs(methods: list[str], data: DataOptions, hp: HparamOptions, run: RunOptions) -> list[RunConfig]:
    """One `RunConfig` per method from the shared options; every user mistake here raises before any
    model is loaded (the built-in corpus for perplexity is read only when no --ppl-text is given)."""
    from ..methods.catalogue import METHODS, can_batch
    from ..runner.config import MODES, RunConfig

    if not methods:
        raise EditlabError("no method given; name at least one (see `editlab methods`)")
    if run.mode not in MODES:
        raise OptionError(f"unknown --mode {run.mode!r}; use one of {', '.join(MODES)}")
    check_positive("--batch-size", run.batch_size, MAX_BATCH_SIZE)
    overrides = hparam_overrides(hp)
    for m in methods:
        METHODS.resolve(m)
        if run.mode == "batch" and run.batch_size > 1 and not can_batch(m):
            raise OptionError(f"method {m!r} edits one request at a time; use --mode single or a batch method")
        check_hparams_early(m, overrides)
    checkpoints = parse_checkpoints(run.checkpoints)
    if checkpoints and run.mode != "sequential":
        raise OptionError("--checkpoints applies to --mode sequential only")
    probes = parse_probe_options(run)
    text = read_ppl_text(run.ppl_text) if run.mode == "sequential" else None
    return [RunConfig(method=m, mode=run.mode, dataset=data.data, batch_size=run.batch_size, checkpoints=list(checkpoints),
                      hparams=dict(overrides), seed=run.seed, generation=run.generation, fluency=run.fluency, ppl_text=text,
                      probes=list(probes), probe_budget=run.probe_budget)
            for m in methods]


def run_methods(methods: list[str], data: DataOptions, model: ModelOptions, hp: HparamOptions, run: RunOptions,
                executor: ExecutorOptions = ExecutorOptions()) -> None:
    """What `eval` and `compare` do: the same requests and options for each method, then a summary
    (with `--suite`, the suite's own data and protocol: `cli/suites.py`)."""
    if data.suite is not None:
        from .suites import run_suite_methods

        return run_suite_methods(methods, data, model, hp, run, executor)
    if data.on_bad != "stop" or data.suite_set:
        raise OptionError("--on-bad and --suite-set apply to --suite runs only")
    from ..data import load_requests
    from ..runner import Store

    check_model_options(model)
    configs = run_configs(methods, data, hp, run)
    spec = executor.spec(model)
    if data.limit is not None:
        check_positive("--limit", data.limit)
    with user_warnings_reported():
        requests = load_requests(data.data, limit=data.limit, format=data.format)
    for cfg in configs:  # mode, batch size and checkpoints against the number of requests
        cfg.validate(len(requests))
    store = Store(run.db)
    run_ids = execute_runs(model, requests, configs, store, spec, run)
    console.print(summary_table(store, run_ids, f"{data.data} on {model.model}"))
    console.print(f"results in {run.db}; HTML report: editlab report {run.db} -o report.html")


def execute_runs(model: ModelOptions, requests: list[Any], configs: list[RunConfig], store: Any, spec: Any,
                 run: RunOptions, labels: list[str] | None = None) -> list[str]:
    """Carry out the runs on the chosen executor (all user input already checked): on Ray workers, or
    here after loading the model and checking the prompts fit it. Ctrl-C keeps the finished rows."""
    from ..requests import check_fits

    labels = labels or [f"{c.method} ({c.mode})" for c in configs]
    if spec.is_ray:
        return run_ray(model, requests, configs, store, spec, run)
    run_ids: list[str] = []
    try:
        lm = load_model(model)
        with user_warnings_reported():  # a refused sequential edit, a stack that cannot resume: one line each
            check_fits(requests, lm)
            for cfg, label in zip(configs, labels):
                run_ids.append(run_with_progress(lm, requests, cfg, store, run.resume, label))
    except KeyboardInterrupt:
        exit_interrupted(run.db)
    return run_ids


def run_ray(model: ModelOptions, requests: list[Any], configs: list[RunConfig], store: Any, spec: Any, run: RunOptions) -> list[str]:
    """The configs on Ray workers (`editlab.distributed`), with one progress bar for all of them."""
    from ..distributed.driver import run_on_ray

    label = ", ".join(f"{c.method} ({c.mode})" for c in configs)
    try:
        with progress_bar(label, 1, show_message=True) as tick:
            return run_on_ray(model_args(model), requests, configs, store, spec, run.resume, progress=tick)
    except KeyboardInterrupt:
        exit_interrupted(run.db)


@with_option_groups
def eval_(method: options.Method = options.DEFAULT_METHOD, data: DataOptions = DataOptions(),
          model: ModelOptions = ModelOptions(), hp: HparamOptions = HparamOptions(), run: RunOptions = RunOptions(),
          executor: ExecutorOptions = ExecutorOptions()) -> None:
    """Run one method on a dataset and store every row in DB."""
    run_methods([method], data, model, hp, run, executor)


@with_option_groups
def compare(methods: options.Methods = options.DEFAULT_METHODS, data: DataOptions = DataOptions(),
            model: ModelOptions = ModelOptions(), hp: HparamOptions = HparamOptions(), run: RunOptions = RunOptions(),
            executor: ExecutorOptions = ExecutorOptions()) -> None:
    """Run several methods on the same requests (same pre-edit values) and print a comparison."""
    run_methods([m.strip() for m in methods.split(",") if m.strip()], data, model, hp, run, executor)


def demo(
    out: Annotated[Path, typer.Option(help="Folder for runs.db and report.html")] = Path("editlab-demo"),
    n: Annotated[int, typer.Option(help="Built-in facts per method")] = 5,
    sequential: Annotated[int, typer.Option(help="Edits in the sequential run")] = 6,
    model: options.Model = options.DEFAULT_MODEL,
) -> None:
    """The main job: ROME, MEMIT and FT on the built-in facts with the embedded model, single and
    sequential modes; prints a table and writes an HTML report."""
    from ..data import load_requests
    from ..runner.config import RunConfig
    from ..runner.store import Store

    check_positive("--n", n, 10_000)
    check_positive("--sequential", sequential, 10_000)
    check_model_options(ModelOptions(model=model))
    if out.exists() and not out.is_dir():
        raise EditlabError(f"--out {out} is a file; give a folder for runs.db and report.html")
    check_output_file(out / "report.html", "--out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EditlabError(f"cannot create --out folder {out}: {e.strerror or e}") from None
    db = out / "runs.db"
    from ..methods import get_editor  # torch: every check above is answered without it
    from ..report import write_report

    try:
        store = Store(db)
        lm = load_model(ModelOptions(model=model))
        reqs = load_requests("builtin", limit=n)
        seq_reqs = load_requests("builtin", limit=sequential)
        probe = reqs[0]
        before = lm.generate([probe.prompt], 4)[0].strip()
        run_ids = []
        _warm_statistics(lm)
        for m in ("rome", "memit", "ft"):
            cfg = RunConfig(method=m, mode="single", dataset="builtin")
            run_ids.append(run_with_progress(lm, reqs, cfg, store, True, f"{m} single"))
        text = read_ppl_text(None)
        for m in ("rome", "memit"):
            ck = sorted({c for c in (1, 3, sequential) if c <= sequential})
            cfg = RunConfig(method=m, mode="sequential", dataset="builtin", checkpoints=ck, ppl_text=text)
            run_ids.append(run_with_progress(lm, seq_reqs, cfg, store, True, f"{m} sequential"))
        with get_editor("rome").apply(lm, probe) as edit:
            after = edit.lm.generate([probe.prompt], 4)[0].strip()
        console.print(f"\n[bold]{probe.prompt}[/] … before: [yellow]{before}[/]  after ROME -> {probe.target_new!r}: [green]{after}[/]")
        console.print(summary_table(store, run_ids, f"editlab demo: built-in facts on {model}"))
        path = write_report(db, out / "report.html", "editlab demo")
    except KeyboardInterrupt:
        err_console.print(f"[bold yellow]interrupted.[/] Rows so far are kept in {db}; run `editlab demo` again to continue.")
        raise typer.Exit(code=130) from None
    console.print(f"report: {path}")


def _warm_statistics(lm: Any) -> None:
    """Compute the covariance statistics of every layer the demo's ROME and MEMIT edit in one pass over
    the corpus (instead of one pass per method) before the first edit."""
    from ..methods import get_editor
    from ..stats import warm_statistics

    warm_statistics(lm, [get_editor(m).hparams(lm) for m in ("rome", "memit")])
