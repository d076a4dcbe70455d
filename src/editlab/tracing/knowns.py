"""Known facts (ROME's `known_1000.json`) and the trace averaged over them (the ROME paper's Figure 2).

Only facts the model itself gets right are traced: the greedy next token after the prompt must be the
first token of the recorded answer (the file lists facts GPT-2 XL knows, not this model). Each fact's
trace is reduced to six token classes before averaging, because prompts differ in length and subject
position: first, middle and last subject token, the first token after the subject, further tokens, and
the prompt's last token. A class a prompt lacks (no middle tokens in a two-token subject, no further
tokens in a short prompt) is left out of that prompt's contribution; a one-token subject counts as both
first and last subject token.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..data.io import field, read_records
from ..errors import DataFormatError
from ..paths import data_dir
from .causal import CausalTracer, KindSpec, TraceResult, TracingError, UnknownFactError, parse_kinds

if TYPE_CHECKING:
    from ..models import LM

KNOWNS_RELPATH = "knowns/known_1000.json"
CLASSES = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
           "further tokens", "last token")


@dataclass(frozen=True)
class KnownFact:
    prompt: str
    subject: str
    answer: str
    known_id: int


def load_knowns(path: str | Path | None = None) -> list[KnownFact]:
    """Facts of `known_1000.json` (default: `knowns/known_1000.json` in the data folder)."""
    p = Path(path) if path is not None else data_dir() / KNOWNS_RELPATH
    if not p.is_file():
        raise DataFormatError(f"known facts file not found: {p} (set EDITLAB_DATA to the benchmark data folder "
                              f"holding {KNOWNS_RELPATH}, or give a file path)")
    out = []
    for i, rec in enumerate(read_records(p)):
        prompt = str(field(rec, "prompt", path=p, index=i))
        subject = str(field(rec, "subject", path=p, index=i))
        answer = str(field(rec, "attribute", path=p, index=i))
        if subject not in prompt:
            raise DataFormatError(f"{p}: record {i}: subject {subject!r} does not occur in its prompt {prompt!r}")
        out.append(KnownFact(prompt, subject, answer, int(rec.get("known_id", i))))
    return out


def known_by_model(lm: LM, facts: Sequence[KnownFact], batch: int = 64) -> list[KnownFact]:
    """The facts whose answer's first token is the model's greedy (top-1) next token."""
    kept = []
    for i in range(0, len(facts), batch):
        part = facts[i:i + batch]
        top = lm.next_token_logprobs([f.prompt for f in part]).argmax(-1).tolist()
        for f, t in zip(part, top):
            _, ans = lm.encode_pair(f.prompt, f.answer)
            if ans and ans[0] == t:
                kept.append(f)
    return kept


def token_classes(subject_range: tuple[int, int], n_tokens: int) -> list[list[int]]:
    """Positions of each of `CLASSES` in a prompt of `n_tokens` tokens whose subject spans `subject_range`."""
    a, b = subject_range
    last = n_tokens - 1
    after = [p for p in range(b, n_tokens) if p != last]
    return [[a], list(range(a + 1, b - 1)), [b - 1], after[:1], after[1:], [last]]


@dataclass
class AverageTrace:
    """Indirect effect averaged over facts: `effect[c, l]` for token class `CLASSES[c]` and layer l;
    `counts[c]`: facts that have a token of class c."""

    kind: str
    window: int
    classes: tuple[str, ...]
    effect: torch.Tensor  # [len(classes), n_layers]
    counts: list[int]
    n_facts: int
    low: float  # mean corrupted p(answer)
    high: float  # mean clean p(answer)
    seconds: float
    samples: int = 0  # noise samples per fact (ROME: 10)
    noise_std: float = 0.0  # std of the noise added to the subject's embeddings

    def peak(self, cls: str | None = None) -> tuple[str, int, float]:
        """(token class, layer, average indirect effect) of the largest effect, within one class if given."""
        rows = range(len(self.classes)) if cls is None else [self.classes.index(cls)]
        best = max(((c, int(torch.argmax(self.effect[c])), float(self.effect[c].max())) for c in rows
                    if self.counts[c]), key=lambda x: x[2])
        return self.classes[best[0]], best[1], best[2]

    def save_png(self, path: str | Path) -> Path:
        from .plot import plot_average

        return plot_average(self, path)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "window": self.window, "classes": list(self.classes), "effect": self.effect.tolist(),
                "counts": self.counts, "n_facts": self.n_facts, "low": self.low, "high": self.high,
                "seconds": self.seconds, "samples": self.samples, "noise_std": self.noise_std}


def average_traces(traces: Sequence[TraceResult], seconds: float = 0.0) -> AverageTrace:
    """Average the indirect effects of several traces of one kind by token class."""
    if not traces:
        raise TracingError("no traces to average")
    first = traces[0]
    n_layers = first.scores.shape[1]
    total = torch.zeros(len(CLASSES), n_layers)
    counts = [0] * len(CLASSES)
    for tr in traces:
        if (tr.kind, tr.window) != (first.kind, first.window):
            raise TracingError("cannot average traces of different kinds or windows")
        if (tr.samples, tr.noise_std) != (first.samples, first.noise_std):
            raise TracingError("cannot average traces made with different noise (samples or std)")
        ie = tr.indirect_effect
        for c, pos in enumerate(token_classes(tr.subject_range, len(tr.tokens))):
            if pos:
                total[c] += ie[pos].mean(0)
                counts[c] += 1
    effect = total / torch.tensor([max(1, n) for n in counts], dtype=torch.float32)[:, None]
    return AverageTrace(kind=first.kind, window=first.window, classes=CLASSES, effect=effect, counts=counts,
                        n_facts=len(traces), low=sum(t.low for t in traces) / len(traces),
                        high=sum(t.high for t in traces) / len(traces), seconds=seconds, samples=first.samples,
                        noise_std=first.noise_std)


def trace_known_facts(tracer: CausalTracer, facts: Sequence[KnownFact], kinds: str | Sequence[str | KindSpec] = "hidden,mlp,attn",
                      window: int | None = None, progress: Callable[[float, int], None] | None = None,
                      ) -> dict[str, AverageTrace]:
    """Trace each fact (all kinds) and average per kind; returns {kind label: AverageTrace}. Facts whose
    clean probability falls below the tracer's `min_prob` are skipped with a warning. `progress(done, n)`
    gets fractional `done` values while a fact is traced and whole ones as each fact finishes."""
    specs = parse_kinds(kinds, window, tracer.n_layers)
    tracer.check_kinds(specs)
    per_kind: dict[str, list[TraceResult]] = {k.label: [] for k in specs}
    t0 = time.perf_counter()
    skipped = 0
    for i, f in enumerate(facts):
        # within a fact, report the fraction of its forward passes done (a SmolLM2 fact takes minutes)
        inner = None if progress is None else (lambda d, t, i=i: progress(i + d / t, len(facts)))
        try:
            res = tracer.trace(f.prompt, f.subject, f.answer, kinds=specs, progress=inner)
        except UnknownFactError:
            skipped += 1
            continue
        finally:
            if progress:
                progress(i + 1, len(facts))
        for label, tr in res.items():
            per_kind[label].append(tr)
    if skipped:
        warnings.warn(f"{skipped} of {len(facts)} facts skipped: answer probability below {tracer.min_prob}", stacklevel=2)
    elapsed = time.perf_counter() - t0
    return {label: average_traces(trs, elapsed) for label, trs in per_kind.items()}
