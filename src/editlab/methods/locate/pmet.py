"""PMET: precise model editing in a transformer (Li et al., 2024).

MEMIT's target is a change of the residual stream that attention and MLP make together. PMET optimises
two additions at the last edited layer L, at the subject's last token: δ_attn on the attention output
and δ_mlp on the MLP output, jointly (`optimize_values` with two paths, each with its own decay term
‖δ‖/‖m‖² and its own clamp `clamp_norm_factor`·‖m‖, m = the unedited output at the bare prompt). Only
the MLP part becomes the target: m*_mlp = m_mlp + δ_mlp, written into the MLP output projections of
`layers` with MEMIT's least-squares solve, the residual at the i-th layer being
    R = (m*_mlp − current MLP output at L) / √(layers left)
(PMET's square-root spreading; MEMIT divides by the layers left). The attention part only helps the
optimisation find an MLP target that works with attention's share left as it is.

The value optimisation follows PMET's schedule (`nll_drop`): once every target token is the argmax, the
NLL weight drops to 0.1 and the request stops when its weighted KL is at most 0.01.
"""

from __future__ import annotations

from typing import Any

import torch

from ...models.lm import LM
from ...requests import EditRequest
from ...stats import second_moments
from ..base import Editor
from .memit import memit_update
from .hparams import PMETHparams
from .shared import PreparesContextTemplates, optimize_values, refuse_post_mlp_norm
from .spread import template_set, write_targets



def mlp_module_path(lm: LM, layer: int) -> str:
    """The MLP block whose output joins the residual (the parent of its output projection)."""
    return lm.arch.mlp_out_path(layer).rsplit(".", 1)[0]


class PMETEditor(PreparesContextTemplates, Editor):
    name = "pmet"
    hparams_cls = PMETHparams
    supports_batch = True

    def compute_deltas(self, lm: LM, requests: list[EditRequest], hp: PMETHparams) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        refuse_post_mlp_norm(lm, "PMET")
        covs = second_moments(lm, hp.layers, hp.corpus, hp.mom2_n_tokens)
        templates, sizes = template_set(lm, hp)
        last = hp.layers[-1]
        attn, mlp = f"{lm.arch.block_path(last)}.{lm.arch.attn_out}", mlp_module_path(lm, last)
        delta, init, info = optimize_values(lm, requests, templates, [attn, mlp], hp.value_config())
        info = {**info, "delta_norm_attn": delta[:, 0].norm(dim=-1).tolist(),
                "delta_norm_mlp": delta[:, 1].norm(dim=-1).tolist()}
        out = write_targets(lm, requests, hp, templates, sizes, init[:, 1] + delta[:, 1], mlp,
                            lambda l, k, r: memit_update(k, r, covs[l], hp.mom2_update_weight), "PMET", info,
                            spread="sqrt")
        return out.deltas, out.info
