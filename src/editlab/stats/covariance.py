"""Second moments E[k kᵀ] of the inputs of MLP output projections over generic text, cached on disk.

One cache file per (base-model fingerprint, module, corpus, token count, dtype, window length). The
file carries its key and a SHA-256 of the tensor in its metadata; a file that is unreadable, belongs to
another key or fails the checksum is reported (`StatsCacheWarning`) and recomputed, never used.
The forward pass stops at the deepest layer that is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import StatsCacheError
from ..hooks import StopForward, hooks
from ..models.lm import LM
from ..paths import cache_dir
from .corpus import Corpus, get_corpus

FORMAT_VERSION = 1
DEFAULT_N_TOKENS = 100_000  # default token budget of the statistics (see docs/methods.md for convergence)


class StatsCacheWarning(UserWarning):
    """A cached statistics file was rejected and is being recomputed."""


def _key(lm: LM, module: str, corpus: Corpus, n_tokens: int, dtype: torch.dtype, seq_len: int) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "model": lm.base_fingerprint,
        "module": module,
        "corpus": corpus.name,
        "n_tokens": int(n_tokens),
        "dtype": str(dtype).replace("torch.", ""),
        "seq_len": int(seq_len),
    }


def cache_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    safe_module = key["module"].replace(".", "_")
    return cache_dir("stats", key["model"]) / f"{safe_module}-{digest}.safetensors"


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


def load_cached(path: Path, key: dict[str, Any], dim: int) -> torch.Tensor:
    """Read and verify one cache file; raise `StatsCacheError` saying what is wrong with it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = f.get_tensor("mom2")
    except Exception as e:  # safetensors raises several types for truncated/garbled files
        raise StatsCacheError(f"statistics cache {path} is unreadable ({type(e).__name__}: {e})") from None
    stored = json.loads(meta.get("key", "{}") or "{}")
    if stored != key:
        raise StatsCacheError(f"statistics cache {path} was computed for {stored}, not {key}")
    if tuple(t.shape) != (dim, dim):
        raise StatsCacheError(f"statistics cache {path} has shape {tuple(t.shape)}, expected {(dim, dim)}")
    if meta.get("sha256") != _tensor_digest(t):
        raise StatsCacheError(f"statistics cache {path} fails its checksum (corrupt file)")
    if not torch.isfinite(t).all():
        raise StatsCacheError(f"statistics cache {path} contains non-finite values")
    return t


def _save(path: Path, key: dict[str, Any], t: torch.Tensor, count: int) -> None:
    from safetensors.torch import save_file

    t = t.contiguous().cpu()
    meta = {"key": json.dumps(key, sort_keys=True), "sha256": _tensor_digest(t), "count": str(count)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({"mom2": t}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _token_windows(lm: LM, corpus: Corpus, n_tokens: int, seq_len: int) -> list[list[int]]:
    tok = lm.tokenizer
    sep = tok.eos_token_id
    windows: list[list[int]] = []
    buf: list[int] = []
    total = 0
    for text in corpus.texts:
        buf.extend(tok(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            buf.append(sep)
        while len(buf) >= seq_len and total < n_tokens:
            take = min(seq_len, n_tokens - total)
            windows.append(buf[:take])
            buf = buf[seq_len:]
            total += take
        if total >= n_tokens:
            break
    if total < n_tokens and buf:
        windows.append(buf[: n_tokens - total])
    return windows


def compute_second_moments(
    lm: LM, layers: Iterable[int], corpus: Corpus, n_tokens: int, seq_len: int = 256,
    batch_size: int = 8, dtype: torch.dtype = torch.float32, progress: bool = True,
) -> tuple[dict[int, torch.Tensor], int]:
    """E[k kᵀ] per layer (uncached), and the number of tokens used. Stops at the deepest layer."""
    from tqdm.auto import tqdm

    layers = sorted(set(layers))
    windows = _token_windows(lm, corpus, n_tokens, seq_len)
    count = sum(len(w) for w in windows)
    if count == 0:
        raise StatsCacheError(f"corpus {corpus.name!r} produced no tokens")
    paths = {l: lm.arch.mlp_out_path(l) for l in layers}
    acc: dict[int, torch.Tensor] = {}
    current_mask: list[torch.Tensor] = []

    def make_hook(layer: int):
        def pre(_mod: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0]
            m = current_mask[0].to(x.device)
            k = x[m.bool()].to(torch.float64 if dtype == torch.float64 else torch.float32)
            part = (k.T @ k).double().cpu()
            acc[layer] = part if layer not in acc else acc[layer] + part
            if layer == layers[-1]:
                raise StopForward

        return pre

    backbone = lm.model.get_submodule(lm.arch.backbone)
    bar = tqdm(total=count, desc=f"covariance L{','.join(map(str, layers))}", unit="tok", disable=not progress, leave=False)
    start = time.perf_counter()
    with torch.no_grad(), hooks(lm.model, pre={p: make_hook(l) for l, p in paths.items()}):
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            ids, mask = lm.pad_right(chunk)
            current_mask[:] = [mask]
            try:
                backbone(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
            except StopForward:
                pass
            bar.update(int(mask.sum()))
    bar.close()
    elapsed = time.perf_counter() - start
    lm.cache.setdefault("stats_timings", []).append({"layers": layers, "tokens": count, "seconds": elapsed})
    return {l: (acc[l] / count).to(dtype) for l in layers}, count


def second_moments(
    lm: LM,
    layers: Iterable[int],
    corpus: str | Path | Corpus | None = None,
    n_tokens: int = 100_000,
    dtype: torch.dtype = torch.float32,
    seq_len: int = 256,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Cached E[k kᵀ] for the MLP output projection of each layer (one pass for all missing ones)."""
    corp = corpus if isinstance(corpus, Corpus) else get_corpus(corpus)
    layers = sorted(set(int(l) for l in layers))
    out: dict[int, torch.Tensor] = {}
    missing: list[int] = []
    memo = lm.cache.setdefault("second_moments", {})
    for l in layers:
        key = _key(lm, lm.arch.mlp_out_path(l), corp, n_tokens, dtype, seq_len)
        mkey = json.dumps(key, sort_keys=True)
        if mkey in memo:
            out[l] = memo[mkey]
            continue
        path = cache_path(key)
        dim = lm.arch.as_matrix(lm.module(lm.arch.mlp_out_path(l)).weight).shape[1]
        if path.exists():
            try:
                out[l] = memo[mkey] = load_cached(path, key, dim)
                continue
            except StatsCacheError as e:
                warnings.warn(f"{e}; recomputing", StatsCacheWarning, stacklevel=2)
        missing.append(l)
    if missing:
        computed, count = compute_second_moments(lm, missing, corp, n_tokens, seq_len, dtype=dtype, progress=progress)
        for l, t in computed.items():
            key = _key(lm, lm.arch.mlp_out_path(l), corp, n_tokens, dtype, seq_len)
            _save(cache_path(key), key, t, count)
            out[l] = memo[json.dumps(key, sort_keys=True)] = t
    return out
