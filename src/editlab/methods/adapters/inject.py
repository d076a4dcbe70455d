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
from ...registry import Registry


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


WRAPPERS: Registry[type[AdapterModule]] = Registry("adapter wrapper", EditMismatchError)


def register_wrapper(cls: type[AdapterModule], description: str) -> type[AdapterModule]:
    """Register a wrapper class under its `registered_name` (idempotent for the same class)."""
    name = cls.registered_name
    if name in WRAPPERS:
        if WRAPPERS.get(name) is not cls:
            raise ValueError(f"another wrapper is already registered as {name!r}")
        return cls
    WRAPPERS.register(name, description, lambda: cls)
    return cls


def set_module(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    """Put `module` at dotted `path` inside `model` (parent attribute or ModuleList index)."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, (torch.nn.ModuleList, torch.nn.Sequential)) and child.isdigit():
        parent[int(child)] = module
    else:
        setattr(parent, child, module)
