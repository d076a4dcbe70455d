"""What the command groups share: consoles, error reporting, the quiet-warnings entry, model loading
with a spinner, the progress-bar runner, the summary table, hyper-parameter parsing, and the early
checks every command runs before anything expensive (model options, hyper-parameters, output paths).

Early checks exist so that a mistake costs well under a second instead of a 20-60 s model load (or a
whole edit): each raises a named `EditlabError`, which the CLI prints as one line with exit status 2.
Checks that need the model itself (layer indices against the model's depth, prompt length against its
context) run right after it is loaded, still before any edit."""

from __future__ import annotations

import os
import re
import statistics
import sys
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from ..errors import EditlabError, HparamsError, OptionError, OutputPathError
from .options import HparamOptions, ModelOptions

if TYPE_CHECKING:
    from ..models import LM
    from ..runner import RunConfig, Store

console = Console()
err_console = Console(stderr=True, soft_wrap=True, highlight=False)

# Categories aimed at developers of the libraries underneath (transformers and torch announce
# renamed arguments this way); a CLI user can do nothing about them.
LIBRARY_NOISE: tuple[type[Warning], ...] = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _control_flow_exceptions() -> tuple[type[BaseException], ...]:
    """Exceptions that carry an exit code or a usage message and must reach the command-line framework.
    Recent typer versions vendor click with their own exception classes; older ones use click's."""
    kinds: list[type[BaseException]] = [typer.Exit, typer.Abort]
    try:
        from typer.exceptions import TyperException

        kinds.append(TyperException)
    except ImportError:
        pass
    try:
        import click

        kinds += [click.exceptions.Exit, click.ClickException, click.Abort]
    except ImportError:
        pass
    return tuple(kinds)


_CONTROL_FLOW = _control_flow_exceptions()


# --- errors ----------------------------------------------------------------------------------------------
def one_line(message: str) -> str:
    return re.sub(r"\s*\n\s*", " ", message.strip())


def print_error(message: str) -> None:
    err_console.print(Text.assemble(("error:", "bold red"), " ", one_line(message)))


def print_warning(message: str) -> None:
    err_console.print(Text.assemble(("warning:", "yellow"), " ", one_line(message)))


def _where(exc: BaseException) -> str:
    """`file:line in function` of the frame that raised, the path shortened to start at the package."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown location"
    last = frames[-1]
    path = Path(last.filename)
    parts = path.parts
    for anchor in ("editlab", "site-packages"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            path = Path(*parts[i + (anchor == "site-packages"):])
            break
    return f"{path}:{last.lineno} in {last.name}"


def report_exception(exc: Exception, debug: bool) -> NoReturn:
    """EditlabError: one `error:` line, exit 2. Anything else is a bug: a short note with where it
    happened and a request to report it, exit 1. `debug` adds the full traceback first."""
    if debug:
        err_console.print("".join(traceback.format_exception(exc)).rstrip(), markup=False)
    if isinstance(exc, EditlabError):
        print_error(str(exc) or type(exc).__name__)
        raise typer.Exit(code=2)
    err_console.print(Text.assemble(
        ("internal error:", "bold red"), f" {type(exc).__name__}: {one_line(str(exc))} (at {_where(exc)})"))
    hint = "" if debug else "; add --debug (`editlab --debug ...`) for the full traceback"
    err_console.print(f"This is a bug in editlab. Please report it with the command you ran{hint}.", markup=False)
    raise typer.Exit(code=1)


@contextmanager
def library_warnings_silenced() -> Iterator[None]:
    with warnings.catch_warnings():
        for category in LIBRARY_NOISE:
            warnings.simplefilter("ignore", category)
        yield


class EditlabGroup(TyperGroup):
    """The `editlab` command group: runs every command with library deprecation warnings silenced and
    turns exceptions into one-line messages and exit codes (see `report_exception`)."""

    def invoke(self, ctx: typer.Context) -> Any:
        debug = bool(ctx.params.get("debug"))
        with library_warnings_silenced():
            try:
                return super().invoke(ctx)
            except _CONTROL_FLOW:
                raise
            except Exception as e:  # noqa: BLE001 - the CLI's one place that reports errors
                report_exception(e, debug)


@contextmanager
def user_warnings_reported() -> Iterator[None]:
    """Warnings raised inside (e.g. skipped data records, a model without a chat template, a unit a
    method failed on) printed as one `warning:` line each on stderr as they happen, each text once."""
    seen: set[str] = set()

    def show(message: Any, *_: Any, **__: Any) -> None:
        text = str(message)
        if text not in seen:
            seen.add(text)
            print_warning(text)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for category in LIBRARY_NOISE:
            warnings.simplefilter("ignore", category)
        warnings.showwarning = show
        yield


# --- hyper-parameters -----------------------------------------------------------------------------------
def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`--set key=value` pairs (values stay strings; Hparams coerce and validate them)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise OptionError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        if not k.strip():
            raise OptionError(f"--set expects key=value, got {item!r}")
        out[k.strip()] = v.strip()
    return out


def load_hparams_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise HparamsError(f"cannot read hparams file {path}: {getattr(e, 'strerror', None) or e}") from None
    except yaml.YAMLError as e:
        raise HparamsError(f"hparams file {path} is not valid YAML: {one_line(str(e))}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise HparamsError(f"hparams file {path} must hold a mapping of name: value")
    return data


def hparam_overrides(opts: HparamOptions) -> dict[str, Any]:
    """`--hparams` file values, overridden by `--set` pairs."""
    return {**load_hparams_file(opts.hparams), **parse_sets(opts.set_)}


def check_hparams_early(method: str, overrides: dict[str, Any]) -> None:
    """Names, types and model-free ranges of `overrides` for `method`, without the model: unknown
    names, values that cannot be coerced and counts out of their bounds raise `HparamsError`
    (`Hparams.from_dict` / `Hparams.check_counts`)."""
    from ..methods.catalogue import hparams_class

    from ..tracing.edit_layer import is_auto

    if is_auto(overrides.get("layer")):
        overrides = {**overrides, "layer": 0}  # resolved from the cached trace once the model is loaded
    hparams_class(method).from_dict(overrides)


def check_model_options(opts: ModelOptions) -> None:
    """dtype, device (present on this machine and torch build) and model source (a registered name, a
    local folder, a cached or allowed hub id), all without loading anything."""
    from ..models.sources import check_device, check_dtype_for_device, check_model_source, dtype_name

    dtype_name(opts.dtype)
    check_device(opts.device)
    check_dtype_for_device(opts.dtype, opts.device)
    if opts.device_map is not None:
        if opts.device_map not in DEVICE_MAPS:
            raise OptionError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got {opts.device_map!r}")
        if opts.device != "cpu":
            raise OptionError("give --device or --device-map, not both (--device-map places the model itself)")
    check_model_source(opts.model, True if opts.allow_hub else None)


def check_output_file(path: Path, option: str) -> None:
    """`path` can be created or overwritten as a file: not a folder, its folder exists (or can be made
    by us) and is writable, an existing file is writable. Nothing is created here."""
    if path.is_dir():
        raise OutputPathError(f"{option} {path} is a folder; give a file name")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise OutputPathError(f"{option} {path} exists and is not writable")
        return
    parent = path.parent if str(path.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: cannot write in {parent}")


def check_positive(option: str, value: int, upper: int | None = None) -> None:
    if value < 1 or (upper is not None and value > upper):
        raise OptionError(f"{option} must be between 1 and {upper:,}, got {value}" if upper else f"{option} must be >= 1, got {value}")


# --- model, progress, summary ------------------------------------------------------------------------------
def load_model(opts: ModelOptions) -> LM:
    """The model of the options, after checking its weights fit the free memory (`models.estimate`)."""
    from ..models import load_lm
    from ..models.estimate import check_memory

    check_memory(opts.model, opts.dtype, opts.device, opts.device_map)  # a hub id or a .bin folder: not sized
    with console.status(f"loading {opts.model}"):
        lm = load_lm(opts.model, device=opts.device, dtype=opts.dtype, allow_hub=True if opts.allow_hub else None,
                     device_map=opts.device_map)
    if opts.device_map is not None:
        console.print(f"--device-map {opts.device_map}: {placement(lm)}")
    return lm


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def model_args(opts: ModelOptions) -> dict[str, Any]:
    """`load_lm`'s arguments from the model options (what a Ray worker loads)."""
    return {"name": opts.model, "device": opts.device, "dtype": opts.dtype,
            "allow_hub": True if opts.allow_hub else None, "device_map": opts.device_map}


def placement(lm: LM) -> str:
    """Where accelerate put the model's parts, in one line: devices with the modules each holds."""
    where: dict[str, list[str]] = {}
    for module, device in (getattr(lm.model, "hf_device_map", None) or {"": str(lm.device)}).items():
        where.setdefault(str(device), []).append(module or "the whole model")
    if len(where) == 1:
        return f"the whole model fits on {next(iter(where))} (nothing to spread)"
    return "; ".join(f"{d}: {len(ms)} part(s) ({ms[0]} ... {ms[-1]})" for d, ms in where.items())


@contextmanager
def progress_bar(label: str, total: int, show_message: bool = False) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar on the console; yields the `progress(done, total, message)` callback the runners take.
    With `show_message`, the callback's total replaces `total` and its message is shown after the ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    extra = [TextColumn("{task.fields[info]}")] if show_message else []
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), *extra, console=console, transient=False) as prog:
        task = prog.add_task(label, total=total, info="")
        if show_message:
            yield lambda i, n, msg: prog.update(task, completed=i, total=n, info=msg)
        else:
            yield lambda i, n, msg: prog.update(task, completed=i)


def exit_interrupted(db: Path) -> NoReturn:
    """After Ctrl-C in a run: say that finished rows are kept and how to continue; exit 130."""
    err_console.print(f"[bold yellow]interrupted.[/] Finished rows are kept in {db}; continue with the same "
                      "command plus --resume.")
    raise typer.Exit(code=130)


def run_with_progress(lm: LM, requests: list[Any], cfg: RunConfig, store: Store, resume: bool, label: str) -> str:
    """`editlab.runner.run` with a progress bar; returns the run id."""
    from .. import runner

    with progress_bar(label, len(requests)) as tick:
        return runner.run(lm, requests, cfg, store, progress=tick, resume=resume)


_SUMMARY_KEYS = ["efficacy_score", "paraphrase_score", "neighborhood_score", "rewrite_acc", "rephrase_acc", "locality_acc",
                 "portability_acc"]
_SUMMARY_SHORT = ["ES", "PS", "NS", "rw", "rph", "loc", "port"]


def summary_table(store: Store, run_ids: list[str], title: str) -> Table:
    """One row per run: single/batch runs averaged over requests, sequential runs at their last checkpoint."""
    from ..eval import summarize

    t = Table(title=title, caption="ES/PS/NS: CounterFact efficacy/paraphrase/neighbourhood scores; rw/rph/loc/port: "
              "rewrite/rephrase/locality/portability token accuracy; sequential rows: all edits so far")
    for c in ["run", "n", "s/edit"] + _SUMMARY_SHORT:
        t.add_column(c, justify="right" if c != "run" else "left", no_wrap=c == "run")
    runs = {r["run_id"]: r for r in store.runs()}
    for rid in run_ids:
        rows = list(store.rows(rid))
        run = runs[rid]
        if run["mode"] == "sequential":
            pts = [r for r in rows if r.kind == "checkpoint"]
            if not pts:
                continue
            last = max(pts, key=lambda r: r.n_edits)
            s = {k: last.metrics.get(f"retention_{k}") for k in _SUMMARY_KEYS}
            label = f"{run['method']} seq"
            times = [r.edit_s for r in pts if r.edit_s is not None]  # checkpoint 0 made no edit
            n_shown = last.n_edits
        else:
            s = summarize(r.metrics for r in rows)
            label = f"{run['method']} {run['mode']}"
            times = [r.edit_s for r in rows if r.edit_s is not None]
            n_shown = len(rows)
        med = f"{statistics.median(times):.1f}" if times else ""
        t.add_row(label, str(n_shown), med, *[("" if s.get(k) is None else f"{s[k]:.2f}") for k in _SUMMARY_KEYS])
    return t


def write_out(text: str) -> None:
    """Raw text to stdout (exports must not pass through rich's markup and wrapping)."""
    sys.stdout.write(text)
