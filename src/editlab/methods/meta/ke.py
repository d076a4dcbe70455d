"""KE — KnowledgeEditor (De Cao, Aziz, Titov 2021; card §1).

A hyper-network conditioned on the edit's text turns the edit's gradient into a weight change:

    c = tanh(Linear(mean_t BiLSTM(embed("old >> new || prompt"))))            (c in R^cond_dim)
    per matrix W [o, i]:  [a_c, b_c, a_r, b_r, eta] = MLP_W(c)                 (weight-normed, 2(o+i)+1)
    A = softmax(a_r) (x) a_c,  B = softmax(b_r) (x) b_c
    dW = max_scale * sigmoid(eta) * (A * grad_W L_edit + B)

`grad_W L_edit = sum_t delta_t u_t^T` comes from the shared gradient factors (`factors.py`). The embedding
table is a frozen *copy* of the LM's input embedding (SmolLM2 ties it to the LM head: sharing storage would
let training move the head), rebuilt from the base model when the editor is loaded, so checkpoints do not
carry it.

Objective (`objective`): the paper's constrained form, CE(new | prompt, paraphrases) + alpha (KL - mu) with
the multiplier alpha >= 0 raised by gradient ascent (rate `lr_alpha`) and the budget mu lowered x0.8 (floor
1e-5) after each validation whose edit accuracy exceeds 90 % (default, "lagrangian"); or the MEND/EasyEdit
port's fixed weights cedit * NLL + cloc * KL ("weighted"). The original conditions a BART encoder-decoder;
this is the decoder-only form MEND's port uses (edit the last MLP blocks).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ...models.lm import LM
from ...train.meta import Example
from .common import GradientEditorNet, LearnedEditor
from .factors import Factors
from .hparams import KEHparams
from .nets import safe_name

__all__ = ["KEEditor", "KEHparams", "KENet"]


class KENet(GradientEditorNet):
    tokens = "nonzero"

    def __init__(self, lm: LM, hp: KEHparams) -> None:
        super().__init__(lm, hp)
        with torch.random.fork_rng(devices=[]):  # seeded initialisation that leaves the caller's RNG alone
            torch.manual_seed(hp.seed)
            emb = lm.model.get_input_embeddings().weight
            self.register_buffer("embed", emb.detach().clone().float(), persistent=False)
            self.lstm = nn.LSTM(emb.shape[1], hp.hidden, batch_first=True, bidirectional=True)
            self.cond = nn.Linear(2 * hp.hidden, hp.cond_dim)
            self.heads = nn.ModuleDict({
                safe_name(p): nn.Sequential(weight_norm(nn.Linear(hp.cond_dim, hp.head_dim)), nn.Tanh(),
                                            weight_norm(nn.Linear(hp.head_dim, 2 * sum(self.shapes[p]) + 1)))
                for p in self.paths
            })
        self.tokenizer = lm.tokenizer
        self.max_scale = hp.max_scale
        self.register_buffer("kl_alpha", torch.zeros(()))
        self.register_buffer("margin", torch.tensor(float(hp.margin_kl)))
        self.objective, self.lr_alpha = hp.objective, hp.lr_alpha
        self.label_smoothing = hp.label_smoothing

    def condition(self, example: Example) -> torch.Tensor:
        """c for one edit (each edit alone, so that a batch never changes another edit's condition)."""
        text = f"{example.old or ''} >> {example.edit[1]} || {example.edit[0]}"
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][:64] or [0]
        out, _ = self.lstm(self.embed[torch.tensor([ids], device=self.embed.device)])
        return torch.tanh(self.cond(out[0].mean(0)))

    def deltas(self, lm: LM, examples: Sequence[Example], factors: dict[str, Factors], *, rows: Sequence[int],
               training: bool) -> dict[str, Any]:
        conds = [self.condition(ex) for ex in examples]
        out: dict[str, Any] = {}
        for p in self.paths:
            d_out, d_in = self.shapes[p]
            f = factors[p]
            total = None
            for c, row in zip(conds, rows):
                sel = f.rows == row
                grad = f.delta[sel].T @ f.u[sel]  # [out, in]; zero for an edit without gradient tokens
                h = self.heads[safe_name(p)](c)
                a_c, b_c, a_r, b_r, eta = torch.split(h, [d_in, d_in, d_out, d_out, 1])
                A = torch.softmax(a_r, 0)[:, None] * a_c[None, :]
                B = torch.softmax(b_r, 0)[:, None] * b_c[None, :]
                dw = self.max_scale * torch.sigmoid(eta) * (A * grad + B)
                total = dw if total is None else total + dw
            out[p] = total
        return out

    def combine(self, edit_nll: torch.Tensor, loc_kl: torch.Tensor, hp: Any, training: bool) -> torch.Tensor:
        if self.objective == "weighted" or not training:
            return hp.cedit * edit_nll + hp.cloc * loc_kl
        loss = edit_nll + self.kl_alpha.clone() * (loc_kl - self.margin.clone())
        with torch.no_grad():  # dual ascent on the multiplier
            self.kl_alpha.copy_((self.kl_alpha + self.lr_alpha * (loc_kl.detach() - self.margin)).clamp(min=0))
        return loss

    def after_validation(self, metrics: dict[str, float]) -> None:
        if self.objective == "lagrangian" and metrics.get("edit_acc", 0.0) > 0.9:
            self.margin.copy_(torch.clamp(self.margin * 0.8, min=1e-5))


class KEEditor(LearnedEditor):
    name = "ke"
    hparams_cls = KEHparams
    net_cls = KENet
