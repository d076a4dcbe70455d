"""Editing methods (one module each, grouped by family) and the registry that loads them lazily by name."""

from .base import METHODS, Editor, Hparams, available_methods, get_editor, known_model
from .edit import Edit, restore_all
from .patches import LowRank, ModuleSwap, Patch, SolverState, TableUpdate, ViewPatch, WeightDelta

__all__ = ["METHODS", "Editor", "Hparams", "available_methods", "get_editor", "known_model", "Edit", "restore_all",
           "LowRank", "ModuleSwap", "Patch", "SolverState", "TableUpdate", "ViewPatch", "WeightDelta"]
