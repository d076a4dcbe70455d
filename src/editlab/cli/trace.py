"""`editlab trace`: causal tracing of one prompt, or averaged over the known facts, as PNG heatmaps."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import options
from ..errors import OptionError, OutputPathError
from .common import check_model_options, console, load_model, user_warnings_reported
from .options import ModelOptions, OptionGroup, with_option_groups

if TYPE_CHECKING:
    from ..tracing import TraceResult

_TRACE_PANEL = "Tracing"

Prompt = Annotated[Optional[str], typer.Option(help="Prompt to trace, e.g. 'The Eiffel Tower is located in the city of'")]
Subject = Annotated[Optional[str], typer.Option(help="Subject inside the prompt (its tokens are corrupted)")]
Answer = Annotated[Optional[str], typer.Option(help="True answer (its first token is scored); default: the model's greedy answer")]
TraceData = Annotated[Optional[str], typer.Option(
    "--data", help="'knowns' (known_1000.json in the data folder) or a file of that format: average over the facts "
    "the model gets right", rich_help_panel=options._DATA_PANEL)]
Kinds = Annotated[str, typer.Option(help="States to restore: hidden, mlp, attn; kind:W sets a window of W layers",
                                    rich_help_panel=_TRACE_PANEL)]
Window = Annotated[Optional[int], typer.Option(
    help="Layers restored at once for mlp and attn (default 10, or all layers of a smaller model; hidden: 1 unless hidden:W)",
                                     rich_help_panel=_TRACE_PANEL)]
Samples = Annotated[int, typer.Option(help="Noise samples per prompt", rich_help_panel=_TRACE_PANEL)]
Noise = Annotated[float, typer.Option(help="Noise std in units of the embeddings' std on real text", rich_help_panel=_TRACE_PANEL)]
MinProb = Annotated[float, typer.Option(help="Refuse a prompt whose clean answer probability is below this (0: trace anyway)",
                                        rich_help_panel=_TRACE_PANEL)]
Out = Annotated[Path, typer.Option(help="Directory for the PNG heatmaps and trace.json / average.json")]


PAPER_SAMPLES, PAPER_NOISE = 10, 3.0  # ROME's causal tracing (section 2.1, appendix B.1)


@dataclass(frozen=True)
class FactOptions(OptionGroup):
    """The one fact to trace (or use --data to average over many)."""

    prompt: Prompt = None
    subject: Subject = None
    answer: Answer = None


@dataclass(frozen=True)
class TraceOptions(OptionGroup):
    """What is corrupted and restored."""

    kinds: Kinds = "hidden,mlp,attn"
    window: Window = None
    samples: Samples = PAPER_SAMPLES
    noise: Noise = PAPER_NOISE
    min_prob: MinProb = 0.01
    seed: options.Seed = 0


def _file_stem(label: str) -> str:
    kind, _, w = label.partition(":")
    return f"{kind}_w{w}" if w else kind


def _prepare_out(out: Path) -> None:
    """Fail on an unusable output folder before any model work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".editlab-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputPathError(f"cannot write to output folder {out}: {e.strerror or e}") from None


@contextmanager
def _progress(label: str) -> Iterator[Callable[[float, int], None]]:
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False) as prog:
        task = prog.add_task(label, total=None)
        yield lambda done, total: prog.update(task, completed=done, total=total)


def _where(tr: TraceResult, t: int) -> str:
    from ..tracing.knowns import CLASSES, token_classes

    names = [c for c, pos in zip(CLASSES, token_classes(tr.subject_range, len(tr.tokens))) if t in pos]
    return f"token {t} {tr.tokens[t]!r}" + (f" ({', '.join(names)})" if names else "")


@with_option_groups
def trace(fact: FactOptions = FactOptions(), model: ModelOptions = ModelOptions(), data: TraceData = None,
          limit: options.Limit = None, how: TraceOptions = TraceOptions(), out: Out = Path("trace")) -> None:
    """Causal tracing (ROME): corrupt the subject, restore one state at a time, and map where the answer
    comes back. Writes one heatmap per kind and prints where the MLP effect peaks."""
    from ..tracing.kinds import parse_kinds

    prompt, subject, answer = fact.prompt, fact.subject, fact.answer
    kinds, window = how.kinds, how.window
    if data is None and (prompt is None or subject is None):
        raise OptionError("give --prompt and --subject to trace one prompt, or --data knowns to average over known facts")
    if data is not None and (prompt is not None or subject is not None or answer is not None):
        raise OptionError("--data averages over a file of facts; it cannot be combined with --prompt/--subject/--answer")
    if limit is not None and limit < 1:
        raise OptionError(f"--limit must be at least 1, got {limit}")
    specs = parse_kinds(kinds, window)  # user mistakes surface before the model is loaded
    check_model_options(model)
    facts = _load_facts(data) if data is not None else None
    _prepare_out(out)
    lm = load_model(model)
    from ..tracing import CausalTracer

    tracer = CausalTracer(lm, samples=how.samples, noise_scale=how.noise, seed=how.seed, min_prob=how.min_prob)
    if (how.samples, how.noise) != (PAPER_SAMPLES, PAPER_NOISE):
        console.print(f"note: {how.samples} noise samples at {how.noise:g}x the embedding std is not ROME's protocol "
                      f"({PAPER_SAMPLES} samples at {PAPER_NOISE:g}x); say so wherever these figures are quoted")
    specs = parse_kinds(kinds, window, tracer.n_layers)
    tracer.check_kinds(specs)
    if facts is None:
        assert prompt is not None and subject is not None
        _trace_one(tracer, prompt, subject, answer, specs, out)
    else:
        _trace_many(tracer, facts, limit, specs, out)


def _load_facts(data: str) -> Any:
    from ..tracing import load_knowns

    return load_knowns(None if data == "knowns" else Path(data))


def _trace_one(tracer: Any, prompt: str, subject: str, answer: str | None, specs: list[Any], out: Path) -> None:
    t0 = time.perf_counter()
    with _progress("tracing") as progress:
        results = tracer.trace(prompt, subject, answer, kinds=specs, progress=progress)
    elapsed = time.perf_counter() - t0
    any_tr = next(iter(results.values()))
    table = Table(title=f"causal trace of {prompt!r} -> {any_tr.answer!r} (clean p = {any_tr.high:.3f}, "
                        f"corrupted p = {any_tr.low:.3f}, {elapsed:.1f} s)")
    for c in ("kind", "peak at", "layer", "indirect effect", "heatmap"):
        table.add_column(c)
    for label, tr in results.items():
        png = tr.save_png(out / f"{_file_stem(label)}.png")
        t, layer, ie = tr.peak()
        table.add_row(label, _where(tr, t), str(layer), f"{ie:+.3f}", str(png))
    (out / "trace.json").write_text(json.dumps({k: v.to_dict() for k, v in results.items()}, indent=1))
    console.print(table)
    mlp = [tr for tr in results.values() if tr.kind == "mlp"]
    if mlp:
        tr = mlp[0]
        t, layer, ie = tr.peak()
        span = f" (window of {tr.window} layers centred there)" if tr.window > 1 else ""
        console.print(f"MLP indirect effect peaks at {_where(tr, t)}, layer {layer}{span}: {ie:+.3f}")


def _trace_many(tracer: Any, facts: list[Any], limit: int | None, specs: list[Any], out: Path) -> None:
    from ..tracing import known_by_model, trace_known_facts

    with console.status(f"checking which of {len(facts)} facts the model knows"):
        known = known_by_model(tracer.lm, facts)
    console.print(f"the model's top-1 answer is right for {len(known)} of {len(facts)} facts")
    if not known:
        raise OptionError("the model gets none of these facts right: there is nothing to average")
    chosen = known[:limit] if limit is not None else known
    with user_warnings_reported(), _progress(f"tracing {len(chosen)} facts") as progress:
        averages = trace_known_facts(tracer, chosen, kinds=specs, progress=progress)
    table = Table(title=f"average causal trace over {len(chosen)} known facts")
    for c in ("kind", "peak at", "layer", "avg indirect effect", "last-subject peak", "heatmap"):
        table.add_column(c)
    for label, avg in averages.items():
        png = avg.save_png(out / f"average_{_file_stem(label)}.png")
        cls, layer, ie = avg.peak()
        _, sl, sie = avg.peak("last subject token")
        table.add_row(label, cls, str(layer), f"{ie:+.3f}", f"layer {sl}: {sie:+.3f}", str(png))
    (out / "average.json").write_text(json.dumps({k: v.to_dict() for k, v in averages.items()}, indent=1))
    from ..tracing.edit_layer import save_averages

    cached = save_averages(tracer.lm, averages)  # what `layer=auto` reads
    console.print(table)
    seconds = next(iter(averages.values())).seconds
    console.print(f"{seconds:.0f} s in all, {seconds / len(chosen):.1f} s per fact")
    mlp = [a for a in averages.values() if a.kind == "mlp"]
    if mlp:
        _, sl, sie = mlp[0].peak("last subject token")
        console.print(f"average MLP indirect effect at the last subject token peaks at layer {sl}: {sie:+.3f}; "
                      f"edits with --set layer=auto use the trace kept in {cached}")
