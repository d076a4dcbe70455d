"""MEMIT: mass-editing memory in a transformer (Meng et al., 2023).

For a batch of requests, target hidden states z_i = h_L + δ_i at the last layer L of a range of MLP
layers are found by the shared value optimization. The change is then spread over the layers from
first to last: at layer l, with keys K (template-averaged projection inputs at the subject's last
token) and residual R = (z − h_L(current weights)) / (layers left), the update is
    ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹
where C_l = E[k kᵀ] over generic text and λ (`mom2_update_weight`) trades preserving old keys
against fitting new ones. Keys and residuals are recomputed after each layer's update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ...errors import HparamsError
from ...models.lm import LM
from ...requests import EditRequest
from ...stats import second_moments
from ..base import Editor, Hparams
from .shared import ValueOptConfig, capture_at_subject, context_templates, optimize_values


@dataclass
class MEMITHparams(Hparams):
    layers: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7])
    n_templates: int = 4
    template_len: int = 8
    v_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 0.75
    stop_nll: float = 0.05
    mom2_update_weight: float = 15000.0
    mom2_n_tokens: int = 100_000
    corpus: str = "wikipedia"
    seed: int = 0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # values from the MEMIT paper / its released configs
        "gpt2-xl": {"layers": [13, 14, 15, 16, 17], "mom2_update_weight": 20000.0, "clamp_norm_factor": 0.75,
                    "n_templates": 10, "template_len": 10},
        "gpt-j-6b": {"layers": [3, 4, 5, 6, 7, 8], "mom2_update_weight": 15000.0, "clamp_norm_factor": 0.75,
                     "n_templates": 10, "template_len": 10},
        "llama-2-7b": {"layers": [4, 5, 6, 7, 8], "mom2_update_weight": 15000.0, "clamp_norm_factor": 4.0,
                       "v_weight_decay": 1e-3, "v_steps": 25, "n_templates": 10, "template_len": 10},
        # tuned here on CounterFact records (see docs/methods.md)
        "smollm2-135m": {"layers": [2, 3, 4, 5, 6], "mom2_update_weight": 2000.0, "clamp_norm_factor": 10.0,
                         "n_templates": 2, "template_len": 8, "v_lr": 1.0, "v_steps": 15, "v_weight_decay": 0.05},
    }

    @classmethod
    def defaults_for(cls, lm: LM) -> dict[str, Any]:
        n = lm.n_layers
        first = max(0, round(n * 0.1))
        return {"layers": list(range(first, min(n, first + 5)))}

    def validate(self, lm: LM) -> None:
        if not self.layers:
            raise HparamsError("layers must name at least one layer")
        for l in self.layers:
            self._check_layer("layers", l, lm)
        if sorted(set(self.layers)) != list(self.layers):
            raise HparamsError(f"layers must be strictly increasing, got {self.layers}")
        for name in ("v_steps", "v_lr", "clamp_norm_factor", "mom2_n_tokens", "template_len"):
            self._check_positive(name, getattr(self, name))
        for name in ("v_weight_decay", "kl_factor", "n_templates", "stop_nll", "mom2_update_weight"):
            self._check_positive(name, getattr(self, name), allow_zero=True)


def memit_update(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, weight: float) -> torch.Tensor:
    """ΔW (out, in) = R Kᵀ (λ C + K Kᵀ)⁻¹ for keys K [n, in] and residuals R [n, out] (rows = requests):
    the least-squares fit of the new associations regularized by λ·E[k kᵀ] of existing ones."""
    k = keys.double()
    a = weight * cov.double() + k.T @ k
    return torch.linalg.solve(a, k.T @ resid.double()).T


class MEMITEditor(Editor):
    name = "memit"
    hparams_cls = MEMITHparams
    supports_batch = True

    def compute_deltas(self, lm: LM, requests: list[EditRequest], hp: MEMITHparams) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        templates = context_templates(lm, hp.n_templates, hp.template_len, hp.seed)
        last = lm.arch.block_path(hp.layers[-1])
        cfg = ValueOptConfig(hp.v_steps, hp.v_lr, hp.kl_factor, hp.v_weight_decay, hp.clamp_norm_factor, hp.stop_nll)
        delta, h0, info = optimize_values(lm, requests, templates, last, cfg)
        z = h0 + delta  # target hidden states at the last layer [n, d]
        covs = second_moments(lm, hp.layers, hp.corpus, hp.mom2_n_tokens)
        names = {l: f"{lm.arch.mlp_out_path(l)}.weight" for l in hp.layers}
        params = {l: lm.model.get_parameter(names[l]) for l in hp.layers}
        originals = {l: p.detach().clone() for l, p in params.items()}
        totals: dict[str, torch.Tensor] = {}
        try:
            for i, l in enumerate(hp.layers):
                kpath = lm.arch.mlp_out_path(l)
                got = capture_at_subject(lm, requests, templates, {kpath: "in", last: "out"})
                keys, cur = got[kpath].double(), got[last].double()
                resid = (z.double() - cur) / (len(hp.layers) - i)
                upd = memit_update(keys, resid, covs[l], hp.mom2_update_weight)
                d = lm.arch.from_matrix(upd.to(params[l].dtype))
                with torch.no_grad():
                    params[l].add_(d.to(params[l].device))
                totals[names[l]] = d.cpu()
        finally:
            with torch.no_grad():
                for l, p in params.items():
                    p.copy_(originals[l])
        return totals, {"templates": len(templates), **info}
