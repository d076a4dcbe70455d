"""Generation fluency: the weighted n-gram entropy of generated text (ROME paper, after Zhang et al.
2018): with f_n the relative frequencies of the word n-grams of a text,
    H_n = −Σ f_n log2 f_n,   fluency = mean(2/3 · H_2, 4/3 · H_3).
Repetitive text has low entropy; the ROME paper reports it averaged over generation prompts."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    words = _WORD.findall(text.lower())
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum((c / total) * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(w * h)
    return sum(values) / len(values)
