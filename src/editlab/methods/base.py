"""Shared editor machinery: the `Hparams` base class (validation, overrides, presets), the `Editor` base
class (`apply` with transactional weight updates) and the method registry."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping, Sequence, TypeVar

import torch

from ..errors import EditRequestError, HparamsError, UnknownMethodError
from ..models.lm import LM
from ..registry import Registry, lazy
from ..requests import EditRequest
from .edit import Edit, apply_weight_deltas

H = TypeVar("H", bound="Hparams")


@dataclass
class Hparams:
    """Base of every method's hyper-parameters. Subclasses add fields and `defaults_for(lm)`."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def defaults_for(cls, lm: LM) -> dict[str, Any]:
        """Values derived from the model's ArchSpec/config (overriding the dataclass defaults)."""
        return {}

    @classmethod
    def preset_name(cls, lm: LM) -> str | None:
        name = lm.name.lower().rstrip("/").split("/")[-1]
        for preset in cls.PRESETS:
            if preset in name:
                return preset
        return None

    @classmethod
    def for_model(cls: type[H], lm: LM, preset: str | None = None, **overrides: Any) -> H:
        """Defaults for `lm`: ArchSpec-derived values, then the named (or auto-detected) preset,
        then `overrides`. Unknown keys and out-of-range values raise `HparamsError`."""
        values = cls.defaults_for(lm)
        name = preset or cls.preset_name(lm)
        if preset and preset not in cls.PRESETS:
            raise HparamsError(f"unknown preset {preset!r} for {cls.__name__}; known: {sorted(cls.PRESETS)}")
        if name:
            values.update(cls.PRESETS[name])
        values.update(overrides)
        hp = cls.from_dict(values)
        hp.validate(lm)
        return hp

    @classmethod
    def from_dict(cls: type[H], values: Mapping[str, Any]) -> H:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise HparamsError(f"unknown hyper-parameter(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
        coerced = {}
        for k, v in values.items():
            coerced[k] = _coerce(k, v, known[k])
        return cls(**coerced)

    def replace(self: H, **changes: Any) -> H:
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, lm: LM) -> None:
        """Raise HparamsError for values out of range for `lm` (subclasses extend)."""

    # helpers for subclasses
    @staticmethod
    def _check_layer(name: str, layer: int, lm: LM) -> None:
        if not 0 <= layer < lm.n_layers:
            raise HparamsError(f"{name}={layer} is out of range: {lm.name} has layers 0..{lm.n_layers - 1}")

    @staticmethod
    def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
        if value < 0 or (value == 0 and not allow_zero):
            raise HparamsError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _coerce(name: str, value: Any, f: dataclasses.Field) -> Any:
    """Accept strings from the CLI (`--set layer=5`) for int/float/bool/list fields."""
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
    )
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int) and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, (list, tuple)):
            if isinstance(value, str):
                value = [int(x) if x.strip().lstrip("-").isdigit() else x.strip() for x in value.strip("[]() ").split(",") if x.strip()]
            return list(value)
    except (TypeError, ValueError):
        raise HparamsError(f"hyper-parameter {name}: cannot use {value!r} (expected {type(default).__name__})") from None
    return value


class Editor(ABC):
    """One editing method. Subclasses set `name`, `hparams_cls`, and implement `compute_deltas`."""

    name: ClassVar[str]
    hparams_cls: ClassVar[type[Hparams]]
    supports_batch: ClassVar[bool] = False

    def hparams(self, lm: LM, **overrides: Any) -> Hparams:
        return self.hparams_cls.for_model(lm, **overrides)

    def apply(
        self,
        lm: LM,
        requests: EditRequest | Sequence[EditRequest],
        hparams: Hparams | Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> Edit:
        """Edit `lm` in place and return the reversible `Edit`. If anything fails, the model's weights
        are left exactly as they were."""
        reqs = [requests] if isinstance(requests, EditRequest) else list(requests)
        if not reqs:
            raise EditRequestError("no edit requests given")
        for i, r in enumerate(reqs):
            if not isinstance(r, EditRequest):
                raise EditRequestError(f"requests[{i}] is a {type(r).__name__}, not an EditRequest")
        if len(reqs) > 1 and not self.supports_batch:
            raise EditRequestError(f"method {self.name!r} edits one request at a time; got {len(reqs)}")
        if hparams is None:
            hp = self.hparams(lm, **overrides)
        elif isinstance(hparams, Hparams):
            hp = hparams.replace(**overrides) if overrides else hparams
            hp.validate(lm)
        else:
            hp = self.hparams(lm, **{**dict(hparams), **overrides})
        grads = {n: p.requires_grad for n, p in lm.model.named_parameters()}
        try:
            for p in lm.model.parameters():
                p.requires_grad_(False)
            deltas, info = self.compute_deltas(lm, reqs, hp)
        finally:
            for n, p in lm.model.named_parameters():
                p.requires_grad_(grads[n])
        return apply_weight_deltas(lm, self.name, hp.to_dict(), reqs, deltas, info)

    @abstractmethod
    def compute_deltas(
        self, lm: LM, requests: list[EditRequest], hp: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Return (parameter name -> weight delta, info). Must not leave the model modified."""


# ---------------------------------------------------------------- registry (lazy per method)
METHODS: Registry[type[Editor]] = Registry("method", UnknownMethodError)
METHODS.register("ft", "FT-L: fine-tuning of one MLP layer within an L-inf ball (ROME paper's baseline)",
                 lazy("editlab.methods.ft:FTEditor"), aliases=("ft-l",), family="fine-tuning")
METHODS.register("ft-m", "FT-M: fine-tuning of one MLP layer, loss on the target tokens only (EasyEdit)",
                 lazy("editlab.methods.ft:FTMEditor"), family="fine-tuning")
METHODS.register("rome", "ROME (r-ROME keys by default): rank-one update of one MLP output projection",
                 lazy("editlab.methods.locate.rome:ROMEEditor"), aliases=("r-rome",), family="locate-and-edit")
METHODS.register("memit", "MEMIT: batch edits spread over several MLP layers by least squares",
                 lazy("editlab.methods.locate.memit:MEMITEditor"), family="locate-and-edit")


def available_methods() -> dict[str, str]:
    """Registered method names and their one-line descriptions."""
    return METHODS.describe()


def get_editor(name: str) -> Editor:
    """A fresh editor instance for a registered method name or alias (UnknownMethodError otherwise)."""
    cls = METHODS.get(name)
    editor = cls()
    editor.name = METHODS.resolve(name)
    return editor
