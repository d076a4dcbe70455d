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

    def validate(self, n_requests: int) -> None:
        if self.mode not in MODES:
            raise EditlabError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.mode == "batch" and self.batch_size < 1:
            raise EditlabError("--batch-size must be >= 1")
        if self.mode == "sequential":
            if not self.checkpoints:
                self.checkpoints = sorted({c for c in (1, 10, 50, 100, 500, 1000) if c <= n_requests} | {n_requests})
            bad = [c for c in self.checkpoints if c < 1 or c > n_requests]
            if bad:
                raise EditlabError(f"checkpoints {bad} outside 1..{n_requests}")
            self.checkpoints = sorted(set(self.checkpoints))
