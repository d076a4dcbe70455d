"""`editlab eval | compare | demo`: runs of one or several methods over a dataset, stored in SQLite."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import EditlabError
from . import options
from .common import console, err_console, hparam_overrides, load_model, run_with_progress, summary_table, user_warnings_reported
from .options import DataOptions, HparamOptions, ModelOptions, RunOptions, with_option_groups

if TYPE_CHECKING:
    from ..runner import RunConfig


def parse_checkpoints(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EditlabError(f"--checkpoints expects comma-separated integers, got {text!r}") from None


def read_ppl_text(path: Path | None) -> str:
    """The text whose perplexity a sequential run tracks: the file given, else the built-in corpus."""
    if path is not None:
        try:
            return path.read_text(encoding="utf-8")
        except OSError as e:
            raise EditlabError(f"cannot read {path}: {e}") from None
    from ..stats import get_corpus

    return "\n\n".join(get_corpus().texts[:5])


def run_configs(methods: list[str], data: DataOptions, hp: HparamOptions, run: RunOptions) -> list[RunConfig]:
    """One `RunConfig` per method from the shared options; every user mistake here raises before any
    model is loaded (the built-in corpus for perplexity is read only when no --ppl-text is given)."""
    from ..methods import get_editor
    from ..runner import RunConfig

    if not methods:
        raise EditlabError("no method given; name at least one (see `editlab methods`)")
    for m in methods:
        get_editor(m)
    overrides = hparam_overrides(hp)
    checkpoints = parse_checkpoints(run.checkpoints)
    text = read_ppl_text(run.ppl_text) if run.mode == "sequential" else None
    return [RunConfig(method=m, mode=run.mode, dataset=data.data, batch_size=run.batch_size, checkpoints=list(checkpoints),
                      hparams=dict(overrides), seed=run.seed, generation=run.generation, fluency=run.fluency, ppl_text=text)
            for m in methods]


def run_methods(methods: list[str], data: DataOptions, model: ModelOptions, hp: HparamOptions, run: RunOptions) -> None:
    """What `eval` and `compare` do: the same requests and options for each method, then a summary."""
    from ..data import load_requests
    from ..runner import Store

    configs = run_configs(methods, data, hp, run)
    with user_warnings_reported():
        requests = load_requests(data.data, limit=data.limit, format=data.format)
    store = Store(run.db)
    run_ids: list[str] = []
    try:
        lm = load_model(model)
        for cfg in configs:
            run_ids.append(run_with_progress(lm, requests, cfg, store, run.resume, f"{cfg.method} ({cfg.mode})"))
    except KeyboardInterrupt:
        err_console.print(f"[bold yellow]interrupted.[/] Finished rows are kept in {run.db}; continue with the same "
                          "command plus --resume.")
        raise typer.Exit(code=130) from None
    console.print(summary_table(store, run_ids, f"{data.data} on {model.model}"))
    console.print(f"results in {run.db}; HTML report: editlab report {run.db} -o report.html")


@with_option_groups
def eval_(method: options.Method = options.DEFAULT_METHOD, data: DataOptions = DataOptions(),
          model: ModelOptions = ModelOptions(), hp: HparamOptions = HparamOptions(), run: RunOptions = RunOptions()) -> None:
    """Run one method on a dataset and store every row in DB."""
    run_methods([method], data, model, hp, run)


@with_option_groups
def compare(methods: options.Methods = options.DEFAULT_METHODS, data: DataOptions = DataOptions(),
            model: ModelOptions = ModelOptions(), hp: HparamOptions = HparamOptions(), run: RunOptions = RunOptions()) -> None:
    """Run several methods on the same requests (same pre-edit values) and print a comparison."""
    run_methods([m.strip() for m in methods.split(",") if m.strip()], data, model, hp, run)


def demo(
    out: Annotated[Path, typer.Option(help="Folder for runs.db and report.html")] = Path("editlab-demo"),
    n: Annotated[int, typer.Option(help="Built-in facts per method")] = 5,
    sequential: Annotated[int, typer.Option(help="Edits in the sequential run")] = 6,
    model: options.Model = options.DEFAULT_MODEL,
) -> None:
    """The main job: ROME, MEMIT and FT on the built-in facts with the embedded model, single and
    sequential modes; prints a table and writes an HTML report."""
    from ..data import load_requests
    from ..methods import get_editor
    from ..report import write_report
    from ..runner import RunConfig, Store

    out.mkdir(parents=True, exist_ok=True)
    db = out / "runs.db"
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
    from ..stats import second_moments

    rome, memit = get_editor("rome").hparams(lm), get_editor("memit").hparams(lm)
    if (rome.corpus, rome.mom2_n_tokens) == (memit.corpus, memit.mom2_n_tokens):
        second_moments(lm, {rome.layer, *memit.layers}, rome.corpus, rome.mom2_n_tokens)
