"""Fine-tuning baselines on one MLP output projection, with the objective as a hyper-parameter.

- `ft` (FT-L, Zhu et al. 2020 as run in the ROME paper and EasyEdit, `objective="prompt_last"`): the
  model reads the bare prompt and *every* token of the new target is scored against the distribution
  at the prompt's last position (a bag-of-tokens NLL, no teacher forcing); after each optimizer step
  every weight is clamped into an L∞ ball of radius `norm_constraint` around its original value.
- `ft-m` (FT-M, EasyEdit, `objective="target_new"`): teacher-forced NLL of the target tokens after the
  prompt; prompt positions are never targets. No norm constraint unless a preset asks for one.

Loop as in the references: `steps` epochs over the requests in chunks of `batch_size`, one Adam step
per chunk (skipped when that chunk's loss is already below `stop_nll`); a request's loss is the mean
over its target tokens and a chunk's loss the mean over its requests; training stops after the first
epoch whose request-weighted mean loss is below `stop_nll`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import HparamsError
from ..batching import teacher_forcing
from ..models.lm import LM
from ..requests import EditRequest
from .base import Editor
from .ft_hparams import OBJECTIVES, FTHparams, FTMHparams  # noqa: F401 (re-exported)


@dataclass
class _Batch:
    """Right-padded inputs (one row per request) and, for every scored target token, its row,
    position and token id."""

    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    n_requests: int


def encode_batch(lm: LM, requests: list[EditRequest], objective: str) -> _Batch:
    """The forward inputs and scored positions of `objective` for `requests`."""
    seqs: list[list[int]] = []
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for i, r in enumerate(requests):
        p_ids, t_ids = lm.encode_pair(r.prompt, r.target_new)
        if objective == "prompt_last":
            # every target token against the one distribution after the prompt
            seqs.append(p_ids)
            pos = [len(p_ids) - 1] * len(t_ids)
        elif objective == "target_new":
            # teacher forcing: token j of the target is predicted at position len(prompt) - 1 + j;
            # prompt tokens are context only, never targets
            seq, pos = teacher_forcing(p_ids, t_ids)
            seqs.append(seq)
        else:
            raise HparamsError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
        rows += [i] * len(t_ids)
        cols += pos
        targets += t_ids
    ids, mask = lm.pad_right(seqs)
    rows_t, cols_t, targets_t = (torch.tensor(x, dtype=torch.long) for x in (rows, cols, targets))
    return _Batch(ids, mask, rows_t, cols_t, targets_t, len(requests))


def batch_loss(lm: LM, batch: _Batch) -> torch.Tensor:
    """Mean over requests of each request's mean target-token NLL (differentiable)."""
    hid = lm.hidden_states(batch.ids, batch.mask)
    logp = torch.log_softmax(lm.head(hid[batch.rows.to(hid.device), batch.cols.to(hid.device)]).float(), -1)
    nll = -logp.gather(1, batch.targets.to(logp.device)[:, None])[:, 0]
    owner = batch.rows.to(nll.device)  # row i is request i
    per_request = torch.zeros(batch.n_requests, device=nll.device).index_add(0, owner, nll)
    counts = torch.bincount(owner, minlength=batch.n_requests).clamp(min=1)
    return (per_request / counts).mean()


def objective_loss(lm: LM, requests: list[EditRequest], objective: str) -> torch.Tensor:
    """The loss FT minimizes for `requests` under `objective` (for inspection and tests)."""
    return batch_loss(lm, encode_batch(lm, requests, objective))


def _trained_params(lm: LM, hp: FTHparams) -> dict[str, torch.nn.Parameter]:
    path = lm.base_path(lm.arch.mlp_out_path(hp.layer))  # through adapter wrappers of other edits
    module = lm.module(path)
    params = {f"{path}.weight": module.weight}
    if hp.update_bias and getattr(module, "bias", None) is not None:
        params[f"{path}.bias"] = module.bias
    return params


def _finetune(lm: LM, requests: list[EditRequest], hp: FTHparams) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Adam on fp32 master copies of the trained weights (mixed precision): the model computes in its
    own dtype, the optimizer state and the updates stay fp32 and are cast into the weights after every
    step, so bf16/fp16 models train without overflowing Adam's moments. On an fp32 model the masters
    are the weights' exact values: the same steps as training the weights in place."""
    params = _trained_params(lm, hp)
    originals = {n: p.detach().clone() for n, p in params.items()}
    masters = {n: p.detach().float().clone().requires_grad_(True) for n, p in params.items()}
    chunks = [requests[i : i + hp.batch_size] for i in range(0, len(requests), hp.batch_size)]
    batches = [encode_batch(lm, c, hp.objective) for c in chunks]
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(list(masters.values()), lr=hp.lr)
    losses: list[float] = []  # request-weighted mean loss per epoch
    try:
        for _ in range(hp.steps):
            total = 0.0
            for batch in batches:
                opt.zero_grad()
                for p in params.values():
                    p.grad = None
                loss = batch_loss(lm, batch)
                total += float(loss.detach()) * batch.n_requests
                if float(loss.detach()) >= hp.stop_nll:
                    loss.backward()
                    for n, p in params.items():
                        masters[n].grad = p.grad.float() if p.grad is not None else None
                    opt.step()
                with torch.no_grad():
                    for n, m in masters.items():
                        if hp.norm_constraint > 0:
                            o = originals[n].float()
                            m.copy_(torch.minimum(torch.maximum(m, o - hp.norm_constraint), o + hp.norm_constraint))
                        params[n].copy_(m)
            losses.append(total / len(requests))
            if losses[-1] < hp.stop_nll:
                break
        deltas = {n: (p.detach().float() - originals[n].float()).cpu() for n, p in params.items()}  # cast on apply
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.requires_grad_(False)
                p.grad = None
                p.copy_(originals[n])
    return deltas, {"losses": losses, "objective": hp.objective}


class FTEditor(Editor):
    name = "ft"
    hparams_cls = FTHparams
    supports_batch = True

    def compute_deltas(self, lm: LM, requests: list[EditRequest], hp: FTHparams) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return _finetune(lm, requests, hp)


class FTMEditor(FTEditor):
    name = "ft-m"
    hparams_cls = FTMHparams
