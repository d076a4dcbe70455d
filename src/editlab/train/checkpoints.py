"""Checkpoints of learned editors in the user cache, keyed by (base-model fingerprint, method,
hyper-parameters, training-data hash).

A checkpoint is a folder `weights.safetensors` + `checkpoint.json` (key, metadata, the weights'
SHA-256), written to a temporary folder and renamed into place, so a crash never leaves one that
loads. A folder whose checksum fails is reported as `CheckpointError`, never used. The SHA-256 goes into
the manifest of every edit made with the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import CheckpointError
from ..fileio import atomic_dir, sha256_file
from ..paths import cache_path
from ..requests import EditRequest

WEIGHTS = "weights.safetensors"
META = "checkpoint.json"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    sha256: str
    key: dict[str, Any]
    meta: dict[str, Any]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors, after verifying the checksum again."""
        from safetensors.torch import load_file

        if sha256_file(self.path / WEIGHTS) != self.sha256:
            raise CheckpointError(f"checkpoint {self.path} fails its checksum (damaged file); train again with --force")
        return load_file(str(self.path / WEIGHTS))


def data_hash(requests: Sequence[EditRequest]) -> str:
    blob = json.dumps([r.to_dict() for r in requests], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def checkpoint_key(lm: Any, method: str, hparams: dict[str, Any], requests: Sequence[EditRequest]) -> dict[str, Any]:
    return {"model": lm.base_fingerprint, "method": method, "hparams": hparams, "data": data_hash(requests)}


def _folder(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_path("checkpoints", key["method"], str(key["model"])[:16]) / digest


def _read(folder: Path) -> Checkpoint:
    try:
        meta = json.loads((folder / META).read_text())
        ckpt = Checkpoint(folder, meta["sha256"], meta["key"], meta.get("meta", {}))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {folder} is unreadable: {e}") from None
    if not (folder / WEIGHTS).exists() or sha256_file(folder / WEIGHTS) != ckpt.sha256:
        raise CheckpointError(f"checkpoint {folder} fails its checksum (damaged file); train again with --force")
    return ckpt


def work_dir(key: dict[str, Any]) -> Path:
    """Where a training run under `key` keeps its resumable state until the checkpoint is saved."""
    folder = _folder(key)
    return folder.parent / f"{folder.name}.partial"


def find_checkpoint(key: dict[str, Any]) -> Checkpoint | None:
    """The checkpoint stored under exactly `key`, or None."""
    folder = _folder(key)
    if not (folder / META).exists():
        return None
    ckpt = _read(folder)
    if ckpt.key != json.loads(json.dumps(key, default=str)):
        raise CheckpointError(f"checkpoint {folder} holds another key than its folder name says")
    return ckpt


def latest_checkpoint(lm: Any, method: str, hparams: dict[str, Any], fmt: int = 1,
                      absent: dict[str, Any] | None = None) -> Checkpoint | None:
    """Newest checkpoint for this base model and method (any training data) whose hyper-parameters agree
    with `hparams` on every key `hparams` has (callers leave out training-only fields), and whose
    network format is `fmt` (a key without one is format 1). A key without a field of `absent` holds that
    field's value there (checkpoints written before the field existed)."""
    absent = absent or {}
    missing = object()
    root = cache_path("checkpoints", method, str(lm.base_fingerprint)[:16])  # a lookup creates nothing
    found = []
    want = json.loads(json.dumps(hparams, default=str))
    for folder in root.iterdir() if root.is_dir() else ():
        if not (folder / META).exists():
            continue
        try:
            meta = json.loads((folder / META).read_text())
        except (OSError, ValueError):
            continue
        k = meta.get("key", {})
        have = k.get("hparams") or {}
        if (k.get("model") == lm.base_fingerprint and k.get("format", 1) == fmt
                and all(have.get(name, absent.get(name, missing)) == value for name, value in want.items())):
            found.append((meta.get("created", 0), folder))
    if not found:
        return None
    return _read(max(found)[1])


def save_checkpoint(key: dict[str, Any], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Checkpoint:
    """Store a trained editor under `key` atomically and return it."""
    from safetensors.torch import save_file

    folder = _folder(key)
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        sha = sha256_file(tmp / WEIGHTS)
        body = {"key": key, "sha256": sha, "meta": meta, "created": time.time()}
        (tmp / META).write_text(json.dumps(body, indent=2, default=str))
    shutil.rmtree(work_dir(key), ignore_errors=True)  # the resumable state is no longer needed
    return _read(folder)
