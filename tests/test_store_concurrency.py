"""The result store under concurrency and damage: several processes creating and writing one database
lose and duplicate nothing, readers never turn a file into a store, a damaged file names its recovery."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest

from editlab.errors import StoreBusyError, StoreCorruptError, StoreError
from editlab.runner import store as store_mod
from editlab.runner.store import Row, Store

# fork: the children inherit the imported modules (a spawned child would re-import torch each time)
CTX = mp.get_context("fork")


def _row(run_id: str, key: str, value: float = 1.0) -> Row:
    return Row(run_id, key, None, "edit", 1, 0.01, 0.01, {"efficacy_score": value})


def _create_and_write(db: str, run_id: str, keys: list[str], barrier, errors) -> None:
    try:
        barrier.wait()  # every process opens the (new) database at the same moment
        s = Store(db)
        s.ensure_run(run_id, method="ft", mode="single")
        for k in keys:
            s.add_row(_row(run_id, k))
        s.close()
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which asserts there are none
        errors.put(f"{type(e).__name__}: {e}")


def _run_writers(db: Path, jobs: list[tuple[str, list[str]]]) -> list[str]:
    barrier = CTX.Barrier(len(jobs))
    errors = CTX.Queue()
    procs = [CTX.Process(target=_create_and_write, args=(str(db), rid, keys, barrier, errors)) for rid, keys in jobs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    out = []
    while not errors.empty():
        out.append(errors.get())
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return out


@pytest.mark.parametrize("attempt", range(3))
def test_processes_creating_one_new_database_all_succeed(tmp_path, attempt):
    db = tmp_path / "new.db"
    errors = _run_writers(db, [(f"run{i}", [f"k{j}" for j in range(5)]) for i in range(4)])
    assert errors == []
    s = Store.open_readonly(db)
    assert {r["run_id"] for r in s.runs()} == {"run0", "run1", "run2", "run3"}
    assert s.count_rows() == 20


def test_writers_of_the_same_run_skip_existing_rows_instead_of_failing(tmp_path):
    db = tmp_path / "same.db"
    keys = [f"{i}:case{i}" for i in range(30)]
    # four copies of the same run, each starting at a different row and wrapping around
    jobs = [("same-run", keys[i * 7:] + keys[: i * 7]) for i in range(4)]
    assert _run_writers(db, jobs) == []
    with Store.open_readonly(db) as s:
        got = [r.row_key for r in s.rows("same-run")]
        assert sorted(got) == sorted(keys)  # nothing lost, nothing twice
        assert len(s.runs()) == 1


def test_add_row_reports_whether_it_wrote(tmp_path):
    s = Store(tmp_path / "r.db")
    s.ensure_run("r", method="ft")
    assert s.add_row(_row("r", "a", 1.0)) is True
    assert s.add_row(_row("r", "a", 2.0)) is False
    assert [r.metrics for r in s.rows("r")] == [{"efficacy_score": 1.0}]  # the first write is kept
    assert s.ensure_run("r", method="ft") is True


def test_schema_creation_is_idempotent_on_an_existing_store(tmp_path):
    db = tmp_path / "r.db"
    Store(db).close()
    s = Store(db)
    s.ensure_run("r", method="ft")
    s.close()
    assert len(Store(db).runs()) == 1


def _hold_lock(db: str, seconds: float, ready, errors) -> None:
    import time

    try:
        con = sqlite3.connect(db, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
        ready.set()
        time.sleep(seconds)
        con.execute("COMMIT")
        con.close()
    except BaseException as e:  # noqa: BLE001
        errors.put(repr(e))


def _locked_by_another_process(db: Path, seconds: float):
    ready, errors = CTX.Event(), CTX.Queue()
    p = CTX.Process(target=_hold_lock, args=(str(db), seconds, ready, errors))
    p.start()
    assert ready.wait(30)
    return p


def test_a_writer_waits_for_a_lock_and_then_writes(tmp_path, monkeypatch):
    db = tmp_path / "busy.db"
    Store(db).close()
    monkeypatch.setattr(store_mod, "BUSY_TIMEOUT_S", 0.2)  # shorter than the lock: the retries must carry it
    s = Store(db)
    s.ensure_run("r", method="ft")
    holder = _locked_by_another_process(db, 0.8)
    assert s.add_row(_row("r", "k")) is True
    holder.join(30)
    assert s.count_rows("r") == 1


def test_a_lock_held_past_every_retry_is_a_named_error(tmp_path, monkeypatch):
    db = tmp_path / "busy.db"
    Store(db).close()
    monkeypatch.setattr(store_mod, "BUSY_TIMEOUT_S", 0.05)
    monkeypatch.setattr(store_mod, "RETRIES", 1)
    s = Store(db)
    s.ensure_run("r", method="ft")
    holder = _locked_by_another_process(db, 3.0)
    with pytest.raises(StoreBusyError, match="locked"):
        s.add_row(_row("r", "k"))
    holder.join(30)
    assert s.count_rows("r") == 0
    assert s.add_row(_row("r", "k")) is True  # no transaction was left open


# ----------------------------------------------------------------------------------- read-only opening
def test_readonly_refuses_missing_empty_and_foreign_files_without_touching_them(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store.open_readonly(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()

    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with pytest.raises(StoreError, match="empty"):
        Store.open_readonly(empty)
    assert empty.read_bytes() == b""

    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE people (name TEXT)")
    con.commit()
    con.close()
    before = foreign.read_bytes()
    with pytest.raises(StoreError, match="not an editlab store"):
        Store.open_readonly(foreign)
    with pytest.raises(StoreError, match="not an editlab store"):
        Store(foreign)
    assert foreign.read_bytes() == before

    text = tmp_path / "notes.db"
    text.write_text("hello, not a database\n" * 10)
    with pytest.raises(StoreError, match="not an SQLite database"):
        Store(text)
    assert text.read_text() == "hello, not a database\n" * 10


def test_readonly_store_cannot_write(tmp_path):
    db = tmp_path / "r.db"
    with Store(db) as s:
        s.ensure_run("r", method="ft")
        s.add_row(_row("r", "a"))
    before = db.read_bytes()
    with Store.open_readonly(db) as ro:
        assert [r.row_key for r in ro.rows()] == ["a"]
        with pytest.raises(StoreError, match="read-only"):
            ro.add_row(_row("r", "b"))
        with pytest.raises(StoreError, match="read-only"):
            ro.ensure_run("other")
    assert Store.open_readonly(db).count_rows() == 1
    assert db.read_bytes() == before


def test_a_damaged_database_names_the_file_and_the_recovery_step(tmp_path):
    db = tmp_path / "r.db"
    with Store(db) as s:
        s.ensure_run("r", method="ft")
        for i in range(200):
            s.add_row(_row("r", f"k{i}", float(i)))
    data = bytearray(db.read_bytes())
    data[100:4096] = b"\x00" * (4096 - 100)  # the first page: the schema itself
    db.write_bytes(bytes(data))
    for opener in (Store.open_readonly, Store):
        with pytest.raises(StoreCorruptError) as info:
            opener(db)
        msg = str(info.value)
        assert str(db) in msg and "integrity_check" in msg and ".recover" in msg and "\n" not in msg


def test_a_folder_as_database_path_is_a_named_error(tmp_path):
    with pytest.raises(StoreError, match="is a folder"):
        Store(tmp_path)
