"""ROME: rank-one model editing (Meng et al., 2022) with the r-ROME key fix (Gupta et al., 2024).

The MLP output projection W of one layer is treated as a linear associative memory. The key k* is the
projection's input at the subject's last token, averaged over random context prefixes; the value δ is
optimized (see `locate.optimize_values`) so that adding it to W's output there makes the model say the
new target. The closed-form update
    ΔW = (v* − W k*) uᵀ / (uᵀ k*),   u = C⁻¹ k*,   v* = W k* + δ,
inserts (k*, v*) while leaving other keys, weighted by their covariance C = E[k kᵀ], least changed.
The *same* averaged key k* is used in the optimization and in the update; the original reference code
used a different key in the update, which is what makes sequential ROME edits collapse the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...models.lm import LM
from ...requests import EditRequest
from ...stats import second_moments
from ..base import Editor, Hparams
from .shared import ValueOptConfig, capture_at_subject, context_templates, optimize_values


@dataclass
class ROMEHparams(Hparams):
    layer: int = 5
    n_templates: int = 4  # random context prefixes (plus the bare prompt)
    template_len: int = 8  # tokens per prefix
    v_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    stop_nll: float = 0.05
    mom2_adjustment: bool = True
    mom2_n_tokens: int = 100_000
    corpus: str = "wikipedia"
    seed: int = 0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # values from the ROME paper / its released configs
        "gpt2-xl": {"layer": 17, "n_templates": 10, "template_len": 10, "v_weight_decay": 0.5, "clamp_norm_factor": 4.0},
        "gpt-j-6b": {"layer": 5, "n_templates": 10, "template_len": 10, "v_weight_decay": 0.5, "clamp_norm_factor": 4.0},
        "llama-2-7b": {"layer": 5, "n_templates": 10, "template_len": 10, "v_steps": 25, "v_weight_decay": 1e-3},
        # tuned here on CounterFact records (see docs/methods.md)
        "smollm2-135m": {"layer": 4, "n_templates": 4, "template_len": 8, "v_steps": 15, "v_lr": 1.0, "v_weight_decay": 0.05,
                         "kl_factor": 0.0625, "clamp_norm_factor": 10.0},
    }

    @classmethod
    def defaults_for(cls, lm: LM) -> dict[str, Any]:
        # early-middle MLP layers hold subject->attribute associations (causal tracing)
        return {"layer": max(0, round(lm.n_layers * 0.15))}

    def validate(self, lm: LM) -> None:
        self._check_layer("layer", self.layer, lm)
        for name in ("v_steps", "v_lr", "clamp_norm_factor", "mom2_n_tokens"):
            self._check_positive(name, getattr(self, name))
        for name in ("v_weight_decay", "kl_factor", "n_templates", "stop_nll"):
            self._check_positive(name, getattr(self, name), allow_zero=True)
        self._check_positive("template_len", self.template_len)


def rank_one_update(w: torch.Tensor, key: torch.Tensor, delta: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
    """ΔW (out, in) that maps `key` to W key + delta, minimal under the covariance metric."""
    k = key.double()
    u = torch.linalg.solve(cov.double(), k) if cov is not None else k
    target = w.double() @ k + delta.double()
    resid = target - w.double() @ k
    return torch.outer(resid, u) / (u @ k)


class ROMEEditor(Editor):
    name = "rome"
    hparams_cls = ROMEHparams
    supports_batch = False

    def compute_deltas(self, lm: LM, requests: list[EditRequest], hp: ROMEHparams) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        req = requests[0]
        templates = context_templates(lm, hp.n_templates, hp.template_len, hp.seed)
        path = lm.arch.mlp_out_path(hp.layer)
        module = lm.module(path)
        cov = None
        if hp.mom2_adjustment:
            cov = second_moments(lm, [hp.layer], hp.corpus, hp.mom2_n_tokens)[hp.layer]
        key = capture_at_subject(lm, [req], templates, {path: "in"})[path][0]
        cfg = ValueOptConfig(hp.v_steps, hp.v_lr, hp.kl_factor, hp.v_weight_decay, hp.clamp_norm_factor, hp.stop_nll)
        delta, _v0, info = optimize_values(lm, [req], templates, path, cfg)
        w = lm.arch.as_matrix(module.weight.detach()).float().cpu()
        upd = rank_one_update(w, key, delta[0], cov)
        d = lm.arch.from_matrix(upd.to(module.weight.dtype))
        return {f"{path}.weight": d}, {"templates": len(templates), **info}
