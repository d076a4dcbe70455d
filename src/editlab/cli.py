"""Command-line interface: `editlab edit | methods | models | datasets`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import EditlabError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Edit the factual knowledge of language models and measure what editing breaks.")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`--set key=value` pairs (values stay strings; Hparams coerce and validate them)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise EditlabError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def load_hparams_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise EditlabError(f"cannot read hparams file {path}: {e}") from None
    if not isinstance(data, dict):
        raise EditlabError(f"hparams file {path} must hold a mapping of key: value")
    return data


def _fail(e: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(code=2)


@app.command()
def edit(
    prompt: str = typer.Option(..., help="Prompt containing the subject, e.g. 'The Eiffel Tower is located in the city of'"),
    subject: str = typer.Option(..., help="Subject inside the prompt"),
    target: str = typer.Option(..., help="New answer the edited model should give"),
    model: str = typer.Option("smollm2-135m", help="Model name or local path"),
    method: str = typer.Option("rome", help="Editing method (see `editlab methods`)"),
    target_true: Optional[str] = typer.Option(None, help="Current answer (optional, checked to differ)"),
    related: list[str] = typer.Option([], help="Extra related prompts to show before/after"),
    unrelated: list[str] = typer.Option([], help="Extra unrelated prompts to show before/after"),
    set_: list[str] = typer.Option([], "--set", help="Hparam override key=value (repeatable)"),
    hparams: Optional[Path] = typer.Option(None, help="YAML file of hparam overrides"),
    device: str = typer.Option("cpu", help="Device, e.g. cpu or cuda"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    max_new_tokens: int = typer.Option(12, help="Tokens generated per completion"),
    save: Optional[Path] = typer.Option(None, help="Directory to save the edit (safetensors + manifest)"),
) -> None:
    """Apply one edit and print before/after completions of the prompt and of related/unrelated prompts."""
    import time

    from .methods import get_editor
    from .models import load_lm
    from .requests import EditRequest

    try:
        req = EditRequest.create(prompt, subject, target, target_true)
        editor = get_editor(method)
        overrides = {**load_hparams_file(hparams), **parse_sets(set_)}
        with console.status(f"loading {model}"):
            lm = load_lm(model, device=device, dtype=dtype)
        hp = editor.hparams(lm, **overrides)
        rel = list(related) or [f"{subject} is", f"Where is {subject}? It is in"]
        unrel = list(unrelated) or ["The capital of France is", "The Colosseum is located in the city of"]
        probes = [("edited", req.prompt)] + [("related", p) for p in rel] + [("unrelated", p) for p in unrel]
        before = lm.generate([p for _, p in probes], max_new_tokens)
        t0 = time.perf_counter()
        result = editor.apply(lm, req, hp)
        elapsed = time.perf_counter() - t0
        after = lm.generate([p for _, p in probes], max_new_tokens)
    except EditlabError as e:
        _fail(e)
        return
    table = Table(title=f"{method} on {model}: {subject!r} -> {target!r}  ({elapsed:.1f} s)")
    table.add_column("kind", style="dim")
    table.add_column("prompt")
    table.add_column("before", style="yellow")
    table.add_column("after", style="green")
    for (kind, p), b, a in zip(probes, before, after):
        table.add_row(kind, p, b.strip().replace("\n", " "), a.strip().replace("\n", " "))
    console.print(table)
    if save:
        result.save(save)
        console.print(f"saved edit to {save}")
    result.restore()


def _progress_runner(lm: Any, requests: list[Any], cfg: Any, store: Any, resume: bool, label: str) -> str:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .runner import run

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False) as prog:
        task = prog.add_task(label, total=len(requests))
        return run(lm, requests, cfg, store, progress=lambda i, n, msg: prog.update(task, completed=i), resume=resume)


def _parse_checkpoints(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EditlabError(f"--checkpoints expects comma-separated integers, got {text!r}") from None


def _summary_table(store: Any, run_ids: list[str], title: str) -> Table:
    from .eval import summarize

    keys = ["efficacy_score", "paraphrase_score", "neighborhood_score", "rewrite_acc", "rephrase_acc", "locality_acc", "portability_acc"]
    short = ["ES", "PS", "NS", "rw", "rph", "loc", "port"]
    t = Table(title=title, caption="ES/PS/NS: CounterFact efficacy/paraphrase/neighbourhood scores; rw/rph/loc/port: "
              "rewrite/rephrase/locality/portability token accuracy; sequential rows: all edits so far")
    for c in ["run", "n", "s/edit"] + short:
        t.add_column(c, justify="right" if c != "run" else "left", no_wrap=c == "run")
    runs = {r["run_id"]: r for r in store.runs()}
    for rid in run_ids:
        rows = [r for r in store.rows(rid)]
        run = runs[rid]
        if run["mode"] == "sequential":
            pts = [r for r in rows if r.kind == "checkpoint"]
            if not pts:
                continue
            last = max(pts, key=lambda r: r.n_edits)
            s = {k: last.metrics.get(f"retention_{k}") for k in keys}
            label = f"{run['method']} seq"
            times = [r.edit_s for r in pts]
            n_shown = last.n_edits
        else:
            s = summarize(r.metrics for r in rows)
            label = f"{run['method']} {run['mode']}"
            times = sorted(r.edit_s for r in rows if r.edit_s is not None)
            n_shown = len(rows)
        med = f"{sorted(times)[len(times) // 2]:.1f}" if times else ""
        t.add_row(label, str(n_shown), med, *[("" if s.get(k) is None else f"{s[k]:.2f}") for k in keys])
    return t


def _load_for_run(model: str, device: str, dtype: str) -> Any:
    from .models import load_lm

    with console.status(f"loading {model}"):
        return load_lm(model, device=device, dtype=dtype)


@app.command("eval")
def eval_(
    method: str = typer.Option("rome", help="Editing method"),
    data: str = typer.Option("builtin", help="Dataset name (see `editlab datasets`) or file path"),
    model: str = typer.Option("smollm2-135m", help="Model name or local path"),
    limit: Optional[int] = typer.Option(None, help="Use the first N requests"),
    format: Optional[str] = typer.Option(None, help="File format if it cannot be detected"),
    mode: str = typer.Option("single", help="single | batch | sequential"),
    batch_size: int = typer.Option(1, help="Requests per edit in batch mode"),
    checkpoints: Optional[str] = typer.Option(None, help="Sequential mode: e.g. 1,10,50"),
    db: Path = typer.Option(Path("runs.db"), help="SQLite result database"),
    resume: bool = typer.Option(False, help="Continue an interrupted run in the same database"),
    set_: list[str] = typer.Option([], "--set", help="Hparam override key=value"),
    hparams: Optional[Path] = typer.Option(None, help="YAML file of hparam overrides"),
    generation: bool = typer.Option(False, help="Also compute generation exact match"),
    ppl_text: Optional[Path] = typer.Option(None, help="Sequential mode: text file for perplexity (default: the built-in corpus)"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    seed: int = typer.Option(0),
) -> None:
    """Run one method on a dataset and store every row in DB."""
    _run_methods([method], data, model, limit, format, mode, batch_size, checkpoints, db, resume, set_, hparams,
                 generation, ppl_text, device, dtype, seed)


@app.command()
def compare(
    methods: str = typer.Option("ft,rome,memit", help="Comma-separated methods"),
    data: str = typer.Option("builtin"),
    model: str = typer.Option("smollm2-135m"),
    limit: Optional[int] = typer.Option(None),
    format: Optional[str] = typer.Option(None),
    mode: str = typer.Option("single"),
    batch_size: int = typer.Option(1),
    checkpoints: Optional[str] = typer.Option(None),
    db: Path = typer.Option(Path("runs.db")),
    resume: bool = typer.Option(False),
    generation: bool = typer.Option(False),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    seed: int = typer.Option(0),
) -> None:
    """Run several methods on the same requests (same pre-edit values) and print a comparison."""
    _run_methods([m.strip() for m in methods.split(",") if m.strip()], data, model, limit, format, mode, batch_size,
                 checkpoints, db, resume, [], None, generation, None, device, dtype, seed)


def _ppl_text(path: Path | None) -> str:
    if path is not None:
        try:
            return path.read_text(encoding="utf-8")
        except OSError as e:
            raise EditlabError(f"cannot read {path}: {e}") from None
    from .stats import get_corpus

    return "\n\n".join(get_corpus().texts[:5])


def _run_methods(methods_: list[str], data: str, model: str, limit: Optional[int], format: Optional[str], mode: str,
                 batch_size: int, checkpoints: Optional[str], db: Path, resume: bool, set_: list[str],
                 hparams: Optional[Path], generation: bool, ppl_text: Optional[Path], device: str, dtype: str, seed: int) -> None:
    import warnings

    from .data import load_requests
    from .methods import get_editor
    from .runner import RunConfig, Store

    run_ids: list[str] = []
    store = None
    try:
        for m in methods_:
            get_editor(m)  # unknown methods fail before anything is loaded
        overrides = {**load_hparams_file(hparams), **parse_sets(set_)}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            requests = load_requests(data, limit=limit, format=format)
        for w in caught:
            err_console.print(f"[yellow]warning:[/] {w.message}")
        store = Store(db)
        lm = _load_for_run(model, device, dtype)
        text = _ppl_text(ppl_text) if mode == "sequential" else None
        for m in methods_:
            cfg = RunConfig(method=m, mode=mode, dataset=data, batch_size=batch_size,
                            checkpoints=_parse_checkpoints(checkpoints), hparams=overrides, seed=seed,
                            generation=generation, ppl_text=text)
            run_ids.append(_progress_runner(lm, requests, cfg, store, resume, f"{m} ({mode})"))
    except EditlabError as e:
        _fail(e)
        return
    except KeyboardInterrupt:
        err_console.print(f"[bold yellow]interrupted.[/] Finished rows are kept in {db}; continue with the same command plus --resume.")
        raise typer.Exit(code=130)
    console.print(_summary_table(store, run_ids, f"{data} on {model}"))
    console.print(f"results in {db}; HTML report: editlab report {db} -o report.html")


@app.command()
def export(
    db: Path = typer.Argument(..., help="Result database"),
    format: str = typer.Option("csv", help="csv | json"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output file (default: stdout)"),
) -> None:
    """Write every row with its metrics as CSV or JSON."""
    import csv
    import io
    import json

    from .runner import Store

    try:
        if not db.exists():
            raise EditlabError(f"database {db} does not exist")
        records = Store(db).export_records()
        if format == "json":
            text = json.dumps(records, indent=2)
        elif format == "csv":
            cols: list[str] = []
            for r in records:
                cols += [k for k in r if k not in cols]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=cols)
            w.writeheader()
            w.writerows(records)
            text = buf.getvalue()
        else:
            raise EditlabError(f"unknown export format {format!r}; use csv or json")
    except EditlabError as e:
        _fail(e)
        return
    if out:
        out.write_text(text)
        console.print(f"wrote {len(records)} rows to {out}")
    else:
        sys.stdout.write(text)


@app.command()
def report(
    db: Path = typer.Argument(..., help="Result database"),
    out: Path = typer.Option(Path("report.html"), "-o", "--out", help="HTML file to write"),
    title: str = typer.Option("editlab report"),
) -> None:
    """Write one self-contained HTML report (tables and embedded plots)."""
    from .report import write_report

    try:
        if not db.exists():
            raise EditlabError(f"database {db} does not exist")
        path = write_report(db, out, title)
    except EditlabError as e:
        _fail(e)
        return
    console.print(f"wrote {path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("editlab-demo"), help="Folder for runs.db and report.html"),
    n: int = typer.Option(10, help="Built-in facts per method"),
    sequential: int = typer.Option(12, help="Edits in the sequential run"),
    model: str = typer.Option("smollm2-135m"),
) -> None:
    """The main job: FT, ROME and MEMIT on the built-in facts with the embedded model, single and
    sequential modes; prints a table and writes an HTML report."""
    from .data import load_requests
    from .report import write_report
    from .runner import RunConfig, Store

    out.mkdir(parents=True, exist_ok=True)
    db = out / "runs.db"
    try:
        store = Store(db)
        lm = _load_for_run(model, "cpu", "float32")
        reqs = load_requests("builtin", limit=n)
        seq_reqs = load_requests("builtin", limit=sequential)
        probe = reqs[0]
        before = lm.generate([probe.prompt], 4)[0].strip()
        run_ids = []
        for m in ("ft", "rome", "memit"):
            cfg = RunConfig(method=m, mode="single", dataset="builtin")
            run_ids.append(_progress_runner(lm, reqs, cfg, store, True, f"{m} single"))
        text = _ppl_text(None)
        for m in ("rome", "memit"):
            ck = sorted({c for c in (1, 4, 8, sequential) if c <= sequential})
            cfg = RunConfig(method=m, mode="sequential", dataset="builtin", checkpoints=ck, ppl_text=text)
            run_ids.append(_progress_runner(lm, seq_reqs, cfg, store, True, f"{m} sequential"))
        from .methods import get_editor

        with get_editor("rome").apply(lm, probe):
            after = lm.generate([probe.prompt], 4)[0].strip()
        console.print(f"\n[bold]{probe.prompt}[/] … before: [yellow]{before}[/]  after ROME -> {probe.target_new!r}: [green]{after}[/]")
        console.print(_summary_table(store, run_ids, f"editlab demo: built-in facts on {model}"))
        path = write_report(db, out / "report.html", "editlab demo")
    except EditlabError as e:
        _fail(e)
        return
    except KeyboardInterrupt:
        err_console.print(f"[bold yellow]interrupted.[/] Rows so far are kept in {db}; run `editlab demo` again to continue.")
        raise typer.Exit(code=130)
    console.print(f"report: {path}")


@app.command()
def methods() -> None:
    """List editing methods."""
    from .methods import available_methods

    _print_listing("methods", ["name", "description"], list(available_methods().items()))


@app.command()
def models() -> None:
    """List named models (any local Hugging Face folder works too)."""
    from .models import MODELS

    _print_listing("models", ["name", "description"], [(m.name, m.description) for m in MODELS.values()])


@app.command()
def datasets() -> None:
    """List dataset names (resolved under $EDITLAB_DATA, default ../shared/data)."""
    from .data import DATASETS

    _print_listing("datasets", ["name", "file", "description"], [(d.name, d.relpath, d.description) for d in DATASETS.values()])


def _print_listing(title: str, columns: list[str], rows: list[tuple[str, ...]]) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    console.print(t)


def main() -> None:
    try:
        app()
    except EditlabError as e:  # pragma: no cover - commands catch their own
        err_console.print(f"[bold red]error:[/] {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
