"""Editing methods (one module each) and the registry that loads them lazily by name."""

from .base import Editor, Hparams, available_methods, get_editor
from .edit import Edit

__all__ = ["Editor", "Hparams", "available_methods", "get_editor", "Edit"]
