"""Where editlab keeps its cache (converted models, covariance statistics, cleaned corpora) and where it
looks for benchmark data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_path(*parts: str) -> Path:
    """`$EDITLAB_HOME` (default `~/.cache/editlab`), joined with `parts`; nothing is created (for lookups)."""
    return Path(os.environ.get("EDITLAB_HOME") or Path.home() / ".cache" / "editlab").expanduser().joinpath(*parts)


def cache_dir(*parts: str) -> Path:
    """`cache_path(*parts)`, created on demand (for writes)."""
    path = cache_path(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """Benchmark data folder: `$EDITLAB_DATA`, else `../shared/data` relative to the working directory."""
    env = os.environ.get("EDITLAB_DATA")
    if env:
        return Path(env).expanduser()
    return (Path.cwd() / ".." / "shared" / "data").resolve()
