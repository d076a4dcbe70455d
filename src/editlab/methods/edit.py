"""`Edit`: the reversible, savable result of applying an editing method.

Weight edits keep the original tensors of every parameter they touch, so `restore()` is bit-exact;
`save(dir)` writes the deltas as safetensors plus a JSON manifest naming the method, hparams, requests
and the base-model fingerprint; `Edit.load(dir, lm)` refuses a model with another fingerprint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import EditMismatchError
from ..models.lm import LM
from ..requests import EditRequest

MANIFEST = "edit.json"
TENSORS = "deltas.safetensors"


class Edit:
    """Handle on an applied edit. `edit.lm` is the edited system that evaluation scores."""

    def __init__(
        self,
        lm: LM,
        method: str,
        hparams: dict[str, Any],
        requests: Sequence[EditRequest],
        deltas: dict[str, torch.Tensor],
        originals: dict[str, torch.Tensor],
        base_fingerprint: str,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.lm = lm
        self.method = method
        self.hparams = hparams
        self.requests = list(requests)
        self.delta = deltas
        self._originals = originals
        self.base_fingerprint = base_fingerprint
        self.info = dict(info or {})
        self.active = True
        lm.active_edits.append(self)

    # ------------------------------------------------------------- lifecycle
    def restore(self) -> None:
        """Put back the exact original weights. Idempotent."""
        if not self.active:
            return
        with torch.no_grad():
            for name, orig in self._originals.items():
                param = self.lm.model.get_parameter(name)
                param.copy_(orig.to(param.device))
        self.active = False
        if self in self.lm.active_edits:
            self.lm.active_edits.remove(self)

    def __enter__(self) -> "Edit":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    # ------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in self.delta.items()}, str(d / TENSORS))
        manifest = {
            "format": 1,
            "method": self.method,
            "hparams": self.hparams,
            "requests": [r.to_dict() for r in self.requests],
            "base_fingerprint": self.base_fingerprint,
            "model": self.lm.name,
            "parameters": sorted(self.delta),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (d / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return d

    @classmethod
    def load(cls, directory: str | Path, lm: LM) -> "Edit":
        """Apply a saved edit to `lm`, which must be the unedited base model it was made on."""
        from safetensors.torch import load_file

        d = Path(directory)
        try:
            manifest = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise EditMismatchError(f"{d / MANIFEST} is missing or not valid JSON: {e}") from None
        current = lm.fingerprint()
        if manifest.get("base_fingerprint") != current:
            raise EditMismatchError(
                f"edit in {d} was made on a model with fingerprint {manifest.get('base_fingerprint')}, "
                f"but this model's weights have fingerprint {current} (different or already edited model)"
            )
        deltas = load_file(str(d / TENSORS))
        return apply_weight_deltas(
            lm, manifest["method"], manifest.get("hparams", {}),
            [EditRequest.from_dict(r) for r in manifest.get("requests", [])], deltas,
        )


def apply_weight_deltas(
    lm: LM, method: str, hparams: dict[str, Any], requests: Sequence[EditRequest],
    deltas: dict[str, torch.Tensor], info: dict[str, Any] | None = None,
) -> Edit:
    """Add `deltas` (parameter name -> tensor) to the model's weights, keeping the originals.
    Validates every delta before touching any weight."""
    params = {}
    for name, dlt in deltas.items():
        try:
            p = lm.model.get_parameter(name)
        except AttributeError:
            raise EditMismatchError(f"model has no parameter {name!r}") from None
        if p.shape != dlt.shape:
            raise EditMismatchError(f"delta for {name} has shape {tuple(dlt.shape)}, parameter has {tuple(p.shape)}")
        if not torch.isfinite(dlt).all():
            raise EditMismatchError(f"delta for {name} contains non-finite values")
        params[name] = p
    base_fp = lm.current_fingerprint()
    originals = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.add_(deltas[n].to(device=p.device, dtype=p.dtype))
    return Edit(lm, method, hparams, requests, {n: d.detach().cpu() for n, d in deltas.items()}, originals, base_fp, info)
