"""IKE — in-context knowledge editing (Zheng et al. 2023, arXiv 2305.12740) as an LM view.

No weight changes: every prompt is answered after a context that states the new fact and shows, with
demonstrations about *other* facts, how a "New Fact" is to be used:

    New Fact: {f_j}\\nPrompt: {p_j} {a_j}\\n\\n     (one per demonstration, least to most similar)
    New Fact: {f}\\nPrompt: {prompt_of_f} {new}\\n\\n  (the copy demonstration of the edited fact)
    New Fact: {f}\\nPrompt: {query}                  (the query; the continuation is scored after it)

Demonstrations come from a training pool (`pool`, default `counterfact-train`; never evaluation
records): the `n_demos` pool facts nearest to the edited fact (cosine of all-MiniLM-L6-v2 embeddings,
as the paper's `semantic_search`), excluding facts about the same subject, split by `ratio` into
*copy* (the pool fact's own prompt and new answer), *update* (its paraphrase and new answer) and
*retain* (its neighbour prompt and that prompt's own true answer) — the paper's 4 : 12 : 16 of 32 —
the type of each drawn by a seeded permutation (the reference shuffles without a seed), and put in
order from least to most similar. They are chosen once per edited fact, at edit time, as the paper
retrieves once per test record for all of its probes; the text is stored in the edit, so a saved edit
needs neither the pool nor the encoder to give the same outputs.

Several edited facts (a batch, or a sequence through `on=`): for each query prompt the
`facts_per_query` edited facts most similar to the prompt are stated (retrieved from the edit memory by
the same encoder; the most similar last, nearest the query) and the demonstrations of the most similar
one are used. With one fact, or no more facts than `facts_per_query`, every fact is stated and no
encoder is needed at query time. `scope_threshold` > 0 gives *scoped IKE* (method card, section 8):
a prompt whose best cosine to every edited fact is below it gets no context at all (the base system
answers); 0 (default) is IKE as published, which states the fact for every prompt.

Context length: `n_demos` defaults to 32 (the paper's k) scaled down for short contexts (one
demonstration per 64 tokens of context). For each query the least similar demonstrations are dropped
until context + prompt + continuation (or + tokens to generate) fits the model's context (or
`max_context_tokens`); if the prompt and the stated facts alone do not fit, `PromptTooLongError`.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, Sequence

import torch

from ...errors import EditMismatchError, PromptTooLongError
from ...models.lm import LM
from ...requests import EditRequest, _context_limit
from ..base import Editor
from ..edit import Edit
from ..patches import Patch, ViewPatch
from .hparams import IKEHparams
from .prompting import join
from .retriever import EditMemory, Retriever, check_threshold, record_for, statement
from .views import PromptView, extend_below, extension_of, split_query

FORMAT = 1
DEMO_TYPES = ("copy", "update", "retain")


def demo_text(fact: str, prompt: str, answer: str) -> str:
    return f"New Fact: {fact}\nPrompt: {prompt} {answer}\n\n"


def query_text(facts: Sequence[str], prompt: str) -> str:
    return "".join(f"New Fact: {f}\n" for f in facts) + f"Prompt: {prompt}"


# ------------------------------------------------------------------------------------ demonstration pool
@dataclass
class DemoPool:
    """Pool facts with the demonstrations each can give, and their statement embeddings."""

    requests: list[EditRequest]
    statements: list[str]
    embeddings: torch.Tensor = field(repr=False)

    def demos_for(self, request: EditRequest, fact_vec: torch.Tensor, n: int, ratio: Sequence[int],
                  rng: random.Random) -> list[dict[str, Any]]:
        """The `n` pool facts nearest to the edited fact (same-subject and same-prompt facts excluded)
        as demonstrations, least similar first: [{"text", "type", "score", "pool_index"}]."""
        if n == 0 or not self.requests:
            return []
        sims = self.embeddings @ fact_vec
        order = torch.argsort(sims, descending=True).tolist()
        chosen = []
        for i in order:
            r = self.requests[i]
            if r.subject == request.subject or r.prompt == request.prompt:
                continue
            chosen.append(i)
            if len(chosen) == n:
                break
        types = split_types(len(chosen), ratio)
        rng.shuffle(types)
        out = []
        for i, kind in zip(chosen, types):
            r = self.requests[i]
            fact = self.statements[i]
            if kind == "update" and r.paraphrases:
                text = demo_text(fact, r.paraphrases[0][0], r.target_new)
            elif kind == "retain" and r.neighborhood:
                text = demo_text(fact, r.neighborhood[0][0], r.neighborhood[0][1])
            else:  # copy, or a pool fact without the probe its type needs
                kind, text = "copy", demo_text(fact, r.prompt, r.target_new)
            out.append({"text": text, "type": kind, "score": float(sims[i]), "pool_index": i})
        out.reverse()  # least similar first: the most similar demonstration sits next to the query
        return out


def split_types(n: int, ratio: Sequence[int]) -> list[str]:
    """`n` demonstration types in proportion `ratio` (copy, update, retain), by largest remainder."""
    total = sum(ratio)
    exact = [n * w / total for w in ratio]
    counts = [int(x) for x in exact]
    for j in sorted(range(3), key=lambda j: exact[j] - counts[j], reverse=True)[: n - sum(counts)]:
        counts[j] += 1
    return [t for t, c in zip(DEMO_TYPES, counts) for _ in range(c)]


@lru_cache(maxsize=4)
def _pool_requests(pool: str, pool_size: int) -> tuple[EditRequest, ...]:
    from ...data import load_requests

    with warnings.catch_warnings():  # a few invalid pool records are skipped; they are not the user's edits
        warnings.simplefilter("ignore")
        return tuple(load_requests(pool, limit=pool_size or None))


def load_pool(pool: str, pool_size: int, retriever: Retriever) -> DemoPool:
    """The demonstration pool `pool` (a dataset name or file; its first `pool_size` records, 0 = all),
    embedded once and cached on disk by content."""
    from ...paths import cache_dir

    reqs = list(_pool_requests(pool, pool_size))
    texts = [statement(r) for r in reqs]
    return DemoPool(reqs, texts, retriever.embed_cached(texts, cache_dir("embeddings")))


# ------------------------------------------------------------------------------------ the view
class IKEView(PromptView):
    """Puts, before each prompt, the IKE context of the edited fact(s) relevant to it (see the module
    docstring). Config: {"format", "facts_per_query", "scope_threshold", "max_context_tokens",
    "memory": EditMemory config of this edit's own facts, "demos": [[demo text, ...] per fact], "extends": bool,
    "below_facts": facts of the IKE edit it extends}; tensors: the
    memory's embeddings when they were computed."""

    def __init__(self, inner: Any, config: dict[str, Any] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(inner, config, tensors)
        cfg = self.config
        try:
            self.memory = self.saved_memory("IKE", FORMAT)
            self.demos: list[list[str]] = [list(map(str, d)) for d in cfg["demos"]]
            self.facts_per_query = int(cfg["facts_per_query"])
            self.scope_threshold = check_threshold(float(cfg["scope_threshold"]), "scope_threshold")
            self.max_context_tokens = int(cfg.get("max_context_tokens", 0))
            self.chat = bool(cfg.get("chat", False))
        except (KeyError, TypeError, ValueError) as e:
            raise EditMismatchError(f"IKE view config is malformed: {e}") from None
        if len(self.demos) != len(self.memory) or not len(self.memory):
            raise EditMismatchError(f"IKE view: {len(self.memory)} facts but {len(self.demos)} demonstration lists")
        # An edit that extends the IKE edit below it (`on=`) holds only its own facts: its view joins them
        # to the facts of the view below and takes that view's place (one context per prompt, not one per
        # edit), so each edit stores and saves what it added, whatever the length of the sequence.
        if cfg.get("extends"):
            below = extend_below(self, IKEView, "IKE", ("facts_per_query", "scope_threshold", "max_context_tokens", "chat"))
            self.demos = below.demos + self.demos
        self._retriever: Retriever | None = None
        self._ntok: dict[str, int] = {}

    # ---------------------------------------------------------------- context
    @property
    def retriever(self) -> Retriever:
        if self._retriever is None:
            self._retriever = Retriever(self.memory.embedder)
        return self._retriever

    def _needs_retrieval(self) -> bool:
        return self.scope_threshold > 0 or len(self.memory) > self.facts_per_query

    def facts_for(self, queries: Sequence[str]) -> list[list[int]]:
        """Per query: indices of the facts to state, least similar first ([] when out of scope)."""
        if not self._needs_retrieval():
            return [list(range(len(self.memory))) for _ in queries]
        hits = self.memory.search(self.retriever, list(queries), min(self.facts_per_query, len(self.memory)))
        out = []
        for scores, idx in zip(hits.scores.tolist(), hits.indices.tolist()):
            if self.scope_threshold > 0 and scores[0] < self.scope_threshold:
                out.append([])
            else:
                out.append(list(reversed(idx)))
        return out

    def _tokens(self, text: str) -> int:
        n = self._ntok.get(text)
        if n is None:
            n = self._ntok[text] = len(self.base.tokenizer(text, add_special_tokens=False)["input_ids"])
        return n

    def _limit(self) -> int | None:
        model_limit = _context_limit(self.base)
        if self.max_context_tokens:
            return min(self.max_context_tokens, model_limit) if model_limit else self.max_context_tokens
        return model_limit

    def context(self, prompt: str, facts: list[int], reserve: int = 0) -> str:
        """The text put before `prompt` for the facts `facts` (least similar first), with the least
        similar demonstrations dropped until it fits with `reserve` more tokens."""
        if not facts:
            return ""
        stated = [self.memory.records[i].text for i in facts]
        copies = [demo_text(r.text, r.request.prompt, r.request.target_new) if r.request is not None else ""
                  for r in (self.memory.records[i] for i in facts)]
        demos = list(self.demos[facts[-1]])
        head = "".join(copies) + query_text(stated, "")
        limit = self._limit()
        if limit is None:
            return "".join(demos) + head

        def length(ds: list[str]) -> int:
            return len(self.base.encode_prompt(join(self.base.tokenizer, "".join(ds) + head, prompt, self.chat))) + reserve

        n = length(demos)
        if n > limit:
            # drop the least similar demonstrations by their token counts, then check exactly
            excess = n - limit
            while demos and excess > 0:
                excess -= self._tokens(demos.pop(0))
            while demos and length(demos) > limit:
                demos.pop(0)
            if length(demos) > limit:
                raise PromptTooLongError(f"IKE: the prompt {prompt[:60]!r} with its stated fact(s) and {reserve} more "
                                         f"tokens is {length(demos)} tokens, over the context of {limit} tokens")
        return "".join(demos) + head

    def wrap(self, prompts: Sequence[str], reserves: Sequence[int]) -> list[str]:
        # retrieve by the prompt's question (`split_query`), never by a few-shot prompt's demonstrations:
        # the encoder reads 256 word pieces, so a long few-shot prompt would be cut before its question
        facts = self.facts_for([split_query(p)[1] for p in prompts])
        return [join(self.base.tokenizer, self.context(p, f, r), p, self.chat) for p, f, r in zip(prompts, facts, reserves)]

    # ---------------------------------------------------------------- the LM calls (PromptView: score, next token, generate)
    def window_contexts(self, windows: Sequence[Sequence[int]], prefix_ids: Sequence[int]) -> list[str]:
        """Raw token windows (perplexity) are read after the context of the fact(s) nearest to each
        window's text, as if the window were the query. A window that leaves no room for even the stated
        fact (it nearly fills the model's context) is read without context: perplexity probes must not
        fail for an in-context method, and no context is what such a window could get."""
        out = []
        for w, f in zip(windows, self.facts_for(self.window_queries(windows))):
            try:
                ctx = self.context("", f, len(w) + len(prefix_ids))
            except PromptTooLongError:
                ctx = ""
            out.append(join(self.base.tokenizer, ctx, "", self.chat) if ctx else "")
        return out



class IKEEditor(Editor):
    """Returns one `ViewPatch("ike")`. With `on=` (a previous IKE edit, the top of the stack) the new
    edit holds the earlier facts too and its view replaces the earlier one, so a sequence of edits is
    one memory that each restore shortens by one step."""

    hparams_cls = IKEHparams
    supports_batch: ClassVar[bool] = True
    supports_on: ClassVar[bool] = True

    def compute_patches(self, lm: LM, requests: list[EditRequest], hp: IKEHparams, on: Edit | None
                        ) -> tuple[list[Patch], dict[str, Any]]:
        memory, demos = EditMemory(hp.embedder), []  # this edit's own facts (an extension holds no others)
        below_facts = extension_of(on, IKEView, "IKE", hp.embedder)
        retriever = Retriever(hp.embedder)
        new_records = [record_for(r) for r in requests]
        info: dict[str, Any] = {"demo_types": {t: 0 for t in DEMO_TYPES}}
        if hp.n_demos:
            pool = load_pool(hp.pool, hp.pool_size, retriever)
            vecs = retriever.embed([r.text for r in new_records])
            rng = random.Random(hp.seed)
            for r, v in zip(requests, vecs):
                ds = pool.demos_for(r, v, hp.n_demos, hp.ratio, rng)
                for d in ds:
                    info["demo_types"][d["type"]] += 1
                demos.append([d["text"] for d in ds])
            memory.add(new_records, vecs)
            info["pool_records"] = len(pool.requests)
        else:
            demos.extend([] for _ in requests)
            memory.add(new_records)
        tensors, mem_cfg = memory.state()
        config = {"format": FORMAT, "memory": mem_cfg, "demos": demos, "facts_per_query": hp.facts_per_query,
                  "scope_threshold": hp.scope_threshold, "max_context_tokens": hp.max_context_tokens,
                  "extends": on is not None, "below_facts": below_facts, "chat": hp.chat}
        patch = ViewPatch("ike", config, tensors)
        view = IKEView(lm.edited, config, tensors)  # a malformed config fails here, before anything is installed
        info["facts"] = len(view.memory)
        return [patch], info
