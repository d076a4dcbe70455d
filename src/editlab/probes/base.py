"""What a probe is: a measurement of the model itself (not of one edit request), taken at every
checkpoint of a sequential run: perplexity, downstream tasks, neighbourhood KL on fixed prompts, weight
norm growth. Definitions and protocols: `docs/pitfalls.md` (sequential collapse) and
`../shared/reference/pitfall-metrics.md` sections 2.5 and 2.7.

Life cycle, driven by the sequential runner:

- `probe.check()` before the model loads: the data the probe needs exists and reads (else `ProbeError`
  naming the file, and the record and field where one is wrong);
- `probe.check_model(lm)` right after the model loads: the probe can run on this model (its prompts
  fit the context);
- `probe.prepare(lm)` once, on the unedited model: read and tokenize the data, keep what later
  measurements compare against (the unedited next-token distributions for NKL);
- `probe.measure(system, lm)` at each checkpoint -> {metric: value}. `system` is what to score (the
  top edit's `edit.lm`: a weight-edited LM or an LM view); `lm` is the underlying `LM` (its tokenizer,
  its weight ledger). Metric names are unique across probes (`ppl_wikitext`, `sst2`, `nkl`, ...), and
  every one is registered in `suites/metrics.py` with its direction.

A budget (`quick` or `full`) fixes the sizes (records per task, token counts) so that runs with the
same budget are comparable; `BUDGETS` holds them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from ..errors import EditlabError

BUDGET_NAMES = ("quick", "full")


class ProbeError(EditlabError, ValueError):
    """A probe cannot run as asked: unknown probe or budget, or its data is missing."""


class Probe(ABC):
    """A registered probe. Subclasses set `name`, `description`, `metrics` (the metric names
    `measure` returns), `headline` (those of them a report plots against the number of edits; the rest
    are in its tables) and `files` (data files relative to the data folder it needs)."""

    name: ClassVar[str]
    description: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    headline: ClassVar[tuple[str, ...]] = ()
    files: ClassVar[tuple[str, ...]] = ()

    def __init__(self, budget: str = "quick", data_root: Path | None = None) -> None:
        if budget not in BUDGET_NAMES:
            raise ProbeError(f"unknown probe budget {budget!r}; use one of {', '.join(BUDGET_NAMES)}")
        from ..paths import data_dir

        self.budget = budget
        self.root = Path(data_root) if data_root is not None else data_dir()

    def check(self) -> None:
        """Raise `ProbeError` if a data file is missing (called before the model loads)."""
        for rel in self.files:
            p = self.root / rel
            if not p.is_file():
                raise ProbeError(f"probe {self.name!r} needs {rel} and did not find it at {p} "
                                 "(set EDITLAB_DATA to the benchmark data folder, or leave the probe out of --probes)")

    def check_model(self, lm: Any) -> None:
        """Raise `ProbeError` if the probe cannot run on `lm` (e.g. a prompt longer than its context);
        cheap (tokenizer only), called right after the model loads, before any long work."""

    @abstractmethod
    def prepare(self, lm: Any) -> None:
        """Read and tokenize the data; compute on the unedited `lm` what `measure` compares against."""

    @abstractmethod
    def measure(self, system: Any, lm: Any) -> dict[str, float]:
        """The probe's metrics for `system` (the current edited system) on the prepared data."""

    def info(self) -> dict[str, Any]:
        """What to record in the run's config: the probe's sizes and data (for reproducibility)."""
        return {"budget": self.budget, "files": list(self.files)}


__all__ = ["BUDGET_NAMES", "Probe", "ProbeError"]
