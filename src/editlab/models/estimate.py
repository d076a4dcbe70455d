"""Memory a model will need, estimated from its files before anything is loaded (`editlab models
--estimate NAME`), and the check that refuses to load a model whose weights cannot fit in the memory
that is free (a named error instead of an out-of-memory kill).

What is counted (bytes):

- weights: every floating tensor of the safetensors files at the chosen dtype (exact: read from the
  files' headers, no tensor is read), other tensors at their stored size;
- statistics: per method that reads covariance statistics, one fp32 d_ff x d_ff matrix per layer it
  edits at its default layers (ROME one, MEMIT/PMET/EMMET/AlphaEdit five), plus the fp64 sum while
  they are computed;
- scoring batch: one forward pass of `max_batch_tokens` tokens: the logits (model dtype) and their
  fp32 log-softmax over the vocabulary, plus the hidden states of every layer;
- peak = weights + statistics + scoring batch, times 1.25 for the framework and the allocator.

It is an estimate: gradient-based methods (FT, the value optimisation of ROME/MEMIT, the meta-learned
editors) add activations for a backward pass over a few prompts, small next to the terms above for
the prompt lengths of the benchmarks. docs/scale.md compares it with measured peaks."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import EditlabError

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
             "I8": 1, "U8": 1, "BOOL": 1}
OVERHEAD = 1.25
STATS_LAYERS = {"rome": 1, "memit": 5, "pmet": 5, "emmet": 5, "alphaedit": 5}


class MemoryEstimateError(EditlabError, MemoryError):
    """The model's weights (at the chosen dtype) need more memory than the device has free."""


@dataclass
class MemoryEstimate:
    model: str
    dtype: str
    n_params: int
    weights: int
    scoring: int
    statistics: dict[str, int] = field(default_factory=dict)
    shape: dict[str, int] = field(default_factory=dict)

    def peak(self, method: str | None = None) -> int:
        return int(OVERHEAD * (self.weights + self.scoring + (self.statistics.get(method, 0) if method else 0)))


class CannotSizeError(EditlabError, ValueError):
    """The model's files do not say its size without loading it (no safetensors, a damaged header)."""


def model_folder(name_or_path: str) -> Path | None:
    """The folder holding the model's files without loading it: a registered model's folder (fetched
    into the cache as `load_lm` would), or a local folder; None for in-memory tiny models and for hub
    ids (their files are not looked up here). The name was checked by the caller."""
    from .sources import MODELS

    if name_or_path in MODELS:
        entry = MODELS.entry(name_or_path)
        return None if entry.meta.get("tiny") else Path(entry.load())
    p = Path(name_or_path).expanduser()
    return p if p.is_dir() else None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files that hold the model's weights: those of the shard index when there is one,
    else `model.safetensors` (never extra copies such as `consolidated.safetensors` or adapters)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CannotSizeError(f"{index} is unreadable ({type(e).__name__})") from None
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise CannotSizeError(f"{folder} has no model.safetensors (other weight formats cannot be sized without loading them)")


def safetensors_sizes(folder: Path) -> tuple[int, int]:
    """(floating-point parameters, bytes of the other tensors) from the headers of the weight files;
    a tensor stored twice under a tied name is counted twice (transformers saves it once)."""
    n_float, other = 0, 0
    for f in weight_files(folder):
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            assert isinstance(header, dict)
        except (OSError, struct.error, ValueError, AssertionError) as e:
            raise CannotSizeError(f"the header of {f} is unreadable ({type(e).__name__})") from None
        for key, t in header.items():
            if key == "__metadata__":
                continue
            numel = 1
            for d in t["shape"]:
                numel *= int(d)
            if t["dtype"].startswith(("F", "BF")):
                n_float += numel
            else:
                other += numel * _ST_BYTES.get(t["dtype"], 1)
    return n_float, other


def _shape(folder: Path) -> dict[str, int]:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        cfg = {**(cfg.get("text_config") or {}), **cfg}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CannotSizeError(f"{folder}/config.json is unreadable ({type(e).__name__})") from None

    def first(*keys: str, default: int = 0) -> int:
        return next((int(cfg[k]) for k in keys if isinstance(cfg.get(k), (int, float))), default)

    hidden = first("hidden_size", "n_embd", "d_model")
    return {"hidden": hidden, "d_ff": first("intermediate_size", "n_inner", default=4 * hidden),
            "layers": first("num_hidden_layers", "n_layer", "num_layers"), "vocab": first("vocab_size")}


def estimate(name_or_path: str, dtype: str = "float32", methods: Iterable[str] = (), max_batch_tokens: int = 4096) -> MemoryEstimate | None:
    """The estimate for a model on disk (None for in-memory tiny models and hub ids not on disk)."""
    from .sources import dtype_name

    dtype = dtype_name(dtype)
    folder = model_folder(name_or_path)
    if folder is None:
        return None
    n_float, other = safetensors_sizes(folder)
    shape = _shape(folder)
    b = BYTES[dtype]
    scoring = max_batch_tokens * shape["vocab"] * (b + 4) + max_batch_tokens * shape["hidden"] * b * (shape["layers"] + 1)
    stats = {m: STATS_LAYERS[m] * shape["d_ff"] ** 2 * (4 + 8) for m in methods if m in STATS_LAYERS}
    return MemoryEstimate(str(name_or_path), dtype, n_float, n_float * b + other, scoring, stats, shape)


def available_memory(device: str = "cpu") -> int | None:
    """Bytes free on the device now (CPU: MemAvailable; CUDA: free on that GPU); None if unknown."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        return int(torch.cuda.mem_get_info(index)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_memory(name_or_path: str, dtype: str, device: str, device_map: Any = None) -> MemoryEstimate | None:
    """Refuse (`MemoryEstimateError`) a model whose weights at `dtype` exceed the free memory of
    `device`, saying what would help; returns the estimate. A model that cannot be sized from its files
    (a hub id, no safetensors) and a device map (accelerate places the weights itself) are not checked."""
    if device_map:
        return None
    try:
        est = estimate(name_or_path, dtype)
    except CannotSizeError:
        return None
    if est is None:
        return est
    free = available_memory(device)
    if free is not None and est.weights > free:
        smaller = [d for d in ("bfloat16",) if BYTES[d] < BYTES[est.dtype]]
        hint = (f"load it in --dtype {smaller[0]} ({gib(est.n_params * BYTES[smaller[0]])})" if smaller
                else "use a machine with more memory or spread it over GPUs (device_map='auto')")
        raise MemoryEstimateError(f"{name_or_path} needs {gib(est.weights)} for its weights in {est.dtype} but {device} "
                                  f"has {gib(free)} free; {hint}")
    return est
