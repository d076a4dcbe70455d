"""SERAC — semi-parametric editing with a retrieval-augmented counterfactual model (Mitchell et al. 2022,
arXiv 2206.06520) as an LM view.

The weights never change. Edits are kept in a memory; for every prompt a *scope classifier* decides
whether an edit covers it. A covered prompt is answered by the *counterfactual model* given that edit;
any other prompt goes, unchanged, to the base model — so locality comes from the classifier alone.

Scope classifier. For each prompt the `k` edits whose prompt is nearest (all-MiniLM-L6-v2 cosine) are
candidates; each (prompt, candidate edit) pair gets five features —

    cos(prompt, edit prompt), cos(prompt, edit statement), cos(prompt, edit subject),
    whether the prompt names the edit's subject (whole words, case and punctuation folded),
    the share of the subject's words found in the prompt

— and a logistic head gives p(in scope). The best candidate is used when p ≥ `threshold` (0.5, the
paper's). The head is SERAC's supervised classifier in small: trained with the paper's balanced binary
cross-entropy on training splits only (`train_data`, default `counterfact-train` and `zsre-train`,
`train_records` each), in memories of `train_group` edits so that negatives are as hard as in use:
positives are (edit, its own prompt / paraphrase), negatives (edit, a neighbourhood prompt — same
relation and object, another subject — or a locality question) among the `k` nearest edits. Training
takes seconds on a CPU and is cached by content (encoder, data texts, settings). `scope="cosine"` is the
untrained ablation: route when cos(prompt, edit prompt) ≥ `threshold`.

Counterfactual model. No smaller model shares SmolLM2's tokenizer, so — as the method card prescribes
and as the reference code's frozen-counterfactual path allows — it is the base model with the edit
stated before the prompt, in IKE's format ("New Fact: <statement>\\nPrompt: <prompt>"), which the 135M
model copies (efficacy 0.98 with the fact alone, IKE card).

Deviations from the paper, on purpose: the paper fine-tunes a DistilBERT classifier end to end (squared
Euclidean distance of [CLS] embeddings, exp(-d²) > 0.5) and trains a t5-small counterfactual model; here
the encoder is frozen MiniLM with a trained five-weight head and the counterfactual model is in-context.
EasyEdit's port trains and evaluates a soft mixture of both models instead of hard routing (method card,
pitfalls); editlab routes hard, as the paper does.

Sequences (`on=`) work as for IKE: each edit stores its own facts, its view joins those of the SERAC view
below and takes its place, so a prompt is routed once over the whole memory; undo drops the edit's facts
exactly. Saved edits hold the head's weights: loading needs neither the training data nor a retrain.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, Sequence

import torch

from ...errors import EditMismatchError, HparamsError, PromptTooLongError
from ...models.lm import LM
from ...paths import data_dir
from ...requests import EditRequest, _context_limit
from ..base import Editor
from ..edit import Edit
from ..patches import Patch, ViewPatch
from .ike import query_text
from .hparams import SCOPES, SERACHparams
from .prompting import join
from .retriever import EditMemory, Retriever, check_threshold, record_for
from .views import PromptView, extend_below, extension_of, split_query

FORMAT = 1
FEATURES = ("cos_prompt", "cos_statement", "cos_subject", "subject_named", "subject_words")
HEAD_FORMAT = 1  # bump when features or training change: cached heads of another format are not reused


# ------------------------------------------------------------------------------------ features
def fold(text: str) -> str:
    """Lower-cased words separated by single spaces (punctuation and underscores fold to spaces, so
    "Wellington's" contains the word "wellington")."""
    return " ".join(re.sub(r"[\W_]+", " ", text.casefold()).split())


def lexical_features(query: str, subject: str) -> tuple[float, float]:
    """(subject named in the query as whole words, share of the subject's words in the query)."""
    q, s = fold(query), fold(subject)
    if not s:
        return 0.0, 0.0
    words = s.split()
    qwords = set(q.split())
    return float(f" {s} " in f" {q} "), sum(w in qwords for w in words) / len(words)


def pair_features(qvecs: torch.Tensor, queries: Sequence[str], cand: torch.Tensor, prompts: torch.Tensor,
                  statements: torch.Tensor, subjects: torch.Tensor, subject_texts: Sequence[str]) -> torch.Tensor:
    """[n, k, 5] features (FEATURES order) of each query with each of its candidate edits `cand` [n, k]."""
    def cos(mat: torch.Tensor) -> torch.Tensor:
        return (mat[cand] * qvecs[:, None, :]).sum(-1)

    lex = torch.tensor([[lexical_features(q, subject_texts[j]) for j in row] for q, row in zip(queries, cand.tolist())],
                       dtype=torch.float32).reshape(cand.shape[0], cand.shape[1], 2)
    return torch.cat([torch.stack([cos(prompts), cos(statements), cos(subjects)], -1).float(), lex], -1)


@dataclass(frozen=True)
class ScopeHead:
    """Logistic regression on standardised pair features: p = sigmoid(w · (x - mean) / std + b)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    weight: tuple[float, ...]
    bias: float
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        mean, std, w = (torch.tensor(v, dtype=torch.float32) for v in (self.mean, self.std, self.weight))
        return torch.sigmoid(((x - mean) / std) @ w + self.bias)

    def to_dict(self) -> dict[str, Any]:
        return {"format": HEAD_FORMAT, "features": list(FEATURES), "mean": list(self.mean), "std": list(self.std),
                "weight": list(self.weight), "bias": self.bias, "info": self.info}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScopeHead":
        try:
            if d.get("format") != HEAD_FORMAT or list(d["features"]) != list(FEATURES):
                raise ValueError(f"head format {d.get('format')!r} / features {d.get('features')!r} are not this version's")
            vals = [tuple(float(x) for x in d[k]) for k in ("mean", "std", "weight")]
            if any(len(v) != len(FEATURES) for v in vals) or min(vals[1]) <= 0:
                raise ValueError("mean, std and weight need one value per feature (std > 0)")
            return cls(*vals, float(d["bias"]), dict(d.get("info") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise EditMismatchError(f"SERAC scope head is malformed: {e}") from None


# ------------------------------------------------------------------------------------ training
def _training_requests(name: str, n: int) -> list[EditRequest]:
    from ...data import load_requests

    with warnings.catch_warnings():  # a few invalid training records are skipped; they are not the user's edits
        warnings.simplefilter("ignore")
        return list(load_requests(name, limit=n or None))


def training_pairs(requests: Sequence[EditRequest], retriever: Retriever, group: int, k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [m, 5], labels [m]) from `requests` split into memories of `group` edits: every
    prompt, paraphrase, neighbourhood prompt and locality question of a memory's edits is a query; its
    `k` nearest edits (by prompt) are its pairs; a pair is positive when the query is the edit's own
    prompt or paraphrase."""
    xs, ys = [], []
    for start in range(0, len(requests), group):
        chunk = list(requests[start:start + group])
        if len(chunk) < 2:
            continue
        P = retriever.embed([r.prompt for r in chunk])
        S = retriever.embed([record_for(r).text for r in chunk])
        J = retriever.embed([r.subject for r in chunk])
        owner, texts, positive = [], [], []
        for i, r in enumerate(chunk):
            for text, pos in ([(r.prompt, True)] + [(p[0], True) for p in r.paraphrases]
                              + [(p[0], False) for p in (*r.neighborhood, *r.locality)]):
                owner.append(i), texts.append(text), positive.append(pos)
        q = retriever.embed(texts)
        kk = min(k, len(chunk))
        cand = (q @ P.T).topk(kk, dim=1).indices
        xs.append(pair_features(q, texts, cand, P, S, J, [r.subject for r in chunk]).reshape(-1, len(FEATURES)))
        own = torch.tensor(owner)[:, None]
        ys.append(((cand == own) & torch.tensor(positive)[:, None]).float().reshape(-1))
    if not xs:
        raise HparamsError(f"SERAC: training needs memories of at least 2 edits (got {len(requests)} records, "
                           f"train_group={group})")
    return torch.cat(xs), torch.cat(ys)


def fit_head(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3) -> ScopeHead:
    """Logistic regression with classes weighted to balance (the paper's balanced BCE), L-BFGS, on
    standardised features; deterministic for the same data."""
    n_pos = float(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise HparamsError("SERAC: the training data gave only one class of (query, edit) pairs; it needs "
                           "paraphrases (positives) and neighbourhood or locality prompts (negatives)")
    mean, std = x.mean(0), x.std(0).clamp(min=1e-4)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")
    pos_weight = torch.tensor((len(y) - n_pos) / n_pos)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, pos_weight=pos_weight)
        loss = loss + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    head = ScopeHead(tuple(mean.tolist()), tuple(std.tolist()), tuple(w.detach().tolist()), float(b.detach()))
    pred = head.probability(x) >= 0.5
    acc_pos = float(pred[y == 1].float().mean())
    acc_neg = float((~pred[y == 0]).float().mean())
    return ScopeHead(head.mean, head.std, head.weight, head.bias,
                     {"pairs": len(y), "positives": int(n_pos), "train_recall": round(acc_pos, 4),
                      "train_specificity": round(acc_neg, 4)})


def train_scope_head(retriever: Retriever, train_data: Sequence[str], train_records: int, group: int, k: int
                     ) -> ScopeHead:
    """The scope head for these settings: from the on-disk cache (keyed by the encoder, the training
    texts themselves and the settings) or trained now and cached atomically."""
    from ...fileio import write_text_atomic
    from ...paths import cache_dir

    reqs = {name: _training_requests(name, train_records) for name in train_data}
    h = hashlib.sha256(f"{HEAD_FORMAT}|{retriever.embedder.ident}|{group}|{k}".encode())
    for name, rs in reqs.items():
        h.update(name.encode())
        for r in rs:
            h.update(json.dumps(r.to_dict(), sort_keys=True).encode())
    path = cache_dir("serac") / f"head-{h.hexdigest()[:32]}.json"
    if path.is_file():
        try:
            return ScopeHead.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, EditMismatchError):
            pass  # a damaged cache file is retrained, not trusted
    parts = [training_pairs(rs, retriever, group, k) for rs in reqs.values()]
    head = fit_head(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    head = ScopeHead(head.mean, head.std, head.weight, head.bias,
                     {**head.info, "train_data": list(train_data), "train_records": train_records, "group": group, "k": k})
    write_text_atomic(path, json.dumps(head.to_dict(), indent=1))
    return head


# ------------------------------------------------------------------------------------ the view
class SERACView(PromptView):
    """Routes each prompt (see the module docstring). Config: {"format", "scope", "threshold", "k",
    "head": ScopeHead dict or None, "memory": EditMemory config, "extends", "below_facts"}; tensors: the
    memory's statement embeddings, "serac.prompts" and "serac.subjects" [N, d]."""

    def __init__(self, inner: Any, config: dict[str, Any] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(inner, config, tensors)
        cfg = self.config
        try:
            self.memory = self.saved_memory("SERAC", FORMAT)
            self.scope = str(cfg["scope"])
            if self.scope not in SCOPES:
                raise ValueError(f"scope {self.scope!r} is not one of {SCOPES}")
            self.threshold = check_threshold(float(cfg["threshold"]))
            self.k = int(cfg["k"])
            self.chat = bool(cfg.get("chat", False))
            self.head = ScopeHead.from_dict(cfg["head"]) if cfg.get("head") is not None else None
            self.prompts = self.tensors["serac.prompts"]
            self.subjects = self.tensors["serac.subjects"]
        except (KeyError, TypeError, ValueError) as e:
            raise EditMismatchError(f"SERAC view config is malformed: {e}") from None
        n = len(self.memory)
        if (not n or self.memory.embeddings is None or self.memory.embeddings.shape[0] != n
                or self.prompts.shape[0] != n or self.subjects.shape[0] != n):
            raise EditMismatchError(f"SERAC view: {n} facts but embeddings for "
                                    f"{0 if self.memory.embeddings is None else self.memory.embeddings.shape[0]} "
                                    f"statements, {self.prompts.shape[0]} prompts, {self.subjects.shape[0]} subjects")
        if self.scope == "learned" and self.head is None:
            raise EditMismatchError("SERAC view: scope 'learned' needs a trained head in its config")
        if cfg.get("extends"):
            below = extend_below(self, SERACView, "SERAC", ("scope", "threshold", "k", "chat", "head"))
            self.prompts = torch.cat([below.prompts, self.prompts.to(below.prompts.dtype)])
            self.subjects = torch.cat([below.subjects, self.subjects.to(below.subjects.dtype)])
        self._retriever: Retriever | None = None

    @property
    def retriever(self) -> Retriever:
        if self._retriever is None:
            self._retriever = Retriever(self.memory.embedder)
        return self._retriever

    # ---------------------------------------------------------------- routing
    def route(self, queries: Sequence[str]) -> list[tuple[int | None, float]]:
        """Per query: (index of the edit that covers it or None, its score: p(in scope) for the learned
        classifier, the cosine for `scope="cosine"`)."""
        queries = list(queries)
        if not queries:
            return []
        q = self.retriever.embed(queries)
        if q.shape[1] != self.prompts.shape[1]:
            raise EditMismatchError(f"SERAC memory vectors have {self.prompts.shape[1]} dimensions, queries "
                                    f"{q.shape[1]} (embedded with another encoder?)")
        sims = q @ self.prompts.to(q.dtype).T
        kk = min(self.k, sims.shape[1])
        top, cand = sims.topk(kk, dim=1)
        if self.scope == "cosine":
            score, best = top[:, 0], cand[:, 0]
        else:
            assert self.head is not None
            feats = pair_features(q, queries, cand, self.prompts, self.memory.embeddings, self.subjects,
                                  [r.request.subject if r.request is not None else "" for r in self.memory.records])
            p = self.head.probability(feats)
            score, at = p.max(dim=1)
            best = cand.gather(1, at[:, None])[:, 0]
        return [(int(b) if s >= self.threshold else None, float(s)) for b, s in zip(best.tolist(), score.tolist())]

    def context(self, index: int | None) -> str:
        """The text put before a prompt routed to edit `index` (nothing for the base model)."""
        return "" if index is None else query_text([self.memory.records[index].text], "")

    def wrap(self, prompts: Sequence[str], reserves: Sequence[int]) -> list[str]:
        """Each prompt with its routed edit's statement before its query (the last line, with a short cue
        line's question: a few-shot prompt is routed by its question, and its demonstrations stay first;
        the whole of a one-line prompt). A routed prompt that, with the
        statement and `reserve` more tokens, no longer fits the model's context raises
        `PromptTooLongError` (a prompt the base model answers is passed on as it is)."""
        limit = _context_limit(self.base)
        parts = [split_query(p) for p in prompts]
        out = []
        for p, (head, query), (i, _), reserve in zip(prompts, parts, self.route([q for _, q in parts]), reserves):
            text = p if i is None else head + join(self.base.tokenizer, self.context(i), query, self.chat)
            if i is not None and limit is not None:
                n = len(self.base.encode_prompt(text)) + reserve
                if n > limit:
                    raise PromptTooLongError(f"SERAC: the prompt {p[:60]!r} with the statement of the edit that covers "
                                             f"it and {reserve} more tokens is {n} tokens, over the context of {limit}")
            out.append(text)
        return out

    # ---------------------------------------------------------------- the LM calls (PromptView: score, next token, generate)
    def window_contexts(self, windows: Sequence[Sequence[int]], prefix_ids: Sequence[int]) -> list[str]:
        """Raw token windows (perplexity) are routed by the text of their first 64 tokens; a routed window
        is read after the edit's statement when it fits the context (else without it)."""
        tok = self.base.tokenizer
        limit = _context_limit(self.base)
        out = []
        for w, (idx, _) in zip(windows, self.route(self.window_queries(windows))):
            ctx = "" if idx is None else join(tok, self.context(idx), "", self.chat)
            if ctx and limit is not None and len(w) + len(prefix_ids) + len(tok(ctx, add_special_tokens=False)["input_ids"]) > limit:
                ctx = ""
            out.append(ctx)
        return out



@lru_cache(maxsize=4)
def _head(embedder: str, train_data: tuple[str, ...], train_records: int, group: int, k: int, data_root: str
          ) -> ScopeHead:
    """The head for these settings, once per process (`data_root` keys it to the data folder in use)."""
    return train_scope_head(Retriever(embedder), train_data, train_records, group, k)


class SERACEditor(Editor):
    """Returns one `ViewPatch("serac")`; with `on=` (a previous SERAC edit, the top of the stack) the new
    edit's view joins the earlier facts, so a sequence is one memory that each restore shortens."""

    hparams_cls = SERACHparams
    supports_batch: ClassVar[bool] = True
    supports_on: ClassVar[bool] = True

    def compute_patches(self, lm: LM, requests: list[EditRequest], hp: SERACHparams, on: Edit | None
                        ) -> tuple[list[Patch], dict[str, Any]]:
        below_facts = extension_of(on, SERACView, "SERAC", hp.embedder)
        retriever = Retriever(hp.embedder)
        head = (_head(hp.embedder, tuple(hp.train_data), hp.train_records, hp.train_group, hp.k, str(data_dir()))
                if hp.scope == "learned" else None)
        records = [record_for(r) for r in requests]
        memory = EditMemory(hp.embedder)
        memory.add(records, retriever.embed([r.text for r in records]))
        tensors, mem_cfg = memory.state()
        tensors["serac.prompts"] = retriever.embed([r.prompt for r in requests]).contiguous()
        tensors["serac.subjects"] = retriever.embed([r.subject for r in requests]).contiguous()
        config = {"format": FORMAT, "scope": hp.scope, "threshold": hp.threshold, "k": hp.k,
                  "head": head.to_dict() if head is not None else None, "memory": mem_cfg,
                  "extends": on is not None, "below_facts": below_facts, "chat": hp.chat}
        view = SERACView(lm.edited, config, tensors)  # a malformed config fails here, before anything is installed
        info: dict[str, Any] = {"facts": len(view.memory)}
        if head is not None:
            info["scope_head"] = head.info
        return [ViewPatch("serac", config, tensors)], info
