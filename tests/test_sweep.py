"""`editlab sweep`: grid parsing, the Pareto front on a hand-made case, a real sweep on the tiny model
(every point an ordinary run, the record and the report's plot), and one-line errors before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from editlab.cli import app
from editlab.errors import OptionError
from editlab.runner import Store
from editlab.sweep import OBJECTIVES, grid_points, objective_values, parse_grid, pareto_front, split_values

MODEL = "tiny-trained-llama"


def test_grid_values_split_outside_brackets_and_points_cover_the_grid() -> None:
    assert split_values("3,4, 5") == ["3", "4", "5"]
    assert split_values("[3,4],[4,5]") == ["[3,4]", "[4,5]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    grid = parse_grid(["layer=3,4", "v_lr=0.1,0.5,1"])
    pts = grid_points(grid)
    assert len(pts) == 6 and pts[0] == {"layer": "3", "v_lr": "0.1"} and pts[-1] == {"layer": "4", "v_lr": "1"}
    assert grid_points(grid, samples=6) == pts  # every flat index decodes to its point, in grid order
    drawn = grid_points(grid, samples=4, seed=1)
    assert len(drawn) == 4 and all(p in pts for p in drawn) and len({tuple(p.items()) for p in drawn}) == 4
    assert drawn == grid_points(grid, samples=4, seed=1)  # seeded
    for bad, text in ((None, "at least one --grid"), (["layer"], "key=v1"), (["layer="], "empty value"),
                      (["layer=3,,4"], "empty value"), (["layer=3", "layer=4"], "twice"), (["layer=3,3"], "repeats")):
        with pytest.raises(OptionError, match=text):
            parse_grid(bad)
    with pytest.raises(OptionError, match=r"more than the 6 point\(s\)"):
        grid_points(grid, samples=7)


def test_pareto_front_by_hand() -> None:
    eff, nei, t = OBJECTIVES["efficacy"], OBJECTIVES["neighborhood"], OBJECTIVES["edit_time"]
    pts = [
        {"efficacy": 0.9, "neighborhood": 0.5, "edit_time": 2.0},  # front: best efficacy
        {"efficacy": 0.5, "neighborhood": 0.8, "edit_time": 2.0},  # front: best neighbourhood
        {"efficacy": 0.5, "neighborhood": 0.5, "edit_time": 2.0},  # dominated by both
        {"efficacy": 0.9, "neighborhood": 0.5, "edit_time": 2.0},  # equal to the first: neither dominates
        {"efficacy": 0.4, "neighborhood": 0.4, "edit_time": 0.5},  # dominated on 2 objectives, not with time
        {"efficacy": None, "neighborhood": 0.9, "edit_time": 0.1},  # incomplete: never on the front
        {"efficacy": float("nan"), "neighborhood": 0.95, "edit_time": 0.1},  # NaN: as incomplete
    ]
    assert pareto_front(pts, [eff, nei]) == [True, True, False, True, False, False, False]
    assert pareto_front(pts, [eff, nei, t]) == [True, True, False, True, True, False, False]


def test_objective_values_of_single_and_sequential_runs() -> None:
    from editlab.runner.store import Row

    rows = [Row("r", f"{i}:c", "c", "edit", 1, s, 0.1, {"efficacy_score": e}) for i, (s, e) in enumerate([(1.0, 1.0), (3.0, 0.0), (2.0, 1.0)])]
    v = objective_values(rows, "single", [OBJECTIVES["efficacy"], OBJECTIVES["edit_time"], OBJECTIVES["portability"]])
    assert v == {"efficacy": pytest.approx(2 / 3), "edit_time": 2.0, "portability": None}
    seq = [Row("r", "ckpt:2", None, "checkpoint", 2, 1.0, 0.1, {"retention_efficacy_score": 0.5}),
           Row("r", "ckpt:5", None, "checkpoint", 5, 1.0, 0.1, {"retention_efficacy_score": 0.25})]
    assert objective_values(seq, "sequential", [OBJECTIVES["efficacy"]]) == {"efficacy": 0.25}
    # an even count's median is the mean of the two middle times, not the upper one
    four = rows + [Row("r", "3:c", "c", "edit", 1, 10.0, 0.1, {"efficacy_score": 1.0})]
    assert objective_values(four, "single", [OBJECTIVES["edit_time"]]) == {"edit_time": 2.5}


def test_sweep_runs_every_point_records_the_front_and_reports_it(tmp_path: Path) -> None:
    db = tmp_path / "sweep.db"
    args = ["sweep", "--method", "ft-m", "--model", MODEL, "--grid", "lr=1e-4,1e-2", "--grid", "steps=2,6",
            "--limit", "4", "--objective", "efficacy,neighborhood", "--db", str(db)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    store = Store.open_readonly(db)
    runs = store.runs()
    assert len(runs) == 4 and all(store.count_rows(r["run_id"]) == 4 for r in runs)
    assert {(r["hparams"]["lr"], r["hparams"]["steps"]) for r in runs} == {(1e-4, 2), (1e-4, 6), (1e-2, 2), (1e-2, 6)}
    (record,) = store.records("sweep:").values()
    trials = record["trials"]
    assert [t["front"] for t in trials] == pareto_front([t["values"] for t in trials],
                                                        [OBJECTIVES["efficacy"], OBJECTIVES["neighborhood"]])
    assert any(t["front"] for t in trials)
    for t in trials:  # the recorded values are the runs' means
        rows = list(store.rows(t["run_id"]))
        assert t["values"]["efficacy"] == pytest.approx(sum(r.metrics["efficacy_score"] for r in rows) / len(rows))
    store.close()
    again = CliRunner().invoke(app, args + ["--resume"])  # finished points are not re-run
    assert again.exit_code == 0, again.output
    assert Store.open_readonly(db).count_rows() == 16
    out = tmp_path / "r.html"
    assert CliRunner().invoke(app, ["report", str(db), "-o", str(out)]).exit_code == 0
    text = out.read_text()
    assert "Sweep sweep-ft-m-" in text and "alt='Pareto front'" in text


@pytest.mark.parametrize("extra,text", [
    ([], "at least one --grid"),
    (["--grid", "nope=1,2"], "--grid point nope=1"),
    (["--grid", "lr=1e-3,fast"], "--grid point lr=fast"),
    (["--grid", "lr=1e-3", "--objective", "speed"], "unknown --objective 'speed'"),
    (["--grid", "lr=1e-3", "--samples", "3"], "more than the 1 point(s)"),
    (["--grid", "lr=1e-2,0.01"], "are the same hyper-parameters"),
    (["--grid", "lr=1e-3", "--suite", "portability"], "sweep runs on --data"),
])
def test_sweep_mistakes_are_one_line_and_write_nothing(tmp_path: Path, extra: list[str], text: str) -> None:
    db = tmp_path / "s.db"
    res = CliRunner().invoke(app, ["sweep", "--method", "ft-m", "--model", MODEL, "--db", str(db), *extra])
    assert res.exit_code == 2, res.output
    assert text in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not db.exists()
