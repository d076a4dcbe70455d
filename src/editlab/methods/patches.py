"""The kinds of patch an `Edit` is made of. Each is reversible and savable.

- `WeightDelta`: a tensor added to an existing parameter, dense or as low-rank factors (`LowRank`).
  The LM keeps ONE copy of the original value of each touched parameter, shared by every active edit
  (see `WeightLedger`), so a sequence of 1,000 rank-one edits costs one weight copy plus the factors.
  Reverting the top patch on a parameter copies the original back and re-adds the deltas of the edits
  still below it in the order they were first applied: the same float operations on the same values,
  so the result is bit-identical to the state before the reverted edit.
- `ModuleSwap`: a wrapper module (an `AdapterModule` that keeps the wrapped module as `base_layer`, as
  PEFT's tuners do) put in place of a module; reverting puts the very same module object back.
- `TableUpdate`: rows added to (or changed in) the tables of a `TableAdapter` wrapper (GRACE's codebook,
  T-Patcher's units), so a sequence of edits shares one wrapper; reverting drops them exactly.
- `ViewPatch`: an `LMView` factory: the weights are untouched, `edit.lm` answers differently (prompt
  prefixes, retrieval routers, constrained decoding).
- `SolverState`: tensors a method carries with its edit for later edits (AlphaEdit's protected keys);
  the model is untouched.

`state()` returns (tensors, JSON config); `PATCH_TYPES[kind].from_state(tensors, config, lm)` rebuilds a
patch for `Edit.load`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from ..errors import EditMismatchError

if TYPE_CHECKING:
    from ..models.lm import LM
    from ..models.view import LMView


@dataclass
class LowRank:
    """A weight delta stored as factors: delta = left @ right, in the parameter's own layout
    (left [rows, r], right [r, cols])."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.left.shape[0], self.right.shape[1]))

    def __post_init__(self) -> None:
        if self.left.dim() != 2 or self.right.dim() != 2 or self.left.shape[1] != self.right.shape[0]:
            raise EditMismatchError(f"low-rank factors must be [rows, r] and [r, cols]; got {tuple(self.left.shape)} "
                                    f"and {tuple(self.right.shape)}")
        self.left, self.right = self.left.detach(), self.right.detach()

    def dense(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """left @ right. Rank one is an elementwise product (no reduction), so it is bit-identical on
        every replay whatever the BLAS, thread count or TF32 setting; higher ranks add their rank-one
        terms in a fixed order."""
        left, right = self.left.to(device=device), self.right.to(device=device)
        d = left[:, 0:1] * right[0:1, :]
        for i in range(1, left.shape[1]):
            d = d + left[:, i : i + 1] * right[i : i + 1, :]
        return d if dtype is None else d.to(dtype)

    @classmethod
    def from_matrix_factors(cls, col: torch.Tensor, row: torch.Tensor, transposed: bool) -> "LowRank":
        """Delta (out, in) = col ⊗ row (col [out] or [out, r], row [in] or [r, in]); `transposed`
        for parameters stored (in, out) such as GPT-2's Conv1D."""
        c = col[:, None] if col.dim() == 1 else col
        r = row[None, :] if row.dim() == 1 else row
        return cls(r.T.contiguous(), c.T.contiguous()) if transposed else cls(c.contiguous(), r.contiguous())


Delta = "torch.Tensor | LowRank"


class Patch(ABC):
    """One reversible change to an LM. `apply` and `revert` are called by `Edit` only."""

    kind: ClassVar[str]

    @abstractmethod
    def apply(self, lm: "LM") -> None: ...

    @abstractmethod
    def revert(self, lm: "LM") -> None: ...

    @abstractmethod
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-serialisable config) to save."""

    @classmethod
    @abstractmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any], lm: "LM") -> "Patch": ...

    def check(self, lm: "LM") -> None:
        """Raise EditMismatchError if this patch cannot be applied to `lm` (called before any change)."""


# ------------------------------------------------------------------------------------ weight deltas
class WeightLedger:
    """Per-LM record of the original value of every parameter that active weight patches touch, and
    of those patches in application order. Keyed by the parameter object's identity: a parameter's
    name changes when an adapter wraps its module (`x.weight` -> `x.base_layer.weight`)."""

    def __init__(self) -> None:
        self.originals: dict[int, torch.Tensor] = {}
        self.params: dict[int, torch.nn.Parameter] = {}
        self.applied: dict[int, list["WeightDelta"]] = {}

    @staticmethod
    def of(lm: "LM") -> "WeightLedger":
        ledger = lm.cache.get("_weight_ledger")
        if ledger is None:
            ledger = lm.cache["_weight_ledger"] = WeightLedger()
        return ledger

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.originals.values())

    def replay_into(self, key: int, out: torch.Tensor, patches: Sequence["WeightDelta"]) -> torch.Tensor:
        """Write into `out` the original value of parameter `key` plus `patches`' deltas added in order:
        the arithmetic of taking patches off (`WeightDelta.revert`), so the value is bit-identical to
        the parameter's after such a revert."""
        with torch.no_grad():
            out.copy_(self.originals[key])
            for below in patches:
                out.add_(below.dense(out))
        return out


class WeightDelta(Patch):
    kind = "weight_delta"

    def __init__(self, name: str, delta: torch.Tensor | LowRank) -> None:
        self.name = name
        self.delta = delta if isinstance(delta, LowRank) else delta.detach()

    def dense(self, param: torch.Tensor) -> torch.Tensor:
        d = self.delta
        return d.dense(param.dtype, param.device) if isinstance(d, LowRank) else d.to(device=param.device, dtype=param.dtype)

    def check(self, lm: "LM") -> None:
        try:
            p = lm.model.get_parameter(self.name)
        except AttributeError:
            raise EditMismatchError(f"model has no parameter {self.name!r}") from None
        if tuple(p.shape) != tuple(self.delta.shape):
            raise EditMismatchError(f"delta for {self.name} has shape {tuple(self.delta.shape)}, parameter has {tuple(p.shape)}")
        parts = [self.delta.left, self.delta.right] if isinstance(self.delta, LowRank) else [self.delta]
        if not all(torch.isfinite(t).all() for t in parts):
            raise EditMismatchError(f"delta for {self.name} contains non-finite values")

    def apply(self, lm: "LM") -> None:
        ledger = WeightLedger.of(lm)
        p = lm.model.get_parameter(self.name)
        d = self.dense(p)  # before any bookkeeping: a failure here leaves nothing behind
        key = id(p)
        if key not in ledger.originals:
            ledger.originals[key] = p.detach().clone()
            ledger.params[key] = p
        with torch.no_grad():
            p.add_(d)
        ledger.applied.setdefault(key, []).append(self)
        self._key = key

    def revert(self, lm: "LM") -> None:
        ledger = WeightLedger.of(lm)
        key = getattr(self, "_key", None)
        stack = ledger.applied.get(key, []) if key is not None else []
        if self not in stack:
            return  # already reverted (idempotent)
        if stack[-1] is not self:
            raise EditMismatchError(f"internal: patch on {self.name} is not the last one applied to it")
        stack.pop()
        ledger.replay_into(key, ledger.params[key], stack)  # in the original order: bit-identical to the state before
        if not stack:
            del ledger.applied[key]
            del ledger.originals[key]
            del ledger.params[key]

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if isinstance(self.delta, LowRank):
            return ({"left": self.delta.left.contiguous().cpu(), "right": self.delta.right.contiguous().cpu()},
                    {"parameter": self.name, "form": "low_rank", "rank": int(self.delta.left.shape[1])})
        return {"delta": self.delta.contiguous().cpu()}, {"parameter": self.name, "form": "dense"}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any], lm: "LM") -> "WeightDelta":
        try:
            if config.get("form") == "low_rank":
                return cls(config["parameter"], LowRank(tensors["left"], tensors["right"]))
            return cls(config["parameter"], tensors["delta"])
        except KeyError as e:
            raise EditMismatchError(f"saved weight patch lacks {e}") from None


def unwind_weights(lm: "LM") -> None:
    """Put every parameter touched by active weight patches back to its original value at once
    (used when a whole stack is dropped, instead of replaying it patch by patch)."""
    ledger = WeightLedger.of(lm)
    with torch.no_grad():
        for key, orig in ledger.originals.items():
            ledger.params[key].copy_(orig)
    ledger.originals.clear()
    ledger.params.clear()
    ledger.applied.clear()


# ------------------------------------------------------------------------------------ module swaps
class ModuleSwap(Patch):
    """Put `wrapper` (an AdapterModule holding the current module as `base_layer`) at `path`."""

    kind = "module_swap"

    def __init__(self, path: str, wrapper: torch.nn.Module) -> None:
        self.path = path
        self.wrapper = wrapper

    def check(self, lm: "LM") -> None:
        from .adapters.inject import WRAPPERS, AdapterModule

        if getattr(self.wrapper, "registered_name", None) not in WRAPPERS:
            raise EditMismatchError(f"module swap at {self.path}: wrapper {type(self.wrapper).__name__} is not "
                                    "registered (register_wrapper), so the edit could not be saved")
        try:
            current = lm.model.get_submodule(self.path)
        except AttributeError:
            raise EditMismatchError(f"model has no module {self.path!r}") from None
        if not isinstance(self.wrapper, AdapterModule):
            raise EditMismatchError(f"module swap at {self.path}: {type(self.wrapper).__name__} is not an AdapterModule")
        if self.wrapper.base_layer is not current:
            raise EditMismatchError(f"module swap at {self.path}: the wrapper does not wrap the module now there")

    def apply(self, lm: "LM") -> None:
        from .adapters.inject import set_module

        set_module(lm.model, self.path, self.wrapper)

    def revert(self, lm: "LM") -> None:
        from .adapters.inject import set_module

        current = lm.model.get_submodule(self.path)
        if current is self.wrapper.base_layer:
            return  # already reverted (idempotent)
        if current is not self.wrapper:
            raise EditMismatchError(f"{self.path} no longer holds this edit's wrapper (was the module replaced "
                                    "outside editlab?)")
        set_module(lm.model, self.path, self.wrapper.base_layer)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from .adapters.inject import WRAPPERS

        return (self.wrapper.adapter_state(),
                {"path": self.path, "wrapper": WRAPPERS.resolve(self.wrapper.registered_name),
                 "config": self.wrapper.config()})

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any], lm: "LM") -> "ModuleSwap":
        from ..errors import EditlabError
        from .adapters.inject import WRAPPERS

        try:
            path, kind, cfg = config["path"], config["wrapper"], config.get("config", {})
            base = lm.model.get_submodule(path)
        except (KeyError, AttributeError) as e:
            raise EditMismatchError(f"saved module swap cannot be placed: {e}") from None
        try:
            wrapper_cls = WRAPPERS.get(kind)
        except EditlabError as e:
            raise EditMismatchError(str(e)) from None
        try:
            wrapper = wrapper_cls.from_config(base, cfg, tensors)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise EditMismatchError(f"saved {kind} wrapper at {path} cannot be rebuilt: {e}") from None
        ref = next(iter(base.parameters()), None)
        if ref is not None:  # the wrapper's own tensors go where the wrapped module lives
            for name, t in list(wrapper.named_parameters(recurse=False)) + list(wrapper.named_buffers(recurse=False)):
                t.data = t.data.to(ref.device)
        return cls(path, wrapper)


class TableUpdate(Patch):
    """Rows added to (and rows changed in) the tables of the `TableAdapter` at `path`, which an edit at
    or below this one installed. Reverting drops the added rows and puts the changed rows back, so the
    wrapper is bit-identical to its state before; only the top update of a wrapper can be reverted,
    which the edit stack guarantees."""

    kind = "table_update"

    def __init__(self, path: str, append: dict[str, torch.Tensor], index: torch.Tensor | None = None,
                 changed: dict[str, torch.Tensor] | None = None) -> None:
        self.path = path
        self.append = {k: v.detach() for k, v in append.items()}
        self.index = (index if index is not None else torch.zeros(0, dtype=torch.long)).detach().long()
        self.changed = {k: v.detach() for k, v in (changed or {}).items()}
        self._undo: Any = None

    def _wrapper(self, lm: "LM") -> Any:
        from .adapters.inject import TableAdapter

        try:
            w = lm.model.get_submodule(self.path)
        except AttributeError:
            raise EditMismatchError(f"model has no module {self.path!r}") from None
        if not isinstance(w, TableAdapter):
            raise EditMismatchError(f"{self.path} holds a {type(w).__name__}, not the table adapter this update "
                                    "extends (load or apply the edit below it first)")
        return w

    def check(self, lm: "LM") -> None:
        self.check_wrapper(self._wrapper(lm))

    def check_wrapper(self, wrapper: Any) -> None:
        from .adapters.inject import TableAdapter

        if not isinstance(wrapper, TableAdapter):
            raise EditMismatchError(f"{self.path}: a table update needs a table adapter, not {type(wrapper).__name__}")
        wrapper.check_rows(self.append, self.index, self.changed)

    def apply(self, lm: "LM") -> None:
        self._undo = self._wrapper(lm).update_rows(self.append, self.index, self.changed)

    def revert(self, lm: "LM") -> None:
        if self._undo is None:
            return  # already reverted (idempotent)
        w = lm.model.get_submodule(self.path)
        w.undo_rows(self.index, self._undo)
        self._undo = None

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"append.{k}": v.contiguous().cpu() for k, v in self.append.items()}
        tensors.update({f"changed.{k}": v.contiguous().cpu() for k, v in self.changed.items()})
        tensors["index"] = self.index.contiguous().cpu()
        return tensors, {"path": self.path}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any], lm: "LM") -> "TableUpdate":
        if not isinstance(config.get("path"), str) or "index" not in tensors:
            raise EditMismatchError("saved table update lacks its path or row index")
        append = {k.removeprefix("append."): v for k, v in tensors.items() if k.startswith("append.")}
        changed = {k.removeprefix("changed."): v for k, v in tensors.items() if k.startswith("changed.")}
        return cls(config["path"], append, tensors["index"], changed)


# ------------------------------------------------------------------------------------ LM views
class ViewPatch(Patch):
    """Makes `edit.lm` a view over the system below it. Nothing in the model changes."""

    kind = "lm_view"

    def __init__(self, view_type: str, config: dict[str, Any] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.view_type = view_type
        self.config = dict(config or {})
        self.tensors = dict(tensors or {})

    def check(self, lm: "LM") -> None:
        from ..errors import EditlabError
        from ..models.view import VIEWS

        try:
            VIEWS.resolve(self.view_type)
        except EditlabError as e:
            raise EditMismatchError(str(e)) from None

    def build(self, inner: Any) -> "LMView":
        from ..models.view import VIEWS

        return VIEWS.get(self.view_type)(inner, self.config, self.tensors)

    def apply(self, lm: "LM") -> None:
        pass

    def revert(self, lm: "LM") -> None:
        pass

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return ({k: v.contiguous().cpu() for k, v in self.tensors.items()},
                {"view": self.view_type, "config": self.config})

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any], lm: "LM") -> "ViewPatch":
        try:
            return cls(config["view"], config.get("config", {}), tensors)
        except KeyError as e:
            raise EditMismatchError(f"saved view patch lacks {e}") from None


# ------------------------------------------------------------------------------------ solver state
class SolverState(Patch):
    """Tensors a method keeps beside an edit for the edits it makes later (AlphaEdit: the keys of its
    edits, which later edits must not disturb). Nothing in the model changes; the state lives and dies
    with its edit, so restoring an edit also forgets what it asked later edits to protect."""

    kind = "solver_state"

    def __init__(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.name = name
        self.tensors = {k: v.detach().cpu() for k, v in tensors.items()}

    def apply(self, lm: "LM") -> None:
        pass

    def revert(self, lm: "LM") -> None:
        pass

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {k: v.contiguous() for k, v in self.tensors.items()}, {"name": self.name}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any], lm: "LM") -> "SolverState":
        if not isinstance(config.get("name"), str):
            raise EditMismatchError("saved solver state lacks its name")
        return cls(config["name"], tensors)


def solver_states(edits: Any, name: str) -> list[SolverState]:
    """The `SolverState` patches called `name` in `edits` (oldest edit first)."""
    return [p for e in edits for p in e.patches if isinstance(p, SolverState) and p.name == name]


PATCH_TYPES: dict[str, type[Patch]] = {c.kind: c for c in (WeightDelta, ModuleSwap, TableUpdate, ViewPatch, SolverState)}
