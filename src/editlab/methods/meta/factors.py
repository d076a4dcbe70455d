"""Machinery the gradient-based learned editors (MEND, MALMEN, KE) share.

- `edited_modules`: the module paths an editor changes (layers x symbolic matrices, via ArchSpec).
- `Scored` / `encode_pairs`: a right-padded batch of (prompt, answer) texts and, for every answer token,
  the position whose logits predict it (teacher forcing; prompt tokens are never targets).
- `capture_factors`: one forward/backward of the *unedited* model on the edit texts that returns, per
  module, the per-token input `u` and output gradient `delta` (the rank-one factors of that matrix's
  gradient, `grad W = sum_t delta_t u_t^T`). The output gradient is read from a zero tensor added to the
  module output, so no weight needs `requires_grad` and the backward stops at the lowest edited layer.
  Rows run in length-sorted sub-batches (`LengthSplit`), the rows that only ride along without hooks.
- `added_outputs`: the edited forward pass. A forward hook adds `x @ dW^T` to each edited module's
  output, which equals running the module with weight `W + dW` (in the (out, in) layout of
  `ArchSpec.as_matrix`, so GPT-2's transposed Conv1D works the same). Gradients flow into `dW` from the
  losses, which is how the editor networks are trained.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ...batching import teacher_forcing
from ...errors import HparamsError
from ...models.lm import LM

DeltaFn = Callable[[torch.Tensor], torch.Tensor]  # module input [..., d_in] -> output change [..., d_out]


def matrix_path(lm: LM, layer: int, matrix: str) -> str:
    """The module path of symbolic `matrix` (mlp_gate | mlp_in | mlp_out) in block `layer`."""
    if matrix == "mlp_in":
        path = lm.arch.mlp_in_path(layer)
    elif matrix == "mlp_out":
        path = lm.arch.mlp_out_path(layer)
    elif matrix == "mlp_gate":
        up = lm.arch.mlp_in_path(layer)
        if "up_proj" not in up:
            raise HparamsError(f"{lm.arch.model_type} has no gated MLP: matrices may hold mlp_in and mlp_out only")
        path = up.replace("up_proj", "gate_proj")
    else:
        raise HparamsError(f"unknown matrix {matrix!r}")
    return lm.base_path(path)


def edited_modules(lm: LM, layers: Sequence[int], matrices: Sequence[str]) -> list[str]:
    """Module paths in a fixed order (by layer, then matrix)."""
    paths = [matrix_path(lm, l, m) for l in layers for m in matrices]
    for p in paths:
        try:
            lm.module(p)
        except AttributeError:
            raise HparamsError(f"{lm.name} has no module {p!r}") from None
    return paths


def matrix_shape(lm: LM, path: str) -> tuple[int, int]:
    """(d_out, d_in) of the module's weight in the (out, in) layout."""
    w = lm.arch.as_matrix(lm.module(path).weight)
    return int(w.shape[0]), int(w.shape[1])


@dataclass
class Scored:
    """Right-padded texts (one row per text); for each answer token its row, predicting position and id.
    A subset (`subset`) keeps the batch rows and scores only texts offset .. offset + n - 1."""

    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    n: int
    offset: int = 0

    def subset(self, lo: int, hi: int) -> "Scored":
        """The answer tokens of texts lo .. hi - 1 (rows still index the whole batch)."""
        keep = (self.rows >= lo) & (self.rows < hi)
        return Scored(self.ids, self.mask, self.rows[keep], self.cols[keep], self.targets[keep], hi - lo, lo)

    def per_text_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of per-token `values` within each scored text -> [n]."""
        rows = self.rows.to(values.device) - self.offset
        total = torch.zeros(self.n, device=values.device, dtype=values.dtype).index_add(0, rows, values)
        return total / torch.bincount(rows, minlength=self.n).clamp(min=1).to(values.dtype)


def encode_pairs(lm: LM, pairs: Sequence[tuple[str, str]], max_tokens: int = 10_000) -> Scored:
    """Teacher-forced batch for (prompt, answer) pairs; a text longer than `max_tokens` keeps its end
    (the answer and the prompt tokens just before it)."""
    seqs: list[list[int]] = []
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for i, (prompt, answer) in enumerate(pairs):
        p_ids, t_ids = lm.encode_pair(prompt, answer)
        t_ids = t_ids[: max(1, max_tokens // 2)]
        seq, pos = teacher_forcing(p_ids, t_ids)
        cut = max(0, len(seq) - max_tokens)
        seqs.append(seq[cut:])
        rows += [i] * len(t_ids)
        cols += [p - cut for p in pos]
        targets += t_ids
    ids, mask = lm.pad_right(seqs)
    r, c, t = (torch.tensor(x, dtype=torch.long) for x in (rows, cols, targets))
    return Scored(ids, mask, r, c, t, len(pairs))


def answer_logprobs(lm: LM, hidden: torch.Tensor, scored: Scored) -> torch.Tensor:
    """Log-softmax over the vocabulary at every answer-predicting position -> [tokens, V] (float32)."""
    h = hidden[scored.rows.to(hidden.device), scored.cols.to(hidden.device)]
    return torch.log_softmax(lm.head(h).float(), -1)


def token_nll(logp: torch.Tensor, scored: Scored) -> torch.Tensor:
    """Per-token NLL of the answers [tokens]."""
    return -logp.gather(1, scored.targets.to(logp.device)[:, None])[:, 0]


@dataclass
class Factors:
    """Per-token gradient factors of one module: inputs u [T, d_in], output gradients delta [T, d_out]
    and the batch row each token came from, rows [T]."""

    u: torch.Tensor
    delta: torch.Tensor
    rows: torch.Tensor

    def of_rows(self, rows: Sequence[int]) -> "Factors":
        keep = torch.isin(self.rows, torch.tensor(list(rows), dtype=self.rows.dtype, device=self.rows.device))
        return Factors(self.u[keep], self.delta[keep], self.rows[keep])


@dataclass
class LengthSplit:
    """Rows of a right-padded batch cut into length-sorted sub-batches (`LM.length_batches`), so that
    short texts are not padded to the longest text of the batch. Exact: with right padding and a causal
    mask a token's states do not depend on the padding after it. `subs[i]` holds the batch rows of
    sub-batch i, `widths[i]` its longest real length; rows of different `groups` never share one."""

    subs: list[torch.Tensor]
    widths: list[int]
    n_rows: int
    width: int

    @classmethod
    def of(cls, lm: LM, mask: torch.Tensor, groups: Sequence[Sequence[int]] | None = None) -> "LengthSplit":
        lengths = [int(x) for x in mask.sum(1).tolist()]
        subs, widths = [], []
        for group in (groups if groups is not None else [range(len(lengths))]):
            rows = list(group)
            for sub in lm.length_batches([lengths[r] for r in rows]):
                picked = [rows[i] for i in sub]
                subs.append(torch.tensor(picked, dtype=torch.long))
                widths.append(max(lengths[r] for r in picked))
        return cls(subs, widths, int(mask.shape[0]), int(mask.shape[1]))

    def inputs(self, ids: torch.Tensor, mask: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids and mask of sub-batch i."""
        rows, w = self.subs[i], self.widths[i]
        return ids.index_select(0, rows.to(ids.device))[:, :w], mask.index_select(0, rows.to(mask.device))[:, :w]

    def gather(self, parts: Sequence[torch.Tensor], subs: Sequence[int] | None = None) -> torch.Tensor:
        """Per-sub-batch tensors [rows, width_i, ...] (of sub-batches `subs`, all by default, in that
        order) back in batch order as one [n_rows, width, ...] tensor, zero at padding and at rows they
        do not cover. Differentiable."""
        which = list(range(len(self.subs))) if subs is None else list(subs)
        padded = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, self.width - t.shape[1])) for t in parts]
        full = torch.cat(padded)
        rows = torch.cat([self.subs[i] for i in which]).to(full.device)
        if len(rows) == self.n_rows:
            inverse = torch.empty_like(rows)
            inverse[rows] = torch.arange(len(rows), device=rows.device)
            return full.index_select(0, inverse)
        return full.new_zeros((self.n_rows,) + tuple(full.shape[1:])).index_copy(0, rows, full)


@dataclass
class Capture:
    """What one unedited forward/backward (`capture`) gives: the gradient factors by module path, the
    final hidden states (detached) and, when asked, the input states of one block (`block_input`,
    [rows, width, d], detached), which an edit of that block and those above does not change."""

    factors: dict[str, Factors]
    hidden: torch.Tensor
    block_input: torch.Tensor | None = None


def capture_factors(lm: LM, paths: Sequence[str], scored: Scored, n_edit_rows: int | None = None,
                    tokens: str = "nonzero") -> tuple[dict[str, Factors], torch.Tensor]:
    """`capture` without the block input: (factors by path, final hidden states)."""
    got = capture(lm, paths, scored, n_edit_rows, tokens)
    return got.factors, got.hidden


def capture(lm: LM, paths: Sequence[str], scored: Scored, n_edit_rows: int | None = None,
            tokens: str = "nonzero", keep_input_of: int | None = None) -> Capture:
    """Gradient factors of the summed per-text mean NLL of the first `n_edit_rows` texts (all by default)
    with respect to each module in `paths`, on the current (unedited) weights. Rows after
    `n_edit_rows` ride along without hooks or graph (their final hidden states come back for free, e.g.
    locality texts whose unedited distributions are needed). Rows run in length-sorted sub-batches
    (`LengthSplit`). `tokens`: "nonzero" keeps every real token whose output gradient is not zero
    (MEND), "answer" only the positions that predict answer tokens (MALMEN). `keep_input_of`: a block
    index whose input states to keep for every row (`Capture.block_input`)."""
    n_edit = scored.n if n_edit_rows is None else n_edit_rows
    split = LengthSplit.of(lm, scored.mask, [range(n_edit), range(n_edit, int(scored.ids.shape[0]))])
    edit_subs = [i for i, rows in enumerate(split.subs) if int(rows[0]) < n_edit]
    rest_subs = [i for i in range(len(split.subs)) if i not in edit_subs]
    inputs: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    zeros: dict[str, list[torch.Tensor]] = {p: [] for p in paths}

    def hook(path: str):
        def fn(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            inputs[path].append(args[0].detach())
            z = torch.zeros_like(out, requires_grad=True)
            zeros[path].append(z)
            return out + z
        return fn

    kept: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        kept.append((args[0] if args else kwargs["hidden_states"]).detach())

    parts: list[torch.Tensor] = []
    keeper = None if keep_input_of is None else \
        lm.module(lm.arch.block_path(keep_input_of)).register_forward_pre_hook(keep, with_kwargs=True)
    try:
        handles = []
        try:
            for p in paths:
                handles.append(lm.module(p).register_forward_hook(hook(p)))
            with torch.enable_grad():
                parts += [lm.hidden_states(*split.inputs(scored.ids, scored.mask, i)) for i in edit_subs]
        finally:
            for h in handles:
                h.remove()
        # rows that only ride along: without the hooks nothing they touch requires grad, so no graph is
        # built; gradient mode stays on so that they use the edit rows' attention kernel
        # (LM.attention_for_gradients) and a zero edit leaves a zero locality KL in half precision too
        with torch.enable_grad():
            parts += [lm.hidden_states(*split.inputs(scored.ids, scored.mask, i)) for i in rest_subs]
    finally:
        if keeper is not None:
            keeper.remove()
    with torch.enable_grad():
        hidden = split.gather(parts, edit_subs + rest_subs)
        edit = scored.subset(0, n_edit)
        logp = answer_logprobs(lm, hidden, edit)
        loss = edit.per_text_mean(token_nll(logp, edit)).sum()
        flat = torch.autograd.grad(loss, [z for p in paths for z in zeros[p]])
    out: dict[str, Factors] = {}
    mask = scored.mask.to(hidden.device).bool().clone()
    mask[n_edit:] = False
    if tokens == "answer":
        pick = torch.zeros_like(mask)
        pick[edit.rows.to(mask.device), edit.cols.to(mask.device)] = True
        mask = pick
    row_of = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)
    for k, p in enumerate(paths):
        g = split.gather(flat[k * len(edit_subs):(k + 1) * len(edit_subs)], edit_subs)
        m = mask
        if tokens == "nonzero":
            m = mask & (g.abs().sum(-1) > 0)
        out[p] = Factors(split.gather(inputs[p], edit_subs)[m].float(), g[m].float(), row_of[m])
    block_input = split.gather(kept, edit_subs + rest_subs) if kept else None
    return Capture(out, hidden.detach(), block_input)


@contextmanager
def added_outputs(lm: LM, fns: dict[str, DeltaFn]) -> Iterator[None]:
    """Run `lm` as if each module in `fns` had weight W + dW: its output gains fn(input)."""
    handles = []

    def hook(fn: DeltaFn):
        def inner(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            return out + fn(args[0]).to(out.dtype)
        return inner

    try:
        for p, fn in fns.items():
            handles.append(lm.module(p).register_forward_hook(hook(fn)))
        yield
    finally:
        for h in handles:
            h.remove()


def apply_delta(delta: Any, x: torch.Tensor) -> torch.Tensor:
    """x @ dW^T for a dense dW [out, in] or low-rank factors (left [out, r], right [r, in])."""
    if isinstance(delta, tuple):
        left, right = delta
        return (x.float() @ right.T) @ left.T
    return x.float() @ delta.T


def grouped_fn(deltas: Sequence[Any], owners: Sequence[torch.Tensor], d_out: int) -> DeltaFn:
    """One module's edited-output function for a batch whose rows belong to independent edits: rows
    `owners[g]` get delta `deltas[g]`, other rows nothing."""
    if len(deltas) == 1 and owners[0] is None:
        return lambda x: apply_delta(deltas[0], x)

    def fn(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[:-1] + (d_out,), dtype=torch.float32)
        for d, rows in zip(deltas, owners):
            idx = rows.to(x.device)
            out = out.index_copy(0, idx, apply_delta(d, x.index_select(0, idx)))
        return out
    return fn
