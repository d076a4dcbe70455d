"""Bad inputs, table-driven, over every command and every public entry point.

Each CLI case must exit with status 2 and print exactly one `error:` line (no traceback) that contains
the expected words; the model must be loaded only by cases whose mistake needs the model to be seen
(`late`), and its weights (fingerprint) and the result database's runs and rows must be unchanged.
Each API case must raise the named editlab error (also the built-in type Python users catch), with a
one-line message, and leave the model and its edit stack as they were.
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from typer.testing import CliRunner

import editlab.cli.edit
import editlab.cli.run
from editlab import errors as E
from editlab.cli import app
from editlab.models import load_lm
from editlab.runner.store import Row, Store

runner = CliRunner()
REQ = ["--prompt", "The Eiffel Tower is located in the city of", "--subject", "Eiffel Tower", "--target", "Rome"]
EDIT = ["edit", "--model", "tiny-llama", "--method", "rome"] + REQ


@pytest.fixture(scope="module")
def lm():
    return load_lm("tiny-llama")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Files the cases point at: a result store with rows, and a collection of broken inputs."""
    db = tmp_path / "runs.db"
    with Store(db) as s:
        s.ensure_run("ft-single-x", model="tiny-llama", method="ft", mode="single", dataset="builtin", n_requests=2)
        for i in range(2):
            s.add_row(Row("ft-single-x", f"{i}:c{i}", f"c{i}", "edit", 1, 0.1, 0.1, {"efficacy_score": 1.0}))
    out = {"db": db, "dir": tmp_path}
    (tmp_path / "a_file").write_text("x")
    out["a_file"] = tmp_path / "a_file"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    out["full"] = tmp_path / "full"
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "nofield.json").write_text(json.dumps([{"prompt": "x", "target_new": "y"}]))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    (tmp_path / "empty.db").write_bytes(b"")
    (tmp_path / "text.db").write_text("not a database at all\n" * 5)
    con = sqlite3.connect(tmp_path / "foreign.db")
    con.execute("CREATE TABLE people (name TEXT)")
    con.commit()
    con.close()
    damaged = bytearray(db.read_bytes())
    damaged[100:4096] = b"\x00" * (4096 - 100)
    (tmp_path / "damaged.db").write_bytes(bytes(damaged))
    (tmp_path / "empty.txt").write_text("  \n")
    return out


@dataclass
class CliCase:
    id: str
    args: list[str]
    needle: str
    late: bool = False  # the mistake can only be seen with the model loaded
    torch: bool = False  # the check itself needs torch (a CUDA lookup); every other early case is answered without it


def _db(*args: str) -> list[str]:
    return [*args, "--db", "{db}"]


CLI_CASES = [
    # edit: the request
    CliCase("subject-not-in-prompt", ["edit", "--model", "tiny-llama", "--prompt", "The tower is in", "--subject", "Eiffel",
                                      "--target", "Rome"], "does not occur in prompt"),
    CliCase("blank-target", ["edit", "--model", "tiny-llama", "--prompt", "Eiffel is in", "--subject", "Eiffel", "--target", "  "],
            "target_new is empty"),
    CliCase("target-equals-true", EDIT + ["--target-true", "rome"], "would change nothing"),
    CliCase("prompt-over-length-cap", ["edit", "--model", "tiny-llama", "--prompt", "Eiffel " + "x" * 10_001, "--subject",
                                       "Eiffel", "--target", "Rome"], "characters long"),
    CliCase("prompt-over-context", ["edit", "--model", "tiny-llama", "--prompt", "Eiffel " + "is big " * 400, "--subject",
                                    "Eiffel", "--target", "Rome"], "exceeds the model's context", late=True),
    CliCase("blank-related-prompt", EDIT + ["--related", " "], "prompt 1 is empty"),
    CliCase("max-new-tokens-zero", EDIT + ["--max-new-tokens", "0"], "--max-new-tokens"),
    # method and hyper-parameters
    CliCase("unknown-method", ["edit", "--model", "tiny-llama", "--method", "nope"] + REQ, "unknown method"),
    CliCase("set-without-equals", EDIT + ["--set", "layer"], "--set expects key=value"),
    CliCase("set-empty-key", EDIT + ["--set", "=3"], "--set expects key=value"),
    CliCase("unknown-hparam", EDIT + ["--set", "nope=1"], "unknown hyper-parameter"),
    CliCase("hparam-wrong-type", EDIT + ["--set", "v_steps=abc"], "v_steps"),
    CliCase("hparam-nan", EDIT + ["--set", "v_lr=nan"], "v_lr"),
    CliCase("hparam-inf", EDIT + ["--set", "clamp_norm_factor=inf"], "clamp_norm_factor"),
    CliCase("hparam-fractional-int", EDIT + ["--set", "v_steps=2.5"], "v_steps"),
    CliCase("hparam-steps-too-many", EDIT + ["--set", "v_steps=10000000"], "out of range"),
    CliCase("hparam-negative-layer", EDIT + ["--set", "layer=-1"], "out of range"),
    CliCase("hparam-layer-past-model", EDIT + ["--set", "layer=99"], "out of range", late=True),
    CliCase("hparam-list-of-words", ["edit", "--model", "tiny-llama", "--method", "memit"] + REQ + ["--set", "layers=a,b"],
            "list of integers"),
    CliCase("hparams-file-missing", EDIT + ["--hparams", "{dir}/missing.yaml"], "cannot read hparams file"),
    CliCase("hparams-file-invalid-yaml", EDIT + ["--hparams", "{dir}/broken.yaml"], "not valid YAML"),
    CliCase("hparams-file-not-mapping", EDIT + ["--hparams", "{dir}/list.yaml"], "must hold a mapping"),
    # model options
    CliCase("unknown-dtype", EDIT + ["--dtype", "fp8"], "unknown dtype"),
    CliCase("unparsable-device", EDIT + ["--device", "gpu"], "unknown device"),
    CliCase("absent-device", EDIT + ["--device", "cuda:99"], "not available", torch=True),
    CliCase("empty-model", ["edit", "--model", "", "--method", "rome"] + REQ, "no model given"),
    CliCase("model-typo", ["edit", "--model", "smollm2-13m", "--method", "rome"] + REQ, "did you mean 'smollm2-135m'"),
    CliCase("hub-id-not-allowed", ["edit", "--model", "openai-community/gpt2-not-cached", "--method", "rome"] + REQ,
            "--allow-hub"),
    CliCase("model-missing-folder", ["edit", "--model", "./no/such/model", "--method", "rome"] + REQ, "not found"),
    CliCase("model-is-a-file", ["edit", "--model", "{a_file}", "--method", "rome"] + REQ, "is a file"),
    CliCase("model-folder-without-config", ["edit", "--model", "{full}", "--method", "rome"] + REQ, "no config.json"),
    CliCase("unknown-tiny-model", ["edit", "--model", "tiny-nope", "--method", "rome"] + REQ, "unknown tiny model"),
    # output of edit
    CliCase("save-to-a-file", EDIT + ["--save", "{a_file}"], "is a file"),
    CliCase("save-into-foreign-folder", EDIT + ["--save", "{full}"], "holds other files"),
    # eval / compare: run plan
    CliCase("unknown-mode", _db("eval", "--model", "tiny-llama", "--mode", "parallel"), "unknown --mode"),
    CliCase("batch-size-zero", _db("eval", "--model", "tiny-llama", "--mode", "batch", "--batch-size", "0"), "--batch-size"),
    CliCase("batch-with-single-request-method", _db("eval", "--model", "tiny-llama", "--method", "rome", "--mode", "batch",
                                                     "--batch-size", "2"), "one request at a time"),
    CliCase("checkpoints-not-numbers", _db("eval", "--model", "tiny-llama", "--mode", "sequential", "--checkpoints", "a,b"),
            "comma-separated integers"),
    CliCase("checkpoints-unsorted", _db("eval", "--model", "tiny-llama", "--mode", "sequential", "--checkpoints", "5,2"),
            "give them as 2,5"),
    CliCase("checkpoints-duplicated", _db("eval", "--model", "tiny-llama", "--mode", "sequential", "--checkpoints", "0,2,2"),
            "given twice"),
    CliCase("checkpoint-negative", _db("eval", "--model", "tiny-llama", "--mode", "sequential", "--checkpoints=-1,2"), "0 or more"),
    CliCase("probe-unknown", _db("eval", "--model", "tiny-llama", "--mode", "sequential", "--probes", "perplexity,ppl"),
            "unknown probe 'ppl'"),
    CliCase("probes-in-single-mode", _db("eval", "--model", "tiny-llama", "--probes", "nkl"), "add --mode sequential"),
    CliCase("probe-budget-unknown", _db("eval", "--model", "tiny-llama", "--mode", "sequential", "--probes", "norm",
                                        "--probe-budget", "huge"), "--probe-budget must be one of"),
    CliCase("checkpoint-past-requests", _db("eval", "--model", "tiny-llama", "--mode", "sequential", "--limit", "2",
                                            "--checkpoints", "5"), "outside 0..2"),
    CliCase("checkpoints-in-single-mode", _db("eval", "--model", "tiny-llama", "--checkpoints", "1"), "sequential only"),
    CliCase("ppl-text-missing", _db("eval", "--model", "tiny-llama", "--mode", "sequential", "--ppl-text", "{dir}/nope.txt"),
            "cannot read --ppl-text"),
    CliCase("ppl-text-empty", _db("eval", "--model", "tiny-llama", "--mode", "sequential", "--ppl-text", "{dir}/empty.txt"),
            "is empty"),
    CliCase("compare-no-methods", _db("compare", "--model", "tiny-llama", "--methods", " , "), "no method given"),
    CliCase("compare-one-unknown-method", _db("compare", "--model", "tiny-llama", "--methods", "ft,nope"), "unknown method"),
    CliCase("eval-hparam-out-of-range-for-model", _db("eval", "--model", "tiny-llama", "--method", "ft", "--set", "layer=50"),
            "out of range", late=True),
    # eval: data
    CliCase("data-unknown-name", _db("eval", "--model", "tiny-llama", "--data", "nosuchset"), "unknown dataset"),
    CliCase("data-missing-file", _db("eval", "--model", "tiny-llama", "--data", "{dir}/missing.json"), "not found"),
    CliCase("data-invalid-json", _db("eval", "--model", "tiny-llama", "--data", "{dir}/bad.json"), "not valid JSON"),
    CliCase("data-empty-file", _db("eval", "--model", "tiny-llama", "--data", "{dir}/empty.json"), "empty"),
    CliCase("data-record-lacks-field", _db("eval", "--model", "tiny-llama", "--data", "{dir}/nofield.json", "--format",
                                           "counterfact-compact"), "lacks field"),
    CliCase("data-unknown-format", _db("eval", "--model", "tiny-llama", "--data", "{dir}/nofield.json", "--format", "xml"),
            "unknown dataset format"),
    CliCase("limit-zero", _db("eval", "--model", "tiny-llama", "--limit", "0"), "--limit"),
    # eval: database
    CliCase("db-is-a-folder", ["eval", "--model", "tiny-llama", "--db", "{dir}"], "is a folder"),
    CliCase("db-is-a-text-file", ["eval", "--model", "tiny-llama", "--db", "{dir}/text.db"], "not an SQLite database"),
    CliCase("db-is-a-foreign-database", ["eval", "--model", "tiny-llama", "--db", "{dir}/foreign.db"], "not an editlab store"),
    CliCase("db-is-damaged", ["eval", "--model", "tiny-llama", "--db", "{dir}/damaged.db"], "integrity_check"),
    # export / report
    CliCase("export-missing-db", ["export", "{dir}/missing.db"], "does not exist"),
    CliCase("export-empty-db", ["export", "{dir}/empty.db"], "empty file"),
    CliCase("export-foreign-db", ["export", "{dir}/foreign.db"], "not an editlab store"),
    CliCase("export-damaged-db", ["export", "{dir}/damaged.db"], ".recover"),
    CliCase("export-unknown-format", ["export", "{db}", "--format", "xml"], "unknown export format"),
    CliCase("export-out-under-a-file", ["export", "{db}", "-o", "{a_file}/rows.csv"], "is a file"),
    CliCase("report-out-is-a-folder", ["report", "{db}", "-o", "{dir}"], "is a folder"),
    CliCase("report-text-db", ["report", "{dir}/text.db", "-o", "{dir}/r.html"], "not an SQLite database"),
    # demo
    CliCase("demo-n-zero", ["demo", "--n", "0", "--out", "{dir}/demo"], "--n"),
    CliCase("demo-out-is-a-file", ["demo", "--out", "{a_file}"], "is a file"),
    CliCase("demo-model-typo", ["demo", "--model", "tiny-lama", "--out", "{dir}/demo"], "did you mean"),
    # serve
    CliCase("serve-remote-host", ["serve", "--host", "0.0.0.0"], "--allow-remote"),
    CliCase("serve-port-out-of-range", ["serve", "--port", "0"], "1..65535"),
    CliCase("serve-model-typo", ["serve", "--model", "tiny-lama"], "did you mean"),
]


def _snapshot_db(db: Path) -> tuple[list[Any], list[Any]]:
    with Store.open_readonly(db) as s:
        return [r["run_id"] for r in s.runs()], [(r.run_id, r.row_key, r.metrics) for r in s.rows()]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_bad_input(case: CliCase, files, lm, monkeypatch):
    loads: list[str] = []

    def load_model(opts):  # the shared tiny model, counted: early mistakes must never load one
        loads.append(opts.model)
        return lm

    monkeypatch.setattr(editlab.cli.edit, "load_model", load_model)
    monkeypatch.setattr(editlab.cli.run, "load_model", load_model)
    fingerprint, db_before = lm.fingerprint(), _snapshot_db(files["db"])
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in case.args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert case.needle in lines[0], lines[0]
    assert bool(loads) == case.late, f"model loaded: {loads}"
    assert lm.fingerprint() == fingerprint and lm.active_edits == []
    assert _snapshot_db(files["db"]) == db_before


_COLD = """
import json, sys
from typer.testing import CliRunner
from editlab.cli import app
cases, files = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for case_id, args in cases:
    result = CliRunner().invoke(app, [a.format(**files) for a in args])
    heavy = sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules)
    if result.exit_code != 2 or heavy:
        print(json.dumps([case_id, result.exit_code, heavy]))
        break
"""


def test_early_mistakes_are_answered_without_importing_torch(files):
    """Every mistake caught before the model loads is caught before torch is imported too (a fresh
    interpreter runs the cases in turn and stops at the first that imports torch, transformers or
    numpy), so a cold `editlab` answers it in well under a second instead of after torch's 2-10 s."""
    import subprocess
    import sys

    cases = [(c.id, c.args) for c in CLI_CASES if not c.late and not c.torch]
    paths = {k: str(v) for k, v in files.items()}
    out = subprocess.run([sys.executable, "-c", _COLD, json.dumps(cases), json.dumps(paths)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"case (id, exit code, heavy modules imported): {out.stdout.strip()}"


def test_there_are_at_least_forty_distinct_cli_cases():
    assert len({c.id for c in CLI_CASES}) == len(CLI_CASES) >= 40
    assert {c.args[0] for c in CLI_CASES} >= {"edit", "eval", "compare", "export", "report", "demo", "serve"}


# ------------------------------------------------------------------------------------------------- API
def _api_cases() -> list[tuple[str, Callable[[Any, dict[str, Path]], Any], type[Exception], type[Exception]]]:
    from editlab import EditRequest, get_editor
    from editlab.data import load_requests
    from editlab.methods import Edit
    from editlab.methods.base import METHODS
    from editlab.requests import check_fits

    good = lambda: EditRequest.create("The Eiffel Tower is located in", "Eiffel Tower", "Rome")  # noqa: E731
    rome_hp = dict(METHODS.entry("rome").meta["tiny_hparams"])
    return [
        ("request-prompt-none", lambda lm, f: EditRequest.create(None, "x", "y"), E.EditRequestError, ValueError),
        ("request-subject-empty", lambda lm, f: EditRequest.create("The tower", "", "y"), E.EditRequestError, ValueError),
        ("request-target-nan", lambda lm, f: EditRequest.create("The tower", "tower", math.nan), E.EditRequestError, ValueError),
        ("request-nul", lambda lm, f: EditRequest.create("The to\x00wer", "to", "y"), E.EditRequestError, ValueError),
        ("request-bad-probe", lambda lm, f: EditRequest.create("The tower", "tower", "y", paraphrases=["just a string"]),
         E.EditRequestError, ValueError),
        ("request-bypassing-create", lambda lm, f: EditRequest("p", "", "y"), E.EditRequestError, ValueError),
        ("method-none", lambda lm, f: get_editor(None), E.UnknownMethodError, KeyError),
        ("method-unknown", lambda lm, f: get_editor("nope"), E.UnknownMethodError, KeyError),
        ("load-lm-none", lambda lm, f: load_lm(None), E.ModelNotFoundError, OSError),
        ("load-lm-empty", lambda lm, f: load_lm("  "), E.ModelNotFoundError, OSError),
        ("load-lm-hub-not-allowed", lambda lm, f: load_lm("someone/some-model"), E.ModelNotFoundError, OSError),
        ("load-lm-dtype", lambda lm, f: load_lm("tiny-llama", dtype="float8"), E.DtypeError, ValueError),
        ("load-lm-dtype-int", lambda lm, f: load_lm("tiny-llama", dtype=torch_int()), E.DtypeError, ValueError),
        ("load-lm-device", lambda lm, f: load_lm("tiny-llama", device="cuda:99"), E.DeviceError, ValueError),
        ("load-lm-device-garbage", lambda lm, f: load_lm("tiny-llama", device="tpu!"), E.DeviceError, ValueError),
        ("load-lm-batch-tokens", lambda lm, f: load_lm("tiny-llama", max_batch_tokens=0), E.OptionError, ValueError),
        ("apply-nan-hparam", lambda lm, f: get_editor("rome").apply(lm, good(), **{**rome_hp, "v_lr": math.nan}),
         E.HparamsError, ValueError),
        ("apply-unknown-hparam", lambda lm, f: get_editor("rome").apply(lm, good(), nope=1), E.HparamsError, ValueError),
        ("apply-layer-out-of-range", lambda lm, f: get_editor("ft").apply(lm, good(), layer=40), E.HparamsError, ValueError),
        ("apply-negative-steps", lambda lm, f: get_editor("ft").apply(lm, good(), layer=0, steps=-3), E.HparamsError, ValueError),
        ("hparams-steps-over-bound", lambda lm, f: get_editor("ft").hparams(lm, layer=0, steps=10**9),
         E.HparamsError, ValueError),
        ("apply-instance-steps-over-bound", lambda lm, f: get_editor("ft").apply(
            lm, good(), get_editor("ft").hparams_cls(layer=0, steps=10**9)),
         E.HparamsError, ValueError),
        ("hparams-bool-for-int", lambda lm, f: get_editor("ft").hparams(lm, layer=True), E.HparamsError, ValueError),
        ("hparams-kn-layers-not-ints", lambda lm, f: get_editor("kn").hparams(lm, layers=[1.5]), E.HparamsError, ValueError),
        ("hparams-seed-overflow", lambda lm, f: get_editor("rome").hparams(lm, seed=2**70), E.HparamsError, ValueError),
        ("hparams-template-count-over-bound", lambda lm, f: get_editor("rome").hparams(lm, context_templates=[[10, 10**6]]),
         E.HparamsError, ValueError),
        ("hparams-chunk-rows-over-bound", lambda lm, f: get_editor("memit").hparams(lm, v_chunk_rows=10**9),
         E.HparamsError, ValueError),
        ("apply-string-request", lambda lm, f: get_editor("rome").apply(lm, "Eiffel -> Rome"), E.EditRequestError, ValueError),
        ("apply-no-requests", lambda lm, f: get_editor("rome").apply(lm, []), E.EditRequestError, ValueError),
        ("prompt-over-context", lambda lm, f: check_fits(EditRequest.create("Eiffel " + "is big " * 400, "Eiffel", "Rome"), lm),
         E.PromptTooLongError, ValueError),
        ("apply-prompt-over-context", lambda lm, f: get_editor("ft").apply(
            lm, EditRequest.create("Eiffel " + "is big " * 400, "Eiffel", "Rome"), layer=0),
         E.PromptTooLongError, ValueError),
        ("load-edit-missing-folder", lambda lm, f: Edit.load(f["dir"] / "no-edit", lm), E.EditIntegrityError, ValueError),
        ("load-edit-folder-without-manifest", lambda lm, f: Edit.load(f["full"], lm), E.EditIntegrityError, ValueError),
        ("data-unknown", lambda lm, f: load_requests("nosuchset"), E.DataFormatError, ValueError),
        ("data-bad-json", lambda lm, f: load_requests(f["dir"] / "bad.json"), E.DataFormatError, ValueError),
        ("data-limit-zero", lambda lm, f: load_requests("builtin", limit=0), E.DataFormatError, ValueError),
        ("store-readonly-missing", lambda lm, f: Store.open_readonly(f["dir"] / "missing.db"), E.StoreError, OSError),
        ("store-foreign", lambda lm, f: Store(f["dir"] / "foreign.db"), E.StoreError, OSError),
        ("store-damaged", lambda lm, f: Store.open_readonly(f["dir"] / "damaged.db"), E.StoreCorruptError, OSError),
    ]


def torch_int():
    import torch

    return torch.int64


API_CASES = _api_cases()


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(case, files, lm):
    _, call, named, builtin = case
    fingerprint = lm.fingerprint()
    db_before = _snapshot_db(files["db"])
    with pytest.raises(named) as info:
        call(lm, files)
    assert isinstance(info.value, E.EditlabError) and isinstance(info.value, builtin)
    msg = str(info.value)
    assert msg and "\n" not in msg
    assert lm.fingerprint() == fingerprint and lm.active_edits == []
    assert _snapshot_db(files["db"]) == db_before
