"""A worker's view of the result store: what `runner.run` reads comes from the driver's snapshot, what
it writes is sent back to the driver as messages, so the driver stays the only writer of the SQLite
file (on any machine of the cluster, with no shared file system needed for rows).

Messages, in the order the runner produces them:

    ("row", Row)                          a finished row
    ("pre_edit", fingerprint, values)     pre-edit predictions the worker computed
    ("config", run_id, extra)             keys merged into the run's stored config
    ("tick", done, total)                 progress within the task (edits)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypedDict

from ..runner.store import Row

Message = tuple[Any, ...]


class RunState(TypedDict):
    existed: bool
    done: set[str]
    config: dict[str, Any]


class ShardStore:
    """Stands in for `Store` inside a worker, for the runs in `runs` (one for an edit run; the method
    runs and the unedited run for a suite). `path` is the driver's database path: sequential runs
    keep their resumable edit stacks beside it (`runner/stacks.py`), which needs a file system the
    driver and the workers share; without one a retried sequence re-applies its edits from the first."""

    def __init__(self, path: str | Path, runs: dict[str, RunState], pre_edit: dict[tuple[str, str], list[int]],
                 emit: Callable[[Message], None]) -> None:
        self.path = Path(path)
        self._runs = {rid: RunState(existed=st["existed"], done=set(st["done"]), config=dict(st["config"]))
                      for rid, st in runs.items()}
        self._pre = dict(pre_edit)
        self._emit = emit

    def _run(self, run_id: str) -> RunState:
        try:
            return self._runs[run_id]
        except KeyError:
            raise RuntimeError(f"internal: run {run_id} was not planned by the driver") from None

    def ensure_run(self, run_id: str, **fields: Any) -> bool:
        return self._run(run_id)["existed"]  # the driver created the run before handing out its tasks

    def done_keys(self, run_id: str) -> set[str]:
        return set(self._run(run_id)["done"])

    def load_pre_edit(self, fingerprint: str) -> dict[tuple[str, str], list[int]]:
        return dict(self._pre)

    def save_pre_edit(self, fingerprint: str, values: dict[tuple[str, str], list[int]]) -> None:
        self._pre.update(values)
        self._emit(("pre_edit", fingerprint, dict(values)))

    def runs_config(self, run_id: str) -> dict[str, Any]:
        return dict(self._run(run_id)["config"])

    def update_run_config(self, run_id: str, **extra: Any) -> None:
        self._run(run_id)["config"].update(extra)
        self._emit(("config", run_id, dict(extra)))

    def add_row(self, row: Row) -> bool:
        done = self._run(row.run_id)["done"]
        if row.row_key in done:
            return False
        done.add(row.row_key)
        self._emit(("row", row))
        return True
