"""Sequential runs resume from the edit stack saved at their newest finished checkpoint: only the
missing edits are applied, the rows equal an uninterrupted run's, the saved stack is bit-exact, and a
missing or damaged stack falls back (with one warning) to re-applying every edit."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from editlab.data import load_requests
from editlab.errors import EditRequestError
from editlab.methods import Edit, SolverState, restore_all
from editlab.methods.base import Editor
from editlab.methods.edit import TENSORS
from editlab.models import load_lm
from editlab.requests import EditRequest
from editlab.runner import RunConfig, Store, run
from editlab.runner.stacks import RunStacks, StackResumeWarning, stacks_folder

CHECKPOINTS = [2, 4, 6]
PPL_TEXT = "Paris is the capital of France. The Eiffel Tower is in Paris. " * 20


def method_hparams(method: str, corpus: Path) -> dict:
    if method == "alphaedit":  # supports on=: each edit extends the previous one's protected keys
        return {"layers": [1, 2], "context_templates": [[4, 2]], "v_steps": 10, "null_space": "energy",
                "null_space_energy": 0.9, "l2": 0.1, "l2_mode": "relative", "corpus": str(corpus), "mom2_n_tokens": 300}
    return {"corpus": str(corpus), "mom2_n_tokens": 300}


class Applies:
    """Counts `Editor.apply` calls; raises (a simulated kill) on call number `fail_at`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.fail_at: int | None = None
        real = Editor.apply

        def counting(editor, *a, **k):
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("simulated kill")
            return real(editor, *a, **k)

        monkeypatch.setattr(Editor, "apply", counting)

    def reset(self, fail_at: int | None = None) -> None:
        self.calls, self.fail_at = 0, fail_at


@pytest.fixture
def lm():
    return load_lm("tiny-trained-llama")


@pytest.fixture
def reqs():
    return load_requests("builtin", limit=6)


def weights(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def rows_of(store: Store, rid: str) -> dict[str, tuple[int, dict[str, float]]]:
    return {r.row_key: (r.n_edits, r.metrics) for r in store.rows(rid)}


def assert_same_rows(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, (n, m) in want.items():
        assert got[key][0] == n
        assert set(got[key][1]) == set(m), key
        for name, v in m.items():
            want_v = v if isinstance(v, str) else pytest.approx(v, rel=1e-6, abs=1e-6)  # an error row's message
            assert got[key][1][name] == want_v, (key, name)


def stack_dir(db: Path, rid: str) -> Path:
    root = stacks_folder(db)
    assert root is not None
    return root / rid


def reference_rows(lm, reqs, cfg_args, tmp_path) -> dict:
    store = Store(tmp_path / "reference.db")
    rid = run(lm, reqs, RunConfig(**cfg_args), store)
    return rows_of(store, rid)


@pytest.mark.parametrize("method", ["alphaedit", "rome"])
def test_killed_run_resumes_after_the_last_saved_checkpoint(method, lm, reqs, corpus_file, tmp_path, monkeypatch):
    args = dict(method=method, mode="sequential", checkpoints=CHECKPOINTS, hparams=method_hparams(method, corpus_file),
                ppl_text=PPL_TEXT)
    base = weights(lm)
    want = reference_rows(lm, reqs, args, tmp_path)
    applies = Applies(monkeypatch)
    db = tmp_path / "r.db"
    applies.reset(fail_at=5)  # dies while making the 5th edit, after checkpoint 4's row
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(lm, reqs, RunConfig(**args), Store(db))
    rid = next(iter(Store(db).runs()))["run_id"]
    assert list(rows_of(Store(db), rid)) == ["ckpt:2", "ckpt:4"]
    saved = stack_dir(db, rid)
    assert sorted(p.name for p in saved.iterdir()) == ["ckpt-4"]  # the older stack was deleted
    assert sorted(int(p.name.split("-")[0]) for p in (saved / "ckpt-4").iterdir()) == [0, 1, 2, 3]
    assert not lm.active_edits

    applies.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", StackResumeWarning)
        rid2 = run(lm, reqs, RunConfig(**args), Store(db))
    assert rid2 == rid
    assert applies.calls == 2  # only edits 5 and 6
    got = rows_of(Store(db), rid)
    assert_same_rows(got, want)
    if method == "rome":  # no solver state to rebuild: the resumed path repeats the same float operations
        assert got == want
    assert got["ckpt:6"][1]["perplexity_base"] == want["ckpt:6"][1]["perplexity_base"]
    assert not saved.exists() and not stacks_folder(db).exists()  # a finished run keeps no stack
    assert not lm.active_edits
    assert all(torch.equal(base[k], v) for k, v in lm.model.state_dict().items())


def killed_at_edit_5(lm, reqs, args, db, monkeypatch):
    """A run of `args` that dies while making edit 5 (after checkpoint 4's row): (the apply counter, run id)."""
    applies = Applies(monkeypatch)
    applies.reset(fail_at=5)
    with pytest.raises(RuntimeError):
        run(lm, reqs, RunConfig(**args), Store(db))
    return applies, next(iter(Store(db).runs()))["run_id"]


def test_damaged_stack_falls_back_to_reapplying_every_edit(lm, reqs, corpus_file, tmp_path, monkeypatch):
    args = dict(method="alphaedit", mode="sequential", checkpoints=CHECKPOINTS,
                hparams=method_hparams("alphaedit", corpus_file), ppl_text=PPL_TEXT)
    want = reference_rows(lm, reqs, args, tmp_path)
    db = tmp_path / "r.db"
    applies, rid = killed_at_edit_5(lm, reqs, args, db, monkeypatch)
    victim = next((stack_dir(db, rid) / "ckpt-4").glob("2-*")) / TENSORS
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0x01  # one bit of one tensor value
    victim.write_bytes(bytes(raw))

    applies.reset()
    with pytest.warns(StackResumeWarning, match="re-applying the edits from the first") as caught:
        run(lm, reqs, RunConfig(**args), Store(db))
    assert len([w for w in caught if issubclass(w.category, StackResumeWarning)]) == 1
    assert "checksum" in str(caught[0].message)
    assert applies.calls == 6
    assert_same_rows(rows_of(Store(db), rid), want)
    assert not lm.active_edits


def test_missing_stack_warns_and_reapplies(lm, reqs, corpus_file, tmp_path, monkeypatch):
    args = dict(method="rome", mode="sequential", checkpoints=CHECKPOINTS, hparams=method_hparams("rome", corpus_file))
    want = reference_rows(lm, reqs, args, tmp_path)
    db = tmp_path / "r.db"
    applies, rid = killed_at_edit_5(lm, reqs, args, db, monkeypatch)
    shutil.rmtree(stack_dir(db, rid))
    applies.reset()
    with pytest.warns(StackResumeWarning, match="no saved stack for checkpoint 4"):
        run(lm, reqs, RunConfig(**args), Store(db))
    assert applies.calls == 6
    assert rows_of(Store(db), rid) == want


def test_saved_stack_loads_bit_identical_to_the_live_run(lm, reqs, corpus_file, tmp_path, monkeypatch):
    args = dict(method="alphaedit", mode="sequential", checkpoints=CHECKPOINTS, hparams=method_hparams("alphaedit", corpus_file))
    base = weights(lm)
    live: dict = {}

    def progress(i, n, msg):
        if i == 4:  # checkpoint 4 is done (its stack saved, its row written)
            live["weights"] = weights(lm)
            live["ids"] = [e.id for e in lm.active_edits]
            live["state"] = [{k: t.clone() for p in e.patches if isinstance(p, SolverState) for k, t in p.tensors.items()}
                             for e in lm.active_edits]

    applies = Applies(monkeypatch)
    db = tmp_path / "r.db"
    applies.reset(fail_at=5)
    with pytest.raises(RuntimeError):
        run(lm, reqs, RunConfig(**args), Store(db), progress=progress)
    rid = next(iter(Store(db).runs()))["run_id"]
    assert all(torch.equal(base[k], v) for k, v in lm.model.state_dict().items())
    store = Store(db)
    n = RunStacks(db, rid).resume(lm, "alphaedit", reqs, CHECKPOINTS, store.done_keys(rid))
    assert n == 4
    assert [e.id for e in lm.active_edits] == live["ids"]
    assert all(e.info.get("extends") == (lm.active_edits[i - 1].id if i else None) for i, e in enumerate(lm.active_edits))
    now = weights(lm)
    changed = [k for k in base if not torch.equal(base[k], live["weights"][k])]
    assert changed  # the edits did move weights, and the loaded stack moves them identically
    assert all(torch.equal(now[k], live["weights"][k]) for k in now)
    for e, want in zip(lm.active_edits, live["state"]):
        got = {k: t for p in e.patches if isinstance(p, SolverState) for k, t in p.tensors.items()}
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert isinstance(lm.active_edits[-1], Edit)
    restore_all(lm)
    assert all(torch.equal(base[k], v) for k, v in lm.model.state_dict().items())


def test_stack_saved_without_its_row_is_not_used(lm, reqs, corpus_file, tmp_path, monkeypatch):
    """A kill between saving checkpoint 4's stack and writing its row: resume must use checkpoint 2's
    stack (kept until row 4 exists), re-apply edits 3-6 and write row 4."""
    args = dict(method="rome", mode="sequential", checkpoints=CHECKPOINTS, hparams=method_hparams("rome", corpus_file))
    want = reference_rows(lm, reqs, args, tmp_path)
    real = Store.add_row

    def dies_at_row_4(self, row):
        if row.row_key == "ckpt:4":
            raise RuntimeError("simulated kill")
        return real(self, row)

    monkeypatch.setattr(Store, "add_row", dies_at_row_4)
    db = tmp_path / "r.db"
    with pytest.raises(RuntimeError):
        run(lm, reqs, RunConfig(**args), Store(db))
    monkeypatch.setattr(Store, "add_row", real)
    rid = next(iter(Store(db).runs()))["run_id"]
    folder = stack_dir(db, rid)
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-2", "ckpt-4"]
    # checkpoint 4 wrote only edits 2-3; edits 0-1 are hard links to checkpoint 2's files
    for old in (folder / "ckpt-2").iterdir():
        assert (folder / "ckpt-4" / old.name / TENSORS).stat().st_ino == (old / TENSORS).stat().st_ino
    applies = Applies(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StackResumeWarning)
        run(lm, reqs, RunConfig(**args), Store(db))
    assert applies.calls == 4
    assert rows_of(Store(db), rid) == want


def test_failing_stack_save_warns_once_and_the_run_completes(lm, reqs, corpus_file, tmp_path, monkeypatch):
    args = dict(method="rome", mode="sequential", checkpoints=[1, 2, 3, 6], hparams=method_hparams("rome", corpus_file))
    want = reference_rows(lm, reqs, args, tmp_path)

    def no_space(self, directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Edit, "save", no_space)
    db = tmp_path / "r.db"
    with pytest.warns(StackResumeWarning, match="cannot save the edit stack at checkpoint 1") as caught:
        rid = run(lm, reqs, RunConfig(**args), Store(db))
    assert len([w for w in caught if issubclass(w.category, StackResumeWarning)]) == 1
    assert rows_of(Store(db), rid) == want
    assert not lm.active_edits


def refusing(monkeypatch: pytest.MonkeyPatch, prompt: str, fail_at: int | None = None) -> list[int]:
    """`Editor.apply` refuses (EditRequestError, model untouched) the request with `prompt`, and raises a
    simulated kill on call number `fail_at`; returns the list that counts the calls."""
    real = Editor.apply
    calls: list[int] = []

    def apply(editor, lm, requests, *a, **k):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise RuntimeError("simulated kill")
        first = requests if isinstance(requests, EditRequest) else requests[0]
        if first.prompt == prompt:
            raise EditRequestError("this method cannot write this fact")
        return real(editor, lm, requests, *a, **k)

    monkeypatch.setattr(Editor, "apply", apply)
    return calls


def test_a_refused_edit_is_recorded_and_the_sequence_goes_on_without_it(lm, reqs, corpus_file, tmp_path, monkeypatch):
    args = dict(method="rome", mode="sequential", hparams=method_hparams("rome", corpus_file))
    # the same edits without the refused request, checkpoints at the same edits
    kept = [r for i, r in enumerate(reqs) if i != 2]
    want = reference_rows(lm, kept, {**args, "checkpoints": [2, 3, 5]}, tmp_path)
    refusing(monkeypatch, reqs[2].prompt)
    store = Store(tmp_path / "r.db")
    with pytest.warns(UserWarning, match="rome refused edit 3 of the sequence"):
        rid = run(lm, reqs, RunConfig(**args, checkpoints=CHECKPOINTS), store)
    rows = {r.row_key: r for r in store.rows(rid)}
    assert sorted(rows) == ["ckpt:2", "ckpt:4", "ckpt:6", "refused:2"]
    assert rows["refused:2"].kind == "error" and "cannot write this fact" in rows["refused:2"].metrics["error"]
    assert [rows[k].metrics["edits_refused"] for k in ("ckpt:2", "ckpt:4", "ckpt:6")] == [0.0, 1.0, 1.0]
    for mine, theirs in (("ckpt:2", "ckpt:2"), ("ckpt:4", "ckpt:3"), ("ckpt:6", "ckpt:5")):
        got = {k: v for k, v in rows[mine].metrics.items() if k != "edits_refused"}
        assert got == pytest.approx({k: v for k, v in want[theirs][1].items() if k != "edits_refused"}), mine
    assert not lm.active_edits


def test_a_run_with_a_refused_edit_resumes_from_its_saved_stack(lm, reqs, corpus_file, tmp_path, monkeypatch):
    args = dict(method="rome", mode="sequential", checkpoints=CHECKPOINTS, hparams=method_hparams("rome", corpus_file))
    refusing(monkeypatch, reqs[2].prompt)
    with pytest.warns(UserWarning):
        want = reference_rows(lm, reqs, args, tmp_path)
    db = tmp_path / "r.db"
    refusing(monkeypatch, reqs[2].prompt, fail_at=5)  # calls: edits 1, 2, 3 (refused), 4, then dies on 5
    with pytest.raises(RuntimeError, match="simulated kill"), pytest.warns(UserWarning):
        run(lm, reqs, RunConfig(**args), Store(db))
    rid = next(iter(Store(db).runs()))["run_id"]
    saved = stack_dir(db, rid) / "ckpt-4"
    assert sorted(int(p.name.split("-")[0]) for p in saved.iterdir()) == [0, 1, 2]  # three edits written
    calls = refusing(monkeypatch, reqs[2].prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StackResumeWarning)
        rid2 = run(lm, reqs, RunConfig(**args), Store(db))
    assert rid2 == rid and len(calls) == 2  # only edits 5 and 6: the stack of three loaded
    assert_same_rows(rows_of(Store(db), rid), want)
    assert not lm.active_edits
