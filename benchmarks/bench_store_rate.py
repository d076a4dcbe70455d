"""How many rows per second the driver can commit to the result store (one transaction per row, WAL),
the ceiling of any executor's throughput (docs/scale.md)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import emit_json_line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from editlab.runner.store import Row, Store

    metrics = {k: 0.123456789 for k in ("efficacy_score", "efficacy_magnitude", "paraphrase_score", "paraphrase_magnitude",
                                        "neighborhood_score", "neighborhood_magnitude", "rewrite_acc", "rephrase_acc",
                                        "locality_acc", "portability_acc", "cf_score")}
    with tempfile.TemporaryDirectory() as d:
        store = Store(Path(d) / "rate.db")
        store.ensure_run("r", model="m", method="rome", mode="single")
        t0 = time.perf_counter()
        for i in range(args.rows):
            store.add_row(Row("r", f"{i}:case{i}", f"case{i}", "edit", 1, 7.0, 0.5, metrics))
        wall = time.perf_counter() - t0
    emit_json_line({"rows": args.rows, "wall_s": round(wall, 2), "rows_per_s": round(args.rows / wall, 1)}, args.out)


if __name__ == "__main__":
    main()
