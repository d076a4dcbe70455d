"""Saved edit stacks of sequential runs, so that an interrupted run resumes from its newest finished
checkpoint instead of re-applying every edit from the first.

Layout, beside the result database (one folder per run, one per checkpoint, one per edit, bottom first):

    <db>.stacks/<run_id>/ckpt-<n>/<k>-<edit id>/{patches.safetensors, edit.json}     k = 0 .. n-1

Each edit folder is what `Edit.save` writes, so `Edit.load` verifies it (checksums, base fingerprint,
the ids of the edits below) before anything touches the weights, and replays the same float operations:
the loaded weights are bit-identical to the live run's.

Why resuming never skips an edit whose state was not saved — the runner keeps this order at a checkpoint:

1. `save(n)` builds the whole `ckpt-<n>` under a hidden temporary folder beside it and renames it into
   place (`fileio.atomic_dir`), so a reader sees a complete stack or none;
2. the checkpoint row is written to the store;
3. `prune` deletes the run's older checkpoint stacks (so one is kept), each renamed to a hidden name
   first so that a kill never leaves half a stack under a checkpoint's name.

`resume` only considers a stack at a checkpoint whose row, and every earlier checkpoint's row, is in
the store. A kill between 1 and 2 leaves `ckpt-<n>` without its row: it is ignored, and the older stack,
still present until 3, is used. A missing or damaged stack gives one `StackResumeWarning` and the caller
re-applies the edits from the first (slower, same rows).

Edits already saved at the previous checkpoint are hard-linked into the new one (saved folders are never
written in place), so a checkpoint writes only the edits made since the last one; where links are not
possible the edit is saved again.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Collection, Sequence

from ..errors import EditIntegrityError, EditlabError
from ..fileio import atomic_dir
from ..methods import Edit, restore_all
from ..methods.edit_folder import EDIT_FILES
from ..models.lm import LM
from ..requests import EditRequest
from .store import ckpt_key

_CKPT = re.compile(r"ckpt-(\d+)")
_EDIT = re.compile(r"(\d+)-([0-9A-Za-z_.-]+)")


class StackResumeWarning(UserWarning):
    """A sequential run could not use (or save) its saved edit stack; it stays correct, only slower."""


def stacks_folder(db_path: str | Path) -> Path | None:
    """`<db>.stacks` beside a result database; None for an in-memory database (nothing to resume)."""
    if str(db_path) == ":memory:":
        return None
    p = Path(db_path)
    return p.with_name(p.name + ".stacks")


class RunStacks:
    """The saved edit stacks of one sequential run."""

    def __init__(self, db_path: str | Path, run_id: str) -> None:
        root = stacks_folder(db_path)
        self.dir = root / run_id if root is not None else None
        self.latest: Path | None = None  # the newest complete stack this process saved or loaded
        self._save_warned = False

    # ------------------------------------------------------------------ saving
    def save(self, lm: LM, n: int) -> Path | None:
        """Save every active edit of `lm` (bottom to top) as `ckpt-<n>`, atomically. A failure (disk full,
        a folder another writer of the same run removed) warns once and returns None: the run goes on,
        and a later resume re-applies what no saved stack holds."""
        if self.dir is None:
            return None
        final = self.dir / f"ckpt-{n}"
        try:
            with atomic_dir(final) as tmp:
                for k, edit in enumerate(lm.active_edits):
                    name = f"{k}-{edit.id}"
                    if not (self.latest is not None and _link_folder(self.latest / name, tmp / name)):
                        edit.save(tmp / name)
        except (OSError, EditlabError) as e:
            if not self._save_warned:
                warnings.warn(f"cannot save the edit stack at checkpoint {n} to {final} ({e}); an interrupted run "
                              "will re-apply these edits on resume", StackResumeWarning, stacklevel=3)
                self._save_warned = True
            return None
        self.latest = final
        return final

    def prune(self, keep: Path) -> None:
        """Delete the run's checkpoint stacks older than `keep` (call after `keep`'s row is written).
        Newer ones (a stack whose row a killed process never wrote) are left: resume ignores them, and
        the run replaces them when it reaches their checkpoint."""
        if self.dir is None:
            return
        n = _ckpt_number(keep)
        for child in _children(self.dir):
            m = _ckpt_number(child)
            if m is not None and n is not None and m < n:
                _remove(child)
        # left by a kill during an earlier prune, or inside a save (atomic_dir's ".ckpt-<n>.*" folders;
        # none of this process's saves is in progress here)
        for child in [*self.dir.glob(".deleting-*"), *self.dir.glob(".ckpt-*")]:
            shutil.rmtree(child, ignore_errors=True)

    def discard(self) -> None:
        """Remove the run's stacks (a finished run has nothing to resume), and `<db>.stacks` if empty."""
        if self.dir is None:
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.parent.rmdir()
        except OSError:  # other runs' stacks remain there, or it never existed
            pass
        self.latest = None

    # ------------------------------------------------------------------ resuming
    def resume(self, lm: LM, method: str, requests: Sequence[EditRequest], checkpoints: Sequence[int],
               done: set[str], refused: Collection[int] = ()) -> int:
        """Load the newest usable saved stack onto `lm` (which must carry no edits) and return how many
        requests it has passed (a stack at checkpoint n holds the edits of `requests[:n]` less the `refused`
        ones, which the method could not write); 0 when there is nothing to resume from. Usable: at a checkpoint c such that the
        rows of c and of every checkpoint before it are in `done`, and every edit verifies and is the
        edit of `requests[k]` by `method`. When rows exist but no stack loads, warn once (one line)."""
        finished: list[int] = []
        for c in sorted(c for c in checkpoints if c > 0):  # checkpoint 0 (unedited) has no stack
            if ckpt_key(c) not in done:
                break
            finished.append(c)
        if not finished or self.dir is None:
            return 0
        found = {n: p for p in _children(self.dir) if (n := _ckpt_number(p)) is not None and n in finished}
        problems: list[str] = []
        for n in sorted(found, reverse=True):
            try:
                self._load(lm, found[n], [i for i in range(n) if i not in refused], method, requests)
            except Exception as e:  # noqa: BLE001 - any failure to load means: do not use this stack
                restore_all(lm)
                problems.append(f"{found[n].name}: {e}")
                continue
            if problems:  # a newer stack was unusable; say so, the older one is still correct
                warnings.warn(f"the newest saved edit stack is unusable ({problems[0]}); resuming from the one "
                              f"saved at checkpoint {n}", StackResumeWarning, stacklevel=3)
            self.latest = found[n]
            return n
        why = problems[0] if problems else f"no saved stack for checkpoint {finished[-1]} in {self.dir}"
        warnings.warn(f"cannot resume from the saved edit stack ({why}); re-applying the edits from the first",
                      StackResumeWarning, stacklevel=3)
        return 0

    def _load(self, lm: LM, folder: Path, applied: Sequence[int], method: str, requests: Sequence[EditRequest]) -> None:
        """Load `folder`'s edits bottom to top; `EditIntegrityError` unless they are exactly the edits of
        `requests[i]` for i in `applied`, in order (each folder named `<k>-<id>` of the edit it holds)."""
        n = len(applied)
        entries: dict[int, Path] = {}
        for p in _children(folder):
            m = _EDIT.fullmatch(p.name)
            if m is None:
                raise EditIntegrityError(f"{folder}: unexpected entry {p.name!r} in a saved edit stack")
            entries[int(m.group(1))] = p
        if sorted(entries) != list(range(n)):
            raise EditIntegrityError(f"{folder} holds edits {sorted(entries)[:5]}..., not the {n} edits 0..{n - 1}")
        for k in range(n):
            edit = Edit.load(entries[k], lm)
            if entries[k].name != f"{k}-{edit.id}" or edit.method != method:
                raise EditIntegrityError(f"{entries[k]} holds {edit.method} edit {edit.id}, not this run's edit {k}")
            if [r.to_dict() for r in edit.requests] != [requests[applied[k]].to_dict()]:
                raise EditIntegrityError(f"{entries[k]} edits another request than this run's request {applied[k]}")


def _children(folder: Path) -> list[Path]:
    """Entries of `folder`, leaving out hidden ones (temporary folders of saves in progress)."""
    try:
        return [p for p in folder.iterdir() if not p.name.startswith(".")]
    except OSError:
        return []


def _ckpt_number(p: Path) -> int | None:
    m = _CKPT.fullmatch(p.name)
    return int(m.group(1)) if m and p.is_dir() else None


def _remove(folder: Path) -> None:
    """Delete a stack folder so that it disappears at once: renamed to a hidden name first (a kill
    during the slow part leaves a hidden leftover, never a half stack under its checkpoint's name)."""
    hidden = folder.with_name(f".deleting-{folder.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(folder, hidden)
    except OSError:  # already gone (another writer of the same run pruned it)
        return
    shutil.rmtree(hidden, ignore_errors=True)


def _link_folder(src: Path, dest: Path) -> bool:
    """Hard-link a saved edit folder's files into `dest`; False (and nothing left) where that fails."""
    try:
        files = [f for f in src.iterdir() if f.name in EDIT_FILES and f.is_file()]
        if not files:
            return False
        dest.mkdir()
        for f in files:
            os.link(f, dest / f.name)
        return True
    except OSError:
        shutil.rmtree(dest, ignore_errors=True)
        return False
