"""The layout of a saved edit's folder (file names, format numbers) and the check that a folder may
receive one. Torch-free, so `editlab edit --save DIR` is checked before torch is imported; `edit.py`
writes and reads the folders."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import OutputPathError


MANIFEST = "edit.json"
TENSORS = "patches.safetensors"
TENSORS_V1 = "deltas.safetensors"
FORMAT = 3
LOADABLE_FORMATS = (1, 2, 3)
# Files an edit folder may hold; a folder with anything else is not overwritten by `save`.
EDIT_FILES = {MANIFEST, TENSORS, TENSORS_V1}


def check_save_target(d: Path) -> None:
    """Raise `OutputPathError` unless `save` may write an edit folder at `d`: absent, an empty folder
    or an earlier edit folder (replaced), with a writable parent. Cheap; the CLI calls it before
    editing so that `--save` fails before the work, not after."""
    if d.exists() and not d.is_dir():
        raise OutputPathError(f"cannot save the edit to {d}: it is a file, not a folder")
    if d.is_dir():
        # Our own leftovers (temporary files of an interrupted format-2 save) may go; nothing else.
        ours = tuple(f".{name}." for name in EDIT_FILES)
        foreign = sorted(p.name for p in d.iterdir() if p.name not in EDIT_FILES and not p.name.startswith(ours))
        if foreign:
            raise OutputPathError(f"cannot save the edit to {d}: the folder holds other files ({', '.join(foreign[:3])}); "
                                  "give a new or empty folder")
    parent = d.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot save the edit to {d}: {parent} is not a writable folder")
