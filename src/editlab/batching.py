"""Token-batch layout shared by every forward pass editlab makes: padding and the teacher-forcing layout
of a (prompt, target) pair. Written once so methods, statistics and metrics line tokens up the same way.
"""

from __future__ import annotations

from typing import Sequence

import torch


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right",
              width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of `seqs` padded to `width` (default: the longest) on `side`. Left
    padding lines up the last tokens (generation, prefix caches); callers that run a plain forward on
    left-padded rows pass explicit position ids (`positions_from_mask`)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    n = max((len(s) for s in seqs), default=0) if width is None else width
    ids = torch.full((len(seqs), max(n, 1) if seqs and n == 0 else n), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        if not len(s):
            continue
        t = torch.as_tensor(list(s), dtype=torch.long)
        if side == "right":
            ids[i, : len(s)] = t
            mask[i, : len(s)] = 1
        else:
            ids[i, n - len(s) :] = t
            mask[i, n - len(s) :] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens (0 at each row's first real token)."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def teacher_forcing(prompt_ids: Sequence[int], target_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """The sequence to run and the positions whose next-token logits predict each target token:
    a target of m tokens needs prompt + target[:-1], read at len(prompt)-1 ... len(prompt)+m-2."""
    seq = list(prompt_ids) + list(target_ids[:-1])
    start = len(prompt_ids) - 1
    return seq, list(range(start, start + len(target_ids)))
