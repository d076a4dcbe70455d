"""`Edit`: the reversible, savable result of applying an editing method.

An edit is a list of patches (`patches.py`): weight deltas, module swaps and LM views. Edits on one LM
form a stack (`lm.active_edits`, oldest first):

- installing is atomic: every patch is checked first, and a failure while applying the k-th patch
  reverts the first k−1, so the model is exactly as before;
- only the top edit can be restored; restoring another raises `EditStackError` and changes nothing.
  Restoring the whole stack gives the base weights and modules bit for bit;
- `edit.lm` is the edited system that evaluation scores: the view of the top view patch, built over the
  system of the edit below, or the LM itself when no edit installed a view.

`save(dir)` writes `patches.safetensors` and the JSON manifest `edit.json` (format 3: method, hparams,
requests, the exact base fingerprint, the edits below it, each patch's kind and config, the learned
editor's checkpoint hash, and for integrity the tensor file's size and SHA-256 plus, per tensor, the
parameter/module it belongs to, its shape, dtype and the SHA-256 of its bytes; the tensor file's own
header repeats which parameter each tensor belongs to). The folder is written beside its final place
and renamed into it, so a crash leaves the old save or none, never half of one.

`Edit.load(dir, lm)` verifies all of that before anything touches the weights and refuses, with
`EditIntegrityError`, a missing or truncated file, a changed byte, scaled values, a tensor moved to
another parameter, or a manifest that contradicts the file; with `EditMismatchError`, another base model
or another stack of edits below. Format-2 folders (whole-file hash only) load after that check;
format-1 folders (dense deltas keyed by parameter name in `deltas.safetensors`, no hashes) load with a
warning that they cannot be verified.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import EditIntegrityError, EditMismatchError, EditStackError, OutputPathError
from ..fileio import atomic_dir, sha256_file
from ..models.lm import LM
from ..requests import EditRequest
from .edit_folder import EDIT_FILES, FORMAT, LOADABLE_FORMATS, MANIFEST, TENSORS, TENSORS_V1, check_save_target  # noqa: F401
from .patches import PATCH_TYPES, LowRank, ModuleSwap, Patch, TableUpdate, ViewPatch, WeightDelta, unwind_weights


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
        staged: dict[str, torch.nn.Module] = {}  # wrappers this edit puts in place, by path
        for p in self.patches:
            if isinstance(p, TableUpdate) and p.path in staged:
                p.check_wrapper(staged[p.path])  # fills the wrapper an earlier patch of this edit installs
            else:
                p.check(lm)
            if isinstance(p, ModuleSwap):
                staged[p.path] = p.wrapper
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

    def reapply(self) -> "Edit":
        """Install a restored edit again, with the same patches, on top of the stack it was restored
        from (the same edits below it): restore + reapply takes the newest edit off and puts it back
        bit-exactly, e.g. to compare the model before and after it."""
        if self.active:
            raise EditStackError(f"this {self.method} edit is already applied")
        below = [e.id for e in self.base_lm.active_edits]
        if below != self.below:
            raise EditStackError(f"cannot reapply this {self.method} edit: the edits below it changed since it was "
                                 "restored; apply it again instead")
        return self._install()

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
        """Write the patches and the manifest into `directory`, atomically: everything is written into a
        temporary folder beside it, then renamed into place. An existing edit folder is replaced; any
        other non-empty folder (or a file) is refused with `OutputPathError` before anything is written."""
        from safetensors.torch import save_file

        d = Path(directory)
        check_save_target(d)
        tensors: dict[str, torch.Tensor] = {}
        table: dict[str, dict[str, Any]] = {}
        entries = []
        for i, p in enumerate(self.patches):
            ts, cfg = p.state()
            entries.append({"kind": p.kind, "config": cfg, "tensors": sorted(ts)})
            for k, t in ts.items():
                key = f"{i}/{k}"
                tensors[key] = t.contiguous().cpu()
                table[key] = {"target": _patch_target(p.kind, cfg), **tensor_record(tensors[key])}
        manifest = self.manifest()
        manifest["patches"] = entries
        manifest["hparams"] = _jsonable(manifest["hparams"])
        manifest["tensors"] = table
        json.dumps(manifest)  # fails here, before any file is written, if something is not serialisable
        header = {"editlab_format": str(FORMAT), "editlab_targets": json.dumps({k: v["target"] for k, v in table.items()},
                                                                                sort_keys=True),
                  # the patch list (kinds and configs) lives in the manifest; its digest in the tensor file,
                  # whose own checksum is in the manifest, ties the two together
                  "editlab_patches_sha256": _patches_digest(manifest["patches"])}
        try:
            with atomic_dir(d) as tmp:
                save_file(tensors, str(tmp / TENSORS), metadata=header)
                manifest["tensors_sha256"] = sha256_file(tmp / TENSORS)
                manifest["tensors_bytes"] = (tmp / TENSORS).stat().st_size
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        except OSError as e:
            raise OutputPathError(f"cannot save the edit to {d}: {e.strerror or e}") from None
        return d

    @classmethod
    def load(cls, directory: str | Path, lm: LM) -> "Edit":
        """Re-apply a saved edit to `lm`, which must be the base model it was made on, carrying exactly
        the edits that were below it when it was saved. Every file is verified first (see the module
        docstring); nothing is applied unless all checks pass."""
        from safetensors.torch import load_file

        lm = getattr(lm, "base", lm)  # an edited system (a view) stands for its LM
        d = Path(directory)
        manifest = read_manifest(d)
        fmt = manifest["format"]
        below = manifest.get("below", [])
        if not isinstance(below, list):
            raise EditIntegrityError(f"{d / MANIFEST}: 'below' must be a list of edit ids")
        current_below = [e.id for e in lm.active_edits]
        if below != current_below:
            raise EditMismatchError(
                f"edit in {d} was saved on top of {len(below)} other edit(s), but the model now carries "
                f"{len(current_below)} different edit(s); restore the model (or load the edits below first)"
            )
        if fmt == 1:  # format-1 files carry the earlier (sampled) fingerprint scheme
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
            if fmt == 1:
                warnings.warn(f"{d} is a format-1 edit without checksums: its tensors cannot be verified; save it "
                              "again to upgrade it", stacklevel=2)
                tfile = d / TENSORS_V1
                if not tfile.is_file():
                    raise EditIntegrityError(f"{tfile} is missing; the saved edit is incomplete")
                patches: list[Patch] = [WeightDelta(n, t) for n, t in sorted(load_file(str(tfile)).items())]
            else:
                flat = verify_tensors(d, manifest)
                patches = []
                for i, entry in enumerate(manifest["patches"]):
                    if not isinstance(entry, dict):
                        raise EditIntegrityError(f"{d / MANIFEST}: patch {i} is not an object")
                    kind = entry.get("kind")
                    if kind not in PATCH_TYPES:
                        raise EditIntegrityError(f"{d / MANIFEST}: unknown patch kind {kind!r}")
                    ts = {k: flat[f"{i}/{k}"] for k in entry.get("tensors", [])}
                    patches.append(PATCH_TYPES[kind].from_state(ts, entry.get("config", {}), lm))
        except EditMismatchError:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError) as e:
            raise EditIntegrityError(f"saved edit in {d} is incomplete or damaged: {type(e).__name__}: {e}") from None
        if not isinstance(manifest.get("method"), str) or not isinstance(manifest.get("hparams", {}), dict):
            raise EditIntegrityError(f"{d / MANIFEST}: 'method' must be a name and 'hparams' a mapping")
        return cls.install(lm, manifest["method"], manifest.get("hparams", {}), requests, patches,
                           manifest.get("info", {}) if isinstance(manifest.get("info"), dict) else {},
                           edit_id=manifest.get("id"), checkpoint_sha256=manifest.get("checkpoint_sha256"))


# ------------------------------------------------------------------------- integrity of saved edits
def tensor_record(t: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype and SHA-256 of a tensor's bytes (as stored: contiguous, little-endian)."""
    flat = t.detach().contiguous().cpu().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "sha256": hashlib.sha256(raw).hexdigest()}


def _patch_target(kind: str, config: Any) -> str:
    """What a patch changes (a parameter name, a module path, a view type), as recorded per tensor."""
    if isinstance(config, dict):
        for key in ("parameter", "path", "view"):
            if isinstance(config.get(key), str):
                return config[key]
    return str(kind)


def read_manifest(d: Path) -> dict[str, Any]:
    """The parsed `edit.json` of a saved edit, with a known format; `EditIntegrityError` otherwise."""
    if not d.is_dir():
        raise EditIntegrityError(f"saved edit {d} does not exist or is not a folder")
    try:
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EditIntegrityError(f"{d / MANIFEST} is missing: {d} is not a saved edit (or its save did not finish)") from None
    except (OSError, ValueError) as e:
        raise EditIntegrityError(f"{d / MANIFEST} is not valid JSON (damaged or truncated): {e}") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if isinstance(fmt, bool) or fmt not in LOADABLE_FORMATS:
        raise EditIntegrityError(f"{d / MANIFEST}: unknown edit format {fmt!r} (this editlab reads formats "
                                 f"{', '.join(map(str, LOADABLE_FORMATS))})")
    return manifest


def _patches_digest(patches: Any) -> str:
    return hashlib.sha256(json.dumps(patches, sort_keys=True).encode()).hexdigest()


def verify_tensors(d: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Load `patches.safetensors` after checking it against the manifest: presence, size, whole-file
    SHA-256, then (format 3) the same tensor names, and for each its target parameter (in the manifest,
    the patch config and the file's own header), shape, dtype and the SHA-256 of its bytes."""
    from safetensors import safe_open

    tfile = d / TENSORS
    if not tfile.is_file():
        raise EditIntegrityError(f"{tfile} is missing; the saved edit is incomplete")
    size = tfile.stat().st_size
    expected_size = manifest.get("tensors_bytes")
    if expected_size is not None and size != expected_size:
        raise EditIntegrityError(f"{tfile} is {size} bytes but {MANIFEST} records {expected_size} "
                                 f"({'truncated' if isinstance(expected_size, int) and size < expected_size else 'altered'} file)")
    if sha256_file(tfile) != manifest.get("tensors_sha256"):
        raise EditIntegrityError(f"{tfile} does not match its checksum in {MANIFEST} (damaged or replaced file)")
    try:
        with safe_open(str(tfile), framework="pt") as f:
            header = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise EditIntegrityError(f"{tfile} cannot be read as safetensors: {type(e).__name__}: {e}") from None
    if manifest["format"] == 2:
        return flat
    table = manifest.get("tensors")
    patches = manifest.get("patches")
    if not isinstance(table, dict) or not isinstance(patches, list):
        raise EditIntegrityError(f"{d / MANIFEST} lacks the per-tensor records of format 3")
    if set(table) != set(flat):
        raise EditIntegrityError(f"{MANIFEST} and {TENSORS} list different tensors: only in the manifest "
                                 f"{sorted(set(table) - set(flat))[:3]}, only in the file {sorted(set(flat) - set(table))[:3]}")
    digest = header.get("editlab_patches_sha256")
    if digest is not None and digest != _patches_digest(patches):
        raise EditIntegrityError(f"{d / MANIFEST}: its patch list (kinds, configs, tensor names) is not the one saved "
                                 f"with {TENSORS} (altered manifest)")
    named = {f"{i}/{k}" for i, e in enumerate(patches) if isinstance(e, dict) and isinstance(e.get("tensors"), list)
             for k in e["tensors"]}
    if named != set(table):
        raise EditIntegrityError(f"{d / MANIFEST}: its patches use tensors {sorted(named)[:3]} but the file holds "
                                 f"{sorted(table)[:3]} (a patch was removed or renamed)")
    try:
        header_targets = json.loads(header.get("editlab_targets", "{}"))
    except ValueError:
        raise EditIntegrityError(f"{tfile}: its header's target list is not valid JSON") from None
    for i, entry in enumerate(patches):
        if not isinstance(entry, dict) or not isinstance(entry.get("tensors", []), list):
            raise EditIntegrityError(f"{d / MANIFEST}: patch {i} is malformed")
        target = _patch_target(str(entry.get("kind")), entry.get("config"))
        for k in entry.get("tensors", []):
            key = f"{i}/{k}"
            rec = table.get(key)
            if not isinstance(rec, dict):
                raise EditIntegrityError(f"{d / MANIFEST}: patch {i} names tensor {k!r}, which has no record")
            if rec.get("target") != target or header_targets.get(key) != target:
                raise EditIntegrityError(
                    f"{d}: tensor {key} belongs to {header_targets.get(key)!r} in the file and to {rec.get('target')!r} in "
                    f"the manifest's record, but patch {i} applies it to {target!r} (tensor moved to another parameter)")
    for key, rec in table.items():
        actual = tensor_record(flat[key])
        for field in ("shape", "dtype", "sha256"):
            if not isinstance(rec, dict) or rec.get(field) != actual[field]:
                raise EditIntegrityError(
                    f"{d}: tensor {key} ({rec.get('target') if isinstance(rec, dict) else '?'}) has {field} {actual[field]!r:.80} "
                    f"but {MANIFEST} records {rec.get(field) if isinstance(rec, dict) else None!r:.80} (altered tensor or manifest)")
    return flat


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
