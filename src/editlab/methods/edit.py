"""`Edit`: the reversible, savable result of applying an editing method.

An edit is a list of patches (`patches.py`): weight deltas, module swaps and LM views. Edits on one LM
form a stack (`lm.active_edits`, oldest first):

- installing is atomic: every patch is checked first, and a failure while applying the k-th patch
  reverts the first k−1, so the model is exactly as before;
- only the top edit can be restored; restoring another raises `EditStackError` and changes nothing.
  Restoring the whole stack gives the base weights and modules bit for bit;
- `edit.lm` is the edited system that evaluation scores: the view of the top view patch, built over the
  system of the edit below, or the LM itself when no edit installed a view.

`save(dir)` writes `patches.safetensors` and the JSON manifest `edit.json` (format 2: method, hparams,
requests, the exact base fingerprint, the edits below it, each patch's kind and config, the tensor file's
SHA-256, the learned editor's checkpoint hash). `Edit.load(dir, lm)` re-applies it and refuses another
base model, another stack of edits below, or a damaged file. Format-1 folders (dense deltas keyed by
parameter name in `deltas.safetensors`) still load.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import EditMismatchError, EditStackError
from ..fileio import sha256_file, temp_path_in, write_text_atomic
from ..models.lm import LM
from ..requests import EditRequest
from .patches import PATCH_TYPES, LowRank, Patch, ViewPatch, WeightDelta, unwind_weights

MANIFEST = "edit.json"
TENSORS = "patches.safetensors"
TENSORS_V1 = "deltas.safetensors"
FORMAT = 2


class Edit:
    """Handle on an applied edit. Create with `Editor.apply` or `Edit.load`; `edit.lm` is what to score."""

    def __init__(
        self,
        lm: LM,
        method: str,
        hparams: dict[str, Any],
        requests: Sequence[EditRequest],
        patches: Sequence[Patch],
        info: dict[str, Any] | None = None,
        *,
        edit_id: str | None = None,
        checkpoint_sha256: str | None = None,
    ) -> None:
        self.base_lm = lm
        self.method = method
        self.hparams = dict(hparams)
        self.requests = list(requests)
        self.patches = list(patches)
        self.info = dict(info or {})
        self.id = edit_id or uuid.uuid4().hex
        self.checkpoint_sha256 = checkpoint_sha256
        self.base_fingerprint = lm.base_fingerprint
        self.below: list[str] = []
        self.active = False
        self._system: Any = lm

    # ------------------------------------------------------------- installing
    def _install(self) -> "Edit":
        """Check every patch, then apply them in order; undo the applied ones if one fails."""
        lm = self.base_lm
        for p in self.patches:
            p.check(lm)
        applied: list[Patch] = []
        try:
            for p in self.patches:
                p.apply(lm)
                applied.append(p)
            system = lm.edited
            for p in self.patches:
                if isinstance(p, ViewPatch):
                    system = p.build(system)
        except BaseException:
            for p in reversed(applied):
                try:
                    p.revert(lm)
                except Exception:  # keep undoing the rest; the original error is what the user needs
                    pass
            raise
        self._system = system
        self.below = [e.id for e in lm.active_edits]
        lm.active_edits.append(self)
        self.active = True
        return self

    @classmethod
    def install(cls, lm: LM, method: str, hparams: dict[str, Any], requests: Sequence[EditRequest],
                patches: Sequence[Patch], info: dict[str, Any] | None = None, **kw: Any) -> "Edit":
        """Apply `patches` to `lm` atomically and push the new edit on its stack."""
        return cls(lm, method, hparams, requests, patches, info, **kw)._install()

    # ------------------------------------------------------------- the edited system
    @property
    def lm(self) -> Any:
        """The edited system: an `LMView` where this edit (or one below) installed one, else the LM."""
        return self._system if self.active else self.base_lm

    @property
    def delta(self) -> dict[str, torch.Tensor]:
        """Dense weight delta per parameter name (sum over this edit's weight patches)."""
        out: dict[str, torch.Tensor] = {}
        for p in self.patches:
            if isinstance(p, WeightDelta):
                d = p.delta.dense() if isinstance(p.delta, LowRank) else p.delta
                out[p.name] = out[p.name] + d if p.name in out else d.clone()
        return out

    # ------------------------------------------------------------- lifecycle
    def restore(self) -> None:
        """Undo this edit, which must be the top of its LM's stack; idempotent once restored."""
        if not self.active:
            return
        stack = self.base_lm.active_edits
        if not stack or stack[-1] is not self:
            above = len(stack) - 1 - stack.index(self)
            raise EditStackError(
                f"cannot restore this {self.method} edit: {above} newer edit(s) sit on top of it; restore those "
                "first (newest first), or use editlab.methods.restore_all(lm)"
            )
        for p in reversed(self.patches):
            p.revert(self.base_lm)
        stack.pop()
        self.active = False

    def __enter__(self) -> "Edit":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def __repr__(self) -> str:
        kinds = ", ".join(sorted({p.kind for p in self.patches}))
        return f"Edit({self.method}, {len(self.requests)} request(s), patches: {kinds}, active={self.active})"

    # ------------------------------------------------------------- persistence
    def manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "id": self.id,
            "method": self.method,
            "hparams": self.hparams,
            "requests": [r.to_dict() for r in self.requests],
            "base_fingerprint": self.base_fingerprint,
            "below": list(self.below),
            "model": self.base_lm.name,
            "checkpoint_sha256": self.checkpoint_sha256,
            "info": _jsonable(self.info),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def save(self, directory: str | Path) -> Path:
        """Write the patches and the manifest into `directory` (created if needed). Each file is written
        to a temporary name and renamed, the manifest last, so a crash never leaves a folder that loads."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        entries = []
        for i, p in enumerate(self.patches):
            ts, cfg = p.state()
            entries.append({"kind": p.kind, "config": cfg, "tensors": sorted(ts)})
            for k, t in ts.items():
                tensors[f"{i}/{k}"] = t.contiguous().cpu()
        manifest = self.manifest()
        manifest["patches"] = entries
        manifest["hparams"] = _jsonable(manifest["hparams"])
        json.dumps(manifest)  # fails here, before any file is written, if something is not serialisable
        tmp_t = temp_path_in(d, TENSORS)
        try:
            save_file(tensors, str(tmp_t))
            manifest["tensors_sha256"] = sha256_file(tmp_t)
            os.replace(tmp_t, d / TENSORS)
        finally:
            tmp_t.unlink(missing_ok=True)
        write_text_atomic(d / MANIFEST, json.dumps(manifest, indent=2))
        return d

    @classmethod
    def load(cls, directory: str | Path, lm: LM) -> "Edit":
        """Re-apply a saved edit to `lm`, which must be the base model it was made on, carrying exactly
        the edits that were below it when it was saved."""
        from safetensors.torch import load_file

        lm = getattr(lm, "base", lm)  # an edited system (a view) stands for its LM
        d = Path(directory)
        try:
            manifest = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise EditMismatchError(f"{d / MANIFEST} is missing or not valid JSON: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") not in (1, FORMAT):
            raise EditMismatchError(f"{d / MANIFEST}: unknown edit format {manifest.get('format') if isinstance(manifest, dict) else None!r}")
        below = list(manifest.get("below", []))
        current_below = [e.id for e in lm.active_edits]
        if below != current_below:
            raise EditMismatchError(
                f"edit in {d} was saved on top of {len(below)} other edit(s), but the model now carries "
                f"{len(current_below)} different edit(s); restore the model (or load the edits below first)"
            )
        if manifest["format"] == 1:  # format-1 files carry the earlier (sampled) fingerprint scheme
            from ..models.lm import model_fingerprint_v1

            current = model_fingerprint_v1(lm.model) if not lm.active_edits else None
        else:
            current = lm.fingerprint() if not lm.active_edits else lm.base_fingerprint
        if manifest.get("base_fingerprint") != current:
            raise EditMismatchError(
                f"edit in {d} was made on a model with fingerprint {manifest.get('base_fingerprint')}, "
                f"but this model's weights have fingerprint {current} (a different or already edited model)"
            )
        try:
            requests = [EditRequest.from_dict(r) for r in manifest.get("requests", [])]
            if manifest["format"] == 1:
                patches: list[Patch] = [WeightDelta(n, t) for n, t in sorted(load_file(str(d / TENSORS_V1)).items())]
            else:
                tfile = d / TENSORS
                if sha256_file(tfile) != manifest["tensors_sha256"]:
                    raise EditMismatchError(f"{tfile} does not match its checksum in {MANIFEST} (damaged or replaced file)")
                flat = load_file(str(tfile))
                patches = []
                for i, entry in enumerate(manifest["patches"]):
                    kind = entry["kind"]
                    if kind not in PATCH_TYPES:
                        raise EditMismatchError(f"{d / MANIFEST}: unknown patch kind {kind!r}")
                    ts = {k: flat[f"{i}/{k}"] for k in entry.get("tensors", [])}
                    patches.append(PATCH_TYPES[kind].from_state(ts, entry.get("config", {}), lm))
        except EditMismatchError:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
            raise EditMismatchError(f"saved edit in {d} is incomplete or damaged: {type(e).__name__}: {e}") from None
        return cls.install(lm, manifest["method"], manifest.get("hparams", {}), requests, patches,
                           manifest.get("info", {}), edit_id=manifest.get("id"),
                           checkpoint_sha256=manifest.get("checkpoint_sha256"))


def restore_all(lm: LM) -> None:
    """Restore every active edit on `lm` (newest first) in one step: touched weights are copied back
    from their single kept original instead of being replayed edit by edit."""
    stack = lm.active_edits
    if not stack:
        return
    errors: list[str] = []
    for e in reversed(stack):
        for p in reversed(e.patches):
            if not isinstance(p, WeightDelta):
                try:
                    p.revert(lm)
                except Exception as err:  # undo everything else regardless, then report
                    errors.append(str(err))
    unwind_weights(lm)
    for e in stack:
        e.active = False
    stack.clear()
    if errors:
        raise EditStackError("weights restored, but some module swaps could not be undone: " + "; ".join(errors))


def _jsonable(x: Any) -> Any:
    try:
        json.dumps(x)
        return x
    except (TypeError, ValueError):
        if isinstance(x, dict):
            return {str(k): _jsonable(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [_jsonable(v) for v in x]
        if isinstance(x, torch.Tensor):
            return x.tolist()
        return repr(x)
