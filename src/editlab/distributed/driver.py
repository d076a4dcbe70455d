"""`--executor ray`: the driver cuts runs into tasks, hands them to worker actors and is the only
writer of the result store.

Order of work:

1. connect (start a local Ray, or join `--ray-address`), check the cluster has the CPUs/GPUs asked for;
2. start the workers: each actor loads the model once and keeps it; their editlab, torch and
   transformers versions must equal the driver's (a node without editlab is named in the error);
3. one worker names every run (`plan_run`: the same run ids as a local run) and the driver records
   them, so `--resume` sees the rows already done;
4. one worker computes the covariance statistics every run will read, once; they reach the other
   workers through the object store (and each machine's statistics cache), never recomputed;
5. tasks: a single/batch run is cut into shards of whole edits, a sequential run is one task (order
   matters), and tasks of all runs share the workers. Each worker streams its rows back as it makes
   them; the driver commits each at once (`Store.add_row`), so a Ctrl-C or a crash keeps every row
   committed so far and `--resume` never re-runs it;
6. a task whose worker dies (killed, out of memory, node lost) goes back to the queue with only its
   edits that have no row yet; Ray restarts the actor (`max_restarts`), and after `max_retries` failures
   of one task the run stops with `ExecutorError`. Rows are keyed by (run, request), so a row is never
   stored twice whatever happens.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from ..errors import EditlabError, ExecutorError
from ..requests import EditRequest
from ..runner.config import RunConfig
from ..runner.runner import RunPlan, chunk_keys, chunk_size, chunk_starts, edit_finished, sequence_finished
from ..runner.store import Store
from .spec import ExecutorSpec, local_cpus
from .worker import EditWorker

Progress = Callable[[int, int, str], None]
TASKS_PER_WORKER = 4  # shards per worker and run: small enough to balance, large enough to amortise
MAX_SHARD = 25  # edits per shard at most: a dead worker loses at most the edit it was making
REVIVE_TIMEOUT_S = 900.0  # a restarting worker that has not answered by then is given up
START_TIMEOUT_S = 900.0  # workers that have not loaded the model by then: the cluster cannot place them


@dataclass
class Task:
    run: int  # index into the configs
    shard: list[int] | None  # chunk starts (single/batch); None: the whole sequential run
    units: int  # edits this task makes (progress)
    attempts: int = 0
    done_units: int = 0
    key: int = 0  # unique per attempt (progress accounting)


@dataclass
class _Worker:
    handle: Any
    info: dict[str, Any] = field(default_factory=dict)
    revive_deadline: float = 0.0


def plan_tasks(cfg: RunConfig, n_requests: int, done: set[str], requests: Sequence[EditRequest], run: int,
               n_workers: int) -> list[Task]:
    """The tasks of one run: shards of the edits that still lack a row, or the whole sequence."""
    if cfg.mode == "sequential":
        if sequence_finished(cfg, done):
            return []
        return [Task(run, None, max(cfg.checkpoints))]
    size = chunk_size(cfg)
    todo = [s for s in chunk_starts(cfg, n_requests) if not edit_finished(cfg, requests, s, done)]
    if not todo:
        return []
    per = max(1, min(MAX_SHARD, -(-len(todo) // (n_workers * TASKS_PER_WORKER))))
    return [Task(run, todo[k : k + per], sum(min(size, n_requests - s) for s in todo[k : k + per]))
            for k in range(0, len(todo), per)]


def _unwrap(ray: Any, e: BaseException) -> BaseException:
    """The user's error inside a Ray task error (an `EditlabError` raised in a worker), else `e`."""
    cause = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayTaskError) else None
    return cause if isinstance(cause, BaseException) else e


def _worker_failed(ray: Any, e: BaseException) -> bool:
    """The worker process died or is unreachable (the task can run again elsewhere)."""
    ex = ray.exceptions
    kinds = tuple(k for k in (getattr(ex, n, None) for n in (
        "RayActorError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError",
        "OutOfMemoryError", "LocalRayletDiedError")) if k)
    return isinstance(e, kinds)


def _state_lost(ray: Any, e: BaseException) -> bool:
    """The task met a worker that Ray restarted since it was given the run's requests."""
    from .worker import WorkerStateLost

    return isinstance(_unwrap(ray, e), WorkerStateLost)


def _reason(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)[:200]


def _start_error(e: BaseException, spec: ExecutorSpec) -> ExecutorError:
    text = str(e)
    where = spec.address or "this machine"
    if "No module named 'editlab'" in text:
        return ExecutorError(f"the Ray workers on {where} cannot import editlab; install the same editlab (pip install "
                             "'editlab[ray]') on every node of the cluster")
    last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), type(e).__name__)
    return ExecutorError(f"a Ray worker on {where} could not start: {last}")


def _connect(ray: Any, spec: ExecutorSpec) -> bool:
    """Start or join Ray; True when this call did (so the end of the run undoes it)."""
    if ray.is_initialized():
        return False
    logging.getLogger("ray").setLevel(logging.ERROR)
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR)
    if spec.address is None:
        try:
            ray.init(num_cpus=max(local_cpus(), spec.workers * spec.cpus_per_worker), include_dashboard=False, **quiet)
        except Exception as e:  # a port in use, no /dev/shm space, ...
            raise ExecutorError(f"cannot start a local Ray on this machine: {_reason(e)}") from None
        return True
    try:
        ray.init(address=spec.address, **quiet)
    except Exception as e:  # ray raises ConnectionError, RuntimeError or its own types here
        raise ExecutorError(f"cannot join the Ray cluster at {spec.address}: {e}") from None
    return True


def _check_resources(ray: Any, spec: ExecutorSpec) -> None:
    """The cluster can place the workers: enough CPUs/GPUs in all, and one worker's share on some node
    (an actor is never split over nodes; otherwise it would wait for a node forever)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if nodes and not any(n.get("CPU", 0) >= spec.cpus_per_worker and n.get("GPU", 0) >= spec.gpus_per_worker for n in nodes):
        best = max(n.get("CPU", 0) for n in nodes)
        raise ExecutorError(f"no node of the Ray cluster has {spec.cpus_per_worker} CPUs"
                            f"{f' and {spec.gpus_per_worker:g} GPUs' if spec.gpus_per_worker else ''} for one worker "
                            f"(the largest has {best:g} CPUs); lower --cpus-per-worker")
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0), have.get("GPU", 0)
    if spec.workers * spec.cpus_per_worker > cpus:
        raise ExecutorError(f"the Ray cluster has {cpus:g} CPUs; {spec.workers} workers x {spec.cpus_per_worker} CPUs "
                            "need more (lower --workers or --cpus-per-worker, or add nodes)")
    if spec.workers * spec.gpus_per_worker > gpus:
        raise ExecutorError(f"the Ray cluster has {gpus:g} GPUs; {spec.workers} workers x {spec.gpus_per_worker:g} GPUs "
                            "need more (lower --workers, or run on CPU)")


@contextmanager
def _cluster(model: dict[str, Any], spec: ExecutorSpec, state: Any, tick: Progress) -> Iterator[tuple[Any, list[_Worker], Any, ExecutorSpec]]:
    """Connect, start the workers (each loads the model once), check their versions, give them
    `state` (the run's requests; a suite needs none); at the end kill them and undo the connection.
    Yields (ray, workers, the state's object ref, the spec with the GPUs CUDA needs)."""
    import ray

    from .. import __version__
    from ..runner.runner import versions

    model = dict(model)
    if Path(model["name"]).exists():
        model["name"] = str(Path(model["name"]).resolve())
    if str(model.get("device", "cpu")).startswith("cuda"):
        model["device"] = "cuda"  # each actor sees only the GPU Ray gave it, as cuda:0
        if not spec.gpus_per_worker:
            spec = ExecutorSpec(spec.executor, spec.address, spec.workers, spec.cpus_per_worker, 1.0, spec.max_retries)
    started = _connect(ray, spec)
    workers: list[_Worker] = []
    try:
        _check_resources(ray, spec)
        actor = ray.remote(EditWorker).options(num_cpus=spec.cpus_per_worker, num_gpus=spec.gpus_per_worker,
                                               max_restarts=max(spec.max_retries, 1), max_task_retries=0)
        state_ref = ray.put(state)
        tick(0, 1, f"starting {spec.describe()}")
        workers = [_Worker(actor.remote(model, spec.cpus_per_worker)) for _ in range(spec.workers)]
        try:
            hellos = [w.handle.hello.remote() for w in workers]
            ready, _ = ray.wait(hellos, num_returns=len(hellos), timeout=START_TIMEOUT_S)
            if len(ready) < len(hellos):
                raise ExecutorError(f"{len(hellos) - len(ready)} of {len(hellos)} Ray workers did not start within "
                                    f"{START_TIMEOUT_S:.0f} s; the cluster may have no free node with "
                                    f"{spec.cpus_per_worker} CPUs (see `ray status`)")
            infos = ray.get(hellos)
            ray.get([w.handle.set_requests.remote(state_ref) for w in workers])
        except ExecutorError:
            raise
        except Exception as e:
            raise _start_error(e, spec) from None
        mine = versions()
        for w, info in zip(workers, infos):
            w.info = info
            diff = {k: (info.get(k), v) for k, v in mine.items() if k != "python" and info.get(k) != v}
            if diff:
                k, (theirs, ours) = next(iter(diff.items()))
                raise ExecutorError(f"the Ray worker on {info.get('host')} has {k} {theirs}, the driver {ours} "
                                    f"(editlab {__version__}); install the same versions on every node")
        yield ray, workers, state_ref, spec
    finally:
        for w in workers:
            try:
                ray.kill(w.handle, no_restart=True)
            except Exception:
                pass
        if started:
            ray.shutdown()


def run_on_ray(model: dict[str, Any], requests: Sequence[EditRequest], configs: Sequence[RunConfig], store: Store,
               spec: ExecutorSpec, resume: bool, progress: Progress | None = None) -> list[str]:
    """Run every config on `requests` across the Ray workers; rows go to `store` as they are made.
    Returns the run ids (those a local run gives). `model` holds `load_lm`'s arguments (name, device,
    dtype, allow_hub); a model path is made absolute, as workers do not share the driver's folder."""
    tick = progress or (lambda i, n, msg: None)
    with _cluster(model, spec, list(requests), tick) as (ray, workers, requests_ref, spec):
        return _EditRuns(ray, workers, requests_ref, store, spec, resume, tick, requests, list(configs)).go()


def run_suite_on_ray(model: dict[str, Any], plan: Any, store: Store, spec: ExecutorSpec, *,
                     hparams: dict[str, Any] | None = None, seed: int = 0, resume: bool = True,
                     progress: Progress | None = None) -> dict[str, str]:
    """`suites.runner.run_suite` across the Ray workers: the suite's units cut into shards, every
    method (and the unedited pass) of a unit in the same task, as locally. Returns {method or
    "unedited": run id}, those a local run gives."""
    tick = progress or (lambda i, n, msg: None)
    with _cluster(model, spec, [], tick) as (ray, workers, state_ref, spec):
        return _SuiteRun(ray, workers, state_ref, store, spec, resume, tick, plan, dict(hparams or {}), seed).go()


class _Dispatch:
    """The driver's state between the start of the workers and the last committed row: the work loop,
    shared by edit runs and suites, which say how to plan, submit and resume their tasks."""

    def __init__(self, ray: Any, workers: list[_Worker], state_ref: Any, store: Store, spec: ExecutorSpec,
                 resume: bool, tick: Progress) -> None:
        self.ray, self.workers, self.state_ref = ray, workers, state_ref
        self.store, self.spec, self.resume, self.tick = store, spec, resume, tick
        self.rows = 0
        self.t0 = time.perf_counter()
        self.moments_ref: Any = None
        self.total = 0

    def _get(self, refs: Any, what: str) -> Any:
        try:
            return self.ray.get(refs)
        except Exception as e:
            if _worker_failed(self.ray, e):
                raise ExecutorError(f"a Ray worker died while {what} ({_reason(e)}); no row was written; "
                                    "run the command again") from None
            raise _unwrap(self.ray, e) from None

    def _share_statistics(self, moments: dict[str, Any]) -> None:
        """Statistics one worker computed, to every other worker through the object store."""
        self.moments_ref = self.ray.put(moments) if moments else None
        if self.moments_ref is not None:
            self._get([w.handle.install.remote(self.moments_ref) for w in self.workers[1:]], "receiving the statistics")

    def _run_of(self, t: Task) -> str:  # for messages
        raise NotImplementedError

    def _submit(self, w: _Worker, t: Task) -> Any:
        raise NotImplementedError

    def _remaining(self, t: Task) -> Task | None:
        """What of a failed task still has no row, as a new attempt (None: nothing left)."""
        raise NotImplementedError

    def _runs_state(self, run_ids: Sequence[str], keys: set[str] | None) -> dict[str, Any]:
        """What a worker's `ShardStore` needs of each run: its done keys (those in `keys` when given),
        its config; the runs exist (the driver made them)."""
        out = {}
        for rid in run_ids:
            done = self.store.done_keys(rid)
            out[rid] = {"existed": True, "done": done & keys if keys is not None else done,
                        "config": self.store.runs_config(rid)}
        return out

    # ------------------------------------------------------------------ the work loop
    def _new(self, t: Task) -> Task:
        self.n_keys += 1
        t.key = self.n_keys
        self.progress[t.key] = t.done_units
        return t

    def _report(self) -> None:
        done = sum(self.progress.values())
        rate = self.rows / max(time.perf_counter() - self.t0, 1e-9)
        alive = len(self.workers) - len(self.dead)
        self.tick(min(done, self.total), self.total, f"{self.rows} rows, {rate:.2f} rows/s, {alive} workers")

    def _dispatch(self, queue: deque[Task]) -> None:
        ray = self.ray
        idle = list(self.workers)
        running: dict[Any, tuple[Task, _Worker]] = {}
        reviving: dict[Any, _Worker] = {}
        self.dead: list[_Worker] = []
        self.n_keys = 0
        self.progress: dict[int, int] = {}
        queue = deque(self._new(t) for t in queue)
        self.t0 = time.perf_counter()  # rows/s over the editing, not the start-up
        while queue or running:
            while idle and queue:
                w, t = idle.pop(0), queue.popleft()
                running[self._submit(w, t)] = (t, w)
            if not running and not reviving:
                raise ExecutorError(f"every Ray worker died ({len(self.dead)}); rows committed so far are kept in "
                                    f"{self.store.path}; rerun with --resume")
            ready, _ = ray.wait(list(running) + list(reviving), num_returns=1, timeout=1.0)
            for obj in ready:
                if obj in reviving:
                    self._revived(obj, reviving, idle)
                    continue
                t, w = running[obj]
                try:
                    msg = self.ray.get(next(obj))
                except StopIteration:
                    del running[obj]
                    self.progress[t.key] = t.done_units + t.units
                    idle.append(w)
                    self._report()
                    continue
                except Exception as e:
                    del running[obj]
                    if _state_lost(ray, e):  # restarted while idle: same task, after its state again
                        self._send_state(w)
                        running[self._submit(w, t)] = (t, w)
                        continue
                    if not _worker_failed(ray, e):
                        raise _unwrap(ray, e) from None
                    self._task_failed(t, w, e, queue, reviving)
                    continue
                self._handle(t, msg)
            now = time.monotonic()
            for ref, w in list(reviving.items()):
                if now > w.revive_deadline:  # never placed again (its node is gone): give it up
                    del reviving[ref]
                    self.dead.append(w)

    def _handle(self, t: Task, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "row":
            if self.store.add_row(msg[1]):
                self.rows += 1
            if t.shard is not None:
                self.progress[t.key] = self.progress.get(t.key, 0) + 1
        elif kind == "pre_edit":
            self.store.save_pre_edit(msg[1], msg[2])
        elif kind == "config":
            self.store.update_run_config(msg[1], **msg[2])
        elif kind == "tick":
            if t.shard is not None:
                return  # shard progress is counted by rows
            self.progress[t.key] = max(self.progress.get(t.key, 0), int(msg[1]))  # a sequence counts its edits
        self._report()

    def _send_state(self, w: _Worker) -> None:
        """A restarted actor has only its model: the requests and statistics again, before its next task
        (calls to one actor run in order; they wait for a restart in progress)."""
        w.handle.set_requests.options(max_task_retries=-1).remote(self.state_ref)
        if self.moments_ref is not None:
            w.handle.install.options(max_task_retries=-1).remote(self.moments_ref)

    def _task_failed(self, t: Task, w: _Worker, e: BaseException, queue: deque[Task], reviving: dict[Any, _Worker]) -> None:
        reason = _reason(e)
        self.progress.pop(t.key, None)
        again = self._remaining(t)
        if again is not None:
            if again.attempts > self.spec.max_retries:
                raise ExecutorError(f"a task {self._run_of(t)} lost its worker {again.attempts} times "
                                    f"(last: {reason}); rows committed so far are kept in {self.store.path}; "
                                    "rerun with --resume")
            queue.appendleft(again)
        w.revive_deadline = time.monotonic() + REVIVE_TIMEOUT_S
        reviving[w.handle.hello.options(max_task_retries=-1).remote()] = w  # waits for Ray's restart
        self.tick(min(sum(self.progress.values()), self.total), self.total,
                  f"a worker died ({reason[:80]}); its task goes to another worker")

    def _revived(self, ref: Any, reviving: dict[Any, _Worker], idle: list[_Worker]) -> None:
        w = reviving.pop(ref)
        try:
            w.info = self.ray.get(ref)
        except Exception as e:
            if not _worker_failed(self.ray, e):
                raise _unwrap(self.ray, e) from None
            if isinstance(e, self.ray.exceptions.ActorDiedError) or time.monotonic() > w.revive_deadline:
                self.dead.append(w)  # restarts used up: this worker is gone for good
            else:
                reviving[w.handle.hello.options(max_task_retries=-1).remote()] = w
            return
        self._send_state(w)
        idle.append(w)


class _EditRuns(_Dispatch):
    """Single, batch and sequential runs of `runner.run` on the same requests."""

    def __init__(self, ray: Any, workers: list[_Worker], state_ref: Any, store: Store, spec: ExecutorSpec,
                 resume: bool, tick: Progress, requests: Sequence[EditRequest], configs: list[RunConfig]) -> None:
        super().__init__(ray, workers, state_ref, store, spec, resume, tick)
        self.requests, self.configs = requests, configs

    def go(self) -> list[str]:
        ray, store = self.ray, self.store
        lead = self.workers[0].handle
        self.tick(0, 1, "planning the runs")
        plans: list[RunPlan] = self._get([lead.plan.remote(c) for c in self.configs], "planning the runs")
        self.plans = plans
        tasks: list[Task] = []
        dones = []
        for k, (cfg, plan) in enumerate(zip(self.configs, plans)):
            cfg.validate(len(self.requests))  # the driver's copy gets the default checkpoints, as the worker's did
            dones.append(store.done_keys(plan.run_id))
            tasks += plan_tasks(cfg, len(self.requests), dones[-1], self.requests, k, len(self.workers))
        todo_cfgs = sorted({t.run for t in tasks})
        if todo_cfgs:  # e.g. a learned editor never trained: one error now, before any run is written
            self._get(lead.check_ready.remote([self.configs[k] for k in todo_cfgs]), "checking the editors")
        for plan, done in zip(plans, dones):
            existed = store.ensure_run(plan.run_id, **plan.fields)
            if existed and not self.resume and done:
                raise EditlabError(f"run {plan.run_id} already has {len(done)} rows in {store.path}; pass --resume to continue it")
        self.total = sum(t.units for t in tasks)
        if tasks:
            self.tick(0, self.total, "computing the covariance statistics (once, on one worker)")
            self._share_statistics(self._get(lead.warm.remote([self.configs[k] for k in todo_cfgs]), "computing the statistics"))
            fingerprint = plans[0].fields["model_fingerprint"]
            self.pre_ref = ray.put(store.load_pre_edit(fingerprint))
            self._dispatch(deque(tasks))
        return [p.run_id for p in plans]

    def _run_of(self, t: Task) -> str:
        return f"of run {self.plans[t.run].run_id}"

    def _submit(self, w: _Worker, t: Task) -> Any:
        cfg, plan = self.configs[t.run], self.plans[t.run]
        keys = None
        if t.shard is not None:  # only the keys this shard could write
            keys = {k for s in t.shard for k in chunk_keys(cfg, self.requests, s)}
        return w.handle.run_task.options(num_returns="streaming").remote(
            cfg, t.shard, str(Path(self.store.path).resolve()), self._runs_state([plan.run_id], keys), self.pre_ref)

    def _remaining(self, t: Task) -> Task | None:
        cfg, plan = self.configs[t.run], self.plans[t.run]
        done = self.store.done_keys(plan.run_id)
        if t.shard is None:
            if sequence_finished(cfg, done):
                return None
            return self._new(Task(t.run, None, t.units, t.attempts + 1, t.done_units))
        size = chunk_size(cfg)
        left = [s for s in t.shard if not edit_finished(cfg, self.requests, s, done)]
        if not left:
            return None
        units = sum(min(size, len(self.requests) - s) for s in left)
        return self._new(Task(t.run, left, units, t.attempts + 1, t.done_units + (t.units - units)))


class _SuiteRun(_Dispatch):
    """A pitfall suite: shards of units; each task runs every method (and the unedited pass) on its
    units, in the local order (units outer, methods inner)."""

    def __init__(self, ray: Any, workers: list[_Worker], state_ref: Any, store: Store, spec: ExecutorSpec,
                 resume: bool, tick: Progress, plan: Any, hparams: dict[str, Any], seed: int) -> None:
        super().__init__(ray, workers, state_ref, store, spec, resume, tick)
        self.plan, self.hparams, self.seed = plan, hparams, seed

    def go(self) -> dict[str, str]:
        from ..suites.runner import check_resume, units_left

        ray = self.ray
        lead = self.workers[0].handle
        self.tick(0, 1, "planning the suite's runs")
        self.plan_ref = ray.put(self.plan)  # the units travel once
        runs = self._get(lead.plan_suite.remote(self.plan_ref, self.hparams, self.seed), "planning the runs")
        unready = [m for m in self.plan.methods if units_left(self.plan.units, self.store.done_keys(runs[m][0]))]
        if unready:  # as a local suite: a learned editor without its network stops before any run is written
            self._get(lead.check_ready_suite.remote(unready, self.hparams), "checking the editors")
        self.run_ids = check_resume(self.store, runs, self.resume)
        done = {m: self.store.done_keys(rid) for m, rid in self.run_ids.items()}
        todo = [i for i, u in enumerate(self.plan.units) if any(u.key not in d for d in done.values())]
        per = max(1, min(MAX_SHARD, -(-len(todo) // (len(self.workers) * TASKS_PER_WORKER)))) if todo else 1
        tasks = [Task(0, todo[k : k + per], len(todo[k : k + per])) for k in range(0, len(todo), per)]
        self.total = len(todo)
        if tasks:
            self.tick(0, self.total, "computing the covariance statistics (once, on one worker)")
            self._share_statistics(self._get(lead.warm_suite.remote(self.plan_ref, self.hparams), "computing the statistics"))
            self._dispatch(deque(tasks))
        return self.run_ids

    def _run_of(self, t: Task) -> str:
        return f"of suite {self.plan.suite.name}"

    def _keys(self, shard: Sequence[int]) -> list[str]:
        return [self.plan.units[i].key for i in shard]

    def _submit(self, w: _Worker, t: Task) -> Any:
        keys = self._keys(t.shard or [])
        return w.handle.run_suite_task.options(num_returns="streaming").remote(
            self.plan_ref, self.hparams, self.seed, keys, str(Path(self.store.path).resolve()),
            self._runs_state(list(self.run_ids.values()), set(keys)))

    def _remaining(self, t: Task) -> Task | None:
        done = {rid: self.store.done_keys(rid) for rid in self.run_ids.values()}
        left = [i for i in (t.shard or []) if any(self.plan.units[i].key not in d for d in done.values())]
        if not left:
            return None
        return self._new(Task(t.run, left, len(left), t.attempts + 1, t.done_units + (t.units - len(left))))

    def _handle(self, t: Task, msg: tuple[Any, ...]) -> None:
        if msg[0] == "row":  # progress counts units: a unit is done with its last method's row
            row = msg[1]
            if self.store.add_row(row):
                self.rows += 1
                if row.kind == "error":  # the worker's own warning does not reach this console
                    warnings.warn(f"{row.run_id.split('-suite-')[0]} failed on {self.plan.suite.name} unit {row.row_key}: "
                                  f"{row.metrics.get('error')} (recorded, left out of the means)", stacklevel=2)
            self._report()
            return
        if msg[0] == "tick":  # the suite runner ticks once per unit of the shard
            self.progress[t.key] = t.done_units + int(msg[1])
            self._report()
            return
        super()._handle(t, msg)
