"""Fine-tuning baselines on one MLP output projection.

- `ft` (FT-L, Zhu et al. 2020 as used in the ROME paper): gradient steps on the NLL of the new target,
  with every weight kept within an L∞ ball of radius `norm_constraint` around its original value.
- `ft-m` (FT-M, EasyEdit): the same loss on the target tokens only (prompt tokens masked), without the
  norm constraint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..models.lm import LM
from ..requests import EditRequest
from .base import Editor, Hparams


@dataclass
class FTHparams(Hparams):
    layer: int = 5
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float = 5e-4  # L∞ radius around the original weights; 0 disables it
    stop_nll: float = 0.01

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "gpt2-xl": {"layer": 0, "lr": 5e-4, "norm_constraint": 5e-4},
        "gpt-j-6b": {"layer": 21, "lr": 5e-4, "norm_constraint": 5e-5},
        "llama-2-7b": {"layer": 21, "lr": 5e-4, "norm_constraint": 5e-4},
        "smollm2-135m": {"layer": 4, "lr": 5e-4, "norm_constraint": 5e-4},
    }

    @classmethod
    def defaults_for(cls, lm: LM) -> dict[str, Any]:
        return {"layer": max(0, round(lm.n_layers * 0.15))}

    def validate(self, lm: LM) -> None:
        self._check_layer("layer", self.layer, lm)
        self._check_positive("steps", self.steps)
        self._check_positive("lr", self.lr)
        self._check_positive("norm_constraint", self.norm_constraint, allow_zero=True)
        self._check_positive("stop_nll", self.stop_nll, allow_zero=True)


@dataclass
class FTMHparams(FTHparams):
    norm_constraint: float = 0.0
    steps: int = 10

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "llama-2-7b": {"layer": 21, "lr": 5e-4},
        "gpt-j-6b": {"layer": 21, "lr": 5e-4},
        "gpt2-xl": {"layer": 0, "lr": 5e-4},
        "smollm2-135m": {"layer": 4, "lr": 5e-4},
    }


def _finetune(lm: LM, requests: list[EditRequest], hp: FTHparams) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    name = f"{lm.arch.mlp_out_path(hp.layer)}.weight"
    param = lm.model.get_parameter(name)
    original = param.detach().clone()
    seqs, positions, targets = [], [], []
    for r in requests:
        p_ids, t_ids = lm.encode_pair(r.prompt, r.target_new)
        seqs.append(p_ids + t_ids[:-1] if len(t_ids) > 1 else p_ids)
        positions.append(list(range(len(p_ids) - 1, len(p_ids) - 1 + len(t_ids))))
        targets.append(t_ids)
    ids, mask = lm.pad_right(seqs)
    b = torch.tensor([i for i, pos in enumerate(positions) for _ in pos])
    p = torch.tensor([x for pos in positions for x in pos])
    t = torch.tensor([x for tg in targets for x in tg], device=lm.device)
    backbone = lm.model.get_submodule(lm.arch.backbone)
    param.requires_grad_(True)
    opt = torch.optim.Adam([param], lr=hp.lr)
    losses: list[float] = []
    try:
        for _ in range(hp.steps):
            out = backbone(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
            hid = out[0] if isinstance(out, tuple) else out.last_hidden_state
            logp = torch.log_softmax(lm.head(hid[b, p]).float(), -1)
            loss = -logp.gather(1, t[:, None]).mean()  # target tokens only: the prompt is never a target
            losses.append(float(loss.detach()))
            if losses[-1] < hp.stop_nll:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            if hp.norm_constraint > 0:
                with torch.no_grad():
                    param.copy_(torch.clamp(param, original - hp.norm_constraint, original + hp.norm_constraint))
        delta = (param.detach() - original).cpu()
    finally:
        param.requires_grad_(False)
        with torch.no_grad():
            param.copy_(original)
    return {name: delta}, {"losses": losses}


class FTEditor(Editor):
    name = "ft"
    hparams_cls = FTHparams
    supports_batch = True

    def compute_deltas(self, lm: LM, requests: list[EditRequest], hp: FTHparams) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return _finetune(lm, requests, hp)


class FTMEditor(FTEditor):
    name = "ft-m"
    hparams_cls = FTMHparams
