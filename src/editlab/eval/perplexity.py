"""Perplexity of a model on a fixed text sample: exp(mean next-token NLL) over non-overlapping windows.
Used as the general-ability signal as sequential edits accumulate."""

from __future__ import annotations

import math

from typing import Any

from ..models.lm import LM


def text_windows(lm: LM, text: str, n_tokens: int = 2048, window: int = 256) -> list[list[int]]:
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]


def perplexity(lm: Any, windows: list[list[int]]) -> float:
    """exp(mean next-token NLL) over the windows, through the LM call `sequence_logprobs`, so an edited
    system (a weight edit or an LM view) is measured by the same code."""
    total, count = 0.0, 0
    for lp in lm.sequence_logprobs(windows):
        total -= float(lp.sum())
        count += int(lp.numel())
    return math.exp(total / max(1, count))
