"""The Ray worker: an actor that loads the model once and runs tasks (a run's shard of edits, or a whole
sequential run) with the same `runner.run` as the local executor, streaming its rows back to the driver.

The class is plain Python; `driver.py` turns it into an actor with `ray.remote`, so importing this
module needs neither ray nor (until an actor starts) torch."""

from __future__ import annotations

import os
import queue
import socket
import threading
from typing import Any, Iterator, Sequence

from .shard_store import Message, ShardStore

_END = ("end",)


class WorkerStateLost(RuntimeError):
    """This worker was restarted by Ray and no longer holds the run's requests and statistics: the
    driver sends them again and hands the task back (it is not the task's fault)."""


class TaskCancelled(RuntimeError):
    """The driver stopped listening to this task; the runner stops after its current edit."""


class EditWorker:
    """Holds one copy of the model and the run's requests; every method is called by the driver."""

    def __init__(self, model: dict[str, Any], threads: int) -> None:
        import torch

        from ..models import load_lm

        torch.set_num_threads(max(1, int(threads)))
        self.lm = load_lm(model["name"], device=model.get("device", "cpu"), dtype=model.get("dtype", "float32"),
                          allow_hub=model.get("allow_hub"), device_map=model.get("device_map"))
        self.requests: list[Any] = []
        self._fits_checked = False
        self._has_state = False

    def set_requests(self, requests: Sequence[Any]) -> int:
        """The requests every run of this driver uses (sent again after a restart; none for a suite)."""
        self.requests = list(requests)
        self._fits_checked = False
        self._has_state = True
        return len(self.requests)

    def hello(self) -> dict[str, Any]:
        """Who this worker is: versions (the driver refuses a mismatch), host and process, model."""
        from ..runner.runner import versions

        return {**versions(), "host": socket.gethostname(), "pid": os.getpid(), "model": self.lm.name,
                "fingerprint": self.lm.base_fingerprint}

    def plan(self, cfg: Any) -> Any:
        """The run's id and stored fields (`runner.plan_run`); first checks the prompts fit the model."""
        from ..requests import check_fits
        from ..runner.runner import plan_run

        if not self._fits_checked:
            check_fits(self.requests, self.lm)
            self._fits_checked = True
        return plan_run(self.lm, cfg, self.requests)

    def check_ready(self, cfgs: Sequence[Any]) -> None:
        """`Editor.check_ready` for each config (a learned editor's network is looked up here, on a worker
        with the model, before the driver writes any run)."""
        from ..methods import get_editor
        from ..runner.runner import plan_run

        for c in cfgs:
            get_editor(c.method).check_ready(self.lm, plan_run(self.lm, c, self.requests).hparams)

    def check_ready_suite(self, methods: Sequence[str], hparams: dict[str, Any]) -> None:
        """`Editor.check_ready` for each of a suite's methods with units left."""
        from ..methods import get_editor

        for m in methods:
            editor = get_editor(m)
            editor.check_ready(self.lm, editor.hparams(self.lm, **dict(hparams.get(m, {}))))

    def warm(self, cfgs: Sequence[Any]) -> dict[str, Any]:
        """Compute the covariance statistics every config will read, once, and hand them out (through
        the object store) so no other worker recomputes them."""
        from ..runner.runner import plan_run
        from ..stats import shared_moments, warm_statistics

        warm_statistics(self.lm, [plan_run(self.lm, c, self.requests).hparams for c in cfgs], progress=False)
        return shared_moments(self.lm)

    def install(self, moments: dict[str, Any]) -> int:
        from ..stats import install_moments

        install_moments(self.lm, moments)
        return len(moments)

    def run_task(self, cfg: Any, shard: list[int] | None, db_path: str, runs: dict[str, Any],
                 pre_edit: dict[tuple[str, str], list[int]]) -> Iterator[Message]:
        """Run one task of an edit run (`runner.run` on a shard, or a whole sequence) and yield its
        messages as they happen (a Ray streaming generator)."""
        from ..runner.runner import run

        if not self.requests:
            raise WorkerStateLost("this worker was restarted and holds no requests")
        yield from self._stream(db_path, runs, pre_edit, lambda store, tick: run(
            self.lm, self.requests, cfg, store, progress=tick, resume=True, shard=shard))

    # --------------------------------------------------------------- pitfall suites
    def plan_suite(self, plan: Any, hparams: dict[str, Any], seed: int) -> Any:
        """The suite's runs: {method or unedited: (run id, runs-row fields)} (`suites.runner.suite_runs`)."""
        from ..suites.runner import suite_runs

        return suite_runs(self.lm, plan, hparams, seed)[0]

    def warm_suite(self, plan: Any, hparams: dict[str, Any]) -> dict[str, Any]:
        from ..methods import get_editor
        from ..stats import shared_moments, warm_statistics

        warm_statistics(self.lm, [get_editor(m).hparams(self.lm, **dict(hparams.get(m, {}))) for m in plan.methods],
                        progress=False)
        return shared_moments(self.lm)

    def run_suite_task(self, plan: Any, hparams: dict[str, Any], seed: int, keys: list[str], db_path: str,
                       runs: dict[str, Any]) -> Iterator[Message]:
        """Run the suite on the units with these keys, streaming rows as they are made."""
        from ..suites.runner import run_suite

        if not self._has_state:
            raise WorkerStateLost("this worker was restarted and holds no statistics")
        yield from self._stream(db_path, runs, {}, lambda store, tick: run_suite(
            self.lm, plan, store, hparams=hparams, seed=seed, resume=True, progress=tick, only=keys))

    def _stream(self, db_path: str, runs: dict[str, Any], pre_edit: dict[tuple[str, str], list[int]],
                work_fn: Any) -> Iterator[Message]:
        """Run `work_fn(store, progress)` in a thread and yield what it writes to the store as messages;
        an error there is raised here, after the messages it produced."""
        out: queue.Queue[Message] = queue.Queue()
        store = ShardStore(db_path, runs, pre_edit, out.put)
        failure: list[BaseException] = []
        cancel = threading.Event()

        def tick(i: int, n: int, msg: str) -> None:
            if cancel.is_set():  # between edits: the runner restores what it applied on the way out
                raise TaskCancelled("the driver stopped listening to this task")
            out.put(("tick", i, n))

        def work() -> None:
            try:
                work_fn(store, tick)
            except BaseException as e:  # handed to the generator, which raises it to the driver
                failure.append(e)
            finally:
                out.put(_END)

        thread = threading.Thread(target=work, name="editlab-task", daemon=True)
        thread.start()
        try:
            while (msg := out.get()) != _END:
                yield msg
        finally:  # also when the stream is closed early: never leave a second thread editing the model
            cancel.set()
            thread.join()
        if failure:
            raise failure[0]
