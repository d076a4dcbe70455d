"""Small file helpers shared by every writer of the user cache and of saved edits: checksums and
atomic replacement, so nothing is ever left half written."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


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


def write_text_atomic(path: str | Path, text: str) -> None:
    p = Path(path)
    tmp = temp_path_in(p.parent, p.name)
    try:
        tmp.write_text(text)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
