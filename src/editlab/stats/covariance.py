"""Second moments E[k kᵀ] of the inputs of MLP output projections over generic text, cached on disk.

Sampling: every document is cut into windows of `seq_len` tokens (a window never crosses a document
boundary; a document's last window may be shorter); the windows of the whole corpus are shuffled with a
fixed seed and taken in that order until `n_tokens` positions are counted (the last window truncated),
so the sample is spread over the corpus, and the sample for n tokens is a prefix of the sample for 2n.
Each window is encoded as the methods encode a prompt (sink prefix `lm.prefix_ids`, then the
tokenizer's leading special tokens) and those head positions are never counted; with no head at all,
position 0 (the attention sink of models without BOS) is left out instead.

One cache file per key: base-model fingerprint, module, corpus (and its cleaner version), tokenizer
digest, token count, dtype, window length, sampling policy and seed, and sink policy. The file carries
its key, the number of tokens actually counted and a SHA-256 of the tensor in its metadata; a file that
is unreadable, belongs to another key or fails the checksum is reported (`StatsCacheWarning`) and
recomputed, never used. Statistics are computed only on the unedited model; cached ones may be read
while edits are active. The forward pass stops at the deepest layer that is needed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ..errors import StatsCacheError
from ..hooks import capture
from ..models.lm import LM
from ..paths import cache_dir
from ..progress import report as report_progress
from .corpus import Corpus, get_corpus
from .defaults import DEFAULT_N_TOKENS, DEFAULT_SEED

FORMAT_VERSION = 2
DEFAULT_SEQ_LEN = 256
SAMPLING = "doc-windows-shuffled-v1"  # name of the sampling policy above; part of the cache key


class StatsCacheWarning(UserWarning):
    """A cached statistics file was rejected and is being recomputed."""


@dataclass(frozen=True)
class Window:
    """`ids` are the text tokens of document `doc` starting at token `start` (no head tokens)."""

    doc: int
    start: int
    ids: tuple[int, ...]


def tokenizer_digest(tokenizer: Any) -> str:
    """Short stable hash of a tokenizer's vocabulary, merges and added tokens (its serialized JSON for
    fast tokenizers; vocabulary and special tokens otherwise)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        data = backend.to_str()
    else:
        data = json.dumps(
            {"vocab": sorted(tokenizer.get_vocab().items()), "special": sorted(map(str, tokenizer.all_special_tokens))}
        )
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def window_head(lm: LM) -> list[int]:
    """Ids the methods put before any text: the sink prefix, then the tokenizer's leading specials (BOS)."""
    probe = list(lm.tokenizer("x", add_special_tokens=True)["input_ids"])
    specials = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
    lead: list[int] = []
    for t in probe:
        if t not in specials:
            break
        lead.append(int(t))
    return list(lm.prefix_ids) + lead


def sink_policy(lm: LM) -> dict[str, Any]:
    """Head ids prepended to every window and how many leading positions are left out (>= 1)."""
    head = window_head(lm)
    return {"head": head, "skip": max(1, len(head))}


def _key(
    lm: LM, module: str, corpus: Corpus, n_tokens: int, dtype: torch.dtype, seq_len: int,
    seed: int = DEFAULT_SEED, tok_digest: str | None = None,
) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "model": lm.base_fingerprint,
        "module": module,
        "corpus": corpus.name,
        "cleaner": corpus.cleaner,
        "tokenizer": tok_digest or tokenizer_digest(lm.tokenizer),
        "n_tokens": int(n_tokens),
        "dtype": str(dtype).replace("torch.", ""),
        "seq_len": int(seq_len),
        "sampling": SAMPLING,
        "seed": int(seed),
        "sink": sink_policy(lm),
    }


def cache_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    safe_module = key["module"].replace(".", "_")
    return cache_dir("stats", key["model"]) / f"{safe_module}-{digest}.safetensors"


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


def load_cached(path: Path, key: dict[str, Any], dim: int) -> tuple[torch.Tensor, int]:
    """Read and verify one cache file: (E[k kᵀ], tokens counted). Raise `StatsCacheError` saying what
    is wrong with it."""
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
    try:
        count = int(meta["count"])
    except (KeyError, ValueError):
        raise StatsCacheError(f"statistics cache {path} does not record its token count") from None
    return t, count


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


def _doc_tokens(lm: LM, corpus: Corpus, tok_digest: str) -> list[list[int]]:
    """Text tokens of every document (memoized on the LM: tokenizing the default corpus takes seconds)."""
    memo = lm.cache.setdefault("corpus_tokens", {})
    mkey = (corpus.name, corpus.cleaner, tok_digest)
    if mkey not in memo:
        enc = lm.tokenizer(list(corpus.texts), add_special_tokens=False)["input_ids"]
        memo.clear()  # one corpus at a time: the default one is ~0.5M ids
        memo[mkey] = [list(e) for e in enc]
    return memo[mkey]


def sample_windows(
    lm: LM, corpus: Corpus, n_tokens: int | None, seq_len: int = DEFAULT_SEQ_LEN, seed: int = DEFAULT_SEED,
    *, tok_digest: str | None = None,
) -> list[Window]:
    """The windows whose keys the statistics count, in order: whole-corpus windows of `seq_len` tokens
    shuffled with `seed`, taken until `n_tokens` positions are counted (None or more than the corpus
    holds: all of it). A window counts all its tokens when a head is prepended, all but its first
    otherwise."""
    if seq_len < 2:
        raise StatsCacheError(f"seq_len must be at least 2, got {seq_len}")
    docs = _doc_tokens(lm, corpus, tok_digest or tokenizer_digest(lm.tokenizer))
    uncounted = 0 if window_head(lm) else 1
    cands = [(d, s) for d, ids in enumerate(docs) for s in range(0, len(ids), seq_len)]
    random.Random(seed).shuffle(cands)
    out: list[Window] = []
    total = 0
    for d, s in cands:
        if n_tokens is not None and total >= n_tokens:
            break
        ids = docs[d][s : s + seq_len]
        counted = len(ids) - uncounted
        if counted <= 0:
            continue
        if n_tokens is not None and total + counted > n_tokens:
            ids = ids[: n_tokens - total + uncounted]
            counted = n_tokens - total
        out.append(Window(d, s, tuple(ids)))
        total += counted
    return out


def _refuse_if_edited(lm: LM) -> None:
    # the cache is keyed by the base fingerprint: statistics of an edited model must never land there
    if lm.active_edits:
        raise StatsCacheError(
            f"refusing to compute statistics while {len(lm.active_edits)} edit(s) are active on {lm.name}: "
            "they would describe the edited model; compute them on the unedited model (restore the edits first)"
        )


def accumulate_moments(
    lm: LM, layers: Iterable[int], windows: Sequence[Window], checkpoints: Sequence[int] | None = None,
    batch_size: int = 8, dtype: torch.dtype = torch.float32, progress: bool = True,
    on_checkpoint: Callable[[int, dict[int, torch.Tensor]], None] | None = None,
) -> tuple[dict[int, dict[int, torch.Tensor]], int]:
    """Sums Σ k kᵀ (float64, CPU) per layer over the counted positions of `windows`, taken in order.
    Returns ({checkpoint: {layer: sum over the first `checkpoint` counted positions}}, total counted);
    the total is always a checkpoint. `on_checkpoint(c, sums)` is called as soon as checkpoint `c` is
    complete (long runs report early). Refuses to run while an edit is active on `lm`."""
    from tqdm.auto import tqdm

    _refuse_if_edited(lm)
    layers = sorted(set(layers))
    policy = sink_policy(lm)
    head, skip = policy["head"], policy["skip"]
    seqs = [head + list(w.ids) for w in windows]
    count = sum(max(0, len(s) - skip) for s in seqs)
    if count == 0:
        raise StatsCacheError("the corpus produced no tokens for the statistics")
    marks = sorted({c for c in (checkpoints or []) if 0 < c < count} | {count})
    paths = {l: lm.arch.mlp_out_path(l) for l in layers}
    acc = {l: torch.zeros((), dtype=torch.float64) for l in layers}
    seen = dict.fromkeys(layers, 0)
    snaps: dict[int, dict[int, torch.Tensor]] = {c: {} for c in marks}
    current_mask: list[torch.Tensor] = []
    reported: set[int] = set()
    work = torch.float64 if dtype == torch.float64 else torch.float32

    def make_hook(layer: int):
        def pre(x: torch.Tensor) -> None:
            k = x[current_mask[0].to(x.device)].to(work)  # row-major: windows in order, positions in order
            base, n = seen[layer], k.shape[0]
            for c in marks:
                if base < c < base + n:
                    part = k[: c - base]
                    snaps[c][layer] = acc[layer] + (part.T @ part).double().cpu()
            acc[layer] = acc[layer] + (k.T @ k).double().cpu()
            seen[layer] = base + n
            if seen[layer] in snaps:
                snaps[seen[layer]][layer] = acc[layer]

        return pre

    task = f"covariance statistics of layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"
    bar = tqdm(total=count, desc=f"covariance L{','.join(map(str, layers))}", unit="tok", disable=not progress, leave=False)
    done = 0
    report_progress(task, done, count)
    start = time.perf_counter()
    hooks_in = {p: make_hook(l) for l, p in paths.items()}
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            ids, mask = lm.pad_right(seqs[i : i + batch_size])
            counted = mask.clone()
            counted[:, :skip] = 0
            current_mask[:] = [counted.bool()]
            capture(lm.model, lambda: lm.backbone_forward(ids, mask), inputs=hooks_in, stop_after=paths[layers[-1]])
            done += int(counted.sum())
            bar.update(int(counted.sum()))
            report_progress(task, done, count)
            for c in marks:
                if on_checkpoint and c not in reported and len(snaps[c]) == len(layers):
                    reported.add(c)
                    on_checkpoint(c, snaps[c])
    bar.close()
    elapsed = time.perf_counter() - start
    lm.cache.setdefault("stats_timings", []).append({"layers": layers, "tokens": count, "seconds": elapsed})
    return snaps, count


def compute_second_moments(
    lm: LM, layers: Iterable[int], corpus: Corpus, n_tokens: int, seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 8, dtype: torch.dtype = torch.float32, progress: bool = True, seed: int = DEFAULT_SEED,
) -> tuple[dict[int, torch.Tensor], int]:
    """E[k kᵀ] per layer (uncached), and the number of tokens counted. Stops at the deepest layer."""
    _refuse_if_edited(lm)
    windows = sample_windows(lm, corpus, n_tokens, seq_len, seed)
    snaps, count = accumulate_moments(lm, layers, windows, batch_size=batch_size, dtype=dtype, progress=progress)
    return {l: (t / count).to(dtype) for l, t in snaps[count].items()}, count


def _record(lm: LM, layer: int, key: dict[str, Any], count: int, path: Path) -> None:
    lm.cache.setdefault("stats_provenance", {})[layer] = {
        "corpus": key["corpus"],
        "module": key["module"],
        "n_tokens": key["n_tokens"],
        "tokens_used": count,
        "seq_len": key["seq_len"],
        "seed": key["seed"],
        "sampling": key["sampling"],
        "skip_positions": key["sink"]["skip"],
        "dtype": key["dtype"],
        "cache_file": str(path),
    }


def stats_provenance(lm: LM) -> dict[int, dict[str, Any]]:
    """Per layer whose statistics were used on `lm` so far (the latest use of each layer): corpus,
    module, tokens requested (`n_tokens`) and actually counted (`tokens_used`), window length, sampling
    policy and seed, positions left out per window, dtype and cache file. For edit manifests and run rows."""
    return copy.deepcopy(lm.cache.get("stats_provenance", {}))


def second_moments(
    lm: LM,
    layers: Iterable[int],
    corpus: str | Path | Corpus | None = None,
    n_tokens: int = DEFAULT_N_TOKENS,
    dtype: torch.dtype = torch.float32,
    seq_len: int = DEFAULT_SEQ_LEN,
    progress: bool = True,
    seed: int = DEFAULT_SEED,
) -> dict[int, torch.Tensor]:
    """Cached E[k kᵀ] for the MLP output projection of each layer (one pass for all missing ones).
    Reading cached statistics works while edits are active; computing missing ones does not."""
    corp = corpus if isinstance(corpus, Corpus) else get_corpus(corpus)
    layers = sorted(set(int(l) for l in layers))
    tok_digest = tokenizer_digest(lm.tokenizer)
    keys = {l: _key(lm, lm.arch.mlp_out_path(l), corp, n_tokens, dtype, seq_len, seed, tok_digest) for l in layers}
    out: dict[int, torch.Tensor] = {}
    missing: list[int] = []
    memo = lm.cache.setdefault("second_moments", {})
    for l in layers:
        key = keys[l]
        mkey = json.dumps(key, sort_keys=True)
        path = cache_path(key)
        if mkey in memo:
            out[l], count = memo[mkey]
            _record(lm, l, key, count, path)
            continue
        dim = lm.arch.as_matrix(lm.module(key["module"]).weight).shape[1]
        if path.exists():
            try:
                t, count = load_cached(path, key, dim)
                out[l] = t
                memo[mkey] = (t, count)
                _record(lm, l, key, count, path)
                continue
            except StatsCacheError as e:
                warnings.warn(f"{e}; recomputing", StatsCacheWarning, stacklevel=2)
        missing.append(l)
    if missing:
        computed, count = compute_second_moments(
            lm, missing, corp, n_tokens, seq_len, dtype=dtype, progress=progress, seed=seed
        )
        for l, t in computed.items():
            key, path = keys[l], cache_path(keys[l])
            _save(path, key, t, count)
            out[l] = t
            memo[json.dumps(key, sort_keys=True)] = (t, count)
            _record(lm, l, key, count, path)
    return out


def warm_statistics(lm: LM, hparams: Iterable[Any], progress: bool = True) -> int:
    """Compute (or read) now the statistics that edits with each of `hparams` will read: one pass over
    the corpus per (corpus, token count) for all the layers involved, instead of one per method.
    Hparams without statistics (no `statistics_layers`) are ignored. Returns the number of layers."""
    groups: dict[tuple[str, int], set[int]] = {}
    for hp in hparams:
        layers = getattr(hp, "statistics_layers", None)
        if callable(layers):
            groups.setdefault((str(hp.corpus), int(hp.mom2_n_tokens)), set()).update(layers())
    for (corpus, n_tokens), layers in groups.items():
        second_moments(lm, layers, corpus, n_tokens, progress=progress)
    return sum(len(l) for l in groups.values())


def shared_moments(lm: LM) -> dict[str, tuple[torch.Tensor, int]]:
    """Every statistic `lm` holds in memory, keyed as `second_moments` keys them, to hand to another
    process with the same model (`install_moments`): a worker computes them once for all."""
    return dict(lm.cache.get("second_moments", {}))


def install_moments(lm: LM, moments: dict[str, tuple[torch.Tensor, int]]) -> None:
    """Make statistics computed by another process (`shared_moments`) `lm`'s own: kept in memory, and
    written to this machine's cache where it lacks them. Entries of another model are never looked up
    (the key holds the model fingerprint), so they are only stored."""
    memo = lm.cache.setdefault("second_moments", {})
    for mkey, (t, count) in moments.items():
        memo.setdefault(mkey, (t, count))
        key = json.loads(mkey)
        path = cache_path(key)
        if not path.exists():
            _save(path, key, t, count)
