"""What a run is (`RunConfig`) and the modes it can run in, torch-free so that the CLI checks a run's
settings before torch is imported."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import EditlabError


MODES = ("single", "batch", "sequential")


@dataclass
class RunConfig:
    method: str
    mode: str = "single"
    dataset: str = "builtin"
    batch_size: int = 1
    checkpoints: list[int] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    generation: bool = False
    fluency: bool = False  # ROME-style generation fluency (n-gram entropy of sampled text) per request
    ppl_text: str | None = None  # sequential mode: text whose perplexity is tracked
    probes: list[str] = field(default_factory=list)  # sequential mode: probes measured at each checkpoint
    probe_budget: str = "quick"

    def validate(self, n_requests: int) -> None:
        if self.mode not in MODES:
            raise EditlabError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.mode == "batch" and self.batch_size < 1:
            raise EditlabError("--batch-size must be >= 1")
        if self.mode == "sequential":
            if not self.checkpoints:
                first = (0,) if self.probes else ()  # probes are read against the unedited model
                self.checkpoints = sorted({c for c in (*first, 1, 10, 50, 100, 500, 1000) if c <= n_requests} | {n_requests})
            check_checkpoints(self.checkpoints, n_requests)
        elif self.probes:
            raise EditlabError("probes are measured at the checkpoints of a sequential run; use mode 'sequential'")
        if self.probes:
            from ..probes import BUDGET_NAMES, parse_probes

            self.probes = parse_probes(self.probes)
            if self.probe_budget not in BUDGET_NAMES:
                raise EditlabError(f"unknown probe budget {self.probe_budget!r}; use one of {', '.join(BUDGET_NAMES)}")


def check_checkpoints(points: list[int], n_requests: int | None = None) -> None:
    """Checkpoints are numbers of edits, given in increasing order, each once, 0 (the unedited model,
    for probes) up to the number of requests; anything else raises `EditlabError` saying which."""
    if any(not isinstance(c, int) or isinstance(c, bool) for c in points):
        raise EditlabError(f"checkpoints must be integers, got {points}")
    dup = sorted({c for c in points if points.count(c) > 1})
    if dup:
        raise EditlabError(f"checkpoint {dup[0]} is given twice; give each number of edits once")
    if points != sorted(points):
        raise EditlabError(f"checkpoints must increase ({','.join(map(str, points))} does not); "
                           f"give them as {','.join(map(str, sorted(points)))}")
    if any(c < 0 for c in points):
        raise EditlabError(f"checkpoints are numbers of edits (0 or more), got {min(points)}")
    bad = [c for c in points if n_requests is not None and c > n_requests]
    if bad:
        raise EditlabError(f"checkpoints {bad} outside 0..{n_requests} (the data has {n_requests} requests)")
