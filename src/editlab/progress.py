"""Progress of long computations for whoever watches them, beside the terminal's tqdm bars.

A loop that can take minutes (covariance statistics, meta-training) calls `report(task, done, total)`
as it advances. `watching(fn)` registers `fn(task, done, total)` for the computations the calling thread
runs inside the block: the playground watches its model thread during an edit, so the page can say
"covariance statistics of layer 6: 40 %" instead of only the seconds. Watchers are per thread (another
thread's computation never reaches them), and a watcher that raises never breaks the computation.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

Watcher = Callable[[str, int, int], None]
_local = threading.local()


@contextmanager
def watching(fn: Watcher) -> Iterator[None]:
    """Call `fn(task, done, total)` for every `report` made on this thread inside the block."""
    before = getattr(_local, "watchers", ())
    _local.watchers = before + (fn,)
    try:
        yield
    finally:
        _local.watchers = before


def report(task: str, done: int, total: int) -> None:
    """Tell this thread's watchers that `task` has done `done` of `total` units."""
    for fn in getattr(_local, "watchers", ()):
        try:
            fn(task, int(done), int(total))
        except Exception:  # noqa: BLE001 - watching must never break the work
            pass
