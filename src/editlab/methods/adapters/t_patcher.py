"""T-Patcher (Huang et al. 2023, "Transformer-Patcher: One Mistake Worth One Neuron").

Each edit adds patch units beside one MLP (the last by default) through the shared `SideUnits`
wrapper: `FFN'(h) = FFN(h) + Σ_p v_p · relu(k_p·h + b_p)`. A unit is trained to fire on its edit's
query (the MLP input at a mistaken position) and on nothing in a memory of unrelated inputs, and its
value corrects the output there. Units of earlier edits stay frozen; an edit with `on=prev` adds its
units to prev's wrapper, so N sequential edits are one wrapper with all their units as rows.

Per unit, with `q` its query, `a(h) = k·h + b` and memory inputs `h_j`:

- init: `k = q/‖q‖²`, `b = 0` (so `a(q) = 1`), `v = amplify · u` with `u` the unit direction that lowers
  the edit loss fastest (minus the normalised gradient of the loss with respect to `v` at `v = 0`);
- loss `L_edit + alc·L_act + mlc·L_mem`, with `L_edit` the teacher-forced target NLL of the edited
  model, `L_act = exp(act_margin − a(q))` and `L_mem = mean_topK exp(a(h_j) − a(q) + margin1) +
  mean_topK exp(a(h_j) − margin2)` over the `memory_top_k` largest memory activations;
- Adam (lr 1e-2) for at most `steps`, stopping once every target token is the argmax, `L_act <
  act_loss_thd` and no memory input fires (`a(h_j) ≤ 0` for all j).

The memory holds the MLP's inputs at every token of generic text (the statistics corpus; the sink
prefix excluded, as queries never see it), `memory_size` rows, cached in `lm.cache` per (base model,
the other edits below, module, corpus, size): edits that only add side units at this MLP do not
change its inputs, so a sequence of T-Patcher edits computes it once. With `memory_data` (a dataset
name or file) the memory is the inputs at every token of that dataset's neighbourhood and locality
probes (prompt + answer) instead, as the reference builds it from the task's training examples; use a
split disjoint from the records scored (e.g. counterfact-train). With `memorize_edits` (default,
the reference's `update_memory=1`) it also holds the inputs at every token of each earlier T-Patcher
edit's prompt and target at this MLP, so a new unit is trained not to fire where earlier units fire
(memory rows equal to the new edit's own queries are dropped as below, so re-editing a prompt works). Training steps run only the
wrapped block and those above it (`side_units.FrozenPrefix`).

SmolLM2-135M (counterfact-train records 0-9, a tuning split, memory_size 10,000, one unit per edit):
single edits reach efficacy 1.0 at ~6-9 s per edit on one CPU thread, but the unit also fires on the
last token of 7 of 12 neighbourhood prompts (same relation, other subject: their query is close to the
edit's), so locality drops; ten sequential edits keep rewrite accuracy 0.97. Stronger memory terms
(margin2 -6, mlc 20) silence neighbours but then the unit no longer fires on its own query.

Where this departs from the paper and its code, and why:

- ReLU units (the paper's host FFNs are GELU, whose "off" is ≈ −0.004; SmolLM2's SiLU gives −0.14, so
  a SiLU unit would move every token). With ReLU a token where no unit fires gets the base output bit
  for bit. `activation="silu"` is available (then use `margin2 ≈ −10`, method card).
- Units sit in a side FFN around the whole MLP block, never spliced into the gated product (whose up
  branch can flip the sign of an "off" unit).
- Per-token decisions only: a unit fires wherever its pre-activation is positive, at any position; no
  query position is stored in the module (rule shared by the adapter family).
- Units go to the first `max_add_neuron_num` (5, the paper's) target positions the model gets wrong
  under teacher forcing, one each (the last prompt token when none is wrong): the paper's one neuron
  per mistake. Until 2026-12-06 the default was 1, which cannot write a multi-token answer whose later
  tokens are also wrong (the unit fires only at the position of its query): on the first three zsRE
  one-hop records each such edit ran all 2000 steps (105-170 s besides computing the memory) and
  wrote 33-50 % of the answer's tokens; with 5 units every token of the first three records of each
  split was written, in 23-37 s per edit besides the memory.
- Memory rows equal to one of the edit's own queries (generic text that literally contains the edit
  prompt) are dropped from that edit's memory: a unit cannot both fire and stay silent on one input.
- Batch edits train all their units jointly (by default one per mistaken target token of each request).
- The value-init direction: the paper scales an initial value by `amplify_con`; we point it along the
  steepest descent of the edit loss so the first steps already move the target.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...hooks import capture
from ...models.lm import LM
from ...requests import EditRequest
from ..base import Editor
from ..ft import encode_batch
from ..patches import Patch
from .hparams import TPatcherHparams
from .pools import probe_pool
from .queries import sequence_inputs, token_inputs
from .side_units import FrozenPrefix, Site, edit_is_own_rows, generic_paragraphs, target_loss

MEMORY_CACHE = "t-patcher-memory"
EDIT_MEMORY_CACHE = "t-patcher-edit-memory"



# ---------------------------------------------------------------- memory and queries
def memory(lm: LM, path: str, hp: TPatcherHparams) -> torch.Tensor:
    """Inputs of the module at `path` on generic text, or on the probes of `hp.memory_data` [n, d_in]
    (float32, on the model's device), cached per (base model, the edits below that could change those
    inputs, path, source, size)."""
    others = tuple(e.id for e in lm.active_edits if not edit_is_own_rows(e, path))
    key = (lm.base_fingerprint, others, path, hp.corpus, hp.memory_data, hp.memory_size)
    store = lm.cache.setdefault(MEMORY_CACHE, {})
    if key not in store:
        # the reference's memory is the model's inputs on the task's own training examples
        texts = list(probe_pool(hp.memory_data, "memory_data")) if hp.memory_data else generic_paragraphs(hp.corpus)
        rows = token_inputs(lm, path, texts, hp.memory_size) if texts else torch.zeros(0)
        store.clear()  # one memory at a time (40k x d floats)
        store[key] = rows.to(lm.device) if rows.numel() else torch.zeros(0, device=lm.device)
    return store[key]


@torch.no_grad()
def edit_memory(lm: LM, path: str) -> torch.Tensor:
    """Inputs of the module at `path` at every token (sink prefix excluded) of the prompt + target of each
    earlier T-Patcher edit at `path` [n, d_in]: the reference's `update_memory`, so that a new unit learns
    to stay silent where earlier edits' units fire. Side units at `path` leave these inputs unchanged,
    so each edit's rows are computed once, cached per (base model, edits below, path, edit)."""
    others = tuple(e.id for e in lm.active_edits if not edit_is_own_rows(e, path))
    store = lm.cache.setdefault(EDIT_MEMORY_CACHE, {})
    rows: list[torch.Tensor] = []
    for e in lm.active_edits:
        if e.method != TPatcherEditor.name or not edit_is_own_rows(e, path):
            continue
        key = (lm.base_fingerprint, others, path, e.id)
        if key not in store:
            seqs = []
            for r in e.requests:
                p_ids, t_ids = lm.encode_pair(r.prompt, r.target_new)
                seqs.append(p_ids + t_ids[:-1])  # the inputs that predict each target token
            store[key] = sequence_inputs(lm, path, seqs, sum(map(len, seqs))).to(lm.device)
        rows.append(store[key])
    return torch.cat(rows) if rows else torch.zeros(0, device=lm.device)


@torch.no_grad()
def inputs_at(lm: LM, path: str, seqs: list[list[int]], positions: list[int]) -> torch.Tensor:
    """Input of module `path` at `positions[i]` of token sequence `seqs[i]`: [len(seqs), d_in] float32.
    Runs the very sequences the edit loss runs (right-padded, so each row's positions are its own)."""
    ids, mask = lm.pad_right(seqs)
    got: list[torch.Tensor] = []
    capture(lm.model, lambda: lm.backbone_forward(ids, mask), inputs={path: got.append}, stop_after=path)
    rows = torch.arange(len(seqs), device=got[0].device)
    return got[0][rows, torch.tensor(positions, device=got[0].device)].float()


def mistake_queries(lm: LM, path: str, requests: list[EditRequest], per_edit: int) -> tuple[torch.Tensor, list[int]]:
    """Queries of the new units: per request, the MLP input at the first `per_edit` target positions the
    current model predicts wrongly under teacher forcing (the last prompt token when none is).
    Returns (queries [u, d_in], the request index of each unit)."""
    scores = lm.score([r.prompt for r in requests], [r.target_new for r in requests])
    seqs, pos, owner = [], [], []
    for i, (r, s) in enumerate(zip(requests, scores)):
        p_ids, t_ids = lm.encode_pair(r.prompt, r.target_new)
        wrong = [j for j, (a, t) in enumerate(zip(s.argmax_ids, t_ids)) if a != t][:per_edit] or [0]
        for j in wrong:
            seqs.append(p_ids + t_ids[:j])
            pos.append(len(p_ids) - 1 + j)
            owner.append(i)
    return inputs_at(lm, path, seqs, pos), owner


# ---------------------------------------------------------------- training
def _bounded_exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x.clamp(max=80.0))  # float32 overflows past ~88


def train_units(lm: LM, site: Site, requests: list[EditRequest], hp: TPatcherHparams
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """New units for `requests` (initialised and trained as the module docstring says) as table rows."""
    q, owner = mistake_queries(lm, site.path, requests, hp.max_add_neuron_num)
    mem = memory(lm, site.path, hp) if hp.memory_size > 0 and hp.mlc > 0 else torch.zeros(0, q.shape[1])
    mem = mem.to(q.device)
    n_edit_rows = 0
    if hp.memorize_edits and hp.mlc > 0:
        earlier = edit_memory(lm, site.path).to(q.device)
        n_edit_rows = int(earlier.shape[0])
        mem = torch.cat([mem.reshape(-1, q.shape[1]), earlier]) if n_edit_rows else mem
    n_units = q.shape[0]
    # memory rows that ARE one of this edit's queries are in scope, not memory
    if mem.shape[0]:
        # (within 1% of the query's norm: batching and padding alone move a copy by ~1e-3 relative,
        # while the nearest different context is typically ~10% away)
        close = torch.cdist(mem, q) <= 1e-2 * q.norm(dim=1).clamp(min=1e-12)[None, :]
        mem = mem[~close.any(1)]
    dev = site.wrapper.keys.device
    keys = (q / q.pow(2).sum(1, keepdim=True).clamp(min=1e-12)).to(dev).requires_grad_(True)
    bias = torch.zeros(n_units, device=dev, requires_grad=True)
    values = torch.zeros(n_units, site.wrapper.d_out, device=dev, requires_grad=True)
    rows = {"keys": keys, "bias": bias, "values": values}
    batch = encode_batch(lm, requests, "target_new")
    qd, memd = q.to(dev), mem.to(dev)
    top_k = min(hp.memory_top_k, memd.shape[0])
    history: list[dict[str, float]] = []
    stopped = False
    prefix = FrozenPrefix(lm, hp.layer)
    with site.training(rows):
        # value init: amplify x the steepest-descent direction of the edit loss at v = 0
        loss0, _ = target_loss(lm, batch, prefix.hidden_states)
        (grad,) = torch.autograd.grad(loss0, values)
        with torch.no_grad():
            values.copy_(-hp.amplify * grad / grad.norm(dim=1, keepdim=True).clamp(min=1e-12))
        opt = torch.optim.Adam([keys, bias, values], lr=hp.lr)
        for _ in range(hp.steps):
            edit_loss, ok = target_loss(lm, batch, prefix.hidden_states)
            a_q = (qd * keys).sum(1) + bias  # each unit on its own query
            act_loss = _bounded_exp(hp.act_margin - a_q).mean()
            mem_loss = torch.zeros((), device=dev)
            mem_fires = False
            if top_k:
                a_m = memd @ keys.T + bias  # [n_mem, units]
                top = a_m.topk(top_k, dim=0).values
                mem_loss = (_bounded_exp(top - a_q + hp.margin1).mean(0)
                            + _bounded_exp(top - hp.margin2).mean(0)).mean()
                mem_fires = bool((top[0] > 0).any())
            history.append({"edit": float(edit_loss.detach()), "act": float(act_loss.detach()),
                            "mem": float(mem_loss.detach())})
            if ok and float(act_loss.detach()) < hp.act_loss_thd and not mem_fires:
                stopped = True
                break
            loss = edit_loss + hp.alc * act_loss + hp.mlc * mem_loss
            if not math.isfinite(float(loss.detach())):
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    trained = {n: t.detach() for n, t in rows.items()}
    with torch.no_grad():
        firing = int(((memd @ trained["keys"].T + trained["bias"]) > 0).any(1).sum()) if memd.shape[0] else 0
        # a unit the memory term has driven below zero on its own query does nothing (a sign that its
        # query cannot be told apart from the memory at this layer)
        query_act = ((qd * trained["keys"]).sum(1) + trained["bias"]).tolist()
    info = {"units": n_units, "unit_requests": owner, "steps": len(history), "converged": stopped,
            "final": history[-1] if history else {}, "memory_rows": int(memd.shape[0]),
            "memory_rows_from_edits": n_edit_rows,
            "memory_rows_firing": firing, "query_preactivation": query_act, "prefix_replay": prefix.active}
    return trained, info


class TPatcherEditor(Editor):
    name = "t-patcher"
    hparams_cls = TPatcherHparams
    supports_batch = True
    supports_on = True

    def compute_patches(self, lm: LM, requests: list[EditRequest], hp: TPatcherHparams,
                        on: Any) -> tuple[list[Patch], dict[str, Any]]:
        site = Site(lm, hp.layer, self.name, hp.activation, on=on)
        rows, info = train_units(lm, site, requests, hp)
        return site.patches(rows), {**info, "path": site.path, "extends": not site.fresh}
