"""Per-request evaluation of an edit, batched into one scoring pass per request.

Definitions (see docs/metrics.md for the formulas):
- CounterFact (ROME paper). For a prompt, P(o) = exp(−mean token NLL of o). Efficacy score: fraction
  of rewrite prompts with P(new) > P(true); magnitude: mean P(new) − P(true). Paraphrase: the same on
  paraphrase prompts. Neighbourhood: fraction of neighbour prompts with P(true) > P(new); magnitude
  P(true) − P(new). Dataset score: harmonic mean of the three scores.
- Token accuracy (zsRE / EasyEdit). Teacher-forced: the fraction of answer tokens that are the argmax
  prediction given the prompt and the preceding answer tokens. rewrite_acc (prompt -> new target),
  rephrase_acc (paraphrases -> new target), portability_acc (portability question -> its answer),
  locality_acc: agreement of the edited model's argmax tokens with the unedited model's on the
  neighbourhood/locality prompts (teacher-forced with their own answers).
- Generation exact match: greedy decoding of as many tokens as the target has; 1 if the decoded ids
  equal the target ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ..models.lm import LM
from ..requests import EditRequest
from ..tokens import encode_pair
from .fluency import ngram_entropy

CF_KEYS = ("efficacy_score", "paraphrase_score", "neighborhood_score")


@dataclass
class PreEdit:
    """Unedited model's argmax tokens on locality-type probes, keyed by (prompt, answer)."""

    argmax: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def merge(self, other: "PreEdit") -> "PreEdit":
        self.argmax.update(other.argmax)
        return self


def _locality_pairs(req: EditRequest) -> list[tuple[str, str]]:
    return list(req.neighborhood) + list(req.locality)


def pre_edit(lm: LM, requests: Iterable[EditRequest], cache: PreEdit | None = None) -> PreEdit:
    """Compute (once) the unedited model's predictions that locality metrics compare against."""
    cache = cache or PreEdit()
    pairs = []
    for r in requests:
        pairs.extend(p for p in _locality_pairs(r) if p not in cache.argmax)
    pairs = list(dict.fromkeys(pairs))
    if pairs:
        for pair, s in zip(pairs, lm.score([p for p, _ in pairs], [a for _, a in pairs])):
            cache.argmax[pair] = s.argmax_ids
    return cache


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def evaluate_request(
    lm: LM,
    req: EditRequest,
    pre: PreEdit | None = None,
    *,
    generation: bool = False,
    fluency_prompts: Sequence[str] = (),
    fluency_tokens: int = 50,
) -> dict[str, float]:
    """All metrics for one request on the (edited) `lm`. Locality needs `pre` (from `pre_edit`)."""
    prompts: list[str] = []
    conts: list[str] = []
    slots: list[tuple[str, int, str]] = []  # (group, index, which)

    def add(group: str, i: int, which: str, prompt: str, cont: str) -> None:
        slots.append((group, i, which))
        prompts.append(prompt)
        conts.append(cont)

    groups = {"rewrite": [req.prompt], "paraphrase": [p for p, _ in req.paraphrases]}
    for g, ps in groups.items():
        for i, p in enumerate(ps):
            add(g, i, "new", p, req.target_new)
            if req.target_true:
                add(g, i, "true", p, req.target_true)
    if req.target_true:
        for i, (p, _a) in enumerate(req.neighborhood):
            add("neighborhood", i, "new", p, req.target_new)
            add("neighborhood", i, "true", p, req.target_true)
    loc_pairs = _locality_pairs(req)
    for i, (p, a) in enumerate(loc_pairs):
        add("locality", i, "own", p, a)
    for i, (p, a) in enumerate(req.portability):
        add("portability", i, "own", p, a)

    scores = lm.score(prompts, conts)
    by = {s: sc for s, sc in zip(slots, scores)}
    out: dict[str, float] = {}

    def prob(group: str, i: int, which: str) -> float:
        return math.exp(-by[(group, i, which)].mean_nll)

    if req.target_true:
        for g, key in (("rewrite", "efficacy"), ("paraphrase", "paraphrase")):
            n = len(groups[g])
            if n:
                diffs = [prob(g, i, "new") - prob(g, i, "true") for i in range(n)]
                out[f"{key}_score"] = sum(d > 0 for d in diffs) / n
                out[f"{key}_magnitude"] = sum(diffs) / n
        if req.neighborhood:
            diffs = [prob("neighborhood", i, "true") - prob("neighborhood", i, "new") for i in range(len(req.neighborhood))]
            out["neighborhood_score"] = sum(d > 0 for d in diffs) / len(diffs)
            out["neighborhood_magnitude"] = sum(diffs) / len(diffs)

    out["rewrite_acc"] = by[("rewrite", 0, "new")].token_accuracy
    if req.paraphrases:
        out["rephrase_acc"] = _mean([by[("paraphrase", i, "new")].token_accuracy for i in range(len(req.paraphrases))])  # type: ignore[assignment]
    if loc_pairs and pre is not None:
        accs = []
        for i, pair in enumerate(loc_pairs):
            before = pre.argmax.get(pair)
            if before is None:
                raise KeyError(f"no pre-edit value for locality probe {pair!r}; call pre_edit() before editing")
            after = by[("locality", i, "own")].argmax_ids
            accs.append(sum(int(a == b) for a, b in zip(after, before)) / max(1, len(before)))
        out["locality_acc"] = sum(accs) / len(accs)
    if req.portability:
        out["portability_acc"] = _mean([by[("portability", i, "own")].token_accuracy for i in range(len(req.portability))])  # type: ignore[assignment]

    if generation:
        gen_prompts = [req.prompt] + [p for p, _ in req.paraphrases]
        em = generation_exact_match(lm, gen_prompts, [req.target_new] * len(gen_prompts))
        out["rewrite_gen_em"] = em[0]
        if len(em) > 1:
            out["rephrase_gen_em"] = sum(em[1:]) / (len(em) - 1)
    if fluency_prompts:
        texts = lm.generate(list(fluency_prompts), fluency_tokens)
        out["fluency"] = sum(ngram_entropy(p + t) for p, t in zip(fluency_prompts, texts)) / len(texts)
    return out


def generation_exact_match(lm: LM, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
    """1.0 where greedy decoding reproduces the target's tokens exactly, else 0.0."""
    t_ids = [encode_pair(lm.tokenizer, p, t)[1] for p, t in zip(prompts, targets)]
    width = max(len(t) for t in t_ids)
    gens = lm.generate_ids(list(prompts), width)
    return [float(g[: len(t)] == t) for g, t in zip(gens, t_ids)]


def summarize(rows: Iterable[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over rows (rows lacking a metric are left out of its mean), plus the
    CounterFact harmonic-mean score when all three CounterFact scores are present."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
    out = {k: sums[k] / counts[k] for k in sums}
    if all(k in out for k in CF_KEYS):
        vals = [out[k] for k in CF_KEYS]
        out["cf_score"] = 0.0 if min(vals) <= 0 else len(vals) / sum(1 / v for v in vals)
    return out
