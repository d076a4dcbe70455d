"""WISE (Wang et al. 2024): a side copy of one MLP output projection, edited in random subspaces and
used only at tokens that its activation router claims.

How it works here
-----------------
The main memory is the MLP output projection `W_v` (`lm.arch.mlp_out_path(layer)`, `down_proj` on
Llama-style models); it is never changed. The side memory of a *shard* is `W_v' = W_v + D`, where the
delta `D` (out x in) is non-zero only on a fixed random subset of its entries (fraction `mask_ratio`,
drawn once per shard from `seed`): this is the paper's random gradient mask, written as a
parametrisation (only the masked entries exist as trainable values), so SGD can never touch the rest.

Per edit, the masked values of the current shard are trained by SGD (`edit_lr`, `n_iter` steps) on

    CE(target | prompt)  +  mean ReLU(Δ(x_irr,t) − α)  +  mean ReLU(β − Δ(x_e,t))
                         +  mean ReLU(γ − (Δ(x_e,t) − max_s Δ(x_irr,s)))

with `Δ(x_t) = ‖D a(x_t)‖₂` at one token (a = the projection's input there), `x_e` the positions that
predict the target tokens (last prompt token onward, teacher forced) and `x_irr` every token of the
request's neighbourhood / locality probes (prompt and answer), or of a few fixed generic sentences when
the request has none. After each step the values are clipped element-wise to `±norm_constraint`
(`W_v' ∈ W_v ± c`). During training the side memory acts at the `x_e` positions only (what routing
will do at inference); the earlier shards stay out of the loss.

Margins. The paper's α, β, γ (5, 20, 10) are absolute norms for Llama-2-7B's layer 27. By default
(`margin_scale="relative"`) `act_margin` holds fractions of this model's own scale at the edit,
s = median over the edit's and the irrelevant tokens of ‖W_v a(x_t)‖ (the MLP's output norm there;
≈ 90 on SmolLM2 layer 25, so [0.05, 0.2, 0.1] gives roughly the paper's 5–20 % of the output);
`margin_scale="absolute"` takes them as raw norms (the "paper" preset).

Routing (per token). A shard's threshold is `ε = act_ratio · m`, with m the running minimum, over the
shard's edits, of the smallest Δ at the edit's own `x_e` tokens right after the edit was trained. At
each token the wrapper computes every shard's Δ; the shards with Δ > ε compete and the one with the
largest Δ answers with `base(x_t) + D a(x_t)` (WISE-Retrieve's "largest score"); a token no shard
claims gets the base layer's output itself (`torch.where`, not blending: bit for bit the base).

Sequential edits and state. Every `save_freq` edits (apply calls) a new shard starts from `D = 0` with a
new mask; earlier shards stay as separate side memories (WISE-Retrieve). One `WISEWrapper` per module
path holds the whole sequence as table rows, one row per edit: the shard id, the shard's mask packed as
bits, the shard's masked values *after* this edit, the running activation minimum and the threshold.
A shard's side memory is its newest row, so restoring an edit just drops its row (nothing is
recomputed or subtracted: exact). An edit costs 4·mask_ratio + 1/8 bytes per weight entry (≈ 0.8 MB on
SmolLM2's 576 x 1536 projection, vs 3.5 MB for a dense delta).

Shard rehearsal (`shard_rehearsal`, editlab's addition; off in every preset). Every edit of a shard
trains the same masked entries, and the paper trains only the new edit, so later edits of a shard can
overwrite earlier ones. With rehearsal the new edit is trained together with the shard's earlier edits
(their CE and β/γ margins, their neighbourhoods among the irrelevant tokens); their requests come from
the active WISE edits of this memory, whose order is the row order. On SmolLM2 it made retention worse,
not better (docs/methods.md, WISE): a 5-edit shard cannot hold its edits however they are trained. With
rehearsal the shard's act_min is the exact minimum over all its edits after this training, not a running
minimum; a shard of `save_freq` edits costs up to `save_freq` requests per training step.

Replay (`replay`, the paper's Appendix B.3; off by default). Once other side memories exist, the last
prompt token of each of their edits (where its answer starts) gets its own term mean ReLU(Δ − α) and
joins the maximum in the γ term, so the new shard stays quiet where an older memory must answer; and
since an older memory cannot learn to be quiet on later edits (it is frozen), the new edit's tokens must
beat, by γ, the largest Δ of any other memory that fires there (editlab's addition to B.3: the router
picks the most active memory). The reference samples one
earlier edit per merged group per step, only after a merge, with fixed margins 5 and 20, and adds a
matching term that keeps one earlier edit of the current group active; here every earlier edit of every
other shard is used at every step with this edit's α and γ, at its last prompt token only (the
reference averages over tokens; the target tokens after the first are left out because two edits with
the same new object share them, which no margin can separate), and the current shard's earlier edits
are what shard rehearsal trains.

Merging (`merge_freq`, WISE-Retrieve). Every `merge_freq` edits (a multiple of `save_freq`) the
`merge_freq / save_freq` shards opened since the last merge become one side memory: the TIES merge
(`ties.py`: trim each shard's delta to `merge_density` of its entries, elect a sign per entry, mean of
the agreeing entries) of their deltas, routed with the smallest of their thresholds, as the reference
keeps the smallest edit activation of the merged shards. Which shards form a merged memory follows from
the rows alone (shard ids and how many edits each holds), so the merged memory is derived when the
memories are built, never stored: restoring the edit that completed a group un-merges it exactly, and
a saved sequence reloads the same memories. With `merge_freq == save_freq` each full shard is a
"merge" of one, trimmed to `merge_density` as the reference trims it.

On SmolLM2 (counterfact-train, tuning split). The paper's SGD rate 1.0 moves Δ by roughly
lr · mask_ratio · ‖a‖² ≈ 70 per step here, so D saturates the clip at once; the "smollm2-135m" preset uses
0.3, one edit per memory and replay (see PRESETS: a shard of several edits cannot hold them on this
model, and replay makes the router pick each edit's own memory). Routing is per token, so a paraphrase is edited only when its own
last token fires: rephrase accuracy stays low (≈ 0.03–0.1 over 20 edits) while rewrite accuracy holds.

Departures (and why)
--------------------
- Per-token routing instead of the reference's one decision per batch from token-averaged norms:
  the decision must be the same under teacher forcing, in a padded batch and while generating with a
  KV cache, and prefix-causal; the margins are per token for the same reason (γ compares each edit
  token with the most active irrelevant token, which is what keeps irrelevant tokens below ε).
- The reference applies the model's activation function (SiLU) to the wrapped layer's *outputs* before
  the norm, which is meaningful after GPT-2's `c_fc` but not after `down_proj`; here Δ is the plain norm
  of the side memory's extra output.
- The side memory's output is computed as `base(x) + D a(x)` (not `(W_v + D) a(x)`): the same map up to
  rounding, it needs no second copy of the weight, and it works unchanged when the wrapped module is
  itself another adapter.
- Not implemented: single-memory WISE with more than one shard (`retrieve=False` is refused once a
  second shard would start, and with `merge_freq`): its reference folds each merge into the previous
  merged memory with fixed weights 0.4 / 0.6. "Edits" count apply calls (a batch is one edit).
  Context templates (random model-sampled prefixes, shared with ROME/MEMIT) are optional
  (`context_templates`, off by default) and seeded.
- The reference's density 0.53 counts over all entries of a shard's delta, of which only `mask_ratio`
  (0.2) can be non-zero, so with its defaults the trim keeps every trained entry and the merge is the
  sign election and the mean where shards' masks overlap.
- The shard threshold uses a running minimum: an earlier edit's activation is not re-measured after
  later edits of its shard have moved D (that would need every edit's activations kept as state);
  with `shard_rehearsal`, which has the shard's earlier edits at hand, it is the exact minimum.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ...errors import CannotExtendError, EditMismatchError, HparamsError
from ...models.lm import LM
from ...requests import EditRequest
from ..base import Editor
from ..ft import batch_loss, encode_batch
from ..patches import ModuleSwap, Patch, TableUpdate
from .hparams import WISEHparams
from .inject import TableAdapter
from ..locate.shared import context_templates, parse_template_groups
from .pools import probe_pool, probe_texts
from .queries import token_inputs
from .ties import ties_merge

# Irrelevant text when a request brings no neighbourhood / locality probes: plain statements on varied
# topics, so the router learns to stay quiet on ordinary text.
GENERIC_SENTENCES = (
    "The weather today is mild with a light breeze.",
    "She opened the book and began to read the first chapter.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The meeting was moved to Thursday afternoon.",
)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool vector -> uint8 bytes (little-endian bit order, zero-padded to a multiple of 8)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `n` bits as a bool vector."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 1).reshape(-1)[:n].bool()


def shard_mask(n: int, k: int, seed: int) -> torch.Tensor:
    """The shard's gradient mask: `k` of `n` entries, drawn with a seeded generator (stored with every
    edit, so a later torch version drawing differently cannot change a saved edit)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:k]] = True
    return mask


class WISEWrapper(TableAdapter):
    """Side memories (one per shard) beside a kept output projection, routed per token.

    Tables, one row per edit: `shard` (id), `mask` (the shard's packed gradient mask), `values` (the
    shard's masked delta entries after this edit, in flattened row-major order of the mask), `act_min`
    (running minimum edit activation of the shard) and `threshold` (ε of the shard after this edit).
    """

    registered_name = "wise"
    tables: ClassVar[tuple[str, ...]] = ("shard", "mask", "values", "act_min", "threshold")

    def __init__(self, base_layer: torch.nn.Module, d_out: int, d_in: int, k: int, *, save_freq: int = 0,
                 merge_shards: int = 0, density: float = 1.0) -> None:
        super().__init__(base_layer)
        self.d_out, self.d_in, self.k = int(d_out), int(d_in), int(k)
        # TIES merging: every `merge_shards` consecutive shards (ids g·m … g·m + m − 1) become one side
        # memory once the last of them holds `save_freq` edits; 0 = every shard stays its own memory
        self.save_freq, self.merge_shards, self.density = int(save_freq), int(merge_shards), float(density)
        device = next(iter(base_layer.parameters()), torch.zeros(0)).device
        n_bytes = (self.d_out * self.d_in + 7) // 8
        self.add_table("shard", (), torch.long, device)
        self.add_table("mask", (n_bytes,), torch.uint8, device)
        self.add_table("values", (self.k,), torch.float32, device)
        self.add_table("act_min", (), torch.float32, device)
        self.add_table("threshold", (), torch.float32, device)
        self._memories: tuple[torch.Tensor, torch.Tensor] | None = None  # derived (dense deltas, ε), not state
        self._train: tuple[torch.Tensor, torch.Tensor] | None = None  # (delta, positions) while training
        # replay: the projection's input at each stored edit's last prompt token, by prompt, for the other
        # active edits (the key); derived, not state: it only saves re-running the layers below
        self._answer_inputs: tuple[tuple[str, ...], dict[str, torch.Tensor]] = ((), {})

    # ------------------------------------------------------------------ state
    def config(self) -> dict[str, Any]:
        return {"d_out": self.d_out, "d_in": self.d_in, "k": self.k, "save_freq": self.save_freq,
                "merge_shards": self.merge_shards, "density": self.density}

    @classmethod
    def from_config(cls, base_layer: torch.nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "WISEWrapper":
        # edits saved before merging existed carry no merge settings: their shards were never merged
        save_freq, merge_shards = int(config.get("save_freq", 0)), int(config.get("merge_shards", 0))
        density = float(config.get("density", 1.0))
        if save_freq < 0 or merge_shards < 0 or not 0 < density <= 1 or (merge_shards and save_freq < 1):
            raise EditMismatchError(f"WISE memory config has invalid merge settings (save_freq={save_freq}, "
                                    f"merge_shards={merge_shards}, density={density}): the saved edit is damaged")
        w = cls(base_layer, int(config["d_out"]), int(config["d_in"]), int(config["k"]),
                save_freq=save_freq, merge_shards=merge_shards, density=density)
        w.load_adapter_state(tensors)
        return w

    def update_rows(self, append, index, changed):  # type: ignore[no-untyped-def]
        self._memories = None
        return super().update_rows(append, index, changed)

    def undo_rows(self, index, undo):  # type: ignore[no-untyped-def]
        self._memories = None
        super().undo_rows(index, undo)

    def shard_rows(self) -> dict[int, int]:
        """Shard id -> its newest row (the shard's current side memory)."""
        return {int(s): i for i, s in enumerate(self.shard.tolist())}

    def shard_state(self, row: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(mask [out*in] bool, values [k], act_min) of the side memory stored in `row`."""
        mask = unpack_bits(self.mask[row].cpu(), self.d_out * self.d_in)
        return mask, self.values[row].detach().float().cpu().clone(), float(self.act_min[row])

    def dense_delta(self, row: int) -> torch.Tensor:
        """D (out x in, float32) of the side memory stored in `row`."""
        mask, values, _ = self.shard_state(row)
        flat = torch.zeros(self.d_out * self.d_in)
        flat[mask] = values
        return flat.view(self.d_out, self.d_in)

    def memory_groups(self) -> list[tuple[list[int], bool]]:
        """The side memories as (table rows, merged) in shard order: rows are each shard's newest row,
        one for a shard on its own, `merge_shards` for shards merged into one memory. A group merges
        when its last shard is full (`save_freq` edits), as the reference merges right after that edit;
        it is derived from the rows alone, so dropping a row (restore) un-merges exactly."""
        newest = self.shard_rows()
        count: dict[int, int] = {}
        for sh in self.shard.tolist():
            count[int(sh)] = count.get(int(sh), 0) + 1
        m = self.merge_shards
        groups: list[tuple[list[int], bool]] = []
        seen: set[int] = set()
        for sh in sorted(newest):
            if sh in seen:
                continue
            first = sh - sh % m if m else sh
            members = list(range(first, first + m)) if m else [sh]
            last = members[-1]
            if m and all(x in newest for x in members) and count.get(last, 0) >= self.save_freq:
                groups.append(([newest[x] for x in members], True))
                seen.update(members)
            else:
                groups.append(([newest[sh]], False))
                seen.add(sh)
        return groups

    def memories(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(deltas [S, out, in], thresholds [S]) of every side memory, or None. A merged memory is the
        TIES merge (`density`) of its shards' deltas, with the smallest of their thresholds (the
        reference keeps the smallest edit activation of the merged shards)."""
        if self.n_rows == 0:
            return None
        if self._memories is None or self._memories[0].device != device:
            deltas, eps = [], []
            for rows, merged in self.memory_groups():
                if merged:  # a group of one (merge_freq == save_freq) is still trimmed, as the reference does
                    deltas.append(ties_merge([self.dense_delta(r) for r in rows], self.density))
                else:
                    deltas.append(self.dense_delta(rows[0]))
                eps.append(min(float(self.threshold[r]) for r in rows))
            self._memories = (torch.stack(deltas).to(device), torch.tensor(eps, device=device))
        return self._memories

    # ------------------------------------------------------------------ forward
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Per-token routing of input `x` [..., in]: (routed [...] bool, chosen shard index [...],
        the chosen side memory's extra output D a(x) [..., out] float32), or None with no memories."""
        mem = self.memories(x.device)
        if mem is None:
            return None
        deltas, eps = mem
        side = torch.einsum("...i,soi->...so", x.float(), deltas)
        score = side.norm(dim=-1)  # Δ per token and shard
        fire = score > eps
        best = torch.where(fire, score, torch.full_like(score, -math.inf)).argmax(-1)
        chosen = torch.gather(side, -2, best[..., None, None].expand(*best.shape, 1, side.shape[-1]))[..., 0, :]
        return fire.any(-1), best, chosen

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.base_layer(x, *args, **kwargs)
        if self._train is not None:  # training one shard: its delta at the edit's positions only
            delta, positions = self._train
            extra = torch.einsum("...i,oi->...o", x.float(), delta)
            return torch.where(positions[..., None], base + extra.to(base.dtype), base)
        routed = self.route(x)
        if routed is None:
            return base
        fire, _, chosen = routed
        return torch.where(fire[..., None], base + chosen.to(base.dtype), base)





def irrelevant_texts(requests: list[EditRequest], hp: WISEHparams | None = None) -> list[str]:
    """x_irr. By default the requests' neighbourhood and locality probes (prompt + answer), else generic
    sentences. With `hp.irr_data`, `hp.irr_texts` texts per request drawn from that dataset's probes
    (seeded by `hp.seed` and the request's prompt, so an edit always draws the same), never one of the
    request's own probes."""
    if hp is None or not hp.irr_data:
        return probe_texts(requests) or list(GENERIC_SENTENCES)
    import random

    pool = probe_pool(hp.irr_data)
    own = set(probe_texts(requests))
    texts: list[str] = []
    for r in requests:
        rng = random.Random(f"{hp.seed}:{r.prompt}:{r.target_new}")
        picks = [pool[i] for i in rng.sample(range(len(pool)), min(len(pool), hp.irr_texts + len(own)))]
        texts.extend([t for t in picks if t not in own][: hp.irr_texts])
    return list(dict.fromkeys(texts)) or list(GENERIC_SENTENCES)


def holds_row_at(edit: Any, path: str) -> bool:
    """Whether `edit` is a WISE edit that stored a row in a WISE memory at `path`."""
    return edit.method == WISEEditor.name and any(isinstance(p, TableUpdate) and p.path == path for p in edit.patches)


def memory_edits(lm: LM, path: str, wrapper: WISEWrapper) -> list[Any]:
    """The active edits whose rows `wrapper` holds, in row order: the one that installed it (its
    ModuleSwap) and the WISE edits at `path` above it (one row per apply call; restore drops the top
    row). Edits below it belong to an inner WISE memory at the same module, if any."""
    edits = list(lm.active_edits)
    start = next((i for i, e in enumerate(edits) if any(
        isinstance(p, ModuleSwap) and p.wrapper is wrapper for p in e.patches)), len(edits))
    return [e for e in edits[start:] if holds_row_at(e, path)]


def stored_requests(lm: LM, path: str, wrapper: WISEWrapper, shard: int) -> tuple[list[EditRequest], list[EditRequest]]:
    """The requests of the edits already stored in the memory at `path`: (those of `shard`, those of
    every other shard), for shard rehearsal and replay; row i of the wrapper belongs to the i-th of
    `memory_edits`."""
    edits = memory_edits(lm, path, wrapper)
    if len(edits) != wrapper.n_rows:
        raise CannotExtendError(f"shard_rehearsal and replay need the requests of every edit in the WISE memory at "
                                f"{path}, but {wrapper.n_rows} rows are stored and {len(edits)} active WISE edits "
                                "hold them: extend the sequence with the edits it was made of still active")
    same: list[EditRequest] = []
    other: list[EditRequest] = []
    for row, edit in zip(wrapper.shard.tolist(), edits):
        (same if int(row) == shard else other).extend(edit.requests)
    return same, other


@torch.no_grad()
def rival_activations(wrapper: WISEWrapper, shard: int, a: torch.Tensor,
                      device: torch.device) -> torch.Tensor | None:
    """Per row of `a` (inputs at the edit's tokens): the largest Δ among the side memories other than
    `shard`'s own that fire there (0 where none fires), or None when there is no other memory. Memories
    are built on `device` (the wrapped layer's, where routing keeps them)."""
    mem = wrapper.memories(device)
    if mem is None:
        return None
    deltas, eps = mem
    other = torch.tensor([all(int(wrapper.shard[r]) != shard for r in rows) for rows, _ in wrapper.memory_groups()],
                         device=device)
    if not bool(other.any()):
        return None
    score = torch.einsum("ni,soi->nso", a.to(device, torch.float32), deltas).norm(dim=-1)
    fires = (score > eps) & other
    return torch.where(fires, score, torch.zeros_like(score)).max(-1).values.cpu()


def templated(lm: LM, requests: list[EditRequest], hp: WISEHparams) -> list[EditRequest]:
    """The requests as trained: each bare prompt, then under every sampled context prefix."""
    groups = parse_template_groups(hp.context_templates)
    prefixes = [t for group in context_templates(lm, groups, hp.seed)[1:] for t in group] if groups else []
    out = list(requests)
    for t in prefixes:
        out += [EditRequest.create(t.format(r.prompt), r.subject, r.target_new, r.target_true) for r in requests]
    return out


class WISEEditor(Editor):
    name = "wise"
    hparams_cls = WISEHparams
    supports_batch: ClassVar[bool] = True
    supports_on: ClassVar[bool] = True

    def compute_patches(self, lm: LM, requests: list[EditRequest], hp: WISEHparams,
                        on: Any) -> tuple[list[Patch], dict[str, Any]]:
        path = lm.arch.mlp_out_path(hp.layer)
        current = lm.module(path)
        weight = lm.arch.as_matrix(lm.base_module(path).weight).detach()
        d_out, d_in = weight.shape
        k = max(1, round(hp.mask_ratio * d_out * d_in))
        patches: list[Patch] = []
        merge_shards = hp.merge_freq // hp.save_freq if hp.merge_freq else 0
        if on is not None and not (isinstance(current, WISEWrapper) and any(
                isinstance(p, (ModuleSwap, TableUpdate)) and p.path == path for p in on.patches)):
            raise CannotExtendError(f"on= edit has no WISE memory at {path}: extend it with the same layer it was made "
                                 "with, or apply without on=")
        if on is not None:
            wrapper = current
            if wrapper.k != k:
                raise CannotExtendError(f"mask_ratio={hp.mask_ratio} gives {k} entries per shard, but the WISE memory "
                                   f"this edit extends uses {wrapper.k}: keep mask_ratio fixed within a sequence")
            if wrapper.merge_shards != merge_shards or merge_shards and (
                    wrapper.density != hp.merge_density or wrapper.save_freq != hp.save_freq):
                raise CannotExtendError(
                    f"the WISE memory this edit extends merges every {wrapper.merge_shards} shards of "
                    f"{wrapper.save_freq} edits at density {wrapper.density}; this edit asks for merge_freq="
                    f"{hp.merge_freq}, save_freq={hp.save_freq}, merge_density={hp.merge_density}: keep them fixed "
                    "within a sequence (merge_freq=0 for a memory made without merging)")
        else:
            wrapper = WISEWrapper(current, d_out, d_in, k, save_freq=hp.save_freq, merge_shards=merge_shards,
                                  density=hp.merge_density)
            patches.append(ModuleSwap(path, wrapper))

        shard, mask, values, act_min = self._shard_for(wrapper, hp, k)
        # shard rehearsal: the shard's earlier edits are trained again beside the new one
        same, other = stored_requests(lm, path, wrapper, shard) if (
            hp.shard_rehearsal or hp.replay) and on is not None else ([], [])
        earlier = same if hp.shard_rehearsal else []
        trained = list(requests) + earlier
        batch = encode_batch(lm, templated(lm, trained, hp), "target_new")
        a_edit = self._edit_inputs(lm, path, batch)
        a_irr = token_inputs(lm, path, irrelevant_texts(trained, hp), hp.irr_tokens, skip_prefix=False)
        replayed = other if hp.replay else []  # replay: the other memories' answer positions, kept quiet here
        a_old = self._answer_inputs(lm, path, wrapper, replayed) if replayed else a_irr[:0]
        ref = next(iter(wrapper.base_layer.parameters()), None)
        rival = rival_activations(wrapper, shard, a_edit, ref.device if ref is not None else lm.device) if (
            hp.replay and on is not None) else None
        with torch.no_grad():
            base_norms = torch.cat([a_edit, a_irr]) @ weight.float().cpu().T
            scale = float(base_norms.norm(dim=-1).median())
        alpha, beta, gamma = (float(m) * (scale if hp.margin_scale == "relative" else 1.0) for m in hp.act_margin)

        swap = patches[0] if patches else None
        if swap is not None:
            swap.apply(lm)  # temporary: train through the wrapper, taken out again below
        try:
            values, losses = self._train(lm, wrapper, batch, mask, values, a_edit, a_irr, a_old, rival,
                                         (alpha, beta, gamma), hp)
        finally:
            wrapper._train = None
            if swap is not None:
                swap.revert(lm)

        with torch.no_grad():
            delta = torch.zeros(d_out * d_in)
            delta[mask] = values
            delta = delta.view(d_out, d_in)
            act_edit = (a_edit @ delta.T).norm(dim=-1)
            act_irr = (a_irr @ delta.T).norm(dim=-1)
        # with rehearsal a_edit holds every edit of the shard, measured after this training: the exact
        # minimum; without it, the running minimum (earlier edits are not re-measured)
        act_min = float(act_edit.min()) if earlier else min(act_min, float(act_edit.min()))
        eps = hp.act_ratio * act_min
        patches.append(TableUpdate(path, {
            "shard": torch.tensor([shard]), "mask": pack_bits(mask)[None], "values": values[None].clone(),
            "act_min": torch.tensor([act_min]), "threshold": torch.tensor([eps]),
        }))
        info = {"path": path, "shard": shard, "edits_in_memory": wrapper.n_rows + 1,
                "memories_before": len(wrapper.memory_groups()) if wrapper.n_rows else 0, "scale": scale,
                "margins": [alpha, beta, gamma], "threshold": eps, "edit_act_min": float(act_edit.min()),
                "irr_act_max": float(act_irr.max()), "irr_routed": float((act_irr > eps).float().mean()),
                "rehearsed": len(earlier), "replayed": len(replayed),
                "loss_first": losses[0][0], "loss_last": losses[-1][0], "ce_first": losses[0][1],
                "ce_last": losses[-1][1]}
        return patches, info

    @staticmethod
    def _shard_for(wrapper: WISEWrapper, hp: WISEHparams, k: int) -> tuple[int, torch.Tensor, torch.Tensor, float]:
        """(shard id, mask, starting values, running act_min) for the next edit: the newest shard while it
        has fewer than `save_freq` edits, else a fresh one (D = 0, new mask)."""
        n_out_in = wrapper.d_out * wrapper.d_in
        if wrapper.n_rows:
            last = int(wrapper.shard[-1])
            used = int((wrapper.shard == last).sum())
            if used < hp.save_freq:
                mask, values, act_min = wrapper.shard_state(wrapper.n_rows - 1)
                return last, mask, values, act_min
            if not hp.retrieve:
                raise HparamsError(f"the WISE memory holds {used} edits (save_freq={hp.save_freq}): a new shard "
                                   "would need the single-memory variant (retrieve=False: shards TIES-merged "
                                   "into the one side memory), which is not implemented; use retrieve=True "
                                   "(merging with merge_freq works there) or a larger save_freq")
            shard = last + 1
        else:
            shard = 0
        mask = shard_mask(n_out_in, k, hp.seed * 1_000_003 + shard)
        return shard, mask, torch.zeros(k), math.inf

    @classmethod
    def _answer_inputs(cls, lm: LM, path: str, wrapper: WISEWrapper, requests: list[EditRequest]) -> torch.Tensor:
        """The projection's input at each request's last prompt token, [len(requests), in] float32, cached
        on the wrapper by prompt. This memory's own rows do not change it, so the cache is kept while the
        other active edits stay the same (it is keyed by their ids). Each prompt gets a pass of its own
        (no padding): a sequence continued after a save / load or a resume, which fills the cache at once,
        then trains on the same bits as the run that filled it one edit at a time."""
        below = tuple(e.id for e in lm.active_edits if not holds_row_at(e, path))
        key, cache = wrapper._answer_inputs
        if key != below:
            cache = {}
            wrapper._answer_inputs = (below, cache)
        for r in {r.prompt: r for r in requests if r.prompt not in cache}.values():
            cache[r.prompt] = cls._edit_inputs(lm, path, encode_batch(lm, [r], "target_new"), first=True)[0]
        return torch.stack([cache[r.prompt] for r in requests])

    @staticmethod
    @torch.no_grad()
    def _edit_inputs(lm: LM, path: str, batch: Any, first: bool = False) -> torch.Tensor:
        """The projection's input at the positions that predict target tokens: [n_tokens, in] float32;
        with `first`, only at each row's first such position (its last prompt token): [rows, in]."""
        from ...hooks import capture

        got: list[torch.Tensor] = []
        capture(lm.model, lambda: lm.backbone_forward(batch.ids, batch.mask), inputs={path: got.append},
                stop_after=path)
        x = got[0]
        rows, cols = batch.rows, batch.cols
        if first:
            start = torch.full((int(batch.ids.shape[0]),), -1, dtype=cols.dtype)
            start = start.scatter_reduce(0, rows, cols, "amin", include_self=False)
            rows, cols = torch.arange(len(start)), start
        return x[rows.to(x.device), cols.to(x.device)].float().cpu()

    @staticmethod
    def _train(lm: LM, wrapper: WISEWrapper, batch: Any, mask: torch.Tensor, values: torch.Tensor,
               a_edit: torch.Tensor, a_irr: torch.Tensor, a_old: torch.Tensor,
               rival: torch.Tensor | None,
               margins: tuple[float, float, float], hp: WISEHparams) -> tuple[torch.Tensor, list[tuple[float, float]]]:
        """SGD on the shard's masked entries: CE + the three activation margins, clipped to ±c. With
        replay, `a_old` (other memories' answer positions) gets its own α term, as the reference's replay
        loss is a separate term, so a few such tokens are not averaged away among the irrelevant ones, and
        joins the γ term's maximum; `rival` (per edit token, the largest Δ of another memory that fires
        there, 0 where none does) must be beaten by γ; at the tokens where none fires it asks Δ ≥ γ,
        which the β term already asks for (β > γ in every preset)."""
        alpha, beta, gamma = margins
        # the wrapped layer's device (with device_map a layer may sit on another device than the embeddings)
        ref = next(iter(wrapper.base_layer.parameters()), None)
        device = ref.device if ref is not None else lm.device
        index = mask.nonzero()[:, 0].to(device)
        n = wrapper.d_out * wrapper.d_in
        v = values.to(device).clone().requires_grad_(True)
        positions = torch.zeros(batch.ids.shape, dtype=torch.bool, device=device)
        positions[batch.rows.to(device), batch.cols.to(device)] = True
        a_e, a_i, a_o = a_edit.to(device), a_irr.to(device), a_old.to(device)
        rival_e = rival.to(device) if rival is not None else None
        opt = torch.optim.SGD([v], lr=hp.edit_lr)
        losses: list[float] = []
        for _ in range(hp.n_iter):
            delta = torch.zeros(n, device=device).index_put((index,), v).view(wrapper.d_out, wrapper.d_in)
            wrapper._train = (delta, positions)
            ce = batch_loss(lm, batch)
            act_e = (a_e @ delta.T).norm(dim=-1)
            act_i = (a_i @ delta.T).norm(dim=-1)
            loss = ce + torch.relu(act_i - alpha).mean() + torch.relu(beta - act_e).mean()
            quiet_max = act_i.max()
            if a_o.shape[0]:
                act_o = (a_o @ delta.T).norm(dim=-1)
                loss = loss + torch.relu(act_o - alpha).mean()
                quiet_max = torch.maximum(quiet_max, act_o.max())
            loss = loss + torch.relu(gamma - (act_e - quiet_max)).mean()
            if rival_e is not None:  # where no other memory fires (rival 0) this asks only Δ ≥ γ, below β
                loss = loss + torch.relu(gamma - (act_e - rival_e)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                v.clamp_(-hp.norm_constraint, hp.norm_constraint)
            losses.append((float(loss.detach()), float(ce.detach())))
        return v.detach().float().cpu(), losses
