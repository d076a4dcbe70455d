"""Perplexity of a model on a fixed text sample: exp(mean next-token NLL) over non-overlapping windows.
Used as the general-ability signal as sequential edits accumulate."""

from __future__ import annotations

import math

import torch

from ..models.lm import LM


def text_windows(lm: LM, text: str, n_tokens: int = 2048, window: int = 256) -> list[list[int]]:
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]


@torch.no_grad()
def perplexity(lm: LM, windows: list[list[int]]) -> float:
    total, count = 0.0, 0
    for i in range(0, len(windows), 8):
        chunk = windows[i : i + 8]
        ids, mask = lm.pad_right(chunk)
        hid = lm.hidden_states(ids, mask)
        logp = torch.log_softmax(lm.head(hid[:, :-1]).float(), -1)
        tgt = ids[:, 1:].to(logp.device)
        nll = -logp.gather(2, tgt[..., None])[..., 0]
        m = mask[:, 1:].to(nll.device).bool()
        total += float(nll[m].sum())
        count += int(m.sum())
    return math.exp(total / max(1, count))
