"""How many rows per second the `--executor ray` driver can take in: workers stream N small row
messages each (the shape the runner sends), the driver receives them as in `distributed.driver` and
commits each to a result store. The ceiling of the driver, whatever the methods cost (docs/scale.md)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import emit_json_line


class Streamer:
    def rows(self, n: int, worker: int):
        from editlab.runner.store import Row

        metrics = {k: 0.123456789 for k in ("efficacy_score", "paraphrase_score", "neighborhood_score", "rewrite_acc",
                                            "rephrase_acc", "locality_acc", "portability_acc", "cf_score")}
        for i in range(n):
            yield ("row", Row("r", f"{worker}-{i}:case", "case", "edit", 1, 1.0, 0.1, metrics))
            yield ("tick", i + 1, n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3000, help="rows per worker")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import ray

    from editlab.runner.store import Store

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    actors = [ray.remote(Streamer).options(num_cpus=1).remote() for _ in range(args.workers)]
    with tempfile.TemporaryDirectory() as d:
        store = Store(Path(d) / "stream.db")
        store.ensure_run("r", model="m", method="x", mode="single")
        t0 = time.perf_counter()
        gens = {a.rows.options(num_returns="streaming").remote(args.rows, k): k for k, a in enumerate(actors)}
        committed = 0
        while gens:
            ready, _ = ray.wait(list(gens), num_returns=1, timeout=1.0)
            for g in ready:
                try:
                    msg = ray.get(next(g))
                except StopIteration:
                    del gens[g]
                    continue
                if msg[0] == "row":
                    committed += store.add_row(msg[1])
        wall = time.perf_counter() - t0
    ray.shutdown()
    emit_json_line({"workers": args.workers, "rows": committed, "messages": 2 * committed, "wall_s": round(wall, 2),
                    "rows_per_s": round(committed / wall, 1)}, args.out)


if __name__ == "__main__":
    main()
