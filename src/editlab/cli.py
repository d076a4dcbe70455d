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
err_console = Console(stderr=True)


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


@app.command()
def methods() -> None:
    """List editing methods."""
    from .methods import available_methods

    t = Table(title="methods")
    t.add_column("name")
    t.add_column("description")
    for k, v in available_methods().items():
        t.add_row(k, v)
    console.print(t)


@app.command()
def models() -> None:
    """List named models (any local Hugging Face folder works too)."""
    from .models import MODELS

    t = Table(title="models")
    t.add_column("name")
    t.add_column("description")
    for m in MODELS.values():
        t.add_row(m.name, m.description)
    console.print(t)


@app.command()
def datasets() -> None:
    """List dataset names (resolved under $EDITLAB_DATA, default ../shared/data)."""
    from .data import DATASETS

    t = Table(title="datasets")
    t.add_column("name")
    t.add_column("file")
    t.add_column("description")
    for d in DATASETS.values():
        t.add_row(d.name, d.relpath, d.description)
    console.print(t)


def main() -> None:
    try:
        app()
    except EditlabError as e:  # pragma: no cover - commands catch their own
        err_console.print(f"[bold red]error:[/] {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
