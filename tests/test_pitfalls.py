"""`editlab pitfalls`: the plan refuses every mistake before a model loads, a run on the tiny trained
model fills every section it was asked for (suites beside their unedited rows, the collapse run with
probes at checkpoint 0 and later), resumes without re-running anything, and the report is one
self-contained HTML file with a section per pitfall, tables marked by direction and embedded plots."""

import re

import pytest
from typer.testing import CliRunner

from editlab.cli import app
from editlab.errors import EditlabError, OptionError
from editlab.models import load_lm
from editlab.pitfalls import plan as plan_mod
from editlab.pitfalls.plan import Budget, plan_pitfalls
from editlab.pitfalls.report import direction, write_pitfalls_report
from editlab.pitfalls.run import run_pitfalls
from editlab.runner import Store

FT = {"layer": 0, "steps": 10, "lr": 0.01}
TINY = Budget("quick", {"counterfact": 2, "zsre": 1, "knowedit": 1, "mquake": 1, "conflict": 1, "distortion": 2,
                        "specificity-plus": 1, "dialogue": 1},
              stream=3, checkpoints=(0, 1, 3), probes=("perplexity", "nkl", "norm"), probe_budget="quick")


@pytest.fixture
def tiny_budget(monkeypatch):
    monkeypatch.setitem(plan_mod.BUDGETS, "quick", TINY)


def test_plan_refuses_mistakes_before_any_model(data_root):
    with pytest.raises(OptionError, match="--budget must be one of quick, full"):
        plan_pitfalls(["rome"], "medium")
    with pytest.raises(OptionError, match="unknown pitfall section 'ripple'"):
        plan_pitfalls(["rome"], only=["ripple"])
    with pytest.raises(OptionError, match="named twice"):
        plan_pitfalls(["rome", "ROME"], only=["conflict"])
    with pytest.raises(EditlabError, match="unknown method 'nope'"):
        plan_pitfalls(["nope"], only=["conflict"])
    with pytest.raises(OptionError, match="no method"):
        plan_pitfalls([], only=["conflict"])
    with pytest.raises(OptionError, match="--on-bad must be stop or skip"):
        plan_pitfalls(["rome"], only=["conflict"], on_bad="maybe")


def test_records_lacking_a_field_are_skipped_or_stop_the_run_as_asked(data_root):
    from editlab.suites.base import RecordFieldError

    # zsRE's subject-replace record 17 names a subject its question does not contain (full budget: 34 per split)
    with pytest.warns(UserWarning, match="record 17"):
        skipped = plan_pitfalls(["rome"], "full", only=["portability"])
    units = skipped.suite_plans["zsre"].units  # the first 34 usable records of each split
    assert len(units) == 3 * 34 and "subject_replace:17" not in {u.key for u in units}
    with pytest.raises(RecordFieldError, match="record 17: subject 'Rio Grande 463'"):
        plan_pitfalls(["rome"], "full", only=["portability"], on_bad="stop")
    res = CliRunner().invoke(app, ["pitfalls", "--method", "rome", "--budget", "full", "--only", "portability",
                                   "--on-bad", "stop"])
    assert res.exit_code == 2 and "record 17" in res.output and "Traceback" not in res.output, res.output


def test_plan_reads_each_suite_at_the_budget(data_root):
    p = plan_pitfalls(["rome"], "quick", only=["conflict", "distortion", "collapse"])
    assert set(p.suite_plans) == {"conflict", "distortion"}
    assert len(p.suite_plans["distortion"].units) == 2 * plan_mod.BUDGETS["quick"].limits["distortion"]  # easy + hard
    assert len(p.stream) == plan_mod.BUDGETS["quick"].stream and p.stream[0].portability


def test_directions_of_report_metrics():
    assert direction("easy.D") is False and direction("coverage.CS") is True
    assert direction("retention_rewrite_acc") is True and direction("ppl_wikitext") is False
    assert direction("nkl_fixed") is False and direction("sst2_chance") is None


def test_run_and_report_on_the_tiny_model(data_root, tiny_budget, tmp_path):
    lm = load_lm("tiny-trained-llama")
    before = lm.current_fingerprint()
    plan = plan_pitfalls(["ft-m"], "quick", only=["portability", "distortion", "collapse"], hparams=FT)
    store = Store(tmp_path / "p.db")
    runs = run_pitfalls(lm, plan, store)
    assert set(runs.suites) == {"counterfact", "zsre", "knowedit"} | {"distortion"}
    assert set(runs.suites["distortion"]) == {"unedited", "ft-m"} and set(runs.collapse) == {"ft-m"}
    pts = {r.n_edits: r.metrics for r in store.rows(runs.collapse["ft-m"])}
    assert sorted(pts) == [0, 1, 3] and pts[0]["nkl_fixed"] == 0.0 and pts[3]["matrices_changed"] >= 1
    assert lm.current_fingerprint() == before and not lm.active_edits
    n_rows = sum(store.count_rows(r["run_id"]) for r in store.runs())
    with pytest.raises(EditlabError, match="--resume"):
        run_pitfalls(lm, plan, store)
    run_pitfalls(lm, plan, store, resume=True)  # nothing left to do: no new rows
    assert sum(store.count_rows(r["run_id"]) for r in store.runs()) == n_rows
    store.close()

    out = write_pitfalls_report(tmp_path / "p.db", runs, tmp_path / "r.html", budget="quick", model="tiny")
    html = out.read_text()
    for sec in ("portability", "distortion", "collapse"):
        assert f'id="{sec}"' in html
    assert 'id="conflict"' not in html  # not run, not shown
    assert html.count("data:image/png;base64,") >= 4  # relation bars, D histogram, collapse curves
    assert "one-hop portability by relation" in html and "Distribution of the JS divergence" in html
    assert not re.search(r'src="(?!data:)', html) and "<script" not in html  # one self-contained file
    assert "unedited (0 edits)" in html and "ft-m (3 edits)" in html
    assert '<td>ppl_wikitext</td><td class="dir">↓</td>' in html
    assert "distortion-mle: not in the quick budget" in html  # every suite is accounted for in the report


def test_every_suite_is_planned_or_says_why_not(data_root):
    """`editlab pitfalls` covers every registered suite: the batch-only and 100-case suites run in the full
    budget for the methods that can do them, and are named with the reason wherever they do not run."""
    from editlab.suites import SUITES

    in_sections = {s for sec in plan_mod.SECTIONS for s in sec.suites}
    assert in_sections == set(SUITES.names())
    quick = plan_pitfalls(["rome"], "quick", only=["multihop", "distortion"])
    assert set(quick.suite_plans) == {"mquake", "distortion"}
    assert set(quick.notes) == {"mquake-batch", "distortion-mle"} and "not in the quick budget" in quick.notes["mquake-batch"]
    full = plan_pitfalls(["rome", "memit"], "full", only=["distortion"])
    assert full.suite_plans["distortion"].methods == ["rome", "memit"]
    assert full.suite_plans["distortion-mle"].methods == ["memit"]  # ROME edits one request at a time
    assert "'rome'" in full.notes["distortion-mle"] and "is not run" not in full.notes["distortion-mle"]
    refused = plan_pitfalls(["melo", "rome"], "full", only=["distortion"])  # MELO re-edits no prompt: no round trip
    assert refused.suite_plans["distortion"].methods == ["rome"] and "'melo'" in refused.notes["distortion"]
    alone = plan_pitfalls(["rome"], "full", only=["distortion", "multihop"])
    assert "distortion-mle" not in alone.suite_plans and alone.notes["distortion-mle"].endswith("distortion-mle is not run")
    batch = alone.suite_plans["mquake-batch"]  # others edit the 100 cases in sequence
    assert len(batch.units) == 1 and len(batch.units[0].data) == 100


def test_cli_pitfalls_end_to_end_and_bad_input(data_root, tiny_budget, tmp_path):
    runner = CliRunner()
    args = ["pitfalls", "--model", "tiny-trained-llama", "--method", "ft-m", "--set", "layer=0", "--set", "steps=5",
            "--only", "conflict,collapse", "--db", str(tmp_path / "p.db"), "-o", str(tmp_path / "p.html")]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.html").is_file() and 'id="conflict"' in (tmp_path / "p.html").read_text()
    for bad, needle in ((["--budget", "huge"], "--budget must be one of"), (["--only", "nothing"], "unknown pitfall section"),
                        (["--only", " , "], "--only is empty"), (["-o", str(tmp_path)], "is a folder")):
        res = runner.invoke(app, args + bad)
        assert res.exit_code == 2 and needle in res.output, res.output


def test_best_value_is_marked_by_direction_among_edited_columns_only():
    from editlab.pitfalls.report import _table

    vals = [{"easy.D": 0.0, "coverage.CS": 1.0}, {"easy.D": 0.2, "coverage.CS": 0.4}, {"easy.D": 0.1, "coverage.CS": 0.6}]
    t = _table(["unedited", "rome", "memit"], vals, ["easy.D", "coverage.CS", "nope"], [False, True, True])
    rows = {name: (arrow, [c.best for c in cells]) for name, arrow, cells in t.rows}
    assert rows["easy.D"] == ("↓", [False, False, True])  # lower is better; the unedited 0.0 is never "best"
    assert rows["coverage.CS"] == ("↑", [False, False, True])
    assert rows["nope"] == ("", [False, False, False])  # no direction, no value: nothing marked
    single = _table(["unedited", "rome"], vals[:2], ["easy.D"], [False, True])
    assert [c.best for c in single.rows[0][2]] == [False, False]  # one edited column: no contest


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    import os
    import stat

    from editlab.fileio import atomic_dir, write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "r.html", "↑ best")
        with atomic_dir(tmp_path / "edit") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.html").stat().st_mode) == 0o644  # not tempfile's private 0600
    assert stat.S_IMODE((tmp_path / "edit").stat().st_mode) == 0o755
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == "↑ best"
