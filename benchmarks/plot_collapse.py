"""The survey's "collapse" figure for one model: sequential edits with probes at each checkpoint, every
method in one plot per metric, and a table of the values (markdown) beside the unedited model's.

Runs come from `editlab eval --mode sequential --probes ...` (one database per method, or one for all):

    editlab eval --method rome --data counterfact --limit 200 --mode sequential \\
        --checkpoints 0,10,25,50,100,200 --probes perplexity,downstream,nkl,norm --db out/collapse-rome.db
    python benchmarks/plot_collapse.py out/collapse-*.db --png docs/collapse.png
    python benchmarks/plot_collapse.py out/collapse-new.db docs/collapse_points.jsonl --png docs/collapse.png

(`--export FILE.jsonl` appends the points read to a JSON-lines file; such a file is read like a database.)

Records: the first 200 shipped CounterFact portability records (never used for tuning); checkpoint 0 is
the unedited model, measured by the same probes.
"""

from __future__ import annotations

import argparse
import math

from common import ROOT  # noqa: F401  (common puts src/ on the path)

from editlab.probes import chance_metric, headline_metrics  # noqa: E402
from editlab.suites.metrics import is_fraction  # noqa: E402

# retention of the run's own edits, then every probe's headline metrics (from the probe registry)
METRICS = ("retention_efficacy_score", "retention_rewrite_acc", "retention_locality_acc", *headline_metrics())


def load(dbs: list[str]) -> dict[str, list[tuple[int, dict[str, float]]]]:
    """Checkpoints per method from result databases, or from JSON-lines files written by `--export`
    (one line per method and checkpoint: method, n_edits, metrics, and where the values come from)."""
    import json

    from editlab.runner import Store

    out: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for db in dbs:
        if db.endswith(".jsonl"):
            with open(db) as f:
                for line in f:
                    if line.strip():
                        rec = json.loads(line)
                        out.setdefault(rec["method"], []).append((int(rec["n_edits"]), dict(rec["metrics"])))
            for pts in out.values():
                pts.sort(key=lambda p: p[0])
            continue
        store = Store.open_readonly(db)
        for run in store.runs():
            if run["mode"] != "sequential":
                continue
            pts = sorted(((r.n_edits, {**r.metrics, "_eval_s": r.eval_s or float("nan")})
                          for r in store.rows(run["run_id"]) if r.kind == "checkpoint"), key=lambda p: p[0])
            if pts:  # a second run of one method (other settings) is kept beside it, never replaced
                label = run["method"] if run["method"] not in out else f"{run['method']} ({run['run_id'][-6:]})"
                out[label] = pts
        store.close()
    return out


def export(runs: dict[str, list[tuple[int, dict[str, float]]]], path: str, source: str) -> None:
    """Append the points (the plotted metrics and seconds per checkpoint) to a JSON-lines file, so a
    later figure can put new runs beside these without their databases."""
    import json

    with open(path, "a") as f:
        for method, pts in runs.items():
            for n, m in pts:
                chances = [chance_metric(k) for k in METRICS if chance_metric(k)]
                keep = {k: m[k] for k in (*METRICS, *chances, "_eval_s") if m.get(k) is not None}
                f.write(json.dumps({"method": method, "n_edits": n, "metrics": keep, "source": source}) + "\n")
    print(f"appended {sum(len(p) for p in runs.values())} points to {path}")


def table(runs: dict[str, list[tuple[int, dict[str, float]]]], metrics: tuple[str, ...] = METRICS) -> None:
    keys = [k for k in metrics if any(k in m for pts in runs.values() for _, m in pts)]
    print("| method | edits | " + " | ".join(keys) + " | s/ckpt |")
    print("|---|---|" + "---|" * (len(keys) + 1))
    for method, pts in runs.items():
        for n, m in pts:
            cells = ["" if k not in m or m[k] is None else f"{m[k]:.3f}" if abs(m[k]) < 1e6 else f"{m[k]:.3g}"
                     for k in keys]
            print(f"| {method} | {n} | " + " | ".join(cells) + f" | {m.get('_eval_s', float('nan')):.0f} |")


def plot(runs: dict[str, list[tuple[int, dict[str, float]]]], png: str, metrics: tuple[str, ...] = METRICS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in metrics if any(k in m for pts in runs.values() for _, m in pts)]
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 2.9 * rows), squeeze=False)
    base: dict[str, float] = {}  # the unedited model (checkpoint 0), from whichever run measured each metric
    for pts in runs.values():
        if pts and pts[0][0] == 0:
            for k, v in pts[0][1].items():
                base.setdefault(k, v)
    # one colour and marker per method, the same in every panel (tab10 alone repeats after ten methods)
    palette = plt.get_cmap("tab20").colors
    style = {m: {"color": palette[(2 * i) % 20 + (2 * i) // 20 % 2], "marker": "osD^v<>ph*"[(i + i // 10) % 10]}
             for i, m in enumerate(runs)}
    for ax, k in zip(axes.flat, keys):
        for method, pts in runs.items():
            xy = [(n, m[k]) for n, m in pts if m.get(k) is not None]
            ax.plot([x for x, _ in xy], [y for _, y in xy], ms=3, lw=1.2, label=method, **style[method])
        if k in base and not k.startswith("retention_"):
            ax.axhline(base[k], color="#555", ls="--", lw=1, label="unedited")
        if chance_metric(k) in base:
            ax.axhline(base[chance_metric(k)], color="#999", ls=":", lw=1, label="chance")
        methods_with = [m for m, pts in runs.items() if any(k in mt for _, mt in pts)]
        missing = [m for m in runs if m not in methods_with]
        note = "" if not missing else f" (not measured: {', '.join(missing)})" if len(missing) <= 3 else \
            f" ({len(methods_with)} of {len(runs)} methods)"
        ax.set_title(k + note, fontsize=9)
        ax.set_xlabel("number of edits", fontsize=8)
        ys = [m[k] for pts in runs.values() for _, m in pts if m.get(k)]
        if k.startswith("ppl") and ys and max(ys) > 100 * min(ys):
            ax.set_yscale("log")  # a collapsed model's perplexity runs to millions
        elif not is_fraction(k) and ys and max(ys) > 1000:
            ax.set_yscale("symlog", linthresh=1.0)  # from 0: one exploding method would flatten the others
            if min(ys) >= 0:
                ax.set_ylim(bottom=0)
        if is_fraction(k):
            ax.set_ylim(-0.02, 1.02)  # fractions on their whole range: small moves look small
        ax.spines[["top", "right"]].set_visible(False)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, frameon=False, ncol=2 if len(runs) > 6 else 1)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"wrote {png}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dbs", nargs="+")
    ap.add_argument("--png", default=None)
    ap.add_argument("--metrics", default=",".join(METRICS), help="comma-separated metrics to show (default: all)")
    ap.add_argument("--export", default=None, help="append the points to this JSON-lines file (an input of later plots)")
    ap.add_argument("--source", default="", help="with --export: where the points come from (a date, a command)")
    args = ap.parse_args()
    metrics = tuple(m for m in args.metrics.split(",") if m)
    runs = load(args.dbs)
    if not runs:
        raise SystemExit("no sequential runs in " + ", ".join(args.dbs))
    table(runs, metrics)
    if args.export:
        export(runs, args.export, args.source)
    if args.png:
        plot(runs, args.png, metrics)


if __name__ == "__main__":
    main()
