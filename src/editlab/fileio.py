"""Small file helpers shared by every writer of the user cache and of saved edits: checksums and
atomic replacement, so nothing is ever left half written."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def temp_path_in(directory: str | Path, name: str) -> Path:
    """A fresh hidden temporary file beside where `name` will go (same filesystem: rename is atomic)."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool = False) -> None:
    """Give a temporary file or folder (created private by `tempfile`) the permissions a plain
    `open()` / `mkdir()` would have given it, so the final file is readable as the user expects."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file renamed over it: readers see the old
    file or the new one, never a half-written one."""
    p = Path(path)
    tmp = temp_path_in(p.parent, p.name)
    try:
        tmp.write_text(text, encoding="utf-8")
        _publish_mode(tmp)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `final`; when the block succeeds it replaces `final`
    (an existing one is removed first), when it fails it is deleted. Readers never see a half folder."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        _publish_mode(tmp, directory=True)
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock on the file `path` (created if absent) for the block.

    For one-time cache builds (converting the default model on first use): two processes started at
    once would otherwise both build, and the second one's `atomic_dir` would replace the folder the
    first one is already reading. Take the lock, check the cache again, build only if still needed.
    Where `fcntl` is missing (Windows) the block runs unlocked, as before."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - POSIX everywhere editlab is tested
        yield
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
