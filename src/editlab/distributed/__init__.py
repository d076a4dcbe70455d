"""Runs on a Ray cluster (`--executor ray`): the same runs as the local runner, cut into tasks that
worker actors (one model copy each) carry out, with the driver as the only writer of the result store.

`spec` is importable without torch or ray (the CLI checks options with it); `driver` imports ray."""

from editlab.lazyimport import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".spec": ("EXECUTORS", "ExecutorSpec", "check_executor"),
    ".driver": ("run_on_ray", "plan_tasks"),
})
