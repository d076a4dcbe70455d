"""One injection mechanism for every adapter method (PEFT's tuner pattern, written for editlab).

An `AdapterModule` wraps a module and keeps it as `base_layer`; it is put in place with a `ModuleSwap`
patch and taken out by putting the very same `base_layer` object back, so restore is exact. A wrapper
saves only its own tensors (`adapter_state`, never the base layer's) and a JSON config, and is rebuilt
by `from_config` around the base layer of the model it is loaded onto. Wrapper classes register in
`WRAPPERS` so saved edits can name them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ...errors import EditMismatchError
from ...registry import Registry, lazy


class AdapterModule(torch.nn.Module):
    """Base of every wrapper. Subclasses set `registered_name` (its `WRAPPERS` name), implement
    `forward`, `config()` and `from_config()`."""

    registered_name: ClassVar[str]

    def __init__(self, base_layer: torch.nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    def config(self) -> dict[str, Any]:
        return {}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The wrapper's own tensors (parameters and buffers), without the base layer's."""
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("base_layer.")}

    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {k for k in self.state_dict() if not k.startswith("base_layer.")}
        missing, extra = own - set(tensors), set(tensors) - own
        if missing or extra:
            raise EditMismatchError(f"{type(self).__name__}: saved tensors do not match (missing {sorted(missing)}, "
                                    f"unexpected {sorted(extra)})")
        self.load_state_dict(tensors, strict=False, assign=True)  # keep the saved dtype

    @classmethod
    def from_config(cls, base_layer: torch.nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "AdapterModule":
        raise NotImplementedError


class TableAdapter(AdapterModule):
    """A wrapper whose edit-specific state is rows of named tables: buffers whose first dimension counts
    entries (GRACE's keys, values and radii; T-Patcher's and CaliNET's units). A table wrapper is
    installed empty by a `ModuleSwap`, and rows reach it only through `TableUpdate` patches, each owned by
    one edit: so a sequence of edits shares ONE wrapper (one lookup, one codebook) while every edit can
    still be saved on its own and restored exactly (its rows removed, the rows it changed put back).

    Subclasses list their tables in `tables` and register them with `add_table(name, row_shape, dtype)`.
    `adapter_state` leaves the tables out: they belong to the edits' updates, not to the swap."""

    tables: ClassVar[tuple[str, ...]] = ()

    def add_table(self, name: str, row_shape: tuple[int, ...], dtype: torch.dtype, device: Any = None) -> None:
        self.register_buffer(name, torch.zeros((0, *row_shape), dtype=dtype, device=device))

    @property
    def n_rows(self) -> int:
        return int(getattr(self, self.tables[0]).shape[0]) if self.tables else 0

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in super().adapter_state().items() if k not in self.tables}

    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {k for k in self.state_dict() if not k.startswith("base_layer.") and k not in self.tables}
        if set(tensors) != own:
            raise EditMismatchError(f"{type(self).__name__}: saved tensors {sorted(tensors)} do not match {sorted(own)}")
        if tensors:
            self.load_state_dict(tensors, strict=False, assign=True)

    def check_rows(self, append: dict[str, torch.Tensor], index: torch.Tensor, changed: dict[str, torch.Tensor]) -> None:
        """Raise EditMismatchError unless the update fits this wrapper's tables (called before any change)."""
        n_new = None
        for name in self.tables:
            table = getattr(self, name)
            rows = append.get(name)
            if rows is None or tuple(rows.shape[1:]) != tuple(table.shape[1:]):
                raise EditMismatchError(f"{type(self).__name__}: rows for table {name!r} have shape "
                                        f"{None if rows is None else tuple(rows.shape)}, the table {tuple(table.shape)}")
            if n_new is None:
                n_new = rows.shape[0]
            elif rows.shape[0] != n_new:
                raise EditMismatchError(f"{type(self).__name__}: tables get different numbers of new rows")
            if name in changed and (tuple(changed[name].shape[1:]) != tuple(table.shape[1:])
                                    or changed[name].shape[0] != index.numel()):
                raise EditMismatchError(f"{type(self).__name__}: changed rows of {name!r} do not match the table")
        if set(append) - set(self.tables) or set(changed) - set(self.tables):
            raise EditMismatchError(f"{type(self).__name__}: update names tables it does not have")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.n_rows):
            raise EditMismatchError(f"{type(self).__name__}: update changes row {int(index.max())} of {self.n_rows}")

    def update_rows(self, append: dict[str, torch.Tensor], index: torch.Tensor,
                    changed: dict[str, torch.Tensor]) -> tuple[int, dict[str, torch.Tensor]]:
        """Set rows `index` of the tables in `changed`, then append `append`'s rows. Returns the undo
        record (row count before, the changed rows' previous values)."""
        n0 = self.n_rows
        with torch.no_grad():
            # everything is computed before any table changes, so a failure leaves the wrapper as it was
            old, new = {}, {}
            for name in self.tables:
                table = getattr(self, name)
                if name in changed:
                    idx = index.to(table.device)
                    old[name] = table[idx].clone()
                    table = table.clone()
                    table[idx] = changed[name].to(table.device, table.dtype)
                new[name] = torch.cat([table, append[name].to(table.device, table.dtype)])
            for name, table in new.items():
                setattr(self, name, table)
        return n0, old

    def undo_rows(self, index: torch.Tensor, undo: tuple[int, dict[str, torch.Tensor]]) -> None:
        n0, old = undo
        with torch.no_grad():
            for name in self.tables:
                setattr(self, name, getattr(self, name)[:n0].clone())
            for name, rows in old.items():
                table = getattr(self, name)
                table[index.to(table.device)] = rows


WRAPPERS: Registry[type[AdapterModule]] = Registry("adapter wrapper", EditMismatchError)
# The built-in wrappers are registered here, by name, with lazy factories: a saved edit names its wrapper,
# and `Edit.load` in a fresh process must find it before anything has imported the method's module.
for _name, _target, _description in (
    ("grace-codebook", "grace:GraceCodebook", "GRACE codebook: key/value/radius lookup per token"),
    ("melo-lora", "melo:MeloLoRA", "MELO: LoRA blocks routed per token by a vector database of edit clusters"),
    ("wise", "wise:WISEWrapper", "WISE side memories beside an MLP output projection, routed per token"),
    ("side-units", "side_units:SideUnits",
     "side units (a small FFN of key/value rows) beside an MLP block: T-Patcher, CaliNET"),
):
    WRAPPERS.register(_name, _description, lazy(f"{__package__}.{_target}"))


def register_wrapper(cls: type[AdapterModule], description: str) -> type[AdapterModule]:
    """Register a wrapper class (a plug-in's; the built-ins are registered above) under its
    `registered_name` (idempotent for the same class). A plug-in's module must be imported (so that this
    runs) before `Edit.load` reads an edit that names its wrapper."""
    name = cls.registered_name
    if name in WRAPPERS:
        if WRAPPERS.get(name) is not cls:
            raise ValueError(f"another wrapper is already registered as {name!r}")
        return cls
    WRAPPERS.register(name, description, lambda: cls)
    return cls


def linear_dims(lm: Any, module: torch.nn.Module) -> tuple[int, int]:
    """(input width, output width) of a linear-like module, through other adapters' wrappers (`base_layer`),
    whatever its weight's storage layout (GPT-2's Conv1D included)."""
    while not hasattr(module, "weight") and hasattr(module, "base_layer"):
        module = module.base_layer
    w = lm.arch.as_matrix(module.weight)  # [out, in]
    return int(w.shape[1]), int(w.shape[0])


def set_module(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    """Put `module` at dotted `path` inside `model` (parent attribute or ModuleList index)."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, (torch.nn.ModuleList, torch.nn.Sequential)) and child.isdigit():
        parent[int(child)] = module
    else:
        setattr(parent, child, module)
