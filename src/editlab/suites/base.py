"""What a suite is: data + editing protocol + metric list (see docs/pitfalls.md).

A suite reads its files into `Unit`s (one editing episode each: a record, a pair of tied edits, a group
of k MQuAKE cases). For each unit the runner calls, once:

- `suite.unedited(lm, unit)` -> (metrics of the unedited model, state): the values every edited metric
  compares against (pre-edit probabilities, next-token distributions). State stays in memory;
- then for each method `suite.edited(editing, unit, state)` -> metrics, where `editing` (an `Editing`)
  applies the protocol's edits, gives the edited system and undoes them (the runner restores the model
  after every unit, bit-exactly, whatever happens).

Metric names are `split.metric` where a suite has splits (coverage/reverse/composite, easy/hard, k), so
one run holds every split and `summarize` averages each over the units that have it.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

from ..errors import DataFormatError, EditlabError, EditRequestError
from ..requests import EditRequest


class SuiteError(EditlabError, ValueError):
    """A suite cannot run as asked (its protocol needs something the method or the options lack)."""


class RecordFieldError(DataFormatError):
    """A record lacks a field a metric needs; the message names the file, the record and the field."""


@dataclass
class Unit:
    """One editing episode of a suite: `key` is unique within the suite (the record's own id where it
    has one, never its position alone), `split` names its part of the data, `data` is the suite's own."""

    key: str
    split: str
    data: Any


def field_at(rec: Any, path: str, where: str) -> Any:
    """`rec[a][b]...` for the dotted `path` (integers index lists); a missing or null field raises
    `RecordFieldError` naming `where` (file and record) and the field."""
    cur = rec
    for part in path.split("."):
        try:
            cur = cur[int(part)] if isinstance(cur, list) else cur[part]
        except (KeyError, IndexError, TypeError, ValueError):
            raise RecordFieldError(f"{where}: missing field {path!r}") from None
        if cur is None:
            raise RecordFieldError(f"{where}: field {path!r} is null")
    return cur


def text_at(rec: Any, path: str, where: str) -> str:
    value = field_at(rec, path, where)
    if not isinstance(value, str) or not value.strip():
        raise RecordFieldError(f"{where}: field {path!r} must be a non-empty string, got {value!r:.60}")
    return value


def texts_at(rec: Any, path: str, where: str) -> list[str]:
    """A non-empty list of non-empty strings at `path` (prompt lists); anything else raises
    `RecordFieldError` naming `where` and the field, so a string is never scored letter by letter."""
    value = field_at(rec, path, where)
    if not isinstance(value, list) or not value:
        raise RecordFieldError(f"{where}: field {path!r} must be a non-empty list of strings, got {value!r:.60}")
    for k, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise RecordFieldError(f"{where}: field {path!r} item {k} must be a non-empty string, got {item!r:.60}")
    return list(value)


def collect_units(parsed: Sequence[tuple[int, Any]], parse: Any, *, path: Path, limit: int | None, on_bad: str) -> list[Unit]:
    """Parse `(index, record)` pairs with `parse(index, record, where) -> Unit`, up to `limit` units.
    A record with a missing field, or whose fields make no valid edit (`EditRequestError`), stops the suite
    (`on_bad="stop"`, the default) or is skipped with one warning that counts them and names the first
    (`on_bad="skip"`)."""
    if on_bad not in ("stop", "skip"):
        raise SuiteError(f"on_bad must be 'stop' or 'skip', got {on_bad!r}")
    units: list[Unit] = []
    skipped: list[str] = []
    for i, rec in parsed:
        if limit is not None and len(units) >= limit:
            break
        try:
            units.append(parse(i, rec, f"{path.name} record {i}"))
        except (RecordFieldError, EditRequestError) as e:
            msg = str(e) if isinstance(e, RecordFieldError) else f"{path.name} record {i}: not a valid edit: {e}"
            if on_bad == "stop":
                raise RecordFieldError(f"{msg} (pass --on-bad skip to leave such records out)") from None
            skipped.append(msg)
    if skipped:
        warnings.warn(f"{path.name}: skipped {len(skipped)} record(s) lacking fields, e.g. {skipped[0]}", stacklevel=2)
    return units


def split_units(paths: dict[str, Path], splits: Sequence[str], parse: Any, *, limit: int | None,
                on_bad: str) -> list[Unit]:
    """Units of several splits, one file each, in split order: `parse(split, path, index, record, where)`
    builds a unit; `limit` caps each split (see `collect_units` for `on_bad`)."""
    from ..data.io import read_records

    units: list[Unit] = []
    for split in splits:
        path = paths[split]
        units += collect_units(list(enumerate(read_records(path))),
                               lambda i, rec, where, split=split, path=path: parse(split, path, i, rec, where),
                               path=path, limit=limit, on_bad=on_bad)
    return units


def edit_only(request: EditRequest) -> EditRequest:
    """`request` without any probe: the edit a suite gives a method (its probes are what it is scored on)."""
    return request.without_probes()


class Editing:
    """Applies a protocol's edits with one method and undoes them. `push(requests)` edits the current
    system (one batch edit where the method takes batches and `batch` is true, else one edit per request
    in order, each extending the previous one where the method supports `on=`) and returns a mark;
    `undo(mark)` restores every edit made after it; `system` is what to score now.

    Every probe is held out: the editor is given each request without its paraphrases, neighbourhood,
    portability and locality prompts (`edit_only`), so a method that trains against a request's own probes
    (WISE's irrelevant tokens, KN's paraphrase refining set) cannot see the prompts the suite scores."""

    def __init__(self, lm: Any, method: str, hparams: Any) -> None:
        from ..methods import get_editor

        self.lm = lm
        self.method = method
        self.editor = get_editor(method)
        self.hparams = hparams
        self.stack: list[Any] = []
        self.n_edits = 0  # edit calls made (for time per edit)

    @property
    def system(self) -> Any:
        return self.stack[-1].lm if self.stack else self.lm

    def push(self, requests: Sequence[EditRequest], *, batch: bool = True) -> int:
        mark = len(self.stack)
        reqs = list(requests)
        try:
            if batch and len(reqs) > 1 and self.editor.supports_batch:
                self._apply(reqs)
            else:
                for r in reqs:
                    self._apply([r])
        except BaseException:
            self.undo(mark)
            raise
        return mark

    def _apply(self, reqs: list[EditRequest]) -> None:
        on = self.stack[-1] if self.stack and self.editor.supports_on else None
        reqs = [edit_only(r) for r in reqs]
        payload = reqs if len(reqs) > 1 else reqs[0]
        self.stack.append(self.editor.apply(self.lm, payload, self.hparams, on=on))
        self.n_edits += 1

    def undo(self, mark: int = 0) -> None:
        while len(self.stack) > mark:
            self.stack.pop().restore()


class Suite(ABC):
    """A registered suite. Subclasses set the class attributes and implement `load`, `unedited` and
    `edited`; `files` maps each split to its path under the data folder."""

    name: ClassVar[str]
    description: ClassVar[str]
    files: ClassVar[dict[str, str]]
    metrics: ClassVar[tuple[str, ...]]
    protocol: ClassVar[str] = ""  # one line for listings and reports

    def check_method(self, editor: Any) -> None:
        """Raise `SuiteError` if the protocol needs something `editor` cannot do (checked before the
        model loads)."""

    def refuses_unit(self, editor: Any, unit: Unit) -> str | None:
        """Why `editor` cannot run this protocol on `unit`, where only some units need what it lacks
        (None: it can). The runner stores such a unit as an error row with this reason, without editing;
        a protocol that no unit can run is refused whole by `check_method`."""
        return None

    def method_notes(self, method: str, hparams: Any, units: Sequence[Unit]) -> list[str]:
        """Warnings about how `method`, with its resolved `hparams`, meets this protocol on `units`: a
        setting that caps what the suite can measure, said before the run. The runner shows each once."""
        return []

    def data_paths(self, root: Path) -> dict[str, Path]:
        """Each split's file; a missing one raises `DataFormatError` naming it and where it looked."""
        out = {}
        for split, rel in self.files.items():
            p = root / rel
            if not p.exists():
                raise DataFormatError(f"suite {self.name!r} needs {rel} and did not find it at {p} "
                                      "(set EDITLAB_DATA to the benchmark data folder)")
            out[split] = p
        return out

    @abstractmethod
    def load(self, root: Path, limit: int | None = None, *, on_bad: str = "stop") -> list[Unit]:
        """The suite's units from the data under `root`; `limit` caps units per split."""

    @abstractmethod
    def unedited(self, lm: Any, unit: Unit) -> tuple[dict[str, float], Any]:
        """Metrics of the unedited model on `unit` and the state `edited` compares against."""

    @abstractmethod
    def edited(self, editing: Editing, unit: Unit, state: Any) -> dict[str, float]:
        """Apply the protocol's edits through `editing` and return the metrics. The runner undoes all
        edits afterwards; a protocol that scores an intermediate model undoes to a mark itself."""

    def summarize(self, rows: Sequence[dict[str, float]]) -> dict[str, float]:
        """Dataset values from per-unit rows: the mean of each metric over the units that have it.
        Suites with dataset-level metrics (harmonic means) extend this."""
        from ..eval.metrics import summarize

        return {k: v for k, v in summarize(rows).items() if k != "cf_score"}


__all__ = ["Editing", "RecordFieldError", "edit_only", "Suite", "SuiteError", "Unit", "collect_units", "field_at", "split_units", "text_at"]
