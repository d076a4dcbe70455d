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
from typing import Any, ClassVar

import torch

from ..errors import HparamsError
from ..batching import teacher_forcing
from ..models.lm import LM
from ..requests import EditRequest
from .base import Editor, Hparams

OBJECTIVES = ("prompt_last", "target_new")


@dataclass
class FTHparams(Hparams):
    """FT-L by default. Paper presets: ROME's `hparams/FT/*_constr.json` (GPT-2 XL, GPT-J: the FT-L
    runs of the ROME paper) and EasyEdit's `hparams/FT/llama-7b.yaml` (its survey's FT-L on Llama-2)."""

    layer: int = 5
    objective: str = "prompt_last"
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float = 5e-4  # L∞ radius around the original weights; 0 disables it
    batch_size: int = 128  # requests per optimizer step (ROME's default)
    # The references select parameters by module-name substring, so on GPT-2/GPT-J the projection's
    # bias is trained too; on for those paper presets, off elsewhere (Llama-family layers have none).
    update_bias: bool = False
    stop_nll: float = 0.01

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # paper values: kmeng01/rome hparams/FT/gpt2-xl_constr.json
        "gpt2-xl": {"layer": 0, "steps": 25, "lr": 5e-4, "norm_constraint": 5e-4, "update_bias": True},
        # paper values: kmeng01/rome hparams/FT/EleutherAI_gpt-j-6B_constr.json (EasyEdit's current
        # gpt-j-6B.yaml instead trains layer 21 without a constraint)
        "gpt-j-6b": {"layer": 0, "steps": 25, "lr": 5e-4, "norm_constraint": 5e-5, "update_bias": True},
        # paper values: zjunlp/EasyEdit hparams/FT/llama-7b.yaml (llama-2-7b): no L∞ constraint there
        "llama-2-7b": {"layer": 21, "steps": 25, "lr": 5e-4, "norm_constraint": 0.0, "batch_size": 1},
        # SmolLM2-135M, chosen on counterfact-train records 0-7 (never a reported split). The paper
        # radius 5e-4 is inert here: efficacy 0.125, every metric equal to the unedited model's. The
        # FT-L definition is kept and only the radius widened (layer 4, lr and steps as the paper):
        # efficacy / paraphrase / neighborhood = 0.625 / 0.50 / 0.875 at 5e-3 and 0.875 / 0.625 /
        # 0.875 at 1e-2 (unedited 0.125 / 0.25 / 0.875). Locality is expected to suffer for this
        # baseline on more records.
        "smollm2-135m": {"layer": 4, "steps": 25, "lr": 5e-4, "norm_constraint": 1e-2},
    }

    @classmethod
    def defaults_for(cls, lm: LM) -> dict[str, Any]:
        return {"layer": max(0, round(lm.n_layers * 0.15))}

    def validate(self, lm: LM) -> None:
        self._check_layer("layer", self.layer, lm)
        if self.objective not in OBJECTIVES:
            raise HparamsError(f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        self._check_positive("steps", self.steps)
        self._check_positive("lr", self.lr)
        self._check_positive("batch_size", self.batch_size)
        self._check_positive("norm_constraint", self.norm_constraint, allow_zero=True)
        self._check_positive("stop_nll", self.stop_nll, allow_zero=True)


@dataclass
class FTMHparams(FTHparams):
    """FT-M: EasyEdit's FT hparams files run with `objective_optimization: target_new`."""

    objective: str = "target_new"
    norm_constraint: float = 0.0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # paper values: zjunlp/EasyEdit hparams/FT/*.yaml, objective target_new (its survey's FT-M).
        # EasyEdit's gpt2-xl.yaml keeps its L∞ radius of 5e-4 under target_new as well.
        "gpt2-xl": {"layer": 0, "steps": 25, "lr": 5e-4, "norm_constraint": 5e-4, "batch_size": 3,
                    "update_bias": True},
        "gpt-j-6b": {"layer": 21, "steps": 25, "lr": 5e-4, "norm_constraint": 0.0, "batch_size": 1,
                     "update_bias": True},
        "llama-2-7b": {"layer": 21, "steps": 25, "lr": 5e-4, "norm_constraint": 0.0, "batch_size": 1},
        # SmolLM2-135M: the FT-L layer with EasyEdit's lr and steps, checked on counterfact-train
        # records 0-7: efficacy / paraphrase / neighborhood 1.0 / 0.625 / 0.75 (unedited 0.125 /
        # 0.25 / 0.875)
        "smollm2-135m": {"layer": 4, "steps": 25, "lr": 5e-4},
    }


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
    params = _trained_params(lm, hp)
    originals = {n: p.detach().clone() for n, p in params.items()}
    chunks = [requests[i : i + hp.batch_size] for i in range(0, len(requests), hp.batch_size)]
    batches = [encode_batch(lm, c, hp.objective) for c in chunks]
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(list(params.values()), lr=hp.lr)
    losses: list[float] = []  # request-weighted mean loss per epoch
    try:
        for _ in range(hp.steps):
            total = 0.0
            for batch in batches:
                opt.zero_grad()
                loss = batch_loss(lm, batch)
                total += float(loss.detach()) * batch.n_requests
                if float(loss.detach()) >= hp.stop_nll:
                    loss.backward()
                    opt.step()
                if hp.norm_constraint > 0:
                    with torch.no_grad():
                        for n, p in params.items():
                            o = originals[n]
                            p.copy_(torch.minimum(torch.maximum(p, o - hp.norm_constraint), o + hp.norm_constraint))
            losses.append(total / len(requests))
            if losses[-1] < hp.stop_nll:
                break
        deltas = {n: (p.detach() - originals[n]).cpu() for n, p in params.items()}
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.requires_grad_(False)
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
