"""One self-contained HTML file from a result store: method × metric table, a bar chart per metric
family, a line plot per metric against the number of edits for sequential runs, run metadata, and the
heatmaps of `editlab trace` output folders given with `traces`. Plots are rendered with matplotlib (Agg)
and embedded as base64 PNGs."""

from __future__ import annotations

import base64
import html
import io
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import OptionError
from ..eval.metrics import summarize
from ..runner.store import Store
from .sweeps import sweep_sections

FAMILIES: dict[str, list[str]] = {
    "Reliability": ["efficacy_score", "rewrite_acc", "rewrite_gen_em"],
    "Generalization": ["paraphrase_score", "rephrase_acc", "rephrase_gen_em", "portability_acc"],
    "Locality": ["neighborhood_score", "locality_acc"],
}
TABLE_KEYS = ["efficacy_score", "paraphrase_score", "neighborhood_score", "cf_score", "rewrite_acc", "rephrase_acc",
              "locality_acc", "portability_acc", "rewrite_gen_em", "rephrase_gen_em", "fluency"]
# a sequential run's own curves; then every probe's headline metrics, from the probe registry
RUN_SEQ_KEYS = ["retention_rewrite_acc", "retention_efficacy_score", "retention_rephrase_acc", "retention_locality_acc",
                "newest_rewrite_acc", "perplexity"]
COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"]


def aggregate(store: Store) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(one summary per single/batch run, one list of checkpoint rows per sequential run)."""
    runs = store.runs()
    summaries, sequences = [], []
    for run in runs:
        rows = list(store.rows(run["run_id"]))
        if not rows:
            continue
        if run["mode"] == "suite":  # pitfall suites: their own section (_suite_sections)
            continue
        if run["mode"] == "sequential":
            pts = sorted((r for r in rows if r.kind == "checkpoint"), key=lambda r: r.n_edits)
            sequences.append({"run": run, "points": [(r.n_edits, r.metrics) for r in pts]})
        else:
            edits = [r for r in rows if r.kind == "edit"]
            s = summarize(r.metrics for r in edits)
            times = [r.edit_s for r in edits if r.edit_s is not None]
            summaries.append({"run": run, "n": len(edits), "summary": s,
                              "median_edit_s": statistics.median(times) if times else None})
    return summaries, sequences


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _label(run: dict[str, Any]) -> str:
    extra = f" k={run['config'].get('batch_size')}" if run["mode"] == "batch" and run.get("config") else ""
    return f"{run['method']} ({run['mode']}{extra})"


def _bar_charts(summaries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for family, keys in FAMILIES.items():
        keys = [k for k in keys if any(k in s["summary"] for s in summaries)]
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(keys) * max(1, len(summaries)) / 3, 3.2))
        width = 0.8 / max(1, len(summaries))
        for j, s in enumerate(summaries):
            vals = [s["summary"].get(k, 0.0) for k in keys]
            xs = [i + j * width for i in range(len(keys))]
            bars = ax.bar(xs, vals, width, label=_label(s["run"]), color=COLORS[j % len(COLORS)])
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks([i + width * (len(summaries) - 1) / 2 for i in range(len(keys))])
        ax.set_xticklabels([k.replace("_", " ") for k in keys], fontsize=8, rotation=15, ha="right")
        ax.set_ylim(0, 1.1)
        ax.set_title(family, fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=min(3, len(summaries)))
        out.append((family, _png(fig)))
    return out


def _seq_plots(sequences: list[dict[str, Any]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..probes import chance_metric, headline_metrics
    from ..suites.metrics import is_fraction

    out = []
    keys = [k for k in (*RUN_SEQ_KEYS, *headline_metrics()) if any(k in m for s in sequences for _, m in s["points"])]
    for k in keys:
        fig, ax = plt.subplots(figsize=(4.2, 2.8))
        for j, s in enumerate(sequences):
            pts = [(n, m[k]) for n, m in s["points"] if k in m]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=_label(s["run"]), color=COLORS[j % len(COLORS)])
        if k == "perplexity":
            base = next((m.get("perplexity_base") for s in sequences for _, m in s["points"] if m.get("perplexity_base")), None)
            if base:
                ax.axhline(base, color="#999", ls="--", lw=1, label="unedited")
        elif is_fraction(k):
            ax.set_ylim(-0.05, 1.05)
        chance = next((m[chance_metric(k)] for s in sequences for _, m in s["points"] if chance_metric(k) in m), None)
        if chance is not None:
            ax.axhline(chance, color="#999", ls=":", lw=1, label="chance")
        ax.set_xlabel("number of edits", fontsize=8)
        ax.set_title(k, fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(fontsize=7, frameon=False)
        out.append((k, _png(fig)))
    return out


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1f2328}
header{background:#1f2a44;color:#fff;padding:22px 40px}header h1{margin:0;font-size:22px}
header p{margin:6px 0 0;color:#c9d1e3;font-size:13px}main{padding:20px 40px;max-width:1200px}
section{background:#fff;border:1px solid #e3e6ea;border-radius:8px;padding:16px 20px;margin-bottom:18px}
h2{font-size:16px;margin:0 0 12px}table{border-collapse:collapse;font-size:13px;width:100%}
th,td{padding:6px 10px;border-bottom:1px solid #eceef1;text-align:right}th:first-child,td:first-child{text-align:left}
th{background:#fafbfc;font-weight:600;color:#57606a}td.best{font-weight:700;color:#1a7f37}
.grid{display:flex;flex-wrap:wrap;gap:12px}.grid figure{margin:0;background:#fff}
.meta td{text-align:left;font-family:ui-monospace,Menlo,monospace;font-size:12px}.note{color:#57606a;font-size:12px}
"""


def _suite_sections(store: Store, runs: list[dict[str, Any]]) -> list[str]:
    """One table per pitfall suite (per model): a row per metric with its direction, a column per run,
    the unedited model first; the best edited value per row in green."""
    from ..errors import EditlabError
    from ..suites import metric_info
    from ..suites.runner import UNEDITED, metric_rows, suite_summary

    esc = html.escape
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        if r["mode"] == "suite" and store.count_rows(r["run_id"]):
            cfg = r.get("config") or {}
            setting = ", ".join([f"limit {cfg['limit']}" if cfg.get("limit") else "all records"]
                                + [f"{k}={v}" for k, v in sorted((cfg.get("options") or {}).items())])
            data = "/".join(d.get("sha256", "")[:8] for d in (cfg.get("data") or {}).values())
            # runs of one table are comparable: same suite, model, records, options and data files
            groups.setdefault((str(r["dataset"]), str(r["model"]), f"{setting} · data {data}"), []).append(r)
    parts = []
    for (suite, model, setting), rs in groups.items():
        rs.sort(key=lambda r: (r["method"] != UNEDITED, r["created"] or 0))
        sums = [suite_summary(store, r["run_id"]) for r in rs]
        names = metric_rows(sums)
        parts.append(f"<section><h2>Suite {esc(suite)} · {esc(model)}</h2><p class='note'>{esc(setting)}</p>"
                     "<table><tr><th>metric</th>"
                     + "".join(f"<th>{esc(r['method'])}</th>" for r in rs) + "</tr>")
        for name in names:
            try:
                hib = metric_info(name).higher_is_better
            except EditlabError:
                hib = None
            edited = [s[name] for r, s in zip(rs, sums) if r["method"] != UNEDITED and name in s]
            best = (max(edited) if hib else min(edited)) if edited and hib is not None and len(edited) > 1 else None
            cells = []
            for r, s in zip(rs, sums):
                v = s.get(name)
                cls = " class='best'" if v is not None and v == best and r["method"] != UNEDITED else ""
                cells.append(f"<td{cls}>{'' if v is None else f'{v:.4g}'}</td>")
            arrow = {True: " ↑", False: " ↓", None: ""}[hib]
            parts.append(f"<tr><td>{esc(name)}{arrow}</td>{''.join(cells)}</tr>")
        parts.append("<tr><td>records</td>" + "".join(f"<td>{int(s['n'])}</td>" for s in sums) + "</tr>")
        if any("errors" in s for s in sums):
            parts.append("<tr><td>errors (left out)</td>" + "".join(f"<td>{int(s.get('errors', 0))}</td>" for s in sums)
                         + "</tr>")
        parts.append("<tr><td>median s/edit</td>" + "".join(
            f"<td>{'' if 's_per_edit' not in s else format(s['s_per_edit'], '.2f')}</td>" for s in sums) + "</tr>")
        parts.append("</table><p class='note'>Definitions: docs/pitfalls.md. The unedited column is the same records "
                     "on the unedited model: the ceiling or floor each edited value is read against.</p></section>")
    return parts


def trace_folders(folders: Sequence[str | Path]) -> list[Path]:
    """`editlab trace` output folders to put in a report: each must exist and hold a PNG heatmap with
    its `trace.json` or `average.json` (`OptionError` otherwise; checked before anything is written)."""
    out = []
    for f in folders:
        d = Path(f)
        if not d.is_dir():
            raise OptionError(f"--traces {d}: not a folder (give the --out folder of an 'editlab trace' run)")
        if not list(d.glob("*.png")) or not ((d / "trace.json").is_file() or (d / "average.json").is_file()):
            raise OptionError(f"--traces {d}: no heatmaps with trace.json or average.json; run 'editlab trace --out {d}' first")
        out.append(d)
    return out


def _trace_section(folders: Sequence[Path]) -> list[str]:
    """One block per trace folder: what was traced (from its JSON) and its heatmaps."""
    import json

    esc = html.escape
    parts = ["<section><h2>Causal traces</h2>"]
    for d in folders:
        meta_file = d / "trace.json" if (d / "trace.json").is_file() else d / "average.json"
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        first = next(iter(meta.values()), {}) if isinstance(meta, dict) else {}
        if meta_file.name == "trace.json" and isinstance(first, dict) and "prompt" in first:
            what = (f"{esc(str(first['prompt']))} → {esc(str(first.get('answer', '')).strip())} "
                    f"(subject {esc(str(first.get('subject', '')))})")
        elif isinstance(first, dict) and "n_facts" in first:
            what = f"average over {esc(str(first['n_facts']))} known facts"
        else:
            what = ""
        parts.append(f"<p><b>{esc(d.name)}</b> {what}</p><div class='grid'>")
        for png in sorted(d.glob("*.png")):
            src = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
            parts.append(f"<figure><img alt='{esc(png.stem)}' src='{src}'><figcaption class='note'>{esc(png.stem)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("<p class='note'>Colour: probability of the answer with that state restored in the corrupted run "
                 "(one prompt), or the average indirect effect (averages); see docs/tracing.md.</p></section>")
    return parts


def write_report(db: str | Path, out: str | Path, title: str = "editlab report",
                 traces: Sequence[str | Path] = ()) -> Path:
    """Write the report of store `db` (opened read-only) to `out`, with the heatmaps of the given
    `editlab trace` output folders."""
    trace_dirs = trace_folders(traces)
    store = Store.open_readonly(db)
    summaries, sequences = aggregate(store)
    runs = store.runs()
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_CSS}</style></head><body>"]
    model = ", ".join(sorted({r['model'] for r in runs})) or "-"
    parts.append(f"<header><h1>{esc(title)}</h1><p>model: {esc(model)} · {len(runs)} run(s) · generated {time.strftime('%Y-%m-%d %H:%M')}</p></header><main>")
    if summaries:
        keys = [k for k in TABLE_KEYS if any(k in s["summary"] for s in summaries)]
        best = {k: max(s["summary"].get(k, float("-inf")) for s in summaries) for k in keys}
        parts.append("<section><h2>Methods × metrics</h2><table><tr><th>method</th><th>dataset</th><th>n</th><th>median edit s</th>"
                     + "".join(f"<th>{esc(k)}</th>" for k in keys) + "</tr>")
        for s in summaries:
            cells = []
            for k in keys:
                v = s["summary"].get(k)
                cls = " class='best'" if v is not None and v == best[k] and len(summaries) > 1 else ""
                cells.append(f"<td{cls}>{'' if v is None else f'{v:.3f}'}</td>")
            t = s["median_edit_s"]
            parts.append(f"<tr><td>{esc(_label(s['run']))}</td><td>{esc(str(s['run']['dataset']))}</td><td>{s['n']}</td>"
                         f"<td>{'' if t is None else f'{t:.2f}'}</td>{''.join(cells)}</tr>")
        parts.append("</table><p class='note'>Scores and accuracies are means over requests (docs/metrics.md); best value per column in green.</p></section>")
        charts = _bar_charts(summaries)
        if charts:
            parts.append("<section><h2>Metric families</h2><div class='grid'>")
            parts += [f"<figure><img alt='{esc(n)}' src='{src}'></figure>" for n, src in charts]
            parts.append("</div></section>")
    if sequences:
        parts.append("<section><h2>Sequential editing: metrics as edits accumulate</h2><div class='grid'>")
        parts += [f"<figure><img alt='{esc(n)}' src='{src}'></figure>" for n, src in _seq_plots(sequences)]
        parts.append("</div><p class='note'>retention_*: all edits made so far; newest_*: edits since the previous checkpoint; perplexity on a fixed text sample.</p></section>")
    parts += _suite_sections(store, runs)
    parts += sweep_sections(store, _png)
    if trace_dirs:
        parts += _trace_section(trace_dirs)
    parts.append("<section><h2>Runs</h2><table class='meta'><tr><th>run</th><th>method</th><th>mode</th><th>dataset</th><th>requests</th><th>versions</th><th>hparams</th></tr>")
    for r in runs:
        hp = ", ".join(f"{k}={v}" for k, v in (r["hparams"] or {}).items())
        ver = ", ".join(f"{k} {v}" for k, v in (r["versions"] or {}).items())
        parts.append(f"<tr><td>{esc(r['run_id'])}</td><td>{esc(r['method'])}</td><td>{esc(r['mode'])}</td><td>{esc(str(r['dataset']))}</td>"
                     f"<td>{esc(str(r['n_requests']))}</td><td>{esc(ver)}</td><td>{esc(hp)}</td></tr>")
    parts.append("</table></section></main></body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(parts), encoding="utf-8")
    store.close()
    return out
