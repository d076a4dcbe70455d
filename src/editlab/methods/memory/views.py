"""Shared pieces of the memory methods' LM views.

- `RetrievedFactView`: plain LM calls with the single-hop step of the multi-hop memory methods (MeLLo,
  DeepEdit): the prompt's query (its last line, with a short cue line's question) retrieves the top-1
  edited fact, and when its cosine reaches `scope_threshold` the fact is put right before the query as
  "Retrieved fact: <fact>.\n" (a few-shot prompt keeps its demonstrations first); otherwise, or when the
  fact would overflow the context, the prompt passes unchanged. The format is the one SmolLM2-135M copies
  most (counterfact-train 0-29: new target preferred 0.87, against 0.67 for the bare statement and 0.27
  without context; records 100-129: efficacy 0.90 against 0.80 and 0.47).
- `PromptView`: the base of views that rewrite each prompt (put a context before it) and let the system
  below answer: subclasses give `wrap(prompts, reserves)`; `score`, `next_token_logprobs` and
  `generate_ids` are written once here.
- `extension_of(on, kind, method, embedder)`: the check an editor makes of the edit it extends (`on=`).
- `extend_below`: how a view of a sequence's newer edit (`on=`, config "extends") takes the place of the
  same method's view below it, with one joined memory (IKE, SERAC, MeLLo, DeepEdit).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ...errors import CannotExtendError, EditMismatchError
from ...models.view import LMView
from ...requests import _context_limit
from .retriever import EditMemory, Retriever


def fact_line(fact: str) -> str:
    """A retrieved fact as the MeLLo transcript states it (also the single-hop context)."""
    return f"Retrieved fact: {fact.rstrip().rstrip('.')}.\n"


def split_query(prompt: str) -> tuple[str, str]:
    """(head, query): the query is the prompt's last line, with the lines above it while it has fewer
    than 3 words (so a cue such as "Thoughts:" brings its question along); the head is the rest (a
    few-shot prompt's demonstrations)."""
    lines = prompt.split("\n")
    start = len(lines) - 1
    while start > 0 and len(" ".join(lines[start:]).split()) < 3:
        start -= 1
    return "".join(line + "\n" for line in lines[:start]), "\n".join(lines[start:])


class PromptView(LMView):
    """A view that answers every LM call by the system below, on prompts rewritten by `wrap`."""

    def wrap(self, prompts: Sequence[str], reserves: Sequence[int]) -> list[str]:
        """The texts the system below reads for `prompts`; `reserves[i]` tokens will follow prompt i (the
        continuation scored, or the tokens generated), for context-length checks."""
        raise NotImplementedError

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[Any]:
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        reserves = [len(self.base.encode_pair(p, c)[1]) for p, c in zip(prompts, continuations)]
        return self.inner.score(self.wrap(prompts, reserves), continuations)

    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.inner.next_token_logprobs(self.wrap(prompts, [0] * len(prompts)))

    def generate_ids(self, prompts: Sequence[str], max_new_tokens: int = 20, **kw: Any) -> list[list[int]]:
        return self.inner.generate_ids(self.wrap(prompts, [max_new_tokens] * len(prompts)), max_new_tokens, **kw)

    def saved_memory(self, method: str, fmt: int) -> EditMemory:
        """The memory in this view's config and tensors, after checking the config's format (call it
        inside the subclass's config parsing, which turns a missing key into `EditMismatchError`)."""
        if self.config.get("format") != fmt:
            raise EditMismatchError(f"{method} view format {self.config.get('format')!r} is not {fmt}")
        return EditMemory.from_state(self.tensors, self.config["memory"])

    def window_contexts(self, windows: Sequence[Sequence[int]], prefix_ids: Sequence[int]) -> list[str]:
        """Per raw token window (perplexity probes), the text read before it ("" for none); `prefix_ids`
        come between that text and the window."""
        raise NotImplementedError

    def sequence_logprobs(self, windows: Sequence[Sequence[int]], prefix_ids: Sequence[int] = ()) -> list[torch.Tensor]:
        """Each raw token window read after its `window_contexts` text; windows sharing a context are
        scored together."""
        tok = self.base.tokenizer
        groups: dict[str, list[int]] = {}
        for i, ctx in enumerate(self.window_contexts(windows, prefix_ids)):
            groups.setdefault(ctx, []).append(i)
        out: list[torch.Tensor] = [torch.zeros(0)] * len(windows)
        for ctx, idx in groups.items():
            ids = tok(ctx, add_special_tokens=False)["input_ids"] if ctx else []
            got = self.inner.sequence_logprobs([windows[i] for i in idx], list(ids) + list(prefix_ids))
            for i, lp in zip(idx, got):
                out[i] = lp
        return out

    def window_queries(self, windows: Sequence[Sequence[int]]) -> list[str]:
        """The text a window is routed or retrieved by: its first 64 tokens."""
        return [self.base.tokenizer.decode(list(w)[:64]) for w in windows]


class RetrievedFactView(PromptView):
    """Plain LM calls with MeLLo's single-hop step: the top-1 edited fact for the query, when its cosine
    reaches `scope_threshold`, is put before the query (the prompt's last line) as a "Retrieved fact:" line.
    Subclasses set `self.memory` (an `EditMemory`) and `self.scope_threshold`; shared by the multi-hop
    memory methods."""

    memory: EditMemory
    scope_threshold: float

    def __init__(self, inner: Any, config: dict[str, Any] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(inner, config, tensors)
        self._retriever: Retriever | None = None  # set here: LMView would look it up on the system below

    @property
    def retriever(self) -> Retriever:
        """Query encoder, loaded on first search (a view that is only restored or saved never loads it)."""
        if self._retriever is None:
            self._retriever = Retriever(self.memory.embedder)
        return self._retriever

    split_query = staticmethod(split_query)

    def facts_for(self, queries: Sequence[str]) -> list[str | None]:
        """Per query, the statement of the top-1 edited fact when in scope, else None."""
        if not queries:
            return []
        hits = self.memory.search(self.retriever, [q.strip() or q for q in queries], 1)
        if hits.scores.shape[1] == 0:
            return [None] * len(queries)
        return [self.memory.records[int(i)].text if float(s) >= self.scope_threshold else None
                for s, i in zip(hits.scores[:, 0].tolist(), hits.indices[:, 0].tolist())]

    def _limit(self) -> int | None:
        return _context_limit(self.base)

    def wrap(self, prompts: Sequence[str], reserves: Sequence[int]) -> list[str]:
        """Each prompt with its in-scope fact line before its query; a prompt that would then
        not fit the context with `reserve` more tokens is left as it is."""
        parts = [self.split_query(p) for p in prompts]
        facts = self.facts_for([q for _, q in parts])
        limit = self._limit()
        out = []
        for p, (head, query), f, reserve in zip(prompts, parts, facts, reserves):
            text = p if f is None else head + fact_line(f) + query
            if f is not None and limit is not None and len(self.base.encode_prompt(text)) + reserve > limit:
                text = p
            out.append(text)
        return out

    def window_contexts(self, windows: Sequence[Sequence[int]], prefix_ids: Sequence[int]) -> list[str]:
        """A raw token window (perplexity) is read after the fact line of the fact nearest to its first 64
        tokens' text when in scope and when it fits; else as the base reads it."""
        tok = self.base.tokenizer
        limit = self._limit()
        out = []
        for w, f in zip(windows, self.facts_for(self.window_queries(windows))):
            ctx = "" if f is None else fact_line(f)
            if ctx and limit is not None:
                n = len(tok(ctx, add_special_tokens=False)["input_ids"]) + len(w) + len(prefix_ids)
                if n + len(getattr(self.base, "prefix_ids", ())) > limit:
                    ctx = ""
            out.append(ctx)
        return out


def extension_of(on: Any, kind: type, method: str, embedder: str) -> int:
    """For an editor's `on=` (None or the edit being extended): 0, or the number of facts of the `kind`
    view it holds. Another method's edit raises `EditStackError`, another encoder `HparamsError`."""
    if on is None:
        return 0
    below = on.lm
    if not isinstance(below, kind):
        raise CannotExtendError(f"on= must be a {method} edit (it holds no {method} view)")
    if below.memory.embedder != embedder:
        raise CannotExtendError(f"embedder {embedder!r} differs from the extended edit's {below.memory.embedder!r}")
    return len(below.memory)


def extend_below(view: Any, kind: type, method: str, same: Sequence[str] = ()) -> Any:
    """For a view whose config says it `extends` the edit below: check that the view below is a `kind`
    view holding `below_facts` facts and has the same `same` settings (the joined view applies one
    setting to every fact, so an extension may not change how the earlier facts are routed), join its
    memory before this view's own facts, and take its place (`view.inner` becomes the system under
    it). Returns the view below, whose other per-fact state the caller joins the same way."""
    below = view.inner
    n_below = view.config.get("below_facts")
    if not isinstance(below, kind) or len(below.memory) != n_below:
        raise EditMismatchError(f"this {method} edit extends a {method} edit of {n_below} fact(s), which is not the "
                                "edit below it; apply or load that edit first")
    for key in same:
        if view.config.get(key) != below.config.get(key):
            raise CannotExtendError(f"{method}: {key}={view.config.get(key)!r} differs from the extended edit's "
                               f"{below.config.get(key)!r}; every edit of a sequence (on=) keeps the first one's setting")
    view.memory = below.memory.joined(view.memory)
    view.inner = below.inner
    return below


__all__ = ["PromptView", "RetrievedFactView", "split_query", "extend_below", "extension_of", "fact_line"]
