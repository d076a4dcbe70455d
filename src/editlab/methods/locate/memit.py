"""MEMIT: mass-editing memory in a transformer (Meng et al., 2023).

For a batch of requests, target hidden states z_i = h_L + δ_i at the last layer L of a range of MLP
layers are found by the shared value optimization and spread over the layers from first to last
(`spread.py`). At layer l, with template-averaged keys K and residual R, the update is the least-squares
fit of the new associations regularised by the existing ones:
    ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹
where C_l = E[k kᵀ] over generic text and λ (`mom2_update_weight`) trades preserving old keys against
fitting new ones.
"""

from __future__ import annotations

from typing import Any

import torch

from ...models.lm import LM
from ...requests import EditRequest
from ...stats import second_moments
from ..base import Editor
from .shared import PreparesContextTemplates
from .hparams import MEMITHparams
from .spread import spread_over_layers



def memit_update(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, weight: float) -> torch.Tensor:
    """ΔW (out, in) = R Kᵀ (λ C + K Kᵀ)⁻¹ for keys K [n, in] and residuals R [n, out] (rows = requests):
    the least-squares fit of the new associations regularized by λ·E[k kᵀ] of existing ones."""
    k = keys.double()
    a = weight * cov.double() + k.T @ k
    return torch.linalg.solve(a, k.T @ resid.double()).T


class MEMITEditor(PreparesContextTemplates, Editor):
    name = "memit"
    hparams_cls = MEMITHparams
    supports_batch = True

    def compute_deltas(self, lm: LM, requests: list[EditRequest], hp: MEMITHparams) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        covs = second_moments(lm, hp.layers, hp.corpus, hp.mom2_n_tokens)
        out = spread_over_layers(lm, requests, hp, lambda l, k, r: memit_update(k, r, covs[l], hp.mom2_update_weight),
                                 "MEMIT")
        return out.deltas, out.info
