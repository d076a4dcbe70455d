"""Experiment runner (single / batch / sequential) and its SQLite result store. Names are imported on
first use: `config` and `store` load without torch."""

from editlab.lazyimport import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".config": ("MODES", "RunConfig"),
    ".runner": ("RunPlan", "chunk_starts", "plan_run", "row_key", "run", "shared_pre_edit"),
    ".store": ("Row", "Store", "StoreError"),
})
