"""Experiment runner (single / batch / sequential) and its SQLite result store."""

from .runner import MODES, RunConfig, run, shared_pre_edit
from .store import Row, Store, StoreError

__all__ = ["MODES", "RunConfig", "run", "shared_pre_edit", "Row", "Store", "StoreError"]
