"""The `Hparams` base class of every method's hyper-parameters: coercion of CLI strings, model-free
bounds (`check_counts`), presets chosen by the model's signature, and `validate(lm)` helpers.

Torch-free on purpose: the CLI checks `--set`/`--hparams` against a method's hyper-parameter class before
torch is imported (each family keeps its classes in a torch-free `hparams` module), so a typo is answered
in a fraction of a second."""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping, Sequence, TypeVar

from ..errors import HparamsError

if TYPE_CHECKING:
    from ..models.lm import LM

H = TypeVar("H", bound="Hparams")


def warn_if_evaluation_data(setting: str, names: Sequence[str]) -> None:
    """Warn when a method learns from (or retrieves from) a registered evaluation dataset: figures on
    that dataset's records would then be measured on records the method has seen. Training splits
    (`*-train`), the built-in facts and files are not checked."""
    from ..data import DATASETS

    for name in names:
        if name in DATASETS and not DATASETS.resolve(name).endswith("-train") and DATASETS.resolve(name) != "builtin":
            warnings.warn(f"{setting} uses {name!r}, an evaluation dataset: figures on its records are not results "
                          "(use a training split such as counterfact-train)", UserWarning, stacklevel=3)


@dataclass
class Hparams:
    """Base of every method's hyper-parameters. Subclasses add fields and `defaults_for(lm)`."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    # fields added after runs and checkpoints were stored under keys without them: the value such a key
    # stood for. `identity()` leaves a field out while it holds that value, so earlier run ids and
    # checkpoint keys stay valid (and `latest_checkpoint` reads a key without it as that value).
    ABSENT_MEANS: ClassVar[dict[str, Any]] = {}

    @classmethod
    def defaults_for(cls, lm: LM) -> dict[str, Any]:
        """Values derived from the model's ArchSpec/config (overriding the dataclass defaults)."""
        return {}

    @classmethod
    def preset_name(cls, lm: LM) -> str | None:
        """The preset for `lm`, chosen by its architecture and size (`known_model`), never by its name."""
        known = known_model(lm)
        return known if known in cls.PRESETS else None

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
        from ..tracing.edit_layer import edit_layer_from_trace, is_auto

        if is_auto(values.get("layer")) and "layer" in {f.name for f in fields(cls)}:
            values["layer"] = edit_layer_from_trace(lm).layer  # ROME's rule: the averaged MLP trace's peak
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
        hp = cls(**coerced)
        hp.check_counts(coerced)
        return hp

    # Model-free bounds on counts, by name suffix: what no method could mean, whatever the model
    # (`validate(lm)` checks the model-dependent ranges, e.g. a layer against the model's depth).
    # Subclasses may extend it.
    COUNT_BOUNDS: ClassVar[tuple[tuple[str, int], ...]] = (
        ("steps", 100_000), ("batch_size", 1_000_000), ("n_tokens", 10_000_000_000), ("layer", 10_000),
        ("rank", 100_000), ("rows", 10_000_000), ("mb", 10_000_000), ("neurons", 1_000_000), ("seed", 2**63 - 1),
    )

    def check_counts(self, names: Iterable[str] | None = None) -> None:
        """Counts (steps, sizes, layer indices, token counts) among `names` (default: every field) must be
        whole numbers in 0..`COUNT_BOUNDS`; list fields whose default holds integers must hold integers.
        Needs no model, so the CLI runs it before loading one."""
        by_name = {f.name: f for f in fields(self)}
        for name in (by_name if names is None else names):
            f = by_name[name]
            value, default = getattr(self, name), _field_default(f)
            kind = str(f.type).replace(" ", "")  # annotations are strings (from __future__ import annotations)
            if isinstance(default, bool) or kind == "bool":
                continue
            int_list = kind in ("list[int]", "tuple[int,...]") or (
                isinstance(default, (list, tuple)) and bool(default) and all(type(x) is int for x in default))
            if int_list:
                if not isinstance(value, (list, tuple)) or not all(type(x) is int for x in value):
                    raise HparamsError(f"hyper-parameter {name}: expected a list of integers, got {value!r:.80}")
                items = list(value)
            elif kind == "int" or (isinstance(default, int) and kind != "float"):
                if type(value) is not int:
                    raise HparamsError(f"hyper-parameter {name}: expected an integer, got {value!r:.80}")
                items = [value]
            else:
                continue
            for suffix, bound in self.COUNT_BOUNDS:
                if name == suffix or name.endswith("_" + suffix) or name.endswith(suffix + "s"):
                    bad = [v for v in items if not 0 <= v <= bound]
                    if bad:
                        raise HparamsError(f"hyper-parameter {name}={bad[0]} is out of range (0..{bound:,})")

    def replace(self: H, **changes: Any) -> H:
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """`to_dict()` as run ids and checkpoint keys hash it: without each `ABSENT_MEANS` field that holds
        the value its absence stood for."""
        return {k: v for k, v in self.to_dict().items()
                if not (k in self.ABSENT_MEANS and v == self.ABSENT_MEANS[k])}

    def validate(self, lm: LM) -> None:
        """Raise HparamsError for values out of range for `lm` (subclasses extend)."""

    # helpers for subclasses
    @staticmethod
    def _check_layer(name: str, layer: int, lm: LM) -> None:
        if not 0 <= layer < lm.n_layers:
            raise HparamsError(f"{name}={layer} is out of range: {lm.name} has layers 0..{lm.n_layers - 1}")

    @classmethod
    def _check_layers(cls, name: str, layers: list[int], lm: LM) -> None:
        """A non-empty, strictly increasing list of layers of `lm`."""
        if not layers:
            raise HparamsError(f"{name} must name at least one layer")
        for l in layers:
            cls._check_layer(name, l, lm)
        if sorted(set(layers)) != list(layers):
            raise HparamsError(f"{name} must be strictly increasing, got {layers}")

    @staticmethod
    def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
        if value not in choices:
            raise HparamsError(f"{name} must be one of {list(choices)}, got {value!r}")

    @staticmethod
    def _check_dataset(name: str, value: str, setting: str) -> None:
        """A hyper-parameter naming a dataset (a registered name, "builtin" or a file) that the method reads:
        "" is off; otherwise it must resolve, and an evaluation dataset draws a warning (its records would
        then be seen by the method). Checked here, before any model work."""
        if not value:
            return
        if not isinstance(value, str):
            raise HparamsError(f"{name} must name a dataset or a file, got {value!r}")
        if value != "builtin":
            from ..data import resolve
            from ..errors import DataFormatError

            try:
                resolve(value)
            except DataFormatError as e:
                raise HparamsError(f"{name}: {e}") from None
        warn_if_evaluation_data(setting, [value])

    @staticmethod
    def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
        if value < 0 or (value == 0 and not allow_zero):
            raise HparamsError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _parse_list(text: str) -> list[Any]:
    """'3,4,5', '[3, 4, 5]', '0.5,1e-3' or nested '[[5, 10], [10, 10]]' -> a list of numbers/strings."""
    import yaml

    t = text.strip()
    if t.startswith("["):
        try:
            value = yaml.safe_load(t)
        except yaml.YAMLError:
            raise ValueError(text) from None
        if not isinstance(value, list):
            raise ValueError(text)
        return value

    def number(x: str) -> Any:
        x = x.strip()
        for conv in (int, float):
            try:
                return conv(x)
            except ValueError:
                pass
        return x

    return [number(x) for x in t.strip("()").split(",") if x.strip()]


# Well-known models, recognised by architecture and size (model_type, layers, hidden width, vocabulary),
# so that presets follow the weights, not whatever the folder happens to be called.
KNOWN_MODELS: dict[str, tuple[str, int, int, int]] = {
    "smollm2-135m": ("llama", 30, 576, 49152),
    "gpt2-xl": ("gpt2", 48, 1600, 50257),
    "gpt-j-6b": ("gptj", 28, 4096, 50400),
    "llama-2-7b": ("llama", 32, 4096, 32000),
    "llama-3-8b": ("llama", 32, 4096, 128256),
}


def model_signature(lm: LM) -> tuple[str, int, int, int]:
    cfg = lm.model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 0
    return (lm.arch.model_type, lm.n_layers, int(hidden), int(getattr(cfg, "vocab_size", 0) or 0))


def known_model(lm: LM) -> str | None:
    """Name of the well-known model `lm` is (by signature), or None."""
    sig = model_signature(lm)
    for name, known in KNOWN_MODELS.items():
        if known == sig:
            return name
    return None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]


def _coerce(name: str, value: Any, f: dataclasses.Field) -> Any:
    """Accept strings from the CLI (`--set layer=5`) for int/float/bool/list fields."""
    default = _field_default(f)
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
                return bool(value)
            raise ValueError(value)  # a list, dict or other number is not a switch
        if isinstance(default, int) and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            out = float(value)
            if out != out or out in (float("inf"), float("-inf")):
                raise ValueError(value)
            return out
        if isinstance(default, str):
            if isinstance(value, os.PathLike):  # a corpus or prompt folder given as a Path
                return os.fspath(value)
            if not isinstance(value, str):
                raise ValueError(value)
            return value
        if isinstance(default, (list, tuple)):
            if isinstance(value, str):
                value = _parse_list(value)
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            return list(value)
    except (TypeError, ValueError):
        raise HparamsError(f"hyper-parameter {name}: cannot use {value!r} (expected {type(default).__name__})") from None
    return value
