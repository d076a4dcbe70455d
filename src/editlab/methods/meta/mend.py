"""MEND — Model Editor Networks using Gradient Decomposition (Mitchell et al. 2022; card §1).

The gradient of the edit loss with respect to a linear layer's weight is a sum of per-token outer
products `delta_t u_t^T`. MEND standardises the factors `z = [u; delta]` with running statistics gathered
during training (frozen afterwards), rewrites them with a small residual low-rank network
(`nets.FactorNet`, shared by modules of equal shape, with a scale/shift per module) and edits

    W' = W - alpha_l * sum_t delta~_t u~_t^T

with one learned step size `alpha_l` per module (initialised to `edit_lr`). The published code *adds*
`alpha * grad~` and lets the network learn the sign; here the untrained (identity) network already makes a
descent step, which is the same family of edits with a sign convention that starts training from a
sensible edit. Batched edits sum their factors (one gradient of the summed losses).

The weight delta of one edit is low-rank (rank = number of tokens with a gradient) and is stored as
factors, so saving, loading and bit-exact restore work as for ROME.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ...models.lm import LM
from ...train.meta import Example
from .common import GradientEditorNet, LearnedEditor
from .factors import Factors
from .hparams import MENDHparams
from .nets import FactorNet, RunningNorm, safe_name, shape_key

__all__ = ["MENDEditor", "MENDHparams", "MENDNet"]


class MENDNet(GradientEditorNet):
    tokens = "nonzero"

    def __init__(self, lm: LM, hp: MENDHparams) -> None:
        super().__init__(lm, hp)
        groups: dict[str, list[str]] = {}
        for p in self.paths:
            groups.setdefault(shape_key(*self.shapes[p]), []).append(p)
        self.mode = {p: paths.index(p) for paths in groups.values() for p in paths}
        self.group = {p: k for k, paths in groups.items() for p in paths}
        self.nets = nn.ModuleDict({
            k: FactorNet(self.shapes[paths[0]][1], self.shapes[paths[0]][0], hp.rank, hp.n_blocks, len(paths), seed=hp.seed + i,
                         block=getattr(hp, "block", "residual"))  # MALMEN's net: residual
            for i, (k, paths) in enumerate(groups.items())
        })
        self.norms = nn.ModuleDict({safe_name(p): RunningNorm(sum(self.shapes[p])) for p in self.paths})
        self.alpha = nn.Parameter(torch.full((len(self.paths),), float(hp.edit_lr)))

    def param_groups(self, hp: MENDHparams) -> list[dict[str, Any]]:
        return [{"params": list(self.nets.parameters()), "lr": hp.lr}, {"params": [self.alpha], "lr": hp.lr_lr}]

    def update_statistics(self, factors: dict[str, Factors]) -> None:
        for p in self.paths:
            self.norms[safe_name(p)].update(torch.cat([factors[p].u, factors[p].delta], -1))

    def deltas(self, lm: LM, examples: Sequence[Example], factors: dict[str, Factors], *, rows: Sequence[int],
               training: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, p in enumerate(self.paths):
            f = factors[p]
            d_out, d_in = self.shapes[p]
            z = self.norms[safe_name(p)](torch.cat([f.u, f.delta], -1))
            u_t, d_t = self.nets[self.group[p]](z[:, :d_in], z[:, d_in:], self.mode[p])
            out[p] = (-self.alpha[i] * d_t.T, u_t)  # [out, T] @ [T, in]
        return out


class MENDEditor(LearnedEditor):
    name = "mend"
    hparams_cls = MENDHparams
    net_cls = MENDNet
