"""`--executor ray`: a local two-worker Ray gives the same rows as the local runner (bit for bit at the
same thread count), a worker killed mid-run loses and duplicates nothing, `--resume` never re-runs a
committed row, and every mistake is one line before anything starts."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from editlab.cli import app
from editlab.data import load_requests
from editlab.distributed.driver import plan_tasks
from editlab.distributed.spec import ExecutorSpec, check_executor, normalise_address
from editlab.errors import EditlabError, ExecutorError, OptionError
from editlab.models import load_lm
from editlab.runner import RunConfig, Store, run

MODEL = "tiny-trained-llama"


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory):
    """One local Ray for the module (workers still start per run); statistics in a throwaway cache that
    the workers inherit through the environment."""
    ray = pytest.importorskip("ray", reason="the ray package is not installed (pip install 'editlab[ray]')")
    home = tmp_path_factory.mktemp("ray-home")
    old = os.environ.get("EDITLAB_HOME")
    os.environ["EDITLAB_HOME"] = str(home)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield home
    ray.shutdown()
    if old is None:
        os.environ.pop("EDITLAB_HOME", None)
    else:
        os.environ["EDITLAB_HOME"] = old


def _rows(store: Store, run_id: str) -> dict[str, dict]:
    return {r.row_key: r.metrics for r in store.rows(run_id)}


def _configs() -> list[RunConfig]:
    return [
        RunConfig(method="ft-m"),
        RunConfig(method="memit", mode="batch", batch_size=2, hparams={"mom2_n_tokens": 300, "v_steps": 4}),
        RunConfig(method="rome", mode="sequential", checkpoints=[2, 5], hparams={"mom2_n_tokens": 300, "v_steps": 4}),
    ]


def test_ray_rows_equal_local_rows_and_resume_reruns_nothing(local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from editlab.distributed.driver import run_on_ray

    monkeypatch.setenv("EDITLAB_HOME", str(local_ray))
    requests = load_requests("builtin", limit=6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: same float reductions, same bits
    try:
        lm = load_lm(MODEL)
        local = Store(tmp_path / "local.db")
        local_ids = [run(lm, requests, cfg, local) for cfg in _configs()]
    finally:
        torch.set_num_threads(threads)
    remote = Store(tmp_path / "ray.db")
    seen: list[str] = []
    ray_ids = run_on_ray({"name": MODEL}, requests, _configs(), remote, ExecutorSpec("ray", workers=2), resume=False,
                         progress=lambda i, n, msg: seen.append(msg))
    assert ray_ids == local_ids
    for rid in local_ids:
        assert _rows(remote, rid) == _rows(local, rid), rid
    assert any("rows/s" in m for m in seen)
    # the statistics were computed once, by one worker: the runs record the same cache files
    cfg_l = {r["run_id"]: r["config"] for r in local.runs()}
    cfg_r = {r["run_id"]: r["config"] for r in remote.runs()}
    assert cfg_r[ray_ids[1]]["statistics"] == cfg_l[local_ids[1]]["statistics"]

    # resume: nothing re-runs, nothing is duplicated
    stamps = {rid: sorted(r[0] for r in sqlite3.connect(tmp_path / "ray.db").execute(
        "SELECT created FROM rows WHERE run_id=?", (rid,))) for rid in ray_ids}
    again = run_on_ray({"name": MODEL}, requests, _configs(), remote, ExecutorSpec("ray", workers=2), resume=True)
    assert again == ray_ids
    for rid in ray_ids:
        assert sorted(r[0] for r in sqlite3.connect(tmp_path / "ray.db").execute(
            "SELECT created FROM rows WHERE run_id=?", (rid,))) == stamps[rid]
    with pytest.raises(EditlabError, match="already has .* rows"):
        run_on_ray({"name": MODEL}, requests, _configs()[:1], remote, ExecutorSpec("ray", workers=1), resume=False)


def test_a_worker_killed_mid_run_loses_and_duplicates_no_row(local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    psutil = pytest.importorskip("psutil")
    from editlab.distributed.driver import run_on_ray

    monkeypatch.setenv("EDITLAB_HOME", str(local_ray))
    requests = load_requests("builtin", limit=30)
    store = Store(tmp_path / "kill.db")
    killed: list[int] = []
    rows_at_kill: list[int] = []
    messages: list[str] = []

    def progress(i: int, n: int, msg: str) -> None:
        messages.append(msg)
        head = msg.split(" rows", 1)[0]
        if killed or " rows" not in msg or not head.isdigit() or int(head) < 3:
            return
        for p in psutil.process_iter(["pid", "cmdline"]):
            title = " ".join(p.info["cmdline"] or [])
            if "EditWorker.run_task" in title:
                os.kill(p.info["pid"], signal.SIGKILL)
                killed.append(p.info["pid"])
                rows_at_kill.append(int(head))
                return

    # every edit runs all its steps (stop_nll=0), so the workers are still busy when row 3 lands
    cfg = RunConfig(method="ft-m", hparams={"steps": 60, "lr": 1e-4, "stop_nll": 0.0})
    (rid,) = run_on_ray({"name": MODEL}, requests, [cfg], store, ExecutorSpec("ray", workers=2, max_retries=3),
                        resume=False, progress=progress)
    assert killed, "no worker was found to kill (the test did not exercise a failure)"
    assert rows_at_kill[0] < len(requests), "the worker was killed after every row had landed"
    assert any("a worker died" in m for m in messages)
    rows = list(sqlite3.connect(tmp_path / "kill.db").execute("SELECT row_key, case_id FROM rows WHERE run_id=?", (rid,)))
    # every request has its row (the store's key makes a second copy impossible; none was lost)
    assert sorted(k for k, _ in rows) == sorted(f"{i}:{r.case_id}" for i, r in enumerate(requests))


def test_plan_tasks_cuts_only_what_has_no_row() -> None:
    requests = load_requests("builtin", limit=10)
    cfg = RunConfig(method="ft-m", mode="batch", batch_size=3)
    done = {f"{i}:{requests[i].case_id}" for i in (0, 1, 2, 4)}  # the first batch is complete, the second is not
    tasks = plan_tasks(cfg, 10, done, requests, 0, n_workers=2)
    starts = [s for t in tasks for s in t.shard]
    assert starts == [3, 6, 9]
    assert sum(t.units for t in tasks) == 3 + 3 + 1
    seq = RunConfig(method="ft-m", mode="sequential", checkpoints=[2, 5])
    assert [t.shard for t in plan_tasks(seq, 10, set(), requests, 1, 2)] == [None]
    assert plan_tasks(seq, 10, {"ckpt:2", "ckpt:5"}, requests, 1, 2) == []


def test_executor_mistakes_are_named_before_anything_starts() -> None:
    with pytest.raises(OptionError, match="unknown --executor"):
        check_executor(ExecutorSpec("dask"))
    with pytest.raises(OptionError, match="--workers apply to --executor ray"):
        check_executor(ExecutorSpec("local", workers=4))
    with pytest.raises(OptionError, match="--workers must be"):
        check_executor(ExecutorSpec("ray", workers=0))
    for bad in ("localhost", "http://h:1", "h:port", "h:70000", "ray://head:10001"):
        with pytest.raises(OptionError, match="--ray-address"):
            normalise_address(bad)
    assert normalise_address(" head:6379 ") == "head:6379"
    assert normalise_address("") is None and normalise_address("auto") == "auto"
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(ExecutorError, match=f"cannot reach a Ray cluster at 127.0.0.1:{port}"):
        check_executor(ExecutorSpec("ray", address=f"127.0.0.1:{port}"))
    assert time.perf_counter() - t0 < 30


def test_cli_executor_errors_are_one_line(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    cases = [
        (["--executor", "spark"], "unknown --executor"),
        (["--workers", "3"], "apply to --executor ray only"),
        (["--executor", "ray", "--ray-address", "nohost"], "--ray-address"),
        (["--executor", "ray", "--ray-address", "ray://head:10001"], "cannot stream rows back"),
        (["--executor", "ray", "--device-map", "auto"], "--device-map applies to --executor local"),
    ]
    for extra, text in cases:
        res = CliRunner().invoke(app, ["eval", "--model", MODEL, "--method", "ft-m", "--db", str(db), *extra])
        assert res.exit_code == 2, res.output
        assert text in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
    assert not db.exists()


def test_a_restarted_worker_without_its_requests_says_so() -> None:
    """What the driver relies on to send a restarted worker its state again (not a task failure)."""
    from editlab.distributed.worker import EditWorker, WorkerStateLost

    w = EditWorker({"name": MODEL}, threads=1)
    with pytest.raises(WorkerStateLost):
        next(w.run_task(RunConfig(method="ft-m"), [0], "x.db", {}, {}))
    with pytest.raises(WorkerStateLost):
        next(w.run_suite_task(None, {}, 0, [], "x.db", {}))


def test_ctrl_c_keeps_the_committed_rows_and_resume_finishes_the_run(local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from editlab.distributed.driver import run_on_ray

    monkeypatch.setenv("EDITLAB_HOME", str(local_ray))
    requests = load_requests("builtin", limit=12)
    store = Store(tmp_path / "int.db")
    # every edit runs all its steps (stop_nll=0), so the workers are still busy when the run is interrupted
    cfg = RunConfig(method="ft-m", hparams={"steps": 60, "lr": 1e-4, "stop_nll": 0.0})

    def interrupt(i: int, n: int, msg: str) -> None:
        if msg.startswith("2 rows"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_on_ray({"name": MODEL}, requests, [cfg], store, ExecutorSpec("ray", workers=2), resume=False, progress=interrupt)
    kept = {r[0]: r[1] for r in sqlite3.connect(tmp_path / "int.db").execute("SELECT row_key, created FROM rows")}
    assert 2 <= len(kept) < len(requests)
    (rid,) = run_on_ray({"name": MODEL}, requests, [cfg], store, ExecutorSpec("ray", workers=2), resume=True)
    after = {r[0]: r[1] for r in sqlite3.connect(tmp_path / "int.db").execute("SELECT row_key, created FROM rows")}
    assert len(after) == len(requests) and all(after[k] == t for k, t in kept.items())  # nothing re-run


def test_pitfalls_on_ray_fill_the_runs_a_local_pitfalls_run_fills(local_ray, data_root, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`editlab pitfalls --executor ray`: a suite and the collapse run (sequential edits with probes at
    the checkpoints) give the run ids and rows of the local run; a resume adds nothing."""
    from editlab.pitfalls import plan as plan_mod
    from editlab.pitfalls.plan import Budget, plan_pitfalls
    from editlab.pitfalls.run import run_pitfalls, run_pitfalls_on_ray

    monkeypatch.setenv("EDITLAB_HOME", str(local_ray))
    monkeypatch.setitem(plan_mod.BUDGETS, "quick", Budget("quick", {"distortion": 2}, stream=3, checkpoints=(0, 1, 3),
                                                          probes=("nkl", "norm"), probe_budget="quick"))
    plan = plan_pitfalls(["ft-m"], "quick", only=["distortion", "collapse"], hparams={"layer": 0, "steps": 10, "lr": 0.01})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = Store(tmp_path / "local.db")
        local_runs = run_pitfalls(load_lm(MODEL), plan, local)
    finally:
        torch.set_num_threads(threads)
    remote = Store(tmp_path / "ray.db")
    ray_runs = run_pitfalls_on_ray({"name": MODEL}, plan, remote, ExecutorSpec("ray", workers=2))
    assert ray_runs == local_runs and set(ray_runs.collapse) == {"ft-m"}
    ids = list(local_runs.suites["distortion"].values()) + list(local_runs.collapse.values())
    for rid in ids:
        assert _rows(remote, rid) == _rows(local, rid) and _rows(local, rid), rid
    assert sorted(r.n_edits for r in remote.rows(ray_runs.collapse["ft-m"])) == [0, 1, 3]
    again = run_pitfalls_on_ray({"name": MODEL}, plan, remote, ExecutorSpec("ray", workers=1), resume=True)
    assert again == ray_runs and remote.count_rows() == local.count_rows()


def test_a_suite_on_ray_fills_the_runs_a_local_suite_fills(local_ray, data_root, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from editlab.distributed.driver import run_suite_on_ray
    from editlab.suites.runner import plan_suite, run_suite

    monkeypatch.setenv("EDITLAB_HOME", str(local_ray))
    plan = plan_suite("cfplus", ["ft-m"], limit=4)
    hp = {"ft-m": {"layer": 0, "steps": 10, "lr": 0.01}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = Store(tmp_path / "local.db")
        local_ids = run_suite(load_lm(MODEL), plan, local, hparams=hp)
    finally:
        torch.set_num_threads(threads)
    remote = Store(tmp_path / "ray.db")
    ray_ids = run_suite_on_ray({"name": MODEL}, plan, remote, ExecutorSpec("ray", workers=2), hparams=hp)
    assert ray_ids == local_ids
    for rid in local_ids.values():
        assert _rows(remote, rid) == _rows(local, rid) and len(_rows(local, rid)) == 4, rid
    again = run_suite_on_ray({"name": MODEL}, plan, remote, ExecutorSpec("ray", workers=1), hparams=hp, resume=True)
    assert again == ray_ids and remote.count_rows() == local.count_rows()


def test_a_sweep_on_ray_records_the_points_and_front_a_local_sweep_records(local_ray, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDITLAB_HOME", str(local_ray))
    base = ["sweep", "--method", "ft-m", "--model", MODEL, "--grid", "lr=1e-4,1e-2", "--grid", "steps=2,6",
            "--limit", "3", "--objective", "efficacy,neighborhood"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker (--cpus-per-worker 1)
    try:
        local = CliRunner().invoke(app, base + ["--db", str(tmp_path / "local.db")])
    finally:
        torch.set_num_threads(threads)
    assert local.exit_code == 0, local.output
    remote = CliRunner().invoke(app, base + ["--db", str(tmp_path / "ray.db"), "--executor", "ray", "--workers", "2"])
    assert remote.exit_code == 0, remote.output
    a, b = Store.open_readonly(tmp_path / "local.db"), Store.open_readonly(tmp_path / "ray.db")
    ids = sorted(r["run_id"] for r in a.runs())
    assert len(ids) == 4 and ids == sorted(r["run_id"] for r in b.runs())
    for rid in ids:
        assert _rows(b, rid) == _rows(a, rid) and len(_rows(a, rid)) == 3, rid
    assert a.records("sweep:") == b.records("sweep:")  # the same trials, values and Pareto front


def test_an_address_where_something_else_listens_is_refused_quickly() -> None:
    """A port held by a service that is not Ray (Ray's own connection retries never end there): refused
    in one line after the handshake's timeout, whether the service stays silent or hangs up."""
    import socket
    import threading

    from editlab.distributed.spec import check_reachable

    with socket.socket() as silent, socket.socket() as rude:
        for s in (silent, rude):
            s.bind(("127.0.0.1", 0))
            s.listen(4)

        def hang_up() -> None:
            conn, _ = rude.accept()
            conn.close()
        threading.Thread(target=hang_up, daemon=True).start()
        for s in (silent, rude):
            address = f"127.0.0.1:{s.getsockname()[1]}"
            t = time.perf_counter()
            with pytest.raises(ExecutorError, match=f"something answers at {address} but not as a Ray cluster"):
                check_reachable(address, timeout=0.5)
            assert time.perf_counter() - t < 5


def test_workers_with_other_versions_are_refused_before_any_row(local_ray, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose editlab (or torch, transformers) differs from the driver's would make other numbers:
    the run stops with one line naming the package and both versions, and nothing is written."""
    import editlab.runner.runner as runner_mod
    from editlab.distributed.driver import run_on_ray

    monkeypatch.setenv("EDITLAB_HOME", str(local_ray))
    real = runner_mod.versions()
    monkeypatch.setattr(runner_mod, "versions", lambda: {**real, "editlab": "0.0.0-driver"})  # the driver's only
    store = Store(tmp_path / "v.db")
    reqs = load_requests("builtin", limit=2)
    with pytest.raises(ExecutorError, match=rf"has editlab {real['editlab']}, the driver 0.0.0-driver .*install the same versions"):
        run_on_ray({"name": MODEL}, reqs, [RunConfig(method="ft-m")], store, ExecutorSpec("ray", workers=1), resume=False)
    assert store.count_rows() == 0


def test_a_learned_editor_without_its_network_stops_a_ray_run_before_any_run_is_written(
        local_ray, data_root, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a local run: no MEND network in the workers' cache, so the run and the suite stop on the lead
    worker's check with the training command, and the store gets no run (not one error row per record)."""
    from editlab.distributed.driver import run_on_ray, run_suite_on_ray
    from editlab.errors import CheckpointError
    from editlab.methods import METHODS
    from editlab.suites.runner import plan_suite

    monkeypatch.setenv("EDITLAB_HOME", str(local_ray))
    hp = dict(METHODS.entry("mend").meta["tiny_hparams"])
    store = Store(tmp_path / "m.db")
    with pytest.raises(CheckpointError, match="editlab train mend"):
        run_on_ray({"name": MODEL}, load_requests("builtin", limit=2), [RunConfig(method="ft-m"), RunConfig("mend", hparams=hp)],
                   store, ExecutorSpec("ray", workers=1), resume=False)
    with pytest.raises(CheckpointError, match="editlab train mend"):
        run_suite_on_ray({"name": MODEL}, plan_suite("cfplus", ["ft-m", "mend"], limit=2), store,
                         ExecutorSpec("ray", workers=1), hparams={"mend": hp})
    assert store.runs() == [] and store.count_rows() == 0
