"""The `editlab pitfalls` report: one self-contained HTML file (jinja2 template, plots as embedded
PNGs) with a section per pitfall: what it is in one sentence, a table of every metric beside the
unedited model's value on the same records (best edited value per row marked by the metric's
direction), and a plot: per-relation bars for ripple effects, the distribution of the JS divergence
for distortion, metric against number of edits for the collapse probes, grouped bars otherwise.

Built from the result store alone (plus, for the per-relation bars, the suite's data file named in
the run's config), so `write_pitfalls_report` can be re-run on a finished database.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import EditlabError
from ..probes import PROBES, chance_metric, headline_metrics
from ..suites.metrics import is_fraction
from ..runner.store import Store
from .plan import SECTIONS, Section
from .run import PitfallsRuns

COLORS = ["#8c8c8c", "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1"]
UNEDITED = "unedited"
# collapse metrics plotted against the number of edits, in this order (those present)
RETENTION_PLOTS = ("retention_efficacy_score", "retention_rewrite_acc")  # then every probe's headline metrics


@dataclass
class Cell:
    text: str
    best: bool = False


@dataclass
class Table:
    columns: list[str]
    rows: list[tuple[str, str, list[Cell]]] = field(default_factory=list)  # (metric, arrow, cells)
    notes: list[str] = field(default_factory=list)


@dataclass
class Block:
    """One section of the report."""

    section: Section
    tables: list[tuple[str, Table]] = field(default_factory=list)
    plots: list[tuple[str, str]] = field(default_factory=list)  # (caption, data URI)
    notes: list[str] = field(default_factory=list)


def direction(name: str) -> bool | None:
    """Higher is better (True), lower (False) or neither (None) for a suite or collapse metric name."""
    from ..suites import metric_info

    base = name.rsplit(".", 1)[-1]
    if base.startswith(("retention_", "newest_")):
        return "perplexity" not in base
    if base in ("perplexity", "perplexity_base"):
        return False
    try:
        return metric_info(name).higher_is_better
    except EditlabError:
        return None


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4g}"


def _table(columns: list[str], values: list[dict[str, float]], names: Sequence[str], edited: Sequence[bool],
           ses: Sequence[dict[str, float]] | None = None) -> Table:
    """Rows `names`, one column per summary (with its standard error where `ses` has one); the best edited
    value of each row (by direction, among two or more edited columns) is marked."""
    from ..suites.runner import format_with_se

    errs = list(ses) if ses is not None else [{} for _ in values]
    t = Table(columns)
    for name in names:
        hib = direction(name)
        vals = [v.get(name) for v in values]
        cand = [x for x, e in zip(vals, edited) if e and x is not None]
        best = None
        if hib is not None and len(cand) > 1:
            best = max(cand) if hib else min(cand)
        cells = [Cell("" if x is None else format_with_se(x, err.get(name)) if err.get(name) is not None else _fmt(x),
                      best is not None and x == best and e) for x, e, err in zip(vals, edited, errs)]
        t.rows.append((name, {True: "↑", False: "↓", None: ""}[hib], cells))
    return t


def _png(fig: Any) -> str:
    from ..report.html import _png as png

    return png(fig)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------ suites
def _suite_block(store: Store, block: Block, suite: str, run_ids: dict[str, str]) -> None:
    from ..suites.runner import metric_rows, suite_standard_errors, suite_summary

    order = [UNEDITED] + [m for m in run_ids if m != UNEDITED]
    sums = {m: suite_summary(store, run_ids[m]) for m in order}
    names = metric_rows(list(sums.values()))
    t = _table(order, [sums[m] for m in order], names, [m != UNEDITED for m in order],
               [suite_standard_errors(store, run_ids[m]) for m in order])
    t.notes.append("± the standard error over records (sd/√n).")
    t.rows.append(("records", "", [Cell(str(int(sums[m].get("n", 0)))) for m in order]))
    if any("errors" in s for s in sums.values()):
        t.rows.append(("errors (left out)", "", [Cell(str(int(sums[m].get("errors", 0)))) for m in order]))
    t.rows.append(("median s/edit", "", [Cell(_fmt(sums[m].get("s_per_edit"))) for m in order]))
    block.tables.append((suite, t))
    plot = block.section.plot
    if plot == "relations" and suite == "counterfact":
        uri = _relation_bars(store, run_ids, order)
        if uri:
            block.plots.append(("CounterFact one-hop portability by relation (mean token accuracy per relation)", uri))
    elif plot == "distortion":
        uri = _distortion_hist(store, run_ids, order)
        if uri:
            block.plots.append(("Distribution of the JS divergence D per record (lower is better)", uri))
    elif plot in ("bars", "relations"):
        keys = [n for n in names if direction(n) is not None and is_fraction(n)][:8]
        if keys:
            block.plots.append((f"{suite}: main metrics", _grouped_bars(keys, order, sums)))


def _grouped_bars(keys: list[str], order: list[str], sums: dict[str, dict[str, float]]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(keys) * max(1, len(order)) / 2.2), 3.0))
    width = 0.8 / len(order)
    for j, m in enumerate(order):
        vals = [sums[m].get(k, math.nan) for k in keys]  # a missing value draws no bar (never a zero)
        ax.bar([i + j * width for i in range(len(keys))], vals, width, label=m, color=COLORS[j % len(COLORS)])
    ax.set_xticks([i + width * (len(order) - 1) / 2 for i in range(len(keys))])
    ax.set_xticklabels(keys, fontsize=7, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=7, frameon=False, ncol=min(4, len(order)))
    return _png(fig)


def _relation_bars(store: Store, run_ids: dict[str, str], order: list[str]) -> str | None:
    """Mean one-hop portability per relation (CounterFact `requested_rewrite.relation_id`), one bar per
    run; the relation of each record is read from the data file the run's config names."""
    runs = {r["run_id"]: r for r in store.runs()}
    data = ((runs[run_ids[UNEDITED]].get("config") or {}).get("data") or {}).get("one_hop") or {}
    path = Path(data.get("path", ""))
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    relation = {str(r.get("case_id")): (r.get("requested_rewrite") or {}).get("relation_id") for r in records
                if isinstance(r, dict)}
    per: dict[str, dict[str, list[float]]] = {}
    for m in order:
        acc: dict[str, list[float]] = defaultdict(list)
        for row in store.rows(run_ids[m]):
            v = row.metrics.get("one_hop.one_hop")
            rel = relation.get(row.row_key.split(":", 1)[-1])
            if v is not None and rel:
                acc[rel].append(v)
        per[m] = acc
    rels = sorted({r for acc in per.values() for r in acc})
    if not rels:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.5, 0.45 * len(rels) * len(order)), 3.0))
    width = 0.8 / len(order)
    for j, m in enumerate(order):
        vals = [sum(per[m][r]) / len(per[m][r]) if per[m].get(r) else math.nan for r in rels]
        ax.bar([i + j * width for i in range(len(rels))], vals, width, label=m, color=COLORS[j % len(COLORS)])
    counts = [max(len(per[m].get(r, [])) for m in order) for r in rels]
    ax.set_xticks([i + width * (len(order) - 1) / 2 for i in range(len(rels))])
    ax.set_xticklabels([f"{r} ({c})" for r, c in zip(rels, counts)], fontsize=7, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("one-hop token accuracy", fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=7, frameon=False, ncol=min(4, len(order)))
    return _png(fig)


def _distortion_hist(store: Store, run_ids: dict[str, str], order: list[str]) -> str | None:
    values = {m: [v for row in store.rows(run_ids[m]) for k, v in row.metrics.items() if k.rsplit(".", 1)[-1] == "D"]
              for m in order if m != UNEDITED}
    if not any(values.values()):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 2.8))
    hi = max(max(v) for v in values.values() if v)
    bins = [hi * i / 12 for i in range(13)] if hi > 0 else 12
    for j, (m, v) in enumerate(values.items(), 1):
        if v:
            ax.hist(v, bins=bins, alpha=0.55, label=f"{m} (n={len(v)})", color=COLORS[j % len(COLORS)])
    ax.set_xlabel("D (nats)", fontsize=8)
    ax.set_ylabel("records", fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=7, frameon=False)
    return _png(fig)


# ---------------------------------------------------------------------------------------- collapse
def _collapse_block(store: Store, block: Block, run_ids: dict[str, str]) -> None:
    points: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for m, rid in run_ids.items():
        pts = sorted(((r.n_edits, r.metrics) for r in store.rows(rid) if r.kind == "checkpoint"), key=lambda p: p[0])
        if pts:
            points[m] = pts
    if not points:
        return
    # the unedited model: checkpoint 0 of any run that has it (probes are deterministic, so all agree)
    base = next((pts[0][1] for pts in points.values() if pts[0][0] == 0), {})
    last_n = {m: pts[-1][0] for m, pts in points.items()}
    names = [k for k in dict.fromkeys(k for pts in points.values() for _, mt in pts for k in mt)
             if k not in ("perplexity_base",) and not k.startswith("newest_")]
    cols = [f"{UNEDITED} (0 edits)"] + [f"{m} ({last_n[m]} edits)" for m in points]
    vals = [base] + [points[m][-1][1] for m in points]
    t = _table(cols, vals, names, [False] + [True] * len(points))
    floors = _floors(base, store, run_ids)
    for task, why in floors.items():
        t.notes.append(f"{task}: {why}; its change is not interpreted.")
    block.tables.append(("values at the last checkpoint beside the unedited model", t))
    collapsed = [f"{m} at {n} edits" for m, pts in points.items() for n, mt in pts if mt.get("collapsed") == 1.0]
    block.notes.append("Collapsed (WikiText-2 perplexity above twice the unedited value): " +
                       (", ".join(collapsed) if collapsed else "none"))
    plt = _plt()
    for k in (*RETENTION_PLOTS, *headline_metrics()):
        if not any(k in mt for pts in points.values() for _, mt in pts):
            continue
        fig, ax = plt.subplots(figsize=(4.0, 2.7))
        for j, (m, pts) in enumerate(points.items(), 1):
            xy = [(n, mt[k]) for n, mt in pts if k in mt]
            ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", ms=3, label=m, color=COLORS[j % len(COLORS)])
        if chance_metric(k) in base:
            ax.axhline(base[chance_metric(k)], color="#999", ls=":", lw=1, label="chance")
        if k in base and k not in ("nkl_fixed", "norm_growth_max"):
            ax.axhline(base[k], color="#555", ls="--", lw=1, label="unedited")
        if is_fraction(k):
            ax.set_ylim(-0.03, 1.03)
        arrow = {True: " (↑ better)", False: " (↓ better)", None: ""}[direction(k)]
        title = k + arrow + (" · at floor" if k in floors else "")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("number of edits", fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(fontsize=6, frameon=False)
        block.plots.append((k, _png(fig)))


def _floors(base: dict[str, float], store: Store, run_ids: dict[str, str]) -> dict[str, str]:
    """Downstream tasks whose unedited score is within two standard errors of chance ("at floor")."""
    runs = {r["run_id"]: r for r in store.runs()}
    info = {}
    for rid in run_ids.values():
        info = ((runs.get(rid) or {}).get("config") or {}).get("probe_info", {}).get("downstream", {}) or info
    sizes = info.get("sizes", {}) if isinstance(info, dict) else {}
    out = {}
    for task, chance_key in [(t, chance_metric(t)) for t in PROBES.get("downstream").headline]:
        if task not in base:
            continue
        chance = base.get(chance_key, 0.0) if chance_key else 0.0
        n = sizes.get(task.split("_")[0], 0) if isinstance(sizes, dict) else 0
        p = min(max(chance, 0.05), 0.95)
        margin = 2 * math.sqrt(p * (1 - p) / n) if n else 0.05
        if base[task] <= chance + margin:
            out[task] = f"unedited {base[task]:.3f} vs chance {chance:.3f} (at floor)"
    return out


# ------------------------------------------------------------------------------------------- write
def build_blocks(store: Store, runs: PitfallsRuns) -> list[Block]:
    blocks = []
    for sec in SECTIONS:
        block = Block(sec)
        if sec.key == "collapse":
            if runs.collapse:
                _collapse_block(store, block, runs.collapse)
        else:
            for suite in sec.suites:
                if suite in runs.suites:
                    _suite_block(store, block, suite, runs.suites[suite])
                if suite in runs.notes:  # not run, or not for every method: say why
                    block.notes.append(f"{suite}: {runs.notes[suite]}")
        if block.tables or (block.notes and sec.key != "collapse"):
            blocks.append(block)
    return blocks


def write_pitfalls_report(db: str | Path, runs: PitfallsRuns, out: str | Path, *, title: str = "editlab pitfalls",
                          budget: str = "", model: str = "", seconds: float | None = None) -> Path:
    """Render the report of `runs` (in store `db`, opened read-only) to `out`, written atomically."""
    import jinja2

    from ..fileio import write_text_atomic

    store = Store.open_readonly(db)
    try:
        blocks = build_blocks(store, runs)
    finally:
        store.close()
    env = jinja2.Environment(loader=jinja2.PackageLoader("editlab.pitfalls", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)
    html = env.get_template("pitfalls.html.j2").render(
        title=title, blocks=blocks, budget=budget, model=model, generated=time.strftime("%Y-%m-%d %H:%M"),
        minutes=None if seconds is None else seconds / 60)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, html)
    return out


__all__ = ["build_blocks", "direction", "write_pitfalls_report"]
