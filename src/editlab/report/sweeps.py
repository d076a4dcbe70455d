"""The report's sweep sections: for each `editlab sweep` recorded in the store, the Pareto plot of its
first two objectives (every grid point, the front joined by a line) and a table of all points."""

from __future__ import annotations

import html
from typing import Any, Callable

from ..runner.store import Store


def _pareto_plot(record: dict[str, Any], png: Callable[[Any], str]) -> str | None:
    objectives = record.get("objectives") or []
    if len(objectives) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_name, y_name = objectives[0], objectives[1]
    pts = [(t["values"].get(x_name), t["values"].get(y_name), t) for t in record["trials"]]
    pts = [p for p in pts if p[0] is not None and p[1] is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    ax.scatter([p[0] for p in pts if not p[2]["front"]], [p[1] for p in pts if not p[2]["front"]],
               color="#bbb", s=22, label="grid point")
    front = sorted((p for p in pts if p[2]["front"]), key=lambda p: p[0])
    # with two objectives the front is a staircase in this plane; with more, its points need not be
    ax.plot([p[0] for p in front], [p[1] for p in front], marker="o", color="#e15759", label="Pareto front",
            linestyle="-" if len(objectives) == 2 else "none")
    for x, y, t in front:
        ax.annotate(" ".join(f"{k}={v}" for k, v in t["point"].items()), (x, y), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(x_name, fontsize=8)
    ax.set_ylabel(y_name, fontsize=8)
    note = f" (front over {', '.join(objectives)})" if len(objectives) > 2 else ""
    ax.set_title(f"{record.get('method')} on {record.get('dataset')}{note}", fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=7, frameon=False)
    return png(fig)


def sweep_sections(store: Store, png: Callable[[Any], str]) -> list[str]:
    esc = html.escape
    out = []
    for key, record in store.records("sweep:").items():
        if not isinstance(record, dict) or not record.get("trials"):
            continue
        objectives = record.get("objectives") or []
        keys = record.get("grid_keys") or list(record["trials"][0]["point"])
        parts = [f"<section><h2>Sweep {esc(key[len('sweep:'):])}: {esc(str(record.get('method')))} on "
                 f"{esc(str(record.get('dataset')))} ({record.get('n_requests')} records, {len(record['trials'])} points)</h2>"]
        plot = _pareto_plot(record, png)
        if plot:
            parts.append(f"<figure><img alt='Pareto front' src='{plot}'></figure>")
        parts.append("<table><tr><th>front</th>" + "".join(f"<th>{esc(k)}</th>" for k in keys)
                     + "".join(f"<th>{esc(o)}</th>" for o in objectives) + "</tr>")
        for t in sorted(record["trials"], key=lambda t: not t["front"]):
            vals = "".join(f"<td>{'' if t['values'].get(o) is None else format(t['values'][o], '.3f')}</td>" for o in objectives)
            parts.append(f"<tr><td>{'★' if t['front'] else ''}</td>"
                         + "".join(f"<td>{esc(str(t['point'].get(k)))}</td>" for k in keys) + vals + "</tr>")
        parts.append("</table><p class='note'>★: on the Pareto front of the objectives (no other point is at least as "
                     "good on all and better on one). Sweep on a tuning split: these are not results.</p></section>")
        out.append("".join(parts))
    return out
