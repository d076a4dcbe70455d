"""Pitfall suites on SmolLM2: one markdown table per suite (metric rows, the unedited model first, one
column per method) with records/s, as in docs/pitfalls.md.

    python benchmarks/pitfalls.py --suite cfplus --methods ft-m,rome,memit --limit 100 --db pitfalls.db

Rows go to the result store, so an interrupted run continues where it stopped (same command) and a
later call with more methods reuses the unedited pass already stored. `--print-only` prints the tables
from the store without running anything. `--shard K/N` runs only every N-th unit from the K-th (0-based)
into the same runs, so N processes on one store (one per core) fill one table between them:

    python benchmarks/pitfalls.py --suite conflict --methods t-patcher --limit 34 --db c.db --shard 0/2 &
    python benchmarks/pitfalls.py --suite conflict --methods t-patcher --limit 34 --db c.db --shard 1/2
"""

from __future__ import annotations

import argparse
import time

from editlab.runner.store import Store
from editlab.suites import get_suite, metric_info
from editlab.suites.runner import (UNEDITED, format_with_se, metric_rows, plan_suite, run_suite, suite_standard_errors,
                                   suite_summary)


def table(store: Store, suite_name: str, model: str) -> str:
    suite = get_suite(suite_name)
    runs = [r for r in store.runs() if r["mode"] == "suite" and r["dataset"] == suite.name and r["model"] == model
            and store.count_rows(r["run_id"])]
    runs.sort(key=lambda r: (r["method"] != UNEDITED, r["created"]))
    sums = [suite_summary(store, r["run_id"], suite) for r in runs]
    ses = [suite_standard_errors(store, r["run_id"]) for r in runs]
    names = metric_rows(sums)
    lines = ["| metric | " + " | ".join(r["method"] for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for name in names:
        arrow = {True: " ↑", False: " ↓", None: ""}[metric_info(name).higher_is_better]
        lines.append(f"| {name}{arrow} | " + " | ".join("" if name not in s else format_with_se(s[name], e.get(name))
                                                       for s, e in zip(sums, ses)) + " |")
    lines.append("| records | " + " | ".join(str(int(s["n"])) for s in sums) + " |")
    if any("errors" in s for s in sums):
        lines.append("| errors (left out) | " + " | ".join(str(int(s.get("errors", 0))) for s in sums) + " |")
    rates = []
    for r in runs:
        rows = list(store.rows(r["run_id"]))
        secs = sum((x.edit_s or 0.0) * (x.n_edits or 0) + (x.eval_s or 0.0) for x in rows)
        rates.append(f"{len(rows) / secs:.3g}" if secs else "")
    lines.append("| records/s | " + " | ".join(rates) + " |")
    lines.append("| s/edit (median) | " + " | ".join("" if "s_per_edit" not in s else f"{s['s_per_edit']:.2f}" for s in sums) + " |")
    return "\n".join(lines)


def parse_shard(ap: argparse.ArgumentParser, text: str | None) -> tuple[int, int] | None:
    """`K/N` as (K, N) with 0 <= K < N; None when not given. A malformed value ends the script with one line."""
    if text is None:
        return None
    k, sep, n = text.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
        ap.error(f"--shard {text!r}: expected K/N with 0 <= K < N, e.g. 0/2")
    return int(k), int(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", required=True)
    ap.add_argument("--methods", default="ft-m,rome,memit")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--db", default="pitfalls.db")
    ap.add_argument("--print-only", action="store_true")
    ap.add_argument("--suite-set", action="append", default=[], metavar="KEY=VALUE",
                    help="suite option, as `editlab eval --suite-set` (e.g. cot=false for mquake)")
    ap.add_argument("--shard", default=None, metavar="K/N",
                    help="run only units K, K+N, K+2N, ... (0-based) into the same runs, e.g. 0/2 and 1/2 on two cores")
    ap.add_argument("--on-bad", choices=("stop", "skip"), default="stop",
                    help="records lacking a field a metric needs: stop (name it) or skip (counted, left out)")
    args = ap.parse_args()
    shard = parse_shard(ap, args.shard)
    store = Store(args.db)
    if not args.print_only:
        from editlab.models import load_lm

        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        options = dict(kv.split("=", 1) for kv in args.suite_set)
        plan = plan_suite(args.suite, methods, limit=args.limit, options=options, on_bad=args.on_bad)
        only = None if shard is None else [u.key for u in plan.units[shard[0]::shard[1]]]
        lm = load_lm(args.model)
        t0 = time.perf_counter()
        run_suite(lm, plan, store, only=only, progress=lambda i, n, msg: print(f"\r{msg}", end="", flush=True))
        n_units = len(plan.units) if only is None else len(only)
        print(f"\n{args.suite}: {n_units} units x {len(methods)} methods in {time.perf_counter() - t0:.0f} s")
    print(table(store, args.suite, args.model))


if __name__ == "__main__":
    main()
