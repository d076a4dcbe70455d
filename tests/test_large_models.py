"""Large models: the memory estimate from a model's files (no tensor read), the refusal to load weights
that cannot fit the free memory (one line, before anything loads), and `--device-map` on a model that
fits one device (it says so and edits as usual)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from editlab.cli import app
from editlab.models import estimate as est_mod
from editlab.models.estimate import BYTES, MemoryEstimateError, check_memory, estimate
from editlab.models.tiny import trained_tiny_model


@pytest.fixture
def model_dir(tmp_path: Path) -> tuple[Path, int]:
    model, tok = trained_tiny_model("llama", steps=1)
    folder = tmp_path / "tiny-folder"
    model.save_pretrained(folder)  # safetensors
    tok.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())  # a tied embedding is stored (and held) once
    return folder, n


def test_estimate_counts_the_weights_exactly_from_the_headers(model_dir) -> None:
    folder, n = model_dir
    e32 = estimate(str(folder), "float32", ["rome", "memit", "ft"])
    e16 = estimate(str(folder), "bf16")
    assert e32.n_params == n and e32.weights == n * BYTES["float32"] and e16.weights == n * 2
    d_ff = e32.shape["d_ff"]
    assert e32.statistics == {"rome": d_ff * d_ff * 12, "memit": 5 * d_ff * d_ff * 12}  # ft reads no statistics
    assert e32.peak("memit") > e32.peak("rome") > e32.peak() > e32.weights
    assert estimate("tiny-llama") is None  # built in memory: nothing to size


def test_weights_larger_than_free_memory_are_refused_before_loading(model_dir, monkeypatch, tmp_path: Path) -> None:
    folder, n = model_dir
    monkeypatch.setattr(est_mod, "available_memory", lambda device="cpu": n * 3)  # fits in bf16 (2n), not fp32 (4n)
    with pytest.raises(MemoryEstimateError, match="--dtype bfloat16"):
        check_memory(str(folder), "float32", "cpu")
    assert check_memory(str(folder), "bfloat16", "cpu").weights == 2 * n
    db = tmp_path / "r.db"
    loads: list[str] = []
    import editlab.models

    monkeypatch.setattr(editlab.models, "load_lm", lambda *a, **k: loads.append("x"))
    res = CliRunner().invoke(app, ["eval", "--model", str(folder), "--method", "ft-m", "--limit", "2", "--db", str(db)])
    assert res.exit_code == 2 and "needs" in res.output and "free" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and loads == []


def test_cli_estimate_prints_the_terms(model_dir) -> None:
    folder, _ = model_dir
    res = CliRunner().invoke(app, ["models", "--estimate", str(folder), "--methods", "rome,ft", "--dtype", "bf16"])
    assert res.exit_code == 0, res.output
    for text in ("weights", "statistics (rome)", "peak (ft)", "free on cpu"):
        assert text in res.output
    bad = CliRunner().invoke(app, ["models", "--estimate", "tiny-llama"])
    assert bad.exit_code == 2 and "built in memory" in bad.output


def test_device_map_on_a_model_that_fits_one_device_says_so_and_edits(model_dir, tmp_path: Path) -> None:
    folder, _ = model_dir
    db = tmp_path / "dm.db"
    res = CliRunner().invoke(app, ["eval", "--model", str(folder), "--device-map", "auto", "--method", "ft-m",
                                   "--limit", "2", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert "--device-map auto: the whole model fits on cpu" in res.output
    from editlab.runner import Store

    assert Store.open_readonly(db).count_rows() == 2
    bad = CliRunner().invoke(app, ["eval", "--model", str(folder), "--db", str(tmp_path / "x.db"), "--device-map", "spread"])
    assert bad.exit_code == 2 and "--device-map must be one of" in bad.output and len(bad.output.strip().splitlines()) == 1


def test_device_map_and_device_together_are_refused(model_dir, tmp_path: Path, monkeypatch) -> None:
    folder, _ = model_dir
    import editlab.models.sources as sources

    monkeypatch.setattr(sources, "check_device", lambda device: None)  # as on a machine with a GPU
    bad = CliRunner().invoke(app, ["eval", "--model", str(folder), "--db", str(tmp_path / "x.db"),
                                   "--device-map", "auto", "--device", "cuda"])
    assert bad.exit_code == 2 and "not both" in bad.output and len(bad.output.strip().splitlines()) == 1, bad.output


def test_sharded_and_unsizable_folders(model_dir, tmp_path: Path, monkeypatch) -> None:
    """The shard index decides which files hold the weights (a consolidated copy beside the shards is
    not counted twice); a folder that cannot be sized (only .bin weights) is loaded unchecked."""
    import json
    import shutil

    folder, n = model_dir
    sharded = tmp_path / "sharded"
    shutil.copytree(folder, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00001.safetensors")
    shutil.copy(sharded / "model-00001-of-00001.safetensors", sharded / "consolidated.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00001.safetensors"}}))
    assert estimate(str(sharded)).n_params == n
    binary = tmp_path / "binary"
    shutil.copytree(folder, binary)
    (binary / "model.safetensors").unlink()
    (binary / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setattr(est_mod, "available_memory", lambda device="cpu": 1)
    assert check_memory(str(binary), "float32", "cpu") is None  # cannot be sized: not refused
    res = CliRunner().invoke(app, ["models", "--estimate", str(binary)])
    assert res.exit_code == 2 and "no model.safetensors" in res.output


def test_a_dtype_the_device_cannot_compute_is_refused_before_loading(model_dir, tmp_path: Path, monkeypatch) -> None:
    """bf16 on a GPU older than Ampere: one line naming the device, its compute capability and what to use
    instead, from the library and from the CLI, before any weight is read."""
    import torch

    import editlab.models
    import editlab.models.loading as loading
    from editlab.errors import DtypeError

    folder, _ = model_dir
    capability = {0: (7, 0), 1: (8, 6)}  # an old GPU beside an Ampere one
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[torch.device(device).index])
    with pytest.raises(DtypeError, match=r"cuda:0 \(compute capability 7.0; bfloat16 needs 8.0"):
        loading.check_dtype_on_device(torch.bfloat16, torch.device("cuda:0"))
    loading.check_dtype_on_device(torch.bfloat16, torch.device("cuda:1"))  # the device asked for, not the current one
    loading.check_dtype_on_device(torch.float16, torch.device("cuda:0"))  # float16 runs there
    loading.check_dtype_on_device(torch.bfloat16, torch.device("cpu"))  # CPUs run bf16

    cuda = torch.device("cuda:0")
    monkeypatch.setattr(loading, "resolve_device", lambda device: cuda if device else torch.device("cpu"))  # as on a GPU machine
    loads: list[str] = []
    monkeypatch.setattr(editlab.models, "load_lm", lambda *a, **k: loads.append("x"))
    db = tmp_path / "r.db"
    res = CliRunner().invoke(app, ["eval", "--model", str(folder), "--method", "rome", "--device", "cuda",
                                   "--dtype", "bf16", "--limit", "1", "--db", str(db)])
    assert res.exit_code == 2 and "use --dtype float16 or float32" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and loads == [] and not db.exists()
    with pytest.raises(DtypeError, match="compute capability 7.0"):
        loading.load_lm(str(folder), device="cuda:0", dtype="bfloat16")
