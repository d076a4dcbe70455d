"""Scoring shared by the suites (definitions: docs/pitfalls.md, section 0 of the metric spec).

- `g(o|x)`: mean-token probability `exp(mean log p(o_i | x, o_<i))` of a target after a prompt, on
  the ids `ids(x.rstrip()) ++ ids(" " + o)` (spec section 0 and pitfall P4: 14 of the 140 conflict
  prompts end in a space, which would otherwise leave a lone space token before a target tokenized
  without its leading space). Every probe prompt passes through `probe_prompt`.
- `fact_probs`: P̄ of a fact over a prompt set, the arithmetic mean of `g` over the prompts.
- `js_divergence`, `kl_divergence` in nats; `normalize_answer` / `answer_match` for generated answers.
All model calls are one batched `score` per call, whatever the number of prompts.
"""

from __future__ import annotations

import math
import re
import string
from typing import Any, Iterable, Sequence


def probe_prompt(prompt: str) -> str:
    """A prompt as the suites score and edit it: trailing whitespace removed, so that the target joins
    it with its own leading space (`editlab.tokens.join_target`)."""
    return prompt.rstrip()


def _prompts(prompts: Sequence[str]) -> list[str]:
    return [probe_prompt(p) for p in prompts]


def neighbourhood_scores(g_true: Sequence[float], g_new: Sequence[float]) -> tuple[float, float]:
    """(NS, NM) of one record's prompts: share with g(true) > g(new), mean margin g(true) − g(new)."""
    diffs = [t - n for t, n in zip(g_true, g_new)]
    return sum(d > 0 for d in diffs) / len(diffs), sum(diffs) / len(diffs)


def mean_token_probs(system: Any, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
    """`g(target | prompt)` for each pair, in one batched scoring pass."""
    if not prompts:
        return []
    return [math.exp(-s.mean_nll) for s in system.score(_prompts(prompts), list(targets))]


def fact_probs(system: Any, facts: Sequence[tuple[Sequence[str], str]]) -> list[float]:
    """P̄ for each `(prompt_set, object)`: mean over the prompts of `g(object | prompt)`; all facts are
    scored in one pass."""
    flat_p: list[str] = []
    flat_t: list[str] = []
    for prompts, obj in facts:
        if not prompts:
            raise ValueError(f"fact with object {obj!r} has no prompts")
        flat_p += list(prompts)
        flat_t += [obj] * len(prompts)
    g = mean_token_probs(system, flat_p, flat_t)
    out, at = [], 0
    for prompts, _ in facts:
        out.append(sum(g[at : at + len(prompts)]) / len(prompts))
        at += len(prompts)
    return out


def token_accuracies(system: Any, pairs: Sequence[tuple[str, str]]) -> list[float]:
    """Teacher-forced token accuracy of each answer after its prompt (EasyEdit's portability score)."""
    if not pairs:
        return []
    return [s.token_accuracy for s in system.score(_prompts([p for p, _ in pairs]), [a for _, a in pairs])]


def argmax_ids(system: Any, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
    """Teacher-forced argmax token ids on each probe's own answer (EasyEdit's locality compares these)."""
    if not pairs:
        return []
    return [list(s.argmax_ids) for s in system.score(_prompts([p for p, _ in pairs]), [a for _, a in pairs])]


def agreement(after: Sequence[int], before: Sequence[int]) -> float:
    """Share of positions where two argmax id lists agree (EasyEdit locality of one probe)."""
    return sum(int(a == b) for a, b in zip(after, before)) / max(1, len(before))


def normalize_dist(values: Sequence[float]) -> list[float]:
    total = float(sum(values))
    if total <= 0:
        raise ValueError("cannot normalise a distribution with zero mass")
    return [float(v) / total for v in values]


def kl_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """KL(p ‖ q) in nats over discrete distributions (terms with p = 0 contribute 0)."""
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence in nats: ½KL(p‖m) + ½KL(q‖m), m = (p+q)/2; in [0, ln 2]."""
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)


def harmonic_mean(values: Iterable[float]) -> float:
    vals = list(values)
    if not vals or min(vals) <= 0:
        return 0.0
    return len(vals) / sum(1 / v for v in vals)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_match(output: str, golds: Iterable[str], *, strict: bool = False) -> bool:
    """Whether a generated (already cut) answer equals one of `golds`: after SQuAD normalisation of both
    sides by default, exact string equality after stripping with `strict` (the MeLLo notebook's rule)."""
    if strict:
        out = output.strip()
        return any(out == g.strip() for g in golds)
    out = normalize_answer(output)
    return bool(out) and any(out == normalize_answer(g) for g in golds)


__all__ = ["probe_prompt", "agreement", "answer_match", "argmax_ids", "fact_probs", "harmonic_mean", "js_divergence", "kl_divergence",
           "mean_token_probs", "neighbourhood_scores", "normalize_answer", "normalize_dist", "token_accuracies"]
