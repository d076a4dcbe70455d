"""Editing methods (one module each, grouped by family), the catalogue that names them (`catalogue.py`) and
the machinery they share. Names are imported on first use: `catalogue` and the `hparams` modules load
without torch, so the CLI checks a method name and its hyper-parameters before torch is imported."""

from editlab.lazyimport import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".catalogue": ("METHODS", "available_methods", "hparams_class", "can_batch"),
    ".hparams": ("Hparams", "known_model"),
    ".base": ("Editor", "get_editor"),
    ".edit": ("Edit", "restore_all"),
    ".patches": ("LowRank", "ModuleSwap", "Patch", "SolverState", "TableUpdate", "ViewPatch", "WeightDelta"),
})
