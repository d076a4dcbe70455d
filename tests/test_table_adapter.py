"""The table machinery every adapter method shares: a table update adds rows and changes rows, its
revert restores the tables bit for bit, a malformed update is refused before anything changes, and a
failure part-way through an update leaves the tables as they were."""

from __future__ import annotations

import pytest
import torch

from editlab.errors import EditMismatchError
from editlab.methods.adapters.grace import GraceCodebook


def _book() -> GraceCodebook:
    book = GraceCodebook(torch.nn.Linear(3, 2), 3, 2)
    book.update_rows({"keys": torch.eye(3)[:2], "values": torch.ones(2, 2), "radii": torch.tensor([0.5, 0.5]),
                      "labels": torch.tensor([7, 8])}, torch.zeros(0, dtype=torch.long), {})
    return book


def _tables(book):
    return {n: getattr(book, n).clone() for n in book.tables}


def test_update_and_undo_are_exact():
    book = _book()
    before = _tables(book)
    idx = torch.tensor([1])
    undo = book.update_rows({"keys": torch.tensor([[0.0, 0, 1]]), "values": torch.zeros(1, 2),
                             "radii": torch.tensor([0.25]), "labels": torch.tensor([9])},
                            idx, {"radii": torch.tensor([0.125])})
    assert book.n_rows == 3 and float(book.radii[1]) == 0.125 and float(book.radii[2]) == 0.25
    book.undo_rows(idx, undo)
    after = _tables(book)
    assert all(torch.equal(after[n], before[n]) and after[n].dtype == before[n].dtype for n in before)


def test_malformed_update_is_refused():
    book = _book()
    ok = {"keys": torch.zeros(1, 3), "values": torch.zeros(1, 2), "radii": torch.zeros(1), "labels": torch.zeros(1, dtype=torch.long)}
    none = torch.zeros(0, dtype=torch.long)
    with pytest.raises(EditMismatchError):
        book.check_rows({**ok, "keys": torch.zeros(1, 4)}, none, {})  # wrong width
    with pytest.raises(EditMismatchError):
        book.check_rows({k: v for k, v in ok.items() if k != "labels"}, none, {})  # a table missing
    with pytest.raises(EditMismatchError):
        book.check_rows({**ok, "radii": torch.zeros(2)}, none, {})  # row counts differ
    with pytest.raises(EditMismatchError):
        book.check_rows(ok, torch.tensor([5]), {"radii": torch.zeros(1)})  # no such row
    book.check_rows(ok, torch.tensor([1]), {"radii": torch.zeros(1)})


def test_failure_part_way_changes_nothing(monkeypatch):
    book = _book()
    before = _tables(book)
    real_cat, calls = torch.cat, []

    def flaky(tensors, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real_cat(tensors, *a, **kw)

    monkeypatch.setattr(torch, "cat", flaky)
    with pytest.raises(RuntimeError):
        book.update_rows({"keys": torch.zeros(1, 3), "values": torch.zeros(1, 2), "radii": torch.zeros(1),
                          "labels": torch.zeros(1, dtype=torch.long)}, torch.tensor([0]), {"radii": torch.tensor([9.0])})
    after = _tables(book)
    assert all(torch.equal(after[n], before[n]) for n in before)
