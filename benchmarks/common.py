"""Helpers shared by the benchmark scripts (figures are printed; nothing here asserts timings)."""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("EDITLAB_DATA", str((ROOT / ".." / "shared" / "data").resolve()))
warnings.filterwarnings("ignore", category=UserWarning)


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def emit_json_line(record: dict, out: str | None = None) -> None:
    """Print one result as a JSON line and append it to `out` (a JSON-lines file) when given."""
    import json

    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM; unlike ru_maxrss it is not inherited over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
