"""Side units beside an MLP: the wrapper T-Patcher and CaliNET share.

`SideUnits` wraps a whole MLP block (`FFN(h)`, input `h` = the post-attention-norm hidden state) and
adds a small FFN of its own units beside it:

    FFN'(h) = FFN(h) + Σ_p v_p · act(k_p · h + b_p)

with tables `keys` [N, d_in], `bias` [N], `values` [N, d_out] (and `up` [N, d_in] for the gated
variant `act = silu(k·h + b) ⊙ (u·h)`). A unit is a row of those tables, so a sequence of edits adds
rows to ONE wrapper through `TableUpdate` patches (the first edit installs it empty with a `ModuleSwap`).

Why the MLP and not its output projection: both papers add units to the FFN's *hidden layer*, so their
keys read the FFN input `h` (576-d on SmolLM2), the post-attention-norm state the method cards name as
the query. Wrapping the output projection would put keys in the space of the gated activation
`silu(W_g h) ⊙ (W_u h)` instead, a different (1536-d, sign-flipping) space. The price of wrapping the
block is that the MLP's own sub-modules move to `mlp.base_layer.*`; the wrapper therefore forwards
attribute reads and module assignments of its base layer's children (`mlp.down_proj` still names the
projection), so weight edits, hooks and other adapters at the same layer keep working through it.

Activation `relu` (the default) gives an exact zero off-scope: at a token where no unit's
pre-activation is positive the wrapper returns the base layer's output values bit for bit (and the
tensor itself when no token of the call fires). `silu` and `gated` touch every token (`silu(-3) =
-0.14`), so they promise no such exactness. Every decision is made per token from that token's input
alone (no stored query position), so teacher-forced scoring, next-token scoring and cached generation
agree.

While an editor trains new units it hands them to `pending(...)`: they take part in the forward pass
(with gradients) without being table rows, and are dropped when the block exits. `FrozenPrefix` makes
those training forwards cheap: the blocks below the wrapped MLP never change during training, so their
outputs are recorded once per batch and replayed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ...errors import CannotExtendError, EditMismatchError, HparamsError
from ...hooks import output_tensor, replace_output
from ...models.lm import LM
from ..patches import ModuleSwap, Patch, TableUpdate
from .hparams import ACTIVATIONS
from .inject import TableAdapter, set_module


class SideUnits(TableAdapter):
    """An MLP plus side units (see the module docstring). `owner` names the method whose edits extend
    it (an edit with `on=` only ever adds rows to its own method's wrapper)."""

    registered_name = "side-units"

    def __init__(self, base_layer: torch.nn.Module, d_in: int, d_out: int, activation: str = "relu",
                 owner: str = "", device: Any = None) -> None:
        super().__init__(base_layer)
        if activation not in ACTIVATIONS:
            raise HparamsError(f"side-unit activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.owner = owner
        self.d_in, self.d_out = int(d_in), int(d_out)
        self.tables = ("keys", "bias", "values", "up") if activation == "gated" else ("keys", "bias", "values")
        if device is None:
            ref = next(iter(base_layer.parameters()), None)
            device = ref.device if ref is not None else None
        # float32 whatever the model's dtype: the sign of a pre-activation decides exactness
        self.add_table("keys", (self.d_in,), torch.float32, device)
        self.add_table("bias", (), torch.float32, device)
        self.add_table("values", (self.d_out,), torch.float32, device)
        if activation == "gated":
            self.add_table("up", (self.d_in,), torch.float32, device)
        self._pending: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------- transparency to the base block
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base_layer")
            child = getattr(base, name, None) if base is not None else None
            if isinstance(child, torch.nn.Module):
                return child  # `mlp.down_proj` keeps naming the projection inside the wrapped block
            raise

    def __setattr__(self, name: str, value: Any) -> None:
        base = self.__dict__.get("_modules", {}).get("base_layer")
        if (isinstance(value, torch.nn.Module) and base is not None and name != "base_layer"
                and name not in self._modules and isinstance(getattr(base, name, None), torch.nn.Module)):
            setattr(base, name, value)  # another adapter (un)wrapping a child of the block
            return
        super().__setattr__(name, value)

    # ------------------------------------------------------------- forward
    def rows(self) -> dict[str, torch.Tensor]:
        """The units in use: the table rows, then any pending (training) rows."""
        tabs = {n: getattr(self, n) for n in self.tables}
        if self._pending:
            tabs = {n: torch.cat([t, self._pending[n].to(t.device, t.dtype)]) for n, t in tabs.items()}
        return tabs

    def unit_activations(self, h: torch.Tensor, rows: dict[str, torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-activations, activations) [..., N] of the units for inputs `h` [..., d_in] (float32)."""
        r = self.rows() if rows is None else rows
        hf = h.to(r["keys"].dtype)
        pre = hf @ r["keys"].T + r["bias"]
        if self.activation == "relu":
            act = torch.relu(pre)
        elif self.activation == "silu":
            act = torch.nn.functional.silu(pre)
        else:
            act = torch.nn.functional.silu(pre) * (hf @ r["up"].T)
        return pre, act

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(x, *args, **kwargs)
        r = self.rows()
        if r["keys"].shape[0] == 0:
            return out
        y = output_tensor(out)
        pre, act = self.unit_activations(x, r)
        if self.activation == "relu":
            fired = pre > 0
            if not bool(fired.any()):
                return out  # nothing in scope: the base output itself (the per-token rule below agrees)
            delta = (act @ r["values"]).to(y.dtype)
            # per token: where no unit fires, exactly the base value (not base + 0.0)
            new = torch.where(fired.any(-1, keepdim=True), y + delta, y)
        else:
            new = y + (act @ r["values"]).to(y.dtype)
        return replace_output(out, new)

    @contextmanager
    def pending(self, rows: dict[str, torch.Tensor]) -> Iterator[None]:
        """Use `rows` (tensors that may require grad, one entry per table) as extra units inside the block."""
        missing = set(self.tables) - set(rows)
        if missing:
            raise EditMismatchError(f"pending side units lack tables {sorted(missing)}")
        self._pending = {n: rows[n] for n in self.tables}
        try:
            yield
        finally:
            self._pending = None

    # ------------------------------------------------------------- save / load
    def config(self) -> dict[str, Any]:
        return {"d_in": self.d_in, "d_out": self.d_out, "activation": self.activation, "owner": self.owner}

    @classmethod
    def from_config(cls, base_layer: torch.nn.Module, config: dict[str, Any],
                    tensors: dict[str, torch.Tensor]) -> "SideUnits":
        w = cls(base_layer, int(config["d_in"]), int(config["d_out"]), str(config.get("activation", "relu")),
                str(config.get("owner", "")))
        w.load_adapter_state(tensors)
        return w




# ---------------------------------------------------------------- shared by the editors
def mlp_path(lm: LM, layer: int) -> str:
    """Path of the MLP block of `layer`: the parent of its output projection in the ArchSpec."""
    parent = lm.arch.mlp_out_path(layer).rpartition(".")[0]
    if not parent:
        raise HparamsError(f"cannot find the MLP block of layer {layer} for {lm.arch.model_type}")
    return parent


def mlp_dims(lm: LM, layer: int) -> tuple[int, int]:
    """(input width, output width) of the MLP block of `layer`, read off its original projections."""
    w_in = lm.arch.as_matrix(lm.base_module(lm.arch.mlp_in_path(layer)).weight)
    w_out = lm.arch.as_matrix(lm.base_module(lm.arch.mlp_out_path(layer)).weight)
    return int(w_in.shape[1]), int(w_out.shape[0])


class Site:
    """Where an edit's new units go: the wrapper at `path` and whether this edit installs it.

    `on` (the edit an `on=` edit extends): the rows go into the method's wrapper, which must be the
    outermost module at `path` and one `on` made or extended (`CannotExtendError` otherwise: another layer
    than the extended edit's, or another adapter wrapped it since), as GRACE, MELO and WISE refuse it. Without it a fresh empty
    wrapper goes around whatever is at `path` now (the base MLP, or another adapter's wrapper, which it
    then wraps)."""

    def __init__(self, lm: LM, layer: int, owner: str, activation: str, on: Any = None) -> None:
        self.lm = lm
        self.path = mlp_path(lm, layer)
        current = lm.model.get_submodule(self.path)
        if on is not None and not (isinstance(current, SideUnits) and current.owner == owner and any(
                isinstance(p, (ModuleSwap, TableUpdate)) and p.path == self.path for p in on.patches)):
            raise CannotExtendError(f"on= edit has no {owner} units at {self.path}: extend it with the same layer it "
                                    "was made with, or apply without on=")
        if on is not None:
            if current.activation != activation:
                raise CannotExtendError(f"activation={activation!r} differs from the {current.activation!r} units of "
                                        f"the {owner} edit being extended at {self.path}")
            self.wrapper, self.fresh = current, False
        else:
            d_in, d_out = mlp_dims(lm, layer)
            self.wrapper, self.fresh = SideUnits(current, d_in, d_out, activation, owner), True

    @contextmanager
    def training(self, rows: dict[str, torch.Tensor]) -> Iterator[None]:
        """The model with this site's wrapper in place and `rows` as pending units, for the length of
        the block; afterwards the model is exactly as before."""
        if self.fresh:
            set_module(self.lm.model, self.path, self.wrapper)
        try:
            with self.wrapper.pending(rows):
                yield
        finally:
            if self.fresh:
                set_module(self.lm.model, self.path, self.wrapper.base_layer)

    def patches(self, rows: dict[str, torch.Tensor]) -> list[Patch]:
        """The edit's patches: install the wrapper (first edit only) and append `rows` to its tables."""
        update = TableUpdate(self.path, {n: rows[n].detach().float().cpu() for n in self.wrapper.tables})
        return ([ModuleSwap(self.path, self.wrapper)] if self.fresh else []) + [update]


def edit_is_own_rows(edit: Any, path: str) -> bool:
    """True when every patch of `edit` only adds side units at `path` (such edits leave the inputs
    of the block at `path` unchanged, so memories of those inputs stay valid across them)."""
    for p in edit.patches:
        if isinstance(p, ModuleSwap) and p.path == path and isinstance(p.wrapper, SideUnits):
            continue
        if isinstance(p, TableUpdate) and p.path == path:
            continue
        return False
    return True


class FrozenPrefix:
    """Forward passes for training units in block `layer`: the blocks below it see the same inputs at
    every step and hold nothing that trains, so their outputs are recorded once per batch (one full
    forward without gradients) and replayed; each step then runs only blocks `layer..` and the head.
    For T-Patcher's last-layer units that is one block of thirty. Results are those of a full forward
    (checked once per batch; on any difference, or a backbone that does not call its blocks in order,
    it falls back to full forwards and says so in `active`)."""

    def __init__(self, lm: LM, layer: int) -> None:
        self.lm, self.layer = lm, layer
        self.active = layer > 0
        self._records: dict[int, list[Any]] = {}

    def _record(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[list[Any], torch.Tensor]:
        """(outputs of block `layer`-1, one per call of it: exactly one where the backbone chains its
        blocks), the batch's full final hidden states."""
        from ...hooks import hooks

        outs: list[Any] = []
        with torch.no_grad(), hooks(self.lm.model, forward={self.lm.arch.block_path(self.layer - 1): lambda _m, _a, o: outs.append(o)}):
            full = self.lm.hidden_states(ids, mask)
        return outs, full

    def _replayed(self, outs: list[Any], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from ...hooks import blocks_replayed

        with blocks_replayed(self.lm.model, self.lm.arch.layers, self.layer, outs[-1]):
            return self.lm.hidden_states(ids, mask)

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states of the batch (with gradients through blocks `layer..`)."""
        if not self.active:
            return self.lm.hidden_states(ids, mask)
        key = id(ids)
        if key not in self._records:
            outs, full = self._record(ids, mask)
            try:
                with torch.no_grad():
                    same = len(outs) == 1 and torch.allclose(
                        self._replayed(outs, ids, mask), full, rtol=1e-5, atol=1e-5)
            except (AttributeError, TypeError, IndexError, RuntimeError):
                same = False
            if not same:
                self.active = False
                self._records.clear()
                return self.lm.hidden_states(ids, mask)
            self._records[key] = outs
        return self._replayed(self._records[key], ids, mask)


def target_loss(lm: LM, batch: Any, forward: Any = None) -> tuple[torch.Tensor, bool]:
    """(mean over requests of the teacher-forced target NLL, whether every target token is the argmax)
    for a batch from `ft.encode_batch(..., "target_new")`; differentiable. Like `ft.batch_loss`, plus
    the argmax check the adapters' early stopping needs. `forward` (default `lm.hidden_states`) may be a
    `FrozenPrefix`'s."""
    hid = (forward or lm.hidden_states)(batch.ids, batch.mask)
    logits = lm.head(hid[batch.rows.to(hid.device), batch.cols.to(hid.device)]).float()
    logp = torch.log_softmax(logits, -1)
    tgt = batch.targets.to(logp.device)
    nll = -logp.gather(1, tgt[:, None])[:, 0]
    owner = batch.rows.to(nll.device)
    per = torch.zeros(batch.n_requests, device=nll.device).index_add(0, owner, nll)
    counts = torch.bincount(owner, minlength=batch.n_requests).clamp(min=1)
    ok = bool((logits.argmax(-1) == tgt).all())
    return (per / counts).mean(), ok


PARAGRAPH_CHARS = 2000  # generic text is cut into paragraphs of at most this many characters


def generic_paragraphs(corpus: str) -> list[str]:
    """Paragraphs (at least 20 characters, at most PARAGRAPH_CHARS) of a generic text corpus
    (`stats.corpus.get_corpus`): what side units must leave alone (T-Patcher's memory, CaliNET's KL)."""
    from ...stats.corpus import get_corpus

    out: list[str] = []
    for doc in get_corpus(corpus).texts:
        for para in doc.split("\n"):
            para = para.strip()
            while len(para) >= 20:
                out.append(para[:PARAGRAPH_CHARS])
                para = para[PARAGRAPH_CHARS:]
    return out
