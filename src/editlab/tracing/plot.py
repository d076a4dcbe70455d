"""Heatmaps of causal traces as PNG files (matplotlib, Agg backend: no display needed).

One prompt: rows are the prompt's tokens (subject tokens starred), columns the layers, colour the
probability of the answer with that state restored; the colour scale starts at the corrupted run's
probability, so white means "no effect". Averaged traces: rows are the paper's token classes, colour the
average indirect effect (from 0, white).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OutputPathError

if TYPE_CHECKING:
    from .causal import TraceResult
    from .knowns import AverageTrace

_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
_NAMES = {"hidden": "single restored layer (residual stream)", "mlp": "MLP", "attn": "attention"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _what(kind: str, window: int) -> str:
    if window == 1:
        return f"{_NAMES[kind]} output at one layer" if kind != "hidden" else "hidden state at one layer"
    return f"{_NAMES[kind]} outputs over {window} layers" if kind != "hidden" else f"hidden states over {window} layers"


def _save(fig: Any, path: str | Path) -> Path:
    plt = _pyplot()
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=120, bbox_inches="tight")
    except OSError as e:
        raise OutputPathError(f"cannot write the heatmap {p}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return p


def plot_trace(result: TraceResult, path: str | Path) -> Path:
    """Write one prompt's trace as a PNG heatmap; returns the path."""
    plt = _pyplot()
    scores = result.scores.numpy()
    a, b = result.subject_range
    labels = [repr(t)[1:-1] + ("*" if a <= i < b else "") for i, t in enumerate(result.tokens)]
    n_tok, n_layers = scores.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.18 * n_layers + 2.0), max(2.0, 0.3 * n_tok + 1.0)))
    vmax = max(float(scores.max()), result.high, result.low + 1e-6)
    im = ax.pcolormesh(scores, cmap=_CMAPS[result.kind], vmin=result.low, vmax=vmax)
    ax.invert_yaxis()
    ax.set_yticks([i + 0.5 for i in range(n_tok)])
    ax.set_yticklabels(labels)
    step = max(1, n_layers // 10)
    ax.set_xticks([i + 0.5 for i in range(0, n_layers, step)])
    ax.set_xticklabels([str(i) for i in range(0, n_layers, step)])
    centre = " (centre of the window)" if result.window > 1 else ""
    ax.set_xlabel(f"layer{centre}")
    ax.set_title(f"Restoring the {_what(result.kind, result.window)}\ncorrupted p = {result.low:.3f}, clean p = "
                 f"{result.high:.3f}, {result.samples} noise samples, * = subject token", fontsize=9)
    cb = plt.colorbar(im, ax=ax)
    cb.ax.set_title(f"p({result.answer.strip()!r})", y=-0.12, fontsize=8)
    return _save(fig, path)


def plot_average(avg: AverageTrace, path: str | Path) -> Path:
    """Write an averaged trace (token classes x layers) as a PNG heatmap; returns the path."""
    plt = _pyplot()
    grid = avg.effect.numpy()
    n_rows, n_layers = grid.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.18 * n_layers + 2.0), 3.0))
    # white = no effect; the few negative averages (restoring slightly lowers p) are shown as white too
    im = ax.pcolormesh(grid, cmap=_CMAPS[avg.kind], vmin=0.0, vmax=max(float(grid.max()), 1e-6))
    ax.invert_yaxis()
    ax.set_yticks([i + 0.5 for i in range(n_rows)])
    ax.set_yticklabels([f"{c} ({n})" for c, n in zip(avg.classes, avg.counts)])
    step = max(1, n_layers // 10)
    ax.set_xticks([i + 0.5 for i in range(0, n_layers, step)])
    ax.set_xticklabels([str(i) for i in range(0, n_layers, step)])
    ax.set_xlabel("layer" + (" (centre of the window)" if avg.window > 1 else ""))
    ax.set_title(f"Average indirect effect, {_what(avg.kind, avg.window)} ({avg.n_facts} facts, "
                 f"{avg.samples} noise samples)\n"
                 f"mean corrupted p = {avg.low:.3f}, mean clean p = {avg.high:.3f}; (n) = facts with a token of that class",
                 fontsize=9)
    plt.colorbar(im, ax=ax)
    return _save(fig, path)
