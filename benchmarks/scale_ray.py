"""`--executor ray` against the local executor on the same records (docs/scale.md).

1. local: one process, the model loaded once, every edit in turn;
2. ray: a local Ray with N workers (one model copy each, `--cpus-per-worker` threads), same records;
   wall time includes starting Ray and the workers; rows compared with the local rows;
3. fault: a second method on a Ray run where one worker is killed (SIGKILL) after K rows; rows at the
   end and duplicated rows are counted.

The covariance statistics are computed before either timing (both executors read the same cache).

    python benchmarks/scale_ray.py --method rome --limit 200 --workers 2 --out scale.jsonl
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import tempfile
import time
from pathlib import Path

from common import emit_json_line, med


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="counterfact")
    ap.add_argument("--method", default="rome")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=int, default=1)
    ap.add_argument("--fault-method", default="ft-m")
    ap.add_argument("--kill-after", type=int, default=20)
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: local,ray,fault")
    ap.add_argument("--db-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import torch

    from editlab.data import load_requests
    from editlab.distributed.driver import run_on_ray
    from editlab.distributed.spec import ExecutorSpec
    from editlab.methods import get_editor
    from editlab.models import load_lm
    from editlab.runner import RunConfig, Store, run
    from editlab.stats import warm_statistics

    folder = Path(args.db_dir or tempfile.mkdtemp(prefix="scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    requests = load_requests(args.data, limit=args.limit)
    lm = load_lm(args.model)
    warm_statistics(lm, [get_editor(args.method).hparams(lm)])
    cfg = lambda: RunConfig(method=args.method, dataset=args.data)  # noqa: E731
    base = {"model": args.model, "method": args.method, "records": len(requests), "threads_local": torch.get_num_threads()}

    local_rows = {}
    if "local" not in skip:
        store = Store(folder / "local.db")
        t0 = time.perf_counter()
        rid = run(lm, requests, cfg(), store, progress=lambda i, n, m: print(f"\rlocal {i}/{n}", end="", flush=True))
        wall = time.perf_counter() - t0
        rows = list(store.rows(rid))
        local_rows = {r.row_key: r.metrics for r in rows}
        print()
        emit_json_line({**base, "phase": "local", "wall_s": round(wall, 1), "rows": len(rows),
                        "rows_per_s": round(len(rows) / wall, 4), "median_edit_s": round(med([r.edit_s for r in rows]), 3)}, args.out)
    del lm

    if "ray" not in skip:
        store = Store(folder / "ray.db")
        spec = ExecutorSpec("ray", workers=args.workers, cpus_per_worker=args.cpus_per_worker)
        t0 = time.perf_counter()
        first: list[float] = []

        def tick(i: int, n: int, msg: str) -> None:
            if not first and " rows," in msg and not msg.startswith("0 rows"):
                first.append(time.perf_counter() - t0)
            print(f"\rray {i}/{n} {msg}", end="", flush=True)

        (rid,) = run_on_ray({"name": args.model}, requests, [cfg()], store, spec, resume=False, progress=tick)
        wall = time.perf_counter() - t0
        rows = list(store.rows(rid))
        rec = {**base, "phase": "ray", "workers": args.workers, "cpus_per_worker": args.cpus_per_worker,
               "wall_s": round(wall, 1), "rows": len(rows), "rows_per_s": round(len(rows) / wall, 4),
               "median_edit_s": round(med([r.edit_s for r in rows]), 3), "first_row_s": round(first[0], 1) if first else None}
        if local_rows:
            diffs = [abs(a - local_rows[r.row_key][k]) for r in rows for k, a in r.metrics.items()
                     if r.row_key in local_rows and isinstance(a, float)]
            flips = sum(1 for r in rows for k in ("efficacy_score", "paraphrase_score", "neighborhood_score")
                        if r.row_key in local_rows and r.metrics.get(k) != local_rows[r.row_key].get(k))
            rec.update(max_abs_metric_diff=max(diffs) if diffs else None, score_flips=flips)
        print()
        emit_json_line(rec, args.out)

    if "fault" not in skip:
        import psutil

        store = Store(folder / "fault.db")
        killed: list[int] = []

        def kill_one(i: int, n: int, msg: str) -> None:
            print(f"\rfault {i}/{n} {msg}", end="", flush=True)
            if killed or not msg.split(" ")[0].isdigit() or int(msg.split(" ")[0]) < args.kill_after:
                return
            for p in psutil.process_iter(["pid", "cmdline"]):
                if "EditWorker.run_task" in " ".join(p.info["cmdline"] or []):
                    os.kill(p.info["pid"], signal.SIGKILL)
                    killed.append(p.info["pid"])
                    return

        t0 = time.perf_counter()
        (rid,) = run_on_ray({"name": args.model}, requests, [RunConfig(method=args.fault_method, dataset=args.data)], store,
                            ExecutorSpec("ray", workers=args.workers, cpus_per_worker=args.cpus_per_worker),
                            resume=False, progress=kill_one)
        keys = [k for (k,) in sqlite3.connect(folder / "fault.db").execute("SELECT row_key FROM rows WHERE run_id=?", (rid,))]
        print()
        emit_json_line({**base, "phase": "fault", "method": args.fault_method, "killed_pids": killed,
                        "wall_s": round(time.perf_counter() - t0, 1), "rows": len(keys),
                        "duplicates": len(keys) - len(set(keys)), "expected_rows": len(requests)}, args.out)


if __name__ == "__main__":
    main()
