"""Wall time of `editlab demo` with nothing cached (fresh EDITLAB_HOME) and with caches warm.

    python benchmarks/bench_demo.py [--warm-only]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT


def run_demo(home: str, out: str) -> float:
    env = dict(os.environ, EDITLAB_HOME=home)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "editlab.cli", "demo", "--out", out], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warm-only", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = os.environ.get("EDITLAB_HOME", str(Path.home() / ".cache" / "editlab")) if args.warm_only else tmp
        if not args.warm_only:
            print(f"demo cold (empty cache): {run_demo(home, os.path.join(tmp, 'cold')):.1f} s", flush=True)
        print(f"demo warm (caches present, new output folder): {run_demo(home, os.path.join(tmp, 'warm')):.1f} s", flush=True)


if __name__ == "__main__":
    main()
