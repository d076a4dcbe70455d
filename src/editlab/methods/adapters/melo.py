"""MELO (Yu et al. 2024): LoRA blocks beside an MLP projection, chosen per token by a vector database.

The wrapped module `f` (by default an MLP input projection, `up_proj` / `c_fc`, as in the paper) keeps
its weights. Beside it lie LoRA blocks (block `b`: factors `A_b` [r, d_in], `B_b` [r, d_out], rank `r`
= `block_rank`) and a vector database of edit *clusters* (centre, radius, label = the target token
sequence) each holding *points* (an edit prompt's key and the block trained for it). At every token
the key `h` (the input of `f` at that token) is compared with the cluster centres; if the nearest
centre is within its radius, the nearest point of that cluster names the block and the output is
`f(h) + s·B_bᵀ(A_b h)` with `s = lora_scale`; otherwise it is `f(h)` itself, bit for bit (those rows
are never touched). A point whose block was forgotten (see below) routes to no block.

Editing a batch: the requests are cut into groups of `edits_per_block`; each group gets one new block
per wrapped module, trained only on that group. For each request, the key `q` is the input of `f` at the
last prompt token (what the model sees at inference: the prompt, never prompt + target) and, against
the nearest cluster `c` at distance `d`:
- empty database, or `d > R_c + init(q)`: a new cluster (centre `q`, radius `init(q)`);
- same label: `q` joins `c` as a point; centre = mean of its points; radius = max(distance of its
  points to the centre, `init(q)`);
- other label: a new cluster at `q`, both radii set to `d/2`, and the points of `c` now outside its
  radius are dropped (if none are left, the centre stays as a point that routes to no block).
The block (A seeded, kaiming-uniform like PEFT; B zero, so a new block starts as a no-op) is trained
by Adam (StepLR) on the group's teacher-forced target NLL with the database in place, so training and
inference run the same forward pass and the same routing. Positions before the first one any new block
can reach run once into a KV cache; each step runs only the rest (exact: see `_SuffixLoss`).

`key_tokens="prompt"` (default) files one key per request, at the last prompt token; `"target"` also
files the key at every teacher-forced target position (same label, same block), so the block also
fires where generation has already produced the first target tokens — needed on models too small to
carry a multi-token target from one position (the 4-layer test model), not on SmolLM2 (rewrite
accuracy 1.0 either way on counterfact-train records 0-19).

Radius unit. `radius_unit="key_norm"` (default) reads `init_radius` as a fraction of the new key's own
norm (`init(q) = init_radius·‖q‖`); `"absolute"` (and the `paper` preset) keeps raw L2 units. Absolute
radii are a trap: a key's scale depends on the model, the layer and the module (SmolLM2's residual
stream at late layers: distances 5-20; the normed `up_proj` input MELO keys on: norms ~4), so the
paper's 0.5 (tuned on GPT-2 XL) means something different everywhere; a fraction of the norm means the
same thing at any layer of any model. Measured on SmolLM2 `up_proj` inputs at the last prompt token,
counterfact-train records 0-49, distance / ‖key‖ to the edit prompt's key, 5 / 50 / 95 % quantiles:
layer 25 paraphrases 0.40 / 0.93 / 1.25, neighbourhood prompts 0.29 / 0.73 / 1.14, the nearest other
edit 0.42 / 0.66 / 0.89 (layers 15 and 20 alike). CounterFact paraphrases (a prefix sentence, then the
question) are *not* nearer than other subjects with the same relation, so no radius buys paraphrase
generalization at that position without breaking locality; the default 0.1 stays below every other
prompt (locality 1.0) and the rewrite is exact.

Departures from the paper and EasyEdit's code, and why:
- **Per-token routing on the LoRA module's own input.** EasyEdit routes on the *output* of a separate
  router layer at one query position (the last token of prompt+target while editing, the newest token
  while generating), writes the decision to a module-level global that every LoRA layer reads, and
  applies the chosen block to every position of the row. Here each wrapped module routes every token on
  its own input, with no state kept between calls: one wrapper suffices, two models never share a
  decision, and teacher-forced scoring, batches with padding, prompts that are prefixes of each other
  and cached generation all agree. On an edit prompt this fires where the key was taken (the last
  prompt token) and on inputs close to it. With several `layers`, each layer's database holds its own
  keys (taken before the edit's blocks exist); a later layer's key can move once earlier blocks train,
  and then that layer's block simply does not fire — training sees exactly that, as inference does.
- **Blocks on demand.** The paper pre-allocates `num_block × r` ranks (EasyEdit never checks a block id
  against `num_block`); here the block tables grow by one block per group, so no capacity is set.
- **Within-batch order.** Requests of a batch are placed one after the other, each seeing the clusters
  the earlier ones added (EasyEdit compares a batch only with the database as it was before it).
- **Labels** are exact target token sequences (EasyEdit compares sums of token ids, which collide).
- **Scale.** EasyEdit's dynamic LoRA multiplies both A and B by `√(R/r)`, so its effective multiplier of
  `B(Ax)` is `(α/R)·(R/r)` = `num_block` with α = R; `lora_scale` sets it directly (the `paper` preset:
  350; it held √350 before 2026-12-05, which moved the output 18.7 times less per step).
- **Early stop** once the mean target NLL is below `stop_loss` (the paper runs a fixed number of steps;
  `stop_loss=0` and the `paper` preset do the same).

Tables. The wrapper is a `TableAdapter` with three independent *table groups* — clusters (`centres`,
`radii`, `labels`), points (`points`, `point_cluster`, `point_block`) and blocks (`lora_A`, `lora_B`,
`block_rank` rows per block) — each grown by its own `TableUpdate` (one update names one group), so an
edit's updates append its clusters, points and blocks and change the radii, centres and memberships it
touches, and restoring it puts every row back exactly. Sequential editing (`apply(..., on=previous)`)
extends the same wrapper.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ...batching import teacher_forcing
from ...errors import CannotExtendError, EditMismatchError
from ...hooks import capture
from ...models.lm import LM
from ...requests import EditRequest
from ..base import Editor
from ..edit import Edit
from ..locate.shared import SuffixRunner
from ..patches import ModuleSwap, Patch, TableUpdate
from .grace import SAME_INPUT, label_id
from .hparams import MELOHparams
from .inject import TableAdapter, linear_dims
from .queries import last_prompt_inputs

NO_BLOCK = -1  # a point that routes to no block (its cluster's points were all dropped)
DROPPED = -1  # point_cluster of a point dropped from its cluster when the cluster's radius was halved


class MeloLoRA(TableAdapter):
    """LoRA blocks and their vector database around a module taking [.., d_in] and returning [.., d_out].

    Tables, in three groups that grow independently (each `TableUpdate` names exactly one group):
    clusters `centres` [K, d_in], `radii` [K], `labels` [K]; points `points` [P, d_in], `point_cluster`
    [P] (cluster row, or -1 once dropped), `point_block` [P] (block id, or -1); blocks `lora_A`
    [n_blocks·r, d_in], `lora_B` [n_blocks·r, d_out] (block b = rows b·r .. b·r + r - 1)."""

    registered_name = "melo-lora"
    GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "clusters": ("centres", "radii", "labels"),
        "points": ("points", "point_cluster", "point_block"),
        "blocks": ("lora_A", "lora_B"),
    }
    tables = ("centres", "radii", "labels", "points", "point_cluster", "point_block", "lora_A", "lora_B")

    def __init__(self, base_layer: torch.nn.Module, d_in: int, d_out: int, block_rank: int, scale: float) -> None:
        super().__init__(base_layer)
        self.d_in, self.d_out, self.block_rank, self.scale = int(d_in), int(d_out), int(block_rank), float(scale)
        ref = next(iter(base_layer.parameters()), None)
        dev = ref.device if ref is not None else None
        self.add_table("centres", (self.d_in,), torch.float32, dev)
        self.add_table("radii", (), torch.float32, dev)
        self.add_table("labels", (), torch.long, dev)
        self.add_table("points", (self.d_in,), torch.float32, dev)
        self.add_table("point_cluster", (), torch.long, dev)
        self.add_table("point_block", (), torch.long, dev)
        self.add_table("lora_A", (self.d_in,), torch.float32, dev)
        self.add_table("lora_B", (self.d_out,), torch.float32, dev)
        self._trial: dict[str, Any] = {}  # {"block": b, "A": [r, d_in], "B": [r, d_out]} while an edit trains

    def config(self) -> dict[str, Any]:
        return {"d_in": self.d_in, "d_out": self.d_out, "block_rank": self.block_rank, "scale": self.scale}

    @classmethod
    def from_config(cls, base_layer: torch.nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "MeloLoRA":
        w = cls(base_layer, int(config["d_in"]), int(config["d_out"]), int(config["block_rank"]), float(config["scale"]))
        w.load_adapter_state(tensors)
        return w

    @property
    def n_rows(self) -> int:
        return int(self.centres.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.lora_A.shape[0]) // self.block_rank

    # ------------------------------------------------------------------ table groups
    def _group(self, append: dict[str, torch.Tensor], changed: dict[str, torch.Tensor]) -> tuple[str, ...]:
        for names in self.GROUPS.values():
            if set(append) == set(names) and set(changed) <= set(names):
                return names
        raise EditMismatchError(f"MeloLoRA: an update must name exactly one table group {list(self.GROUPS.values())}; "
                                f"got {sorted(append)} (changed {sorted(changed)})")

    def check_rows(self, append: dict[str, torch.Tensor], index: torch.Tensor, changed: dict[str, torch.Tensor]) -> None:
        names = self._group(append, changed)
        counts = set()
        for name in names:
            table, rows = getattr(self, name), append[name]
            if tuple(rows.shape[1:]) != tuple(table.shape[1:]):
                raise EditMismatchError(f"MeloLoRA: rows for {name!r} have shape {tuple(rows.shape)}, the table "
                                        f"{tuple(table.shape)}")
            counts.add(int(rows.shape[0]))
            if name in changed and (tuple(changed[name].shape[1:]) != tuple(table.shape[1:])
                                    or changed[name].shape[0] != index.numel()):
                raise EditMismatchError(f"MeloLoRA: changed rows of {name!r} do not match the table")
        if len(counts) != 1:
            raise EditMismatchError("MeloLoRA: the tables of one group get different numbers of new rows")
        n = int(getattr(self, names[0]).shape[0])
        if names == self.GROUPS["blocks"] and counts.pop() % self.block_rank:
            raise EditMismatchError(f"MeloLoRA: blocks come in whole blocks of {self.block_rank} rows")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise EditMismatchError(f"MeloLoRA: update changes row {int(index.max())} of {n} in {names[0]!r}")

    def update_rows(self, append: dict[str, torch.Tensor], index: torch.Tensor,
                    changed: dict[str, torch.Tensor]) -> tuple[tuple[str, ...], int, dict[str, torch.Tensor]]:
        names = self._group(append, changed)
        n0 = int(getattr(self, names[0]).shape[0])
        with torch.no_grad():
            old = {}
            for name, rows in changed.items():
                table = getattr(self, name)
                i = index.to(table.device)
                old[name] = table[i].clone()
                table[i] = rows.to(table.device, table.dtype)
            for name in names:
                table = getattr(self, name)
                setattr(self, name, torch.cat([table, append[name].to(table.device, table.dtype)]))
        return names, n0, old

    def undo_rows(self, index: torch.Tensor, undo: tuple[tuple[str, ...], int, dict[str, torch.Tensor]]) -> None:
        names, n0, old = undo
        with torch.no_grad():
            for name in names:
                setattr(self, name, getattr(self, name)[:n0].clone())
            for name, rows in old.items():
                table = getattr(self, name)
                table[index.to(table.device)] = rows

    # ------------------------------------------------------------------ lookup and forward
    @torch.no_grad()
    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token rows that get a block, their block ids) for the keys h [T, d_in]: the nearest cluster
        centre must lie within its radius; the nearest of that cluster's points names the block.

        A matrix-product screen (fast, but its rounding depends on the batch) keeps only the tokens
        within reach of some cluster, with a margin far above float32 rounding; their decisions are
        then made on direct differences, so a token gets the same decision in any batch."""
        none = torch.zeros(0, dtype=torch.long, device=h.device)
        if self.centres.shape[0] == 0:
            return none, none
        h = h.float()
        hh = (h * h).sum(dim=1, keepdim=True)
        cc = (self.centres * self.centres).sum(dim=1)[None, :]
        d2 = hh + cc - 2 * h @ self.centres.T
        near = ((d2 - self.radii[None, :] ** 2) <= 1e-4 * (hh + cc)).any(dim=1).nonzero()[:, 0]
        if near.numel() == 0:
            return none, none
        d = torch.cdist(h[near], self.centres, compute_mode="donot_use_mm_for_euclid_dist")
        dmin, c = d.min(dim=1)
        inside = dmin <= self.radii[c]
        tok, c = near[inside], c[inside]
        if tok.numel() == 0:
            return none, none
        dp = torch.cdist(h[tok], self.points, compute_mode="donot_use_mm_for_euclid_dist")
        dp = dp.masked_fill(self.point_cluster[None, :] != c[:, None], float("inf"))
        blk = self.point_block[dp.argmin(dim=1)]
        keep = blk >= 0
        return tok[keep], blk[keep]

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All blocks' factors [n_blocks, r, d_in] and [n_blocks, r, d_out], with the block being
        trained (if any) appended as the next block id."""
        r = self.block_rank
        A = self.lora_A.reshape(-1, r, self.d_in)
        B = self.lora_B.reshape(-1, r, self.d_out)
        if self._trial:
            if self._trial["block"] != A.shape[0]:
                raise EditMismatchError("internal: the trained block must be the next block of its wrapper")
            A = torch.cat([A, self._trial["A"][None]])
            B = torch.cat([B, self._trial["B"][None]])
        return A, B

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        flat = x.reshape(-1, self.d_in)
        tok, blk = self.route(flat)
        if tok.numel() == 0:
            return out  # nothing in scope: the wrapped module's own output, untouched
        A, B = self._factors()
        xa = torch.einsum("mi,mri->mr", flat[tok].float(), A[blk])
        delta = torch.einsum("mr,mro->mo", xa, B[blk]) * self.scale
        flat_out = out.reshape(-1, self.d_out)
        # rows not in `tok` are copied as they are, bit for bit
        return flat_out.index_add(0, tok, delta.to(flat_out.dtype)).reshape(out.shape)





def _edit_keys(lm: LM, path: str, requests: list[EditRequest], key_tokens: str) -> list[torch.Tensor]:
    """Per request, the keys [n, d_in] its block is filed under: the input of `path` at the last prompt
    token (key_tokens "prompt"), plus, for "target", at every teacher-forced target position (the
    positions that predict target tokens 2..m, which generation reaches once it has produced the
    earlier ones). This layer's input there does not depend on this edit's blocks at this layer."""
    if key_tokens == "prompt":
        return list(last_prompt_inputs(lm, path, [r.prompt for r in requests])[:, None, :])
    seqs, spans = [], []
    for r in requests:
        p_ids, t_ids = lm.encode_pair(r.prompt, r.target_new)
        seq, pos = teacher_forcing(p_ids, t_ids)
        seqs.append(seq)
        spans.append(pos)
    ids, mask = lm.pad_right(seqs)
    got: list[torch.Tensor] = []
    with torch.no_grad():
        capture(lm.model, lambda: lm.backbone_forward(ids, mask), inputs={path: got.append}, stop_after=path)
    return [got[0][i, pos].float().cpu() for i, pos in enumerate(spans)]


class _SuffixLoss:
    """The group's training loss (each request's mean target NLL, averaged over requests, as
    `ft.batch_loss`), run from the first position where a new block can act. The wrappers hold the
    new blocks as their trial (B = 0, so the probe pass sees the model as before training); positions
    before the first one routed to a new block, in every wrapper, never depend on the new factors
    (routing reads each position's own input, which depends only on earlier positions), so they run
    once into a KV cache (`SuffixRunner`) and each step runs only the rest: exact, and several times
    faster than the whole sequence."""

    def __init__(self, lm: LM, group: list[EditRequest], paths: list[str], wrappers: list[MeloLoRA]) -> None:
        seqs, spans = [], []
        for r in group:
            seq, pos = teacher_forcing(*lm.encode_pair(r.prompt, r.target_new))
            seqs.append(seq)
            spans.append(pos)
        ids, mask = lm.pad_right(seqs)
        got: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
        with torch.no_grad():
            capture(lm.model, lambda: lm.backbone_forward(ids, mask), inputs={p: got[p].append for p in paths},
                    stop_after=paths[-1])
        starts = [pos[0] for pos in spans]
        width = ids.shape[1]
        for path, w in zip(paths, wrappers):
            tok, blk = w.route(got[path][0].reshape(-1, w.d_in))
            for t in tok[blk == w.n_blocks].tolist():
                row, col = divmod(t, width)
                if col < len(seqs[row]):
                    starts[row] = min(starts[row], col)
        self.lm = lm
        self.runner = SuffixRunner(lm, seqs, starts)
        self.rows = torch.tensor([i for i, pos in enumerate(spans) for _ in pos])
        self.cols = torch.tensor([p - starts[i] for i, pos in enumerate(spans) for p in pos])
        self.targets = torch.tensor([t for r in group for t in lm.encode_pair(r.prompt, r.target_new)[1]])
        self.n = len(group)

    def __call__(self) -> torch.Tensor:
        hid = self.runner.run(list(range(self.n)))
        dev = hid.device
        logp = torch.log_softmax(self.lm.head(hid[self.rows.to(dev), self.cols.to(dev)]).float(), -1)
        nll = -logp.gather(1, self.targets.to(logp.device)[:, None])[:, 0]
        owner = self.rows.to(nll.device)
        per_request = torch.zeros(self.n, device=nll.device).index_add(0, owner, nll)
        return (per_request / torch.bincount(owner, minlength=self.n)).mean()


class _Database:
    """A working copy of one wrapper's clusters and points while an edit places its requests; `updates`
    turns it into the two table updates (rows appended, rows changed) of the edit."""

    def __init__(self, w: MeloLoRA, init_radius: float, unit: str) -> None:
        self.init_radius, self.unit = init_radius, unit
        self.orig = {n: getattr(w, n).detach().cpu().clone() for n in MeloLoRA.GROUPS["clusters"] + MeloLoRA.GROUPS["points"]}
        self.t = {n: v.clone() for n, v in self.orig.items()}
        self.actions: list[str] = []

    def init(self, q: torch.Tensor) -> float:
        return self.init_radius * float(q.norm()) if self.unit == "key_norm" else self.init_radius

    def _append(self, **rows: torch.Tensor) -> None:
        for name, row in rows.items():
            self.t[name] = torch.cat([self.t[name], row[None].to(self.t[name].dtype)])

    def _add_point(self, q: torch.Tensor, cluster: int, block: int) -> None:
        self._append(points=q, point_cluster=torch.tensor(cluster), point_block=torch.tensor(block))

    def _add_cluster(self, q: torch.Tensor, radius: float, label: int, block: int) -> None:
        self._append(centres=q, radii=torch.tensor(radius), labels=torch.tensor(label))
        self._add_point(q, self.t["centres"].shape[0] - 1, block)

    def place(self, q: torch.Tensor, label: int, block: int) -> None:
        """Put key q (target label, trained into `block`) into the database by the paper's rules."""
        t = self.t
        if t["centres"].shape[0] == 0:
            self._add_cluster(q, self.init(q), label, block)
            self.actions.append("add")
            return
        dists = torch.cdist(q[None], t["centres"], compute_mode="donot_use_mm_for_euclid_dist")[0]
        d, c = float(dists.min()), int(dists.argmin())
        if d > float(t["radii"][c]) + self.init(q):
            self._add_cluster(q, self.init(q), label, block)
            self.actions.append("add")
        elif int(t["labels"][c]) == label:
            self._add_point(q, c, block)
            members = (t["point_cluster"] == c).nonzero()[:, 0]
            centre = t["points"][members].mean(dim=0)
            spread = torch.cdist(t["points"][members], centre[None], compute_mode="donot_use_mm_for_euclid_dist")
            t["centres"][c] = centre
            t["radii"][c] = max(float(spread.max()), self.init(q))
            self.actions.append("join")
        else:
            if d <= SAME_INPUT * float(q.norm()):
                # the very input of an earlier edit, now with another answer: both clusters would get
                # radius 0 and the new block would never be reached
                raise CannotExtendError(
                    "MELO: this prompt was already edited to another answer in this sequence; restore that "
                    "edit first (or start a new sequence without on=)")
            self._add_cluster(q, d / 2, label, block)
            shrunk = min(float(t["radii"][c]), d / 2)  # a split shares the distance; it never widens the older one
            t["radii"][c] = shrunk
            members = (t["point_cluster"] == c).nonzero()[:, 0]
            far = torch.cdist(t["points"][members], t["centres"][c][None],
                              compute_mode="donot_use_mm_for_euclid_dist")[:, 0] > shrunk
            t["point_cluster"][members[far]] = DROPPED
            if bool(far.all()):  # nothing left: the centre stays, routing to no block
                self._add_point(t["centres"][c].clone(), c, NO_BLOCK)
            self.actions.append("split")

    def updates(self, path: str) -> list[TableUpdate]:
        out = []
        for group in ("clusters", "points"):
            names = MeloLoRA.GROUPS[group]
            n0 = self.orig[names[0]].shape[0]
            diff = torch.zeros(n0, dtype=torch.bool)
            for n in names:
                a, b = self.orig[n], self.t[n][:n0]
                diff |= (a != b).reshape(n0, -1).any(dim=1) if n0 else diff
            index = diff.nonzero()[:, 0]
            changed = {n: self.t[n][index] for n in names if index.numel()}
            out.append(TableUpdate(path, {n: self.t[n][n0:] for n in names}, index, changed))
        return out


class MELOEditor(Editor):
    hparams_cls = MELOHparams
    supports_batch: ClassVar[bool] = True
    supports_on: ClassVar[bool] = True
    reedits_prompts: ClassVar[bool] = False  # the same input with another answer is refused (`place`)

    def _wrappers(self, lm: LM, hp: MELOHparams, on: Edit | None) -> tuple[list[MeloLoRA], list[ModuleSwap]]:
        """The wrapper at each path: the one `on` extends, or a new one around the current module."""
        wrappers, swaps = [], []
        for path in hp.paths(lm):
            current = lm.model.get_submodule(path)
            if on is not None:
                if not isinstance(current, MeloLoRA) or not any(
                        isinstance(p, (ModuleSwap, TableUpdate)) and p.path == path for p in on.patches):
                    raise CannotExtendError(f"on= edit has no MELO wrapper at {path}: extend it with the same layers and "
                                         "module it was made with, or apply without on=")
                if (current.block_rank, current.scale) != (hp.block_rank, hp.lora_scale):
                    raise CannotExtendError(f"the MELO wrapper at {path} has block_rank={current.block_rank} and "
                                       f"lora_scale={current.scale}; an edit extending it must use the same")
                wrappers.append(current)
            else:
                d_in, d_out = linear_dims(lm, current)
                w = MeloLoRA(current, d_in, d_out, hp.block_rank, hp.lora_scale)
                wrappers.append(w)
                swaps.append(ModuleSwap(path, w))
        return wrappers, swaps

    def compute_patches(self, lm: LM, requests: list[EditRequest], hp: MELOHparams,
                        on: Edit | None) -> tuple[list[Patch], dict[str, Any]]:
        paths = hp.paths(lm)
        wrappers, swaps = self._wrappers(lm, hp, on)
        size = hp.edits_per_block or len(requests)
        groups = [requests[i : i + size] for i in range(0, len(requests), size)]
        labels = [label_id(lm.encode_pair(r.prompt, r.target_new)[1]) for r in requests]
        applied: list[Patch] = []
        blocks: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in wrappers]
        losses, steps_run = [], []
        try:
            for s in swaps:
                s.apply(lm)
                applied.append(s)
            n_blocks0 = [w.n_blocks for w in wrappers]
            dbs = [_Database(w, hp.init_radius, hp.radius_unit) for w in wrappers]
            start = 0
            for g, group in enumerate(groups):
                # keys with the earlier groups' clusters and trained blocks in place
                stage = self._stage(paths, wrappers, dbs, blocks)
                for p in stage:
                    p.apply(lm)
                try:
                    keys = [_edit_keys(lm, path, group, hp.key_tokens) for path in paths]
                finally:
                    for p in reversed(stage):
                        p.revert(lm)
                for w_i, db in enumerate(dbs):
                    for j in range(len(group)):
                        for q in keys[w_i][j]:
                            db.place(q, labels[start + j], n_blocks0[w_i] + g)
                start += len(group)
                A, B, steps, loss = self._train_group(lm, hp, paths, wrappers, dbs, blocks, group, g)
                for w_i in range(len(wrappers)):
                    blocks[w_i].append((A[w_i], B[w_i]))
                losses.append(loss)
                steps_run.append(steps)
        finally:
            for p in reversed(applied):
                p.revert(lm)
        patches: list[Patch] = [*swaps, *self._stage(paths, wrappers, dbs, blocks)]
        info = {"paths": paths, "actions": [db.actions for db in dbs], "loss": losses, "steps": steps_run,
                "clusters": [int(db.t["centres"].shape[0]) for db in dbs],
                "blocks": [n0 + len(groups) for n0 in n_blocks0]}
        return patches, info

    @staticmethod
    def _stage(paths: list[str], wrappers: list[MeloLoRA], dbs: list[_Database],
               blocks: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> list[Patch]:
        """The table updates for the database and blocks as placed so far (three per wrapper: clusters,
        points, blocks)."""
        out: list[Patch] = []
        for path, w, db, blks in zip(paths, wrappers, dbs, blocks):
            out += db.updates(path)
            A = torch.cat([a for a, _ in blks]) if blks else torch.zeros(0, w.d_in)
            B = torch.cat([b for _, b in blks]) if blks else torch.zeros(0, w.d_out)
            out.append(TableUpdate(path, {"lora_A": A, "lora_B": B}))
        return out

    def _train_group(self, lm: LM, hp: MELOHparams, paths: list[str], wrappers: list[MeloLoRA], dbs: list[_Database],
                     blocks: list[list[tuple[torch.Tensor, torch.Tensor]]], group: list[EditRequest],
                     g: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int, float]:
        """Train one new block per wrapper on `group` with everything placed so far in place (the group's
        points route to the new blocks, which the wrappers hold as their trial). Returns the factors,
        steps run and the last loss; the model is left as it was."""
        A, B = [], []
        for w_i, w in enumerate(wrappers):
            block = w.n_blocks + len(blocks[w_i])
            gen = torch.Generator().manual_seed(hp.seed * 1_000_003 + 1_009 * block + w_i)
            bound = 1.0 / math.sqrt(w.d_in)  # PEFT's kaiming_uniform(a=√5) bound for A
            dev = w.lora_A.device
            A.append((torch.rand(hp.block_rank, w.d_in, generator=gen) * 2 * bound - bound).to(dev).requires_grad_(True))
            B.append(torch.zeros(hp.block_rank, w.d_out, device=dev, requires_grad=True))
        stage = self._stage(paths, wrappers, dbs, blocks)
        opt = torch.optim.Adam(A + B, lr=hp.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.lr_step, gamma=hp.lr_gamma)
        applied: list[Patch] = []
        loss_v, step = float("inf"), 0
        try:
            for p in stage:
                p.apply(lm)
                applied.append(p)
            for w, a, b in zip(wrappers, A, B):
                w._trial = {"block": w.n_blocks, "A": a, "B": b}
            group_loss = _SuffixLoss(lm, group, paths, wrappers)
            for step in range(1, hp.steps + 1):
                loss = group_loss()
                loss_v = float(loss.detach())
                if loss_v < hp.stop_loss:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        finally:
            for w in wrappers:
                w._trial = {}
            for p in reversed(applied):
                p.revert(lm)
        return [a.detach().cpu() for a in A], [b.detach().cpu() for b in B], step, loss_v
