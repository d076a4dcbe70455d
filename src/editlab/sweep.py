"""Hyper-parameter sweeps (`editlab sweep`): a grid of hyper-parameter values (or a seeded random
sample of it), each point an ordinary run in the result store, scored on chosen objectives, with the
Pareto front of those objectives.

Why a grid on editlab's own executor and not Ray Tune: every trial is exactly the run `editlab eval`
would make (same run id, so `--resume` skips finished trials and `editlab report` shows them), the
store stays the one record of what ran, and the trials spread over Ray workers through the same
`--executor ray`. Tune's trial state, checkpoints and result folders would be a second record beside
the store; its adaptive searchers pay off on long trainings with many continuous knobs, while an
editing preset has a few discrete ones (a layer, a learning rate, a step count) that a small grid
covers. `--samples N` draws N points of a larger grid at random (seeded).

Torch-free: the CLI checks a grid before any model loads."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .errors import OptionError

MAX_TRIALS = 10_000


@dataclass(frozen=True)
class Objective:
    name: str
    metric: str  # row metric averaged over a run's rows ("edit_s": the median seconds per edit)
    maximize: bool
    help: str


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("efficacy", "efficacy_score", True, "CounterFact efficacy score (new answer beats the old)"),
    Objective("paraphrase", "paraphrase_score", True, "CounterFact paraphrase score"),
    Objective("neighborhood", "neighborhood_score", True, "CounterFact neighbourhood score (unrelated subjects keep their answer)"),
    Objective("rewrite", "rewrite_acc", True, "token accuracy of the new answer on the edit prompt"),
    Objective("rephrase", "rephrase_acc", True, "token accuracy on the paraphrases"),
    Objective("locality", "locality_acc", True, "token accuracy of unrelated answers against the unedited model"),
    Objective("portability", "portability_acc", True, "token accuracy on consequences of the edit"),
    Objective("edit_time", "edit_s", False, "median seconds per edit (lower is better)"),
)}


def split_values(text: str) -> list[str]:
    """Values separated by commas outside brackets and quotes: `3,4` -> ['3', '4']; `[3,4],[5,6]` -> two lists."""
    out, depth, cur, quote = [], 0, [], ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return out


def parse_grid(items: Sequence[str] | None) -> dict[str, list[str]]:
    """`--grid key=v1,v2` options as {key: [values]}, in the order given; values stay strings (the
    method's Hparams coerce and check them, as for `--set`)."""
    if not items:
        raise OptionError("a sweep needs at least one --grid key=v1,v2,... (see `editlab sweep --help`)")
    grid: dict[str, list[str]] = {}
    for item in items:
        key, eq, values = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise OptionError(f"--grid expects key=v1,v2,..., got {item!r}")
        if key in grid:
            raise OptionError(f"--grid {key} is given twice; give all its values in one --grid {key}=v1,v2")
        vals = split_values(values)
        if not values.strip() or any(v == "" for v in vals):
            raise OptionError(f"--grid {key} has an empty value in {values!r}; give values like {key}=1,2")
        if len(set(vals)) != len(vals):
            raise OptionError(f"--grid {key} repeats a value in {values!r}")
        grid[key] = vals
    return grid


def grid_points(grid: dict[str, list[str]], samples: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """Every point of the grid (first key slowest), or `samples` of them drawn without replacement
    (seeded; in grid order)."""
    size = 1
    for vals in grid.values():
        size *= len(vals)
    if samples is not None:
        if samples < 1:
            raise OptionError(f"--samples must be at least 1, got {samples}")
        if samples > MAX_TRIALS:
            raise OptionError(f"--samples {samples} is more than {MAX_TRIALS} trials")
        if samples > size:
            raise OptionError(f"--samples {samples} is more than the {size} point(s) of the grid")
    elif size > MAX_TRIALS:
        raise OptionError(f"the grid has {size} points (more than {MAX_TRIALS}); pass --samples N to draw N of them")
    keys = list(grid)
    if samples is None:
        return [dict(zip(keys, combo)) for combo in itertools.product(*grid.values())]
    rng = random.Random(seed)
    chosen: set[int] = set()
    while len(chosen) < samples:  # any grid size (range(size) may not fit a C integer)
        chosen.add(rng.randrange(size))
    picked = sorted(chosen)
    out = []
    for flat in picked:
        point, rest = {}, flat
        for k in reversed(keys):
            rest, j = divmod(rest, len(grid[k]))
            point[k] = grid[k][j]
        out.append({k: point[k] for k in keys})
    return out


def parse_objectives(text: str) -> list[Objective]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise OptionError(f"--objective is empty; name one or more of {', '.join(OBJECTIVES)}")
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise OptionError(f"unknown --objective {unknown[0]!r}; use one or more of {', '.join(OBJECTIVES)}")
    if len(set(names)) != len(names):
        raise OptionError(f"--objective names {text!r} repeat one")
    return [OBJECTIVES[n] for n in names]


def objective_values(rows: Iterable[Any], mode: str, objectives: Sequence[Objective]) -> dict[str, float | None]:
    """A run's value of each objective: the mean of its rows (single/batch), or the retention value at
    its last checkpoint (sequential); edit_time is the median seconds per edit. None where no row has it."""
    rows = list(rows)
    out: dict[str, float | None] = {}
    if mode == "sequential":
        pts = [r for r in rows if r.kind == "checkpoint"]
        last = max(pts, key=lambda r: r.n_edits) if pts else None
    for o in objectives:
        if o.metric == "edit_s":
            times = [r.edit_s for r in rows if r.edit_s is not None]
            out[o.name] = statistics.median(times) if times else None
        elif mode == "sequential":
            v = last.metrics.get(f"retention_{o.metric}") if last is not None else None
            out[o.name] = None if v is None else float(v)
        else:
            vals = [float(r.metrics[o.metric]) for r in rows if r.metrics.get(o.metric) is not None]
            out[o.name] = sum(vals) / len(vals) if vals else None
    return out


def pareto_front(points: Sequence[dict[str, float | None]], objectives: Sequence[Objective]) -> list[bool]:
    """Which points no other point dominates (at least as good on every objective, better on one).
    A point missing an objective's value (None or NaN) is never on the front."""
    def better_or_equal(a: float, b: float, o: Objective) -> bool:
        return a >= b if o.maximize else a <= b

    complete = [all(p.get(o.name) is not None and p[o.name] == p[o.name] for o in objectives) for p in points]  # NaN != NaN
    front = []
    for i, p in enumerate(points):
        if not complete[i]:
            front.append(False)
            continue
        dominated = False
        for j, q in enumerate(points):
            if j == i or not complete[j]:
                continue
            if all(better_or_equal(q[o.name], p[o.name], o) for o in objectives) and \
                    any(q[o.name] != p[o.name] for o in objectives):
                dominated = True
                break
        front.append(not dominated)
    return front


def sweep_id(method: str, run_ids: Sequence[str], objectives: Sequence[str]) -> str:
    """Names a sweep by its runs (each id already holds the model, data, hyper-parameters and seed) and
    objectives: the same sweep again keeps its record, any other gets its own."""
    key = json.dumps({"runs": list(run_ids), "objectives": list(objectives)})
    return f"sweep-{method}-" + hashlib.sha256(key.encode()).hexdigest()[:10]
