import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from editlab.cli import app
from editlab.data import load_requests
from editlab.errors import EditlabError
from editlab.models import load_lm
from editlab.runner import RunConfig, Store, StoreError, run
from editlab.runner.store import SCHEMA_VERSION

FT = {"layer": 0, "steps": 10, "lr": 0.01}


@pytest.fixture
def lm():
    return load_lm("tiny-trained-llama")


def state(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def test_single_mode_rows_and_export(lm, tmp_path):
    reqs = load_requests("builtin", limit=4)
    store = Store(tmp_path / "r.db")
    before = state(lm)
    rid = run(lm, reqs, RunConfig("ft-m", hparams=FT), store)
    rows = list(store.rows(rid))
    assert [r.case_id for r in rows] == [r.case_id for r in reqs]
    assert all("rewrite_acc" in r.metrics and "locality_acc" in r.metrics and r.edit_s > 0 for r in rows)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    # a second identical run without resume is refused, with resume it adds nothing
    with pytest.raises(EditlabError, match="--resume"):
        run(lm, reqs, RunConfig("ft-m", hparams=FT), store, resume=False)
    run(lm, reqs, RunConfig("ft-m", hparams=FT), store, resume=True)
    assert len(list(store.rows(rid))) == 4
    recs = store.export_records()
    assert len(recs) == 4 and recs[0]["method"] == "ft-m" and "rewrite_acc" in recs[0]
    # pre-edit values were stored once for this model
    assert store.load_pre_edit(lm.base_fingerprint)


def test_batch_and_sequential_modes(lm, tmp_path):
    reqs = load_requests("builtin", limit=6)
    store = Store(tmp_path / "r.db")
    before = state(lm)
    rid = run(lm, reqs, RunConfig("ft-m", mode="batch", batch_size=3, hparams=FT), store)
    assert [r.n_edits for r in store.rows(rid)] == [3] * 6
    rid = run(lm, reqs, RunConfig("ft-m", mode="sequential", checkpoints=[1, 3, 6], hparams=FT,
                                  ppl_text="Paris is the capital of France. " * 40), store)
    pts = list(store.rows(rid))
    assert [p.n_edits for p in pts] == [1, 3, 6] and all(p.kind == "checkpoint" for p in pts)
    assert all("retention_rewrite_acc" in p.metrics and "newest_rewrite_acc" in p.metrics and p.metrics["perplexity"] > 1 for p in pts)
    run(lm, reqs, RunConfig("ft-m", mode="sequential", checkpoints=[1, 3, 6], hparams=FT,
                            ppl_text="Paris is the capital of France. " * 40), store, resume=True)
    assert len(list(store.rows(rid))) == 3
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_bad_run_configs(lm, tmp_path):
    reqs = load_requests("builtin", limit=3)
    store = Store(tmp_path / "r.db")
    with pytest.raises(EditlabError, match="does not support batch"):
        run(lm, reqs, RunConfig("rome", mode="batch", batch_size=2), store)
    with pytest.raises(EditlabError, match="unknown mode"):
        run(lm, reqs, RunConfig("ft-m", mode="weird"), store)
    with pytest.raises(EditlabError, match="outside 0..3"):
        run(lm, reqs, RunConfig("ft-m", mode="sequential", checkpoints=[5]), store)


def test_store_refuses_foreign_files(tmp_path):
    p = tmp_path / "notes.db"
    p.write_text("my precious notes")
    with pytest.raises(StoreError, match="not an SQLite database"):
        Store(p)
    assert p.read_text() == "my precious notes"
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="not an editlab store"):
        Store(other)
    old = tmp_path / "old.db"
    Store(old).close()
    con = sqlite3.connect(old)
    con.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="schema version"):
        Store(old)


def test_write_failure_keeps_whole_rows_and_resume_completes(lm, tmp_path, monkeypatch):
    reqs = load_requests("builtin", limit=5)
    store = Store(tmp_path / "r.db")
    real = Store.add_row
    calls = {"n": 0}

    def failing(self, row):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(self, row)

    monkeypatch.setattr(Store, "add_row", failing)
    before = state(lm)
    with pytest.raises(OSError, match="disk full"):
        run(lm, reqs, RunConfig("ft-m", hparams=FT), store)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    monkeypatch.setattr(Store, "add_row", real)
    assert len(list(store.rows())) == 2
    run(lm, reqs, RunConfig("ft-m", hparams=FT), store, resume=True)
    keys = [r.row_key for r in store.rows()]
    assert len(keys) == 5 and len(set(keys)) == 5


def test_ctrl_c_keeps_rows_and_says_how_to_resume(tmp_path, monkeypatch):
    import editlab.runner.runner as rr

    real = rr.evaluate_requests
    calls = {"n": 0}

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rr, "evaluate_requests", interrupt)
    db = tmp_path / "r.db"
    args = ["eval", "--model", "tiny-trained-llama", "--method", "ft-m", "--data", "builtin", "--limit", "5", "--db", str(db),
            "--set", "layer=0", "--set", "steps=10", "--set", "lr=0.01"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 130
    assert "--resume" in res.output
    assert len(list(Store(db).rows())) == 2
    monkeypatch.setattr(rr, "evaluate_requests", real)
    res = CliRunner().invoke(app, args + ["--resume"])
    assert res.exit_code == 0, res.output
    keys = [r.row_key for r in Store(db).rows()]
    assert len(keys) == 5 and len(set(keys)) == 5


def test_killed_process_resumes_with_every_row_once(tmp_path):
    db = tmp_path / "r.db"
    cmd = [sys.executable, "-m", "editlab.cli", "eval", "--model", "tiny-trained-llama", "--method", "ft-m", "--data", "builtin",
           "--limit", "12", "--db", str(db), "--set", "layer=0", "--set", "steps=300", "--set", "lr=0.0001",
           "--set", "stop_nll=0"]
    # stop_nll=0 makes every edit run all 300 steps (~0.8 s a row here): the 12 rows cannot all land
    # between two polls, as they did on a fast CI machine with early-stopping 10-step edits
    env = dict(os.environ)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    n = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            con = sqlite3.connect(db, timeout=1)
            n = con.execute("SELECT count(*) FROM rows").fetchone()[0]
            con.close()
        except sqlite3.Error:
            n = 0
        if n >= 3:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(60)
    assert 3 <= n < 12, n
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    con = sqlite3.connect(db)
    keys = [r[0] for r in con.execute("SELECT row_key FROM rows")]
    assert len(keys) == 12 and len(set(keys)) == 12


def test_report_and_export_cli(lm, tmp_path):
    reqs = load_requests("builtin", limit=3)
    db = tmp_path / "r.db"
    store = Store(db)
    run(lm, reqs, RunConfig("ft-m", hparams=FT), store)
    run(lm, reqs, RunConfig("ft-m", mode="sequential", checkpoints=[1, 3], hparams=FT, ppl_text="Some text here. " * 50), store)
    r = CliRunner()
    res = r.invoke(app, ["report", str(db), "-o", str(tmp_path / "rep.html")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "rep.html").read_text()
    assert "Methods × metrics" in page and "data:image/png;base64," in page and "Sequential editing" in page
    assert page.count("<img") >= 2
    res = r.invoke(app, ["export", str(db), "--format", "json", "-o", str(tmp_path / "x.json")])
    assert res.exit_code == 0
    assert len(json.loads((tmp_path / "x.json").read_text())) == 5
    res = r.invoke(app, ["export", str(tmp_path / "missing.db")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_unknown_dataset_via_cli(tmp_path):
    res = CliRunner().invoke(app, ["eval", "--model", "tiny-llama", "--data", "nope", "--db", str(tmp_path / "r.db")])
    assert res.exit_code == 2 and "unknown dataset" in res.output
