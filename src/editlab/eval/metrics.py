"""Per-request evaluation of an edit, batched into one scoring pass per request.

Definitions (see docs/metrics.md for the formulas):
- CounterFact (ROME paper). For a prompt, P(o) = exp(−mean token NLL of o). Efficacy score: fraction
  of rewrite prompts with P(new) > P(true); magnitude: mean P(new) − P(true). Paraphrase: the same on
  paraphrase prompts. Neighbourhood: fraction of neighbour prompts whose own answer beats the
  new target, P(answer) > P(new) (in CounterFact the answer is the edited fact's true object);
  magnitude P(answer) − P(new). Dataset score: harmonic mean of the three scores.
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
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ..requests import EditRequest
from .fluency import generation_fluency

if TYPE_CHECKING:
    from ..models.lm import LM

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


def _probe_slots(req: EditRequest) -> tuple[list[tuple[str, int, str]], list[str], list[str]]:
    slots: list[tuple[str, int, str]] = []  # (group, index, which)
    prompts: list[str] = []
    conts: list[str] = []

    def add(group: str, i: int, which: str, prompt: str, cont: str) -> None:
        slots.append((group, i, which))
        prompts.append(prompt)
        conts.append(cont)

    for g, ps in (("rewrite", [req.prompt]), ("paraphrase", [p for p, _ in req.paraphrases])):
        for i, p in enumerate(ps):
            add(g, i, "new", p, req.target_new)
            if req.target_true:
                add(g, i, "true", p, req.target_true)
    for i, (p, a) in enumerate(req.neighborhood):
        add("neighborhood", i, "new", p, req.target_new)
        add("neighborhood", i, "true", p, a)
    for i, (p, a) in enumerate(_locality_pairs(req)):
        add("locality", i, "own", p, a)
    for i, (p, a) in enumerate(req.portability):
        add("portability", i, "own", p, a)
    return slots, prompts, conts


def _metrics_from_scores(req: EditRequest, by: dict[tuple[str, int, str], Any], pre: PreEdit | None) -> dict[str, float]:
    out: dict[str, float] = {}

    def prob(group: str, i: int, which: str) -> float:
        return math.exp(-by[(group, i, which)].mean_nll)

    if req.target_true:
        for g, key, n in (("rewrite", "efficacy", 1), ("paraphrase", "paraphrase", len(req.paraphrases))):
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
        out["rephrase_acc"] = sum(by[("paraphrase", i, "new")].token_accuracy for i in range(len(req.paraphrases))) / len(req.paraphrases)
    loc_pairs = _locality_pairs(req)
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
        out["portability_acc"] = sum(by[("portability", i, "own")].token_accuracy for i in range(len(req.portability))) / len(req.portability)
    return out


def evaluate_requests(
    lm: LM,
    requests: Sequence[EditRequest],
    pre: PreEdit | None = None,
    *,
    generation: bool = False,
    fluency: bool = False,
    seed: int = 0,
) -> list[dict[str, float]]:
    """All metrics for each request on the (edited) system `lm` (an LM or an edit's view), scored in one
    batched pass. Locality needs `pre` (from `pre_edit`, computed before editing). With `fluency`,
    ROME's generation fluency: the weighted n-gram entropy of 100-token top-k-5 samples (seeded) from
    each request's generation prompts (CounterFact's `generation_prompts`; otherwise the edit prompt
    and its paraphrases), averaged per request."""
    all_prompts: list[str] = []
    all_conts: list[str] = []
    spans = []
    for req in requests:
        slots, prompts, conts = _probe_slots(req)
        spans.append((len(all_prompts), slots))
        all_prompts += prompts
        all_conts += conts
    scores = lm.score(all_prompts, all_conts)
    rows = []
    for req, (start, slots) in zip(requests, spans):
        by = {s: scores[start + k] for k, s in enumerate(slots)}
        rows.append(_metrics_from_scores(req, by, pre))
    if generation:
        gen_p, gen_t, owner = [], [], []
        for r, req in enumerate(requests):
            for p in [req.prompt] + [p for p, _ in req.paraphrases]:
                gen_p.append(p)
                gen_t.append(req.target_new)
                owner.append(r)
        em = generation_exact_match(lm, gen_p, gen_t)
        for r, row in enumerate(rows):
            mine = [e for e, o in zip(em, owner) if o == r]
            row["rewrite_gen_em"] = mine[0]
            if len(mine) > 1:
                row["rephrase_gen_em"] = sum(mine[1:]) / (len(mine) - 1)
    if fluency:
        flat = [(r, p) for r, req in enumerate(requests) for p in generation_prompts(req)]
        scores = generation_fluency(lm, [p for _, p in flat], seed=seed)
        per: dict[int, list[float]] = {}
        for (r, _), v in zip(flat, scores):
            per.setdefault(r, []).append(v)
        for r, vals in per.items():
            rows[r]["fluency"] = sum(vals) / len(vals)
    return rows


def generation_prompts(req: EditRequest) -> list[str]:
    """Prompts whose sampled continuations measure fluency: CounterFact's `generation_prompts` when the
    record has them, else the edit prompt and its paraphrases."""
    given = req.extra.get("generation_prompts") if req.extra else None
    if given:
        return [str(p) for p in given]
    return [req.prompt] + [p for p, _ in req.paraphrases]


def evaluate_request(lm: LM, req: EditRequest, pre: PreEdit | None = None, *, generation: bool = False,
                     fluency: bool = False, seed: int = 0) -> dict[str, float]:
    """`evaluate_requests` for one request."""
    return evaluate_requests(lm, [req], pre, generation=generation, fluency=fluency, seed=seed)[0]


def generation_exact_match(lm: LM, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
    """1.0 where greedy decoding reproduces the target's tokens exactly, else 0.0."""
    t_ids = [lm.encode_pair(p, t)[1] for p, t in zip(prompts, targets)]
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
