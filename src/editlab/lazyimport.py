"""Packages whose public names are imported from their submodules on first use, so that importing the
package (or one torch-free submodule of it) does not import torch."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], Any], list[str]]:
    """`__getattr__` and `__all__` for `package`, given {submodule (relative, e.g. ".base"): names}.

        __getattr__, __all__ = lazy_exports(__name__, {".base": ("Editor",), ".edit": ("Edit",)})
    """
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, list(where)
