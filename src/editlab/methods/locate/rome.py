"""ROME: rank-one model editing (Meng et al., 2022), by default with the r-ROME key fix (Gupta et al., 2024).

The MLP output projection W of one layer is a linear associative memory. Keys are the projection's input
at the subject's last token: k at the bare prompt, and k* averaged (flat) over the bare prompt and the
random context prefixes (paper: 10 of 5 tokens + 10 of 10). The value δ is optimized (`optimize_values`)
so that v* = v_bare + δ, written at the subject's last token, makes the model say the new target. The
update is rank one, ΔW = Λ uᵀ with u = C⁻¹k* (C = E[k kᵀ] over generic text), and `key_mode` picks which
key the new association is fitted at:

- `original` (kmeng01/rome): Λ = (v* − W k)/(uᵀk), so Ŵk = v* — direction from k*, fit at k. These mixed
  keys cause the occasional "disabling" edit and the collapse of sequential ROME;
- `r-rome` (default, the r-ROME paper): Λ = (v* − W k*)/(uᵀk*), so Ŵk* = v*;
- `consistent`: v* = W k* + δ, Λ = δ/(uᵀk*) (editlab's earlier variant: δ is added to the averaged value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...models.lm import LM
from ...requests import EditRequest
from ...stats import second_moments
from ..base import Editor
from ..patches import LowRank
from .hparams import KEY_MODES, ROMEHparams, parse_template_groups  # noqa: F401 (re-exported)
from .shared import (
    PreparesContextTemplates,
    capture_at_subject,
    context_templates,
    flat_mean,
    optimize_values,
    refuse_post_mlp_norm,
)


def rank_one_factors(
    w: torch.Tensor,
    key: torch.Tensor,
    delta: torch.Tensor,
    cov: torch.Tensor | None,
    value_key: torch.Tensor | None = None,
    fit_key: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Λ, u) with ΔW (out, in) = Λ uᵀ, u = C⁻¹`key`, mapping `fit_key` exactly to v* = W `value_key` +
    `delta`: Λ = (v* − W fit_key)/(uᵀ fit_key). Both keys default to `key`. Keys orthogonal to u (in
    the C⁻¹ metric) are untouched. Float64."""
    k = key.double()
    kv = k if value_key is None else value_key.double()
    kf = k if fit_key is None else fit_key.double()
    wd = w.double()
    u = torch.linalg.solve(cov.double(), k) if cov is not None else k
    resid = wd @ kv + delta.double() - wd @ kf
    return resid / (u @ kf), u


def rank_one_update(w: torch.Tensor, key: torch.Tensor, delta: torch.Tensor, cov: torch.Tensor | None,
                    value_key: torch.Tensor | None = None, fit_key: torch.Tensor | None = None) -> torch.Tensor:
    """The dense ΔW = Λ uᵀ of `rank_one_factors`."""
    lam, u = rank_one_factors(w, key, delta, cov, value_key, fit_key)
    return torch.outer(lam, u)


@dataclass
class ROMESolve:
    """Everything the update was built from (CPU), for inspection and tests."""

    key_bare: torch.Tensor  # k
    key_star: torch.Tensor  # k*
    v_init: torch.Tensor  # unedited projection output at the bare prompt
    delta: torch.Tensor  # δ; v* = v_init + δ ('consistent': W k* + b + δ)
    update: torch.Tensor  # ΔW (out, in), float64
    info: dict[str, Any]
    lam: torch.Tensor  # ΔW = Λ uᵀ
    u: torch.Tensor


def rome_solve(lm: LM, req: EditRequest, hp: ROMEHparams) -> ROMESolve:
    refuse_post_mlp_norm(lm, "ROME")
    groups = context_templates(lm, parse_template_groups(hp.context_templates), hp.seed)
    templates = [t for g in groups for t in g]
    path = lm.arch.mlp_out_path(hp.layer)
    cov = None
    if hp.mom2_adjustment:
        cov = second_moments(lm, [hp.layer], hp.corpus, hp.mom2_n_tokens)[hp.layer]
    keys = capture_at_subject(lm, [req], templates, {path: "in"})[path][0]  # [T, d_in]; row 0 is bare
    k_bare, k_star = keys[0], flat_mean(keys[None])[0]
    cfg = hp.value_config()
    delta, v_init, info = optimize_values(lm, [req], templates, path, cfg)
    w = lm.arch.as_matrix(lm.base_module(path).weight.detach()).float().cpu()
    if hp.key_mode == "original":
        lam, u = rank_one_factors(w, k_star, delta[0], cov, value_key=k_bare, fit_key=k_bare)
    elif hp.key_mode == "r-rome":
        lam, u = rank_one_factors(w, k_star, delta[0], cov, value_key=k_bare, fit_key=k_star)
    else:
        lam, u = rank_one_factors(w, k_star, delta[0], cov)
    return ROMESolve(k_bare, k_star, v_init[0], delta[0], torch.outer(lam, u), {"templates": len(templates), **info},
                     lam, u)


class ROMEEditor(PreparesContextTemplates, Editor):
    name = "rome"
    hparams_cls = ROMEHparams
    supports_batch = False

    def compute_deltas(self, lm: LM, requests: list[EditRequest], hp: ROMEHparams) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        solve = rome_solve(lm, requests[0], hp)
        name = lm.param_name(lm.arch.mlp_out_path(hp.layer))
        # kept as rank-one factors: a long sequence of edits costs two vectors each, not a matrix
        # factors stay float32 (vectors: negligible memory; fp16 could overflow u = C⁻¹k*); the product
        # is cast to the weight's dtype once when applied
        delta = LowRank.from_matrix_factors(solve.lam.float(), solve.u.float(), lm.arch.transposed)
        return {name: delta}, solve.info
