"""TIES merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"): several
task vectors (weight deltas from one base) become one in three steps.

1. **Trim**: each delta keeps its `density` fraction of entries of largest magnitude, counted over all of
   its entries (a delta that is already sparser than `density` keeps every non-zero entry).
2. **Elect a sign** per entry: the sign of the sum of the weighted, trimmed deltas (0 counts as +).
3. **Disjoint mean**: per entry, the weighted mean over the deltas whose non-zero value has the elected
   sign; an entry no delta agrees on stays 0.

Used by WISE to merge its shards (side memories) into one memory. Written from the paper's definition;
the weighted, normalised form is the one WISE's reference merges with (weights cancel where one delta
alone contributes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its `density` fraction of largest-magnitude entries set to 0 (ties at the
    cut are broken by position, as `topk` breaks them)."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if density == 1:
        return delta
    k = int(density * delta.numel())
    if k == 0:
        return torch.zeros_like(delta)
    if int(torch.count_nonzero(delta)) <= k:  # every non-zero entry is among the k largest: nothing to cut
        return delta
    flat = delta.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().float().topk(k).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(delta)


def ties_merge(deltas: torch.Tensor | Sequence[torch.Tensor], density: float = 1.0,
               weights: Sequence[float] | None = None) -> torch.Tensor:
    """One delta from the deltas `[n, ...]` (trim to `density`, elect signs, disjoint weighted mean)."""
    stacked = torch.stack(list(deltas)) if not isinstance(deltas, torch.Tensor) else deltas
    if stacked.shape[0] == 0:
        raise ValueError("ties_merge needs at least one delta")
    w = torch.ones(stacked.shape[0]) if weights is None else torch.tensor([float(x) for x in weights])
    if w.numel() != stacked.shape[0] or bool((w <= 0).any()):
        raise ValueError(f"need one positive weight per delta, got {list(w.tolist())} for {stacked.shape[0]}")
    w = w.to(stacked.device, stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    weighted = torch.stack([trim(d, density) for d in stacked]) * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = weighted.sign() == elected  # a zero entry never agrees: it takes no part in the mean
    total = (weighted * agree).sum(0)
    share = (w * agree).sum(0)
    return total / torch.where(share == 0, torch.ones_like(share), share)
