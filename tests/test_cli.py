import ast
import dataclasses
import warnings
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import editlab.cli
from editlab.cli import app
from editlab.errors import EditlabError

runner = CliRunner()

FT_M = ["--set", "layer=0", "--set", "steps=10", "--set", "lr=0.01"]


def test_edit_prints_before_and_after(tmp_path):
    result = runner.invoke(app, [
        "edit", "--model", "tiny-trained-llama", "--method", "ft-m", "--prompt", "Michael Jordan plays",
        "--subject", "Michael Jordan", "--target", "football", "--set", "layer=0", "--set", "steps=40", "--set", "lr=0.01",
        "--unrelated", "Toyota was founded in", "--max-new-tokens", "2", "--save", str(tmp_path / "edit"),
    ])
    assert result.exit_code == 0, result.output
    assert "before" in result.output and "after" in result.output
    assert "fo" in result.output
    assert (tmp_path / "edit" / "edit.json").exists()


def test_edit_bad_input_is_a_clear_error():
    result = runner.invoke(app, ["edit", "--model", "tiny-llama", "--prompt", "The tower is in", "--subject", "Eiffel", "--target", "Rome"])
    assert result.exit_code == 2
    assert "error" in result.output and "subject" in result.output
    result = runner.invoke(app, ["edit", "--model", "tiny-llama", "--method", "nope", "--prompt", "Eiffel is", "--subject", "Eiffel", "--target", "Rome"])
    assert result.exit_code == 2 and "unknown method" in result.output
    result = runner.invoke(app, ["edit", "--model", "tiny-llama", "--prompt", "Eiffel is", "--subject", "Eiffel", "--target", "Rome", "--set", "layer=99"])
    assert result.exit_code == 2 and "out of range" in result.output


def test_listings():
    for cmd, needle in (("methods", "rome"), ("models", "smollm2-135m"), ("datasets", "counterfact")):
        result = runner.invoke(app, [cmd])
        assert result.exit_code == 0 and needle in result.output


def test_methods_lists_every_registered_method_with_its_description():
    from editlab.methods.base import METHODS

    result = runner.invoke(app, ["methods"], env={"COLUMNS": "400"})  # wide enough that no cell wraps
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for entry in METHODS.entries():
        assert any(f" {entry.name} " in line and entry.description in line for line in lines), entry.name


def test_listing_reads_registries_and_plain_dicts():
    from editlab.cli.listing import registry_entries
    from editlab.registry import Registry

    reg: Registry[int] = Registry("thing")
    reg.register("a", "the first", lambda: 1, aliases=("alpha",), family="x")
    assert [(e.name, e.description, e.meta, e.aliases) for e in registry_entries(reg)] == [("a", "the first", {"family": "x"}, ("alpha",))]

    @dataclasses.dataclass(frozen=True)
    class Rec:
        name: str
        relpath: str
        description: str

    listed = registry_entries({"b": Rec("b", "dir/b.json", "the second")})
    assert [(e.name, e.description, e.meta) for e in listed] == [("b", "the second", {"relpath": "dir/b.json"})]


@pytest.fixture
def captured_configs(monkeypatch):
    """Every RunConfig the CLI hands to the runner (the run itself still happens)."""
    import editlab.runner

    seen = []
    real = editlab.runner.run

    def spy(lm, requests, cfg, store, **kw):
        seen.append(cfg)
        return real(lm, requests, cfg, store, **kw)

    monkeypatch.setattr(editlab.runner, "run", spy)
    return seen


@pytest.mark.parametrize("command", [["eval", "--method", "ft-m"], ["compare", "--methods", "ft-m"]])
def test_compare_applies_hparams_ppl_text_and_fluency_exactly_as_eval(command, tmp_path, captured_configs):
    from editlab.runner import Store

    (tmp_path / "hp.yaml").write_text("lr: 0.02\nsteps: 3\n")
    (tmp_path / "ppl.txt").write_text("Rome is the capital of Italy. " * 20)
    db = tmp_path / "r.db"
    result = runner.invoke(app, command + [
        "--model", "tiny-trained-llama", "--data", "builtin", "--limit", "1", "--db", str(db), "--mode", "sequential",
        "--checkpoints", "1", "--hparams", str(tmp_path / "hp.yaml"), "--set", "layer=0", "--set", "steps=7",
        "--ppl-text", str(tmp_path / "ppl.txt"), "--fluency",
    ])
    assert result.exit_code == 0, result.output
    [run] = Store(db).runs()
    assert run["method"] == "ft-m"
    assert run["hparams"]["layer"] == 0 and run["hparams"]["steps"] == 7  # --set wins over the file
    assert run["hparams"]["lr"] == pytest.approx(0.02)
    [cfg] = captured_configs
    assert cfg.fluency is True
    assert cfg.ppl_text == (tmp_path / "ppl.txt").read_text()
    [row] = list(Store(db).rows())
    assert "perplexity" in row.metrics


def test_eval_and_compare_take_the_same_options():
    group = typer.main.get_command(app)
    ctx = typer.Context(group)
    names = {cmd: {p.name for p in group.get_command(ctx, cmd).params} for cmd in ("eval", "compare")}
    assert names["eval"] - {"method"} == names["compare"] - {"methods"}
    assert {"set_", "hparams", "ppl_text", "fluency", "generation", "seed", "device", "dtype"} <= names["compare"]


def _one_error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


EDIT = ["edit", "--model", "tiny-llama", "--prompt", "Eiffel is", "--subject", "Eiffel", "--target", "Rome"]


@pytest.mark.parametrize("command", [EDIT, ["eval", "--model", "tiny-llama"], ["compare", "--methods", "ft,rome", "--model", "tiny-llama"]])
def test_bad_set_and_unknown_method_are_one_line_and_exit_2(command, tmp_path):
    db = ["--db", str(tmp_path / "r.db")] if command[0] != "edit" else []
    result = runner.invoke(app, command + db + ["--set", "layer"])
    assert result.exit_code == 2
    assert "--set expects key=value" in _one_error_line(result)
    if command[0] == "compare":
        bad_method = ["compare", "--methods", "rome,nope", "--model", "tiny-llama"]
    else:
        bad_method = command + ["--method", "nope"]
    result = runner.invoke(app, bad_method + db)
    assert result.exit_code == 2
    assert "unknown method 'nope'" in _one_error_line(result)
    assert "Traceback" not in result.output


def test_compare_reads_ppl_text_before_loading_the_model(tmp_path, monkeypatch):
    import editlab.models

    def no_load(*a, **k):
        raise AssertionError("model loaded before the options were checked")

    monkeypatch.setattr(editlab.models, "load_lm", no_load)
    result = runner.invoke(app, ["compare", "--methods", "ft-m", "--mode", "sequential", "--db", str(tmp_path / "r.db"),
                                 "--ppl-text", str(tmp_path / "missing.txt")])
    assert result.exit_code == 2
    assert "cannot read" in _one_error_line(result)


def test_debug_shows_the_traceback_of_an_editlab_error():
    result = runner.invoke(app, ["--debug"] + EDIT + ["--method", "nope"])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "UnknownMethodError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown method")


def test_unexpected_exception_is_short_with_its_location_and_asks_for_a_report(tmp_path, monkeypatch):
    import editlab.data

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(editlab.data, "load_requests", broken)
    args = ["eval", "--model", "tiny-llama", "--method", "ft-m", "--db", str(tmp_path / "r.db")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "RuntimeError: boom" in result.stderr
    assert f"{Path(__file__).name}:" in result.stderr and "in broken" in result.stderr
    assert "report" in result.stderr and "--debug" in result.stderr
    result = runner.invoke(app, ["--debug"] + args)
    assert result.exit_code == 1 and "Traceback" in result.stderr and "RuntimeError: boom" in result.stderr


def test_library_deprecation_warnings_do_not_reach_the_user(tmp_path, monkeypatch):
    import editlab.models

    def noisy_load(*a, **k):
        warnings.warn("`past_key_values` is deprecated", FutureWarning)
        warnings.warn("torch.old_api is deprecated", DeprecationWarning)
        warnings.warn("a warning the user can act on", UserWarning)
        raise EditlabError("stop here")

    monkeypatch.setattr(editlab.models, "load_lm", noisy_load)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters_before = list(warnings.filters)
        result = runner.invoke(app, EDIT)
        filters_after = list(warnings.filters)
    assert result.exit_code == 2 and "stop here" in result.stderr
    assert "deprecated" not in result.output
    categories = [w.category for w in caught]
    assert UserWarning in categories  # warnings from this spot do get through ...
    assert FutureWarning not in categories and DeprecationWarning not in categories  # ... except library noise
    assert filters_after == filters_before  # the CLI does not change the process's filters


def test_no_function_in_the_cli_takes_more_than_8_parameters():
    files = sorted(Path(editlab.cli.__file__).parent.glob("*.py"))
    assert {"__init__.py", "options.py", "common.py", "edit.py", "run.py", "results.py", "listing.py"} <= {f.name for f in files}
    counts = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = node.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
                counts[f"{f.name}:{getattr(node, 'name', 'lambda')}:{node.lineno}"] = n
    assert any(k.startswith("run.py:eval_") for k in counts)
    too_many = {k: n for k, n in counts.items() if n > 8}
    assert not too_many, too_many


def test_entry_points_exist():
    from editlab.cli import main

    assert callable(main) and isinstance(editlab.cli.app, typer.Typer)


def test_a_refused_sequential_edit_is_one_warning_line_and_the_run_completes(tmp_path, monkeypatch):
    from editlab.data import load_requests
    from editlab.errors import EditRequestError
    from editlab.methods.base import Editor
    from editlab.runner import Store

    refused = load_requests("builtin", limit=2)[1]
    real = Editor.apply

    def apply(editor, lm, requests, *a, **k):
        if getattr(requests, "prompt", None) == refused.prompt:
            raise EditRequestError("this method cannot write this fact")
        return real(editor, lm, requests, *a, **k)

    monkeypatch.setattr(Editor, "apply", apply)
    db = tmp_path / "r.db"
    result = runner.invoke(app, ["eval", "--method", "ft-m", "--model", "tiny-trained-llama", "--data", "builtin",
                                 "--limit", "3", "--mode", "sequential", "--checkpoints", "1,3", "--db", str(db)] + FT_M)
    assert result.exit_code == 0, result.output
    lines = [l for l in result.stderr.splitlines() if "refused edit 2" in l]
    assert len(lines) == 1 and lines[0].startswith("warning: ft-m refused edit 2 of the sequence"), result.stderr
    assert "UserWarning" not in result.stderr and "Traceback" not in result.stderr
    rows = {r.row_key: r for r in Store(db).rows()}
    assert sorted(rows) == ["ckpt:1", "ckpt:3", "refused:1"] and rows["ckpt:3"].metrics["edits_refused"] == 1.0
