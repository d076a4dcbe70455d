"""EMMET: equality-constrained mass model editing (Gupta, Sajnani, Anumanchipalli 2024).

ROME (every edited key maps exactly to its value) and MEMIT (least squares) solve one
preservation–memorisation objective; EMMET is its batched equality-constrained solution:

    min ‖Ŵ K₀ − W K₀‖²  s.t.  Ŵ k_i = v_i for every edit  ⇒  ΔW = R D⁻¹ Kᵀ C⁻¹,  D = K C⁻¹ Kᵀ

with C = μ·E[k kᵀ] (μ = `mom2_update_weight`), K the template-averaged keys and R the spread residuals
(`spread.py`, as MEMIT). For batches of more than one edit, D gets λ_e·I on its diagonal
(`emmet_lambda`) against ill-conditioning (two edits of one subject make D singular; a pseudo-inverse is
the last resort and is reported in the edit's info). A single edit is solved exactly (no λ_e), which is
ROME with MEMIT's averaged keys. Without λ_e, μ cancels.

`emmet_lambda_mode="relative"` scales λ_e by the median of diag D, so that the regulariser means the
same on models whose key norms differ by orders of magnitude; the paper presets use the reference's
absolute value.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import HparamsError
from ...models.lm import LM
from ...requests import EditRequest
from ...stats import second_moments
from ..base import Editor
from .shared import PreparesContextTemplates
from .hparams import LAMBDA_MODES, EMMETHparams  # noqa: F401 (re-exported)
from .spread import spread_over_layers


def emmet_update(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, mu: float, lam: float,
                 lam_mode: str = "absolute", max_cond: float = 1e12) -> tuple[torch.Tensor, dict[str, Any]]:
    """ΔW (out, in) = Rᵀ D⁻¹ K C⁻¹ for keys K [n, in], residuals R [n, out] (rows = requests),
    C = μ·cov, D = K C⁻¹ Kᵀ (+ λ_e I when n > 1). Float64. Returns (ΔW, diagnostics). D worse
    conditioned than `max_cond` (near-duplicate keys) is inverted with a pseudo-inverse."""
    k, r = keys.double(), resid.double()
    try:
        ckt = torch.linalg.solve(mu * cov.double(), k.T)  # C⁻¹ Kᵀ [in, n]
    except RuntimeError:
        raise HparamsError("EMMET: the key statistics are singular; compute them over more tokens "
                           "(mom2_n_tokens)") from None
    d = k @ ckt
    d = (d + d.T) / 2  # symmetric in exact arithmetic
    n = d.shape[0]
    reg = 0.0
    if n > 1 and lam > 0:
        reg = lam * (float(d.diagonal().median()) if lam_mode == "relative" else 1.0)
        d = d + reg * torch.eye(n, dtype=d.dtype)
    cond = float(torch.linalg.cond(d))
    pinv = not cond < max_cond  # (near-)singular D, e.g. the same subject twice with λ_e = 0
    x = torch.linalg.pinv(d, hermitian=True) @ ckt.T if pinv else torch.linalg.solve(d, ckt.T)  # D⁻¹ K C⁻¹ [n, in]
    return r.T @ x, {"lambda": reg, "pseudo_inverse": pinv, "cond_D": cond}


class EMMETEditor(PreparesContextTemplates, Editor):
    name = "emmet"
    hparams_cls = EMMETHparams
    supports_batch = True

    def compute_deltas(self, lm: LM, requests: list[EditRequest], hp: EMMETHparams) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        covs = second_moments(lm, hp.layers, hp.corpus, hp.mom2_n_tokens)
        diag: dict[str, Any] = {}

        def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
            upd, diag[str(layer)] = emmet_update(keys, resid, covs[layer], hp.mom2_update_weight, hp.emmet_lambda,
                                                 hp.emmet_lambda_mode, hp.max_cond)
            return upd

        out = spread_over_layers(lm, requests, hp, solve, "EMMET")
        return out.deltas, {**out.info, "solve": diag}
