"""Fault benchmark: does the result store lose, duplicate or crash under kills and concurrent writers?

1. kill/resume: a sequential run (`editlab eval --mode sequential`, a checkpoint row after every edit)
   is killed with SIGKILL at a random moment of its work (after a random number of rows plus a random
   part of the time between two rows) and resumed with `--resume` (half the time the resumed process is
   killed once more and resumed again), in N rounds, each on a fresh database. The rows of every round
   are compared with an uninterrupted reference run's.
2. concurrent writers: four processes write one new database at the same moment, (a) all running the
   SAME run (same rows, which must each be stored once) and (b) four DIFFERENT runs (seeds 0..3).

Prints, per scenario: rows expected, rows present, duplicates, crashes (a process that ended with an
error instead of finishing or being killed by us), and whether the rows equal the reference run's.
Uses the tiny random model through the real CLI in subprocesses, so it runs in a few minutes on a CPU.

    python benchmarks/bench_faults.py [--kills 20] [--edits 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def eval_cmd(db: Path, edits: int, ppl: Path, mode: str = "sequential", seed: int = 0) -> list[str]:
    cmd = [PY, "-m", "editlab.cli", "eval", "--model", "tiny-llama", "--method", "ft-m", "--mode", mode,
           "--limit", str(edits), "--set", "layer=0", "--set", "steps=10", "--set", "lr=0.01", "--db", str(db),
           "--resume", "--seed", str(seed)]
    if mode == "sequential":
        cmd += ["--checkpoints", ",".join(str(i) for i in range(1, edits + 1)), "--ppl-text", str(ppl)]
    return cmd


def rows_of(db: Path) -> list[tuple[str, str, str]]:
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT run_id, row_key, metrics FROM rows ORDER BY run_id, row_key").fetchall()
    finally:
        con.close()


def duplicates(rows: list[tuple[str, str, str]]) -> int:
    keys = [(r[0], r[1]) for r in rows]
    return len(keys) - len(set(keys))


def run_to_end(cmd: list[str], log: Path) -> int:
    with open(log, "ab") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT).returncode


def count_rows(db: Path) -> int:
    try:
        return len(rows_of(db))
    except sqlite3.Error:  # the very first moments: the file exists but holds no tables yet
        return 0


def run_and_kill(cmd: list[str], db: Path, after_rows: int, delay: float, log: Path) -> str:
    """Start `cmd`; once the database holds `after_rows` rows, wait `delay` seconds and SIGKILL it.
    With `after_rows` 0 the kill lands during start-up or the first edit; otherwise between two rows
    or in the middle of writing one."""
    with open(log, "ab") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        reached = None
        while p.poll() is None:
            now = time.perf_counter()
            if reached is None and count_rows(db) >= after_rows:
                reached = now
            if reached is not None and now - reached >= delay:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
                return f"killed {delay:.1f} s after row {after_rows} ({count_rows(db)} rows kept)"
            time.sleep(0.02)
    return f"finished first (exit {p.returncode})" if p.returncode == 0 else f"CRASHED (exit {p.returncode})"


def kill_resume(tmp: Path, kills: int, edits: int, rng: random.Random) -> dict[str, object]:
    """`kills` rounds, each on a fresh database: start the sequential run and SIGKILL it at a random
    moment of its work (after a random number of rows, plus a random fraction of the time between two
    rows), resume it with --resume (half of the time killed again the same way and resumed once more),
    then compare the rows with an uninterrupted reference run's."""
    ppl = tmp / "ppl.txt"
    ppl.write_text("The Eiffel Tower is in Paris. Rome is the capital of Italy. " * 30)
    ref_db, log = tmp / "reference.db", tmp / "kill.log"
    # the reference run, watched to learn how far apart its rows are written
    times: list[float] = []
    with open(log, "ab") as f:
        t0 = time.perf_counter()
        p = subprocess.Popen(eval_cmd(ref_db, edits, ppl), stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        while p.poll() is None:
            n = count_rows(ref_db)
            while len(times) < n:
                times.append(time.perf_counter() - t0)
            time.sleep(0.02)
    ref = rows_of(ref_db)
    gap = max(0.2, (times[-1] - times[0]) / max(1, len(times) - 1)) if times else 1.0
    crashes = int(p.returncode != 0)
    print(f"reference run: {time.perf_counter() - t0:.1f} s, exit {p.returncode}, {len(ref)} rows, "
          f"first row at {times[0] if times else float('nan'):.1f} s, {gap:.2f} s between rows", flush=True)
    present = dupes = same_rounds = mid_run = 0
    for k in range(kills):
        db = tmp / f"killed-{k}.db"
        notes = []
        for _ in range(2 if rng.random() < 0.5 else 1):
            have = count_rows(db)
            if have >= edits:
                break
            after = rng.randint(have, edits - 1)
            outcome = run_and_kill(eval_cmd(db, edits, ppl), db, after, rng.uniform(0, 1.2 * gap), log)
            crashes += "CRASHED" in outcome
            mid_run += outcome.startswith("killed") and 0 < count_rows(db) < edits
            notes.append(outcome)
        rc = run_to_end(eval_cmd(db, edits, ppl), log)
        crashes += int(rc != 0)
        got = rows_of(db)
        present += len(got)
        dupes += duplicates(got)
        same = got == ref
        same_rounds += int(same)
        print(f"  round {k + 1:2d}/{kills}: {'; '.join(notes)}; resumed: {len(got)} rows, "
              f"{'identical to' if same else 'DIFFERENT from'} the reference", flush=True)
    print(f"  kills that left a partial run (some rows, not all): {mid_run}", flush=True)
    return {"scenario": f"sequential, SIGKILL + resume x{kills}", "expected": kills * edits, "present": present,
            "duplicates": dupes, "crashes": crashes, "same_as_reference": f"{same_rounds}/{kills}"}


def concurrent(tmp: Path, edits: int, same_run: bool) -> dict[str, object]:
    db = tmp / ("same.db" if same_run else "different.db")
    log = tmp / "concurrent.log"
    procs = []
    with open(log, "ab") as f:
        for i in range(4):
            cmd = eval_cmd(db, edits, tmp / "ppl.txt", mode="single", seed=0 if same_run else i)
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT))
        codes = [p.wait() for p in procs]
    got = rows_of(db)
    expected = edits if same_run else 4 * edits
    return {"scenario": f"4 writers, {'same run' if same_run else 'different runs'}", "expected": expected,
            "present": len(got), "duplicates": duplicates(got), "crashes": sum(c != 0 for c in codes),
            "same_as_reference": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--edits", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="editlab-faults-") as d:
        tmp = Path(d)
        results = [kill_resume(tmp, args.kills, args.edits, rng), concurrent(tmp, args.edits, True),
                   concurrent(tmp, args.edits, False)]
        if any(r["crashes"] for r in results):
            print("--- log of the failing processes (tail) ---")
            for name in ("kill.log", "concurrent.log"):
                p = tmp / name
                if p.exists():
                    print("\n".join(line for line in p.read_text(errors="replace").splitlines()
                                    if "error" in line.lower())[-2000:])
    print()
    print(f"{'scenario':38s} {'expected':>8s} {'present':>8s} {'dupes':>6s} {'crashes':>8s}  same as uninterrupted")
    for r in results:
        same = "" if r["same_as_reference"] is None else str(r["same_as_reference"])
        print(f"{r['scenario']:38s} {r['expected']:8d} {r['present']:8d} {r['duplicates']:6d} {r['crashes']:8d}  {same}")
    lost = sum(max(0, int(r["expected"]) - int(r["present"])) for r in results)
    print(f"\nlost rows: {lost}; duplicated rows: {sum(int(r['duplicates']) for r in results)}; "
          f"crashed processes: {sum(int(r['crashes']) for r in results)}")


if __name__ == "__main__":
    main()
