"""Time to the error for bad commands in a fresh `editlab` process (what a user waits after a typo), with
`python -c "import torch"` and `editlab --help` for scale. Each command runs `--repeat` times; the
median wall time is printed.

    python benchmarks/bench_cold_start.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from common import ROOT

REQ = ["--prompt", "The Eiffel Tower is located in the city of", "--subject", "Eiffel Tower", "--target", "Rome"]
COMMANDS = {
    "edit --method nope": ["edit", "--method", "nope", *REQ],
    "edit --set v_steps=abc": ["edit", *REQ, "--set", "v_steps=abc"],
    "edit --dtype fp8": ["edit", *REQ, "--dtype", "fp8"],
    "edit --device gpu": ["edit", *REQ, "--device", "gpu"],
    "edit --model smollm2-13m": ["edit", *REQ, "--model", "smollm2-13m"],
    "eval --mode batch --batch-size 3 --method rome": ["eval", "--mode", "batch", "--batch-size", "3", "--method", "rome"],
    "eval --data nosuch.json": ["eval", "--data", "nosuch.json"],
    "eval --suite mquake --suite-set bogus=1": ["eval", "--suite", "mquake", "--suite-set", "bogus=1"],
    "export nope.db": ["export", "nope.db"],
    "trace --kinds bogus": ["trace", *REQ[:4], "--kinds", "bogus"],
}


def wall(argv: list[str], expect: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    t = time.perf_counter()
    rc = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    elapsed = time.perf_counter() - t
    if rc != expect:
        raise SystemExit(f"{argv[3:]} exited with {rc}, expected {expect}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    cli = [sys.executable, "-m", "editlab.cli"]
    rows = [("python -c 'import torch' (for scale)", [sys.executable, "-c", "import torch"], 0),
            ("editlab --help", [*cli, "--help"], 0)]
    rows += [(f"editlab {name}", [*cli, *argv], 2) for name, argv in COMMANDS.items()]
    print(f"load average {os.getloadavg()[0]:.1f}; median of {args.repeat} fresh processes")
    for label, argv, expect in rows:
        times = [wall(argv, expect) for _ in range(args.repeat)]
        print(f"{statistics.median(times):6.2f} s  {label}", flush=True)


if __name__ == "__main__":
    main()
