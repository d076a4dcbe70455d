"""MALMEN — Massive Language Model Editing Network (Tan, Zhang, Fu 2024; card §1).

MEND's factor network, but the edits of a batch are combined by least squares instead of summed. Per
edited module, with the keys `U` [N, d_in] (module inputs at the positions that predict answer tokens,
no attention-sink position since answers never start a text) and their output gradients:

    (u~_i, delta~_i) = FactorNet(standardised [u_i; delta_i])
    dv_i = -eta_l (u_i . u~_i) delta~_i                          value change wanted for key i
    S    = (U^T U + e^lambda_l I)^-1 U^T dV,   W' = W + S^T        ridge regression of dV on U

with `eta_l` and `lambda_l` learned per module. By the push-through identity S^T = dV^T (U U^T +
e^lambda I)^-1 U, so the delta is stored as rank-N factors and the solve is N x N — the same edit.

Training (card, pitfalls): the published code splits the backward pass (LM, then solve, then network in
row chunks) to fit GPT-J in memory; on models that fit, autograd through `torch.linalg.solve` computes the
same gradients, which is what is done here. The running statistics are updated by training edits only.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ...models.lm import LM
from ...train.meta import Example
from .common import LearnedEditor
from .factors import Factors
from .hparams import MALMENHparams
from .mend import MENDNet
from .nets import safe_name

__all__ = ["MALMENEditor", "MALMENHparams", "MALMENNet"]


class MALMENNet(MENDNet):
    tokens = "answer"
    joint = True

    def __init__(self, lm: LM, hp: MALMENHparams) -> None:
        super().__init__(lm, hp)  # nets, norms and alpha (= eta, initialised to edit_lr)
        self.log_lambda = nn.Parameter(torch.full((len(self.paths),), float(hp.init_lambda)))

    def param_groups(self, hp: MALMENHparams) -> list[dict[str, Any]]:
        return [{"params": list(self.nets.parameters()) + [self.alpha, self.log_lambda], "lr": hp.lr}]

    def deltas(self, lm: LM, examples: Sequence[Example], factors: dict[str, Factors], *, rows: Sequence[int],
               training: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, p in enumerate(self.paths):
            f = factors[p]
            d_in = self.shapes[p][1]
            z = self.norms[safe_name(p)](torch.cat([f.u, f.delta], -1))
            u_t, d_t = self.nets[self.group[p]](z[:, :d_in], z[:, d_in:], self.mode[p])
            dv = -self.alpha[i] * (f.u * u_t).sum(-1, keepdim=True) * d_t  # [N, d_out]
            keys = f.u.double()
            gram = keys @ keys.T + self.log_lambda[i].double().exp() * torch.eye(len(keys), dtype=torch.float64, device=keys.device)
            coef = torch.linalg.solve(gram, dv.double()).float()  # [N, d_out]
            out[p] = (coef.T, f.u)  # dW = coef^T @ U  ([out, N] @ [N, in])
        return out


class MALMENEditor(LearnedEditor):
    name = "malmen"
    hparams_cls = MALMENHparams
    net_cls = MALMENNet
