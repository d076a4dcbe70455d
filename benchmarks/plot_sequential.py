"""One table and one plot from the JSON-lines files `sequential.py --out` writes (several runs, e.g. one
per method, on the same records): retention, locality and perplexity against the number of edits, each
beside the unedited model's value on the same records.

    python benchmarks/plot_sequential.py runs1.jsonl runs2.jsonl --plot docs/sequential.png

The rows of docs/sequential.png (every method on the same 200 records) are in docs/sequential_adapters.jsonl
and docs/sequential_locate.jsonl:

    python benchmarks/plot_sequential.py docs/sequential_adapters.jsonl docs/sequential_locate.jsonl \
        --skip "earlier preset" --plot docs/sequential.png
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--skip", action="append", default=[], help="leave out methods whose name contains this")
    args = ap.parse_args()
    rows = [json.loads(l) for f in args.files for l in open(f) if l.strip()]
    rows = [r for r in rows if not any(s in r["method"] for s in args.skip)]
    rows.sort(key=lambda r: (r["method"], r["edits"]))
    print("| method | edits | ES | retention | rephrase | locality | perplexity | s / edit |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        u = r["unedited"]
        print(f"| {r['method']} | {r['edits']} | {r['es']:.3f} ({u['es']:.3f}) | {r['retention']:.3f} ({u['retention']:.3f}) "
              f"| {r['rephrase']:.3f} ({u['rephrase']:.3f}) | {r['locality']:.3f} ({u['locality']:.3f}) "
              f"| {r['ppl']:.2f} ({r['ppl_unedited']:.2f}) | {r['median_s_per_edit']:.1f} |")
    if not args.plot:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    styles = ["-", "--", ":", "-."]
    for i, m in enumerate(sorted({r["method"] for r in rows})):
        pts = [r for r in rows if r["method"] == m]
        for ax, key in zip(axes, ("retention", "locality", "ppl")):  # line styles tell coinciding curves apart
            ax.plot([p["edits"] for p in pts], [p[key] for p in pts], marker="o", ms=4, ls=styles[i % len(styles)],
                    label=m)
    last = max(rows, key=lambda r: r["edits"])
    axes[2].axhline(last["ppl_unedited"], color="k", linestyle="--", label="unedited")
    axes[1].axhline(1.0, color="k", linestyle="--", label="unedited")
    axes[0].set(xlabel="edits so far", ylabel="rewrite accuracy of all edits so far", title="Retention")
    axes[1].set(xlabel="edits so far", ylabel="neighbourhood token accuracy", title="Locality")
    axes[2].set(xlabel="edits so far", ylabel="WikiText-2 perplexity", title="General ability")
    for ax in axes:
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
