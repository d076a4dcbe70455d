"""`LM`: a causal language model, its tokenizer and its `ArchSpec`, with the three batched calls that
every metric uses (`logprobs`, `next_token_logprobs`, `generate`).

Scoring packs work: a continuation of m tokens needs only the sequence prompt + cont[:-1], and a
sequence that is a prefix of another is read off the longer one (causal attention makes the logits
identical), so CounterFact's single-token target pairs cost one forward row per prompt. The LM head is
applied only at the positions being scored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from ..batching import pad_batch, teacher_forcing
from ..tokens import encode_pair, encode_prompt, subject_last_index
from .arch import ArchSpec


@dataclass
class ContinuationScore:
    """Teacher-forced scores of one continuation: per-token log-probs, the target ids and the model's
    argmax prediction at each of those positions."""

    target_ids: list[int]
    logprobs: torch.Tensor  # [m] float32
    argmax_ids: list[int]

    @property
    def mean_nll(self) -> float:
        return float(-self.logprobs.mean())

    @property
    def token_accuracy(self) -> float:
        if not self.target_ids:
            return 0.0
        return sum(int(a == b) for a, b in zip(self.argmax_ids, self.target_ids)) / len(self.target_ids)


def _config_summary(model: torch.nn.Module) -> bytes:
    """The architecture fields of a model's config, serialised (bookkeeping fields change on save/load)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return b""
    d = cfg.to_dict()
    keys = ("model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer",
            "intermediate_size", "n_inner", "num_attention_heads", "n_head", "num_key_value_heads")
    return json.dumps({k: d.get(k) for k in keys}, sort_keys=True, default=str).encode()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Exact fingerprint of a model's architecture config and weights: BLAKE2b over every tensor's name,
    shape, dtype and raw bytes. Equal exactly when the weights are bit-identical, independent of
    thread counts (no floating-point reduction is involved)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(_config_summary(model))
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            flat = t.detach().contiguous().reshape(-1)
            if flat.numel():
                h.update(flat.view(torch.uint8).cpu().numpy().data)
    return h.hexdigest()


def model_fingerprint_v1(model: torch.nn.Module) -> str:
    """The fingerprint scheme of editlab 0.1 save format 1 (config fields, a strided sample and a float64
    sum per tensor), kept only to recognise the base model of format-1 edit folders. Its float sum can
    depend on the thread count; `model_fingerprint` is exact."""
    h = hashlib.sha256()
    h.update(_config_summary(model))
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 512)
            h.update(flat[::step].float().cpu().numpy().tobytes())
            h.update(repr(float(flat.double().sum())).encode())
    return h.hexdigest()[:32]


class LM:
    """Model + tokenizer + ArchSpec. Create with `editlab.load_lm` (or directly from objects)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        arch: ArchSpec,
        name: str = "model",
        max_batch_tokens: int = 4096,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.arch = arch
        self.name = name
        self.max_batch_tokens = max_batch_tokens
        # sequences sharing at least this many leading tokens run them once (a KV cache); 0 turns it off.
        # Prompts of the usual benchmarks are far shorter, so their numbers never go through it.
        self.min_shared_prefix = 128
        # attention backend of passes that keep gradients on CPU in half precision: "math" (faster
        # there, see `attention_for_gradients`) or "default" (PyTorch's choice, the behaviour before)
        self.grad_attention = "math"
        if getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id: int = int(tokenizer.pad_token_id)
        # tokens put before every text (attention sink, see ArchSpec.sink_token); same for methods,
        # statistics and metrics
        self.prefix_ids: list[int] = arch.sink_prefix_ids(tokenizer)
        self._softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        self._fingerprint: str | None = None
        self.cache: dict[str, Any] = {}  # per-model derived data (e.g. context templates)
        self.active_edits: list[Any] = []  # Edit handles not yet restored, oldest first
        self.base_fingerprint = self.fingerprint()

    # ----------------------------------------------------------------- structure
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers(self.model.config)

    def module(self, path: str) -> torch.nn.Module:
        return self.model.get_submodule(path)

    def base_path(self, path: str) -> str:
        """Path of the original module at `path`, through any adapter wrappers installed there by
        module-swap edits (each keeps the module it wraps as `base_layer`)."""
        module = self.model.get_submodule(path)
        while hasattr(module, "base_layer") and isinstance(module.base_layer, torch.nn.Module):
            module = module.base_layer
            path = f"{path}.base_layer"
        return path

    def base_module(self, path: str) -> torch.nn.Module:
        """The original module at `path` (see `base_path`)."""
        return self.model.get_submodule(self.base_path(path))

    def param_name(self, module_path: str, param: str = "weight") -> str:
        """Parameter name of the original module's `param` at `module_path`, through any wrappers."""
        return f"{self.base_path(module_path)}.{param}"

    def fingerprint(self) -> str:
        """Fingerprint of the *current* weights (recomputed on every call)."""
        return model_fingerprint(self.model)

    def current_fingerprint(self) -> str:
        """Fingerprint of the current weights; free while no editlab edit is active."""
        return self.base_fingerprint if not self.active_edits else self.fingerprint()

    @property
    def edited(self) -> Any:
        """The edited system as evaluation sees it: the top active edit's `lm` (a view where an edit
        installed one), else this LM."""
        return self.active_edits[-1].lm if self.active_edits else self

    # ----------------------------------------------------------------- tokenization (one place)
    def encode_prompt(self, text: str) -> list[int]:
        """Token ids the model sees for `text`: sink prefix, tokenizer specials, then the text."""
        return encode_prompt(self.tokenizer, text, self.prefix_ids)

    def encode_pair(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        """(prompt ids, target ids) with the target continuing the prompt; see `tokens.encode_pair`."""
        return encode_pair(self.tokenizer, prompt, target, self.prefix_ids)

    def subject_last_index(self, prompt: str, subject: str) -> int:
        """Position (in `encode_prompt(prompt)`) of the last token of `subject` in `prompt`."""
        return subject_last_index(self.tokenizer, prompt, subject, self.prefix_ids)

    # ----------------------------------------------------------------- forward helpers
    @property
    def backbone(self) -> torch.nn.Module:
        """The transformer without its LM head (its output is the final, normed hidden state)."""
        return self.model.get_submodule(self.arch.backbone)

    def backbone_forward(self, ids: torch.Tensor, mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Final hidden states [batch, seq, d] of the backbone; `kwargs` go to its forward (position
        ids, a KV cache, ...). The one place that unwraps the backbone's output type."""
        kwargs.setdefault("use_cache", False)
        with self.attention_for_gradients():
            out = self.backbone(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    def attention_for_gradients(self) -> Any:
        """The scaled-dot-product attention backend for a pass that keeps gradients (a context manager).

        On CPU in bfloat16 or float16, PyTorch's default (the flash kernel for CPU) has a slow backward
        for the short rows editing works on: it took a fifth of a ROME edit's time in bfloat16 on
        SmolLM2 and its result was further from float32 (8.6 % of the update's norm against 6.1 %).
        There such a pass uses the math backend (plain matmuls and softmax, differentiated by autograd):
        the same attention, about 30 % less time per edit (docs/methods.md). Passes without gradients
        (every metric), float32 and other devices keep PyTorch's choice, so no score changes."""
        if not (torch.is_grad_enabled() and self.dtype in _HALF and self.device.type == "cpu"
                and self.grad_attention == "math"):
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)

    @property
    def cache_kwarg(self) -> str:
        """The backbone's name for a KV-cache argument: `cache` (transformers ≥ 5.2x, which deprecates the
        old name and removes it in 5.40) or `past_key_values` (earlier 5.x and other model classes)."""
        import inspect

        params = inspect.signature(self.backbone.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def prefix_cache(self, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor) -> Any:
        """The KV cache of the backbone run over `ids` (no grad is kept by the caller's context)."""
        out = self.backbone(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=position_ids.to(self.device), use_cache=True)
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    def shared_prefix_cache(self, tokens: Sequence[int]) -> Any:
        """The KV cache of `tokens` run alone (a prefix shared by the rows that follow it)."""
        ids = torch.tensor([list(tokens)])
        return self.prefix_cache(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])

    @staticmethod
    def repeat_cache(cache: Any, rows: int) -> Any:
        """A copy of a batch-of-one KV cache repeated for `rows` rows (a forward pass extends its cache
        in place, so every batch gets its own)."""
        import copy

        step = copy.deepcopy(cache)
        step.batch_repeat_interleave(rows)
        return step

    def _after_cache(self, cache: Any, suffixes: Sequence[Sequence[int]], plen: int) -> torch.Tensor:
        """Hidden states [len(suffixes), L, d] of right-padded `suffixes` read after a copy of `cache`, the
        KV cache of their shared first `plen` tokens (batch of one)."""
        ids, mask = self.pad_right(suffixes)
        full_mask = torch.cat([torch.ones(len(suffixes), plen, dtype=mask.dtype), mask], dim=1)
        pos = (plen + torch.arange(ids.shape[1]))[None].expand(len(suffixes), -1)
        return self.backbone_forward(ids, full_mask, position_ids=pos.to(self.device), use_cache=True,
                                     **{self.cache_kwarg: self.repeat_cache(cache, len(suffixes))})

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final (normed) hidden states of the backbone for a right-padded batch."""
        return self.backbone_forward(ids, mask)

    @contextlib.contextmanager
    def starting_at_block(self, layer: int, states: torch.Tensor) -> Iterator[None]:
        """Run the backbone as if blocks 0 .. layer-1 had produced `states` (the input of block `layer`
        for the batch about to run, [batch, seq, d], e.g. kept from an earlier pass over the same texts):
        those blocks are skipped; embeddings and masks are built as usual. Only for passes whose changes
        all sit in block `layer` or above (a learned editor's edited forward during training). Only the
        blocks' `forward` is replaced: forward hooks on the skipped blocks themselves still run (on the
        kept states), hooks inside them do not."""
        if layer <= 0:
            yield
            return
        states = states.to(self.device, self.dtype)

        def skip(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if hidden_states.shape != states.shape:
                raise ValueError(f"kept block inputs {tuple(states.shape)} do not fit this batch "
                                 f"{tuple(hidden_states.shape)}")
            return states

        blocks = [self.module(self.arch.block_path(j)) for j in range(layer)]
        prior = [b.__dict__.get("forward") for b in blocks]
        try:
            for b in blocks:
                b.forward = skip  # an instance attribute shadows the class's forward
            yield
        finally:
            for b, f in zip(blocks, prior):
                if f is None:
                    b.__dict__.pop("forward", None)
                else:
                    b.forward = f

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_submodule(self.arch.lm_head)(hidden)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def pad_right(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_batch(seqs, self.pad_id, "right")

    def pad_left(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_batch(seqs, self.pad_id, "left")

    def _batches(self, seqs: list[tuple[int, ...]], overhead: int = 24, budget: int | None = None,
                 shared: int = 0) -> Iterator[list[int]]:
        """Indices of `seqs` split into right-padded batches that minimize padded tokens plus a fixed
        per-batch overhead (in token equivalents), each within max_batch_tokens. Sequences are sorted
        by length and cut into contiguous runs by dynamic programming, so short prompts are not
        padded to the length of long ones. `budget`: tokens per batch instead of max_batch_tokens.
        `shared`: tokens every row also reads from a KV cache of a prefix run once (`seqs` are what
        follows it): they count towards a batch's size (the cache is copied per row), not its cost."""
        return self.length_batches([len(s) for s in seqs], overhead, budget, shared)

    def length_batches(self, lengths: Sequence[int], overhead: int = 24, budget: int | None = None,
                       shared: int = 0) -> Iterator[list[int]]:
        """`_batches` on the lengths alone: indices of right-padded rows of these real lengths, cut into
        the sub-batches that minimize padded tokens plus `overhead` per sub-batch."""
        limit = self.max_batch_tokens if budget is None else budget
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        lens = [lengths[i] for i in order]
        n = len(lens)
        best = [0.0] + [float("inf")] * n  # best[j]: cost of batching order[:j]
        cut = [0] * (n + 1)
        for j in range(1, n + 1):
            for i in range(j - 1, -1, -1):  # batch order[i:j]; its width is lens[i]
                size = (j - i) * lens[i]
                if (j - i) * (lens[i] + shared) > limit and j - i > 1:
                    break
                c = best[i] + size + overhead
                if c < best[j]:
                    best[j], cut[j] = c, i
        spans = []
        j = n
        while j > 0:
            spans.append((cut[j], j))
            j = cut[j]
        for i, j in reversed(spans):
            yield order[i:j]

    @staticmethod
    def _carriers(seqs: Iterable[tuple[int, ...]]) -> tuple[dict[tuple[int, ...], int], list[tuple[int, ...]]]:
        """(sequence -> index of the unique sequence that contains it as a prefix, the unique sequences):
        a sequence that is a prefix of a longer one is computed inside the longer one."""
        carriers: dict[tuple[int, ...], int] = {}
        unique: list[tuple[int, ...]] = []
        for seq in sorted(set(seqs), key=len, reverse=True):
            if seq in carriers:
                continue
            idx = len(unique)
            unique.append(seq)
            for k in range(1, len(seq) + 1):
                carriers.setdefault(seq[:k], idx)
        return carriers, unique

    def _logits_at(self, unique: list[tuple[int, ...]], wanted: Mapping[int, Iterable[int]], doubled: bool = False
                   ) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
        """Per batch of `unique` sequences: the (sequence index, position) keys wanted there and the
        float32 logits [len(keys), V] at those positions. Sequences that share a long token prefix
        (`min_shared_prefix` tokens or more before their first wanted position: an in-context edit's
        demonstrations, a few-shot task's examples) run that prefix once and only their own suffixes
        after its KV cache; the rest run as right-padded batches. `doubled`: every batch runs as twice its
        rows (see `_score_targets_halves`; never through a shared prefix, whose cache is one row)."""
        share = self._share_prefixes() and not doubled
        groups, rest = shared_prefix_groups(unique, wanted, self.min_shared_prefix) if share else ([], list(range(len(unique))))
        for plen, members in groups:
            yield from self._logits_after_prefix(unique, wanted, plen, members)
        budget = max(1, self.max_batch_tokens // 2) if doubled else None  # a doubled batch stays within the budget
        for batch in self._batches([unique[i] for i in rest], budget=budget):
            yield from self._plain_logits(unique, wanted, [rest[b] for b in batch], doubled)

    def _plain_logits(self, unique: list[tuple[int, ...]], wanted: Mapping[int, Iterable[int]], rows: list[int],
                      doubled: bool = False) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
        keys, b_idx, p_idx = _wanted_keys(rows, wanted, 0)
        if not keys:
            return
        ids, mask = self.pad_right([unique[i] for i in rows])
        if not doubled:
            yield keys, self.head(self.hidden_states(ids, mask)[b_idx, p_idx]).float()
            return
        hid = self.hidden_states(torch.cat([ids, ids]), torch.cat([mask, mask]))
        first = [(ci + len(unique), p) for ci, p in keys]
        yield first + keys, self.head(torch.cat([hid[b_idx, p_idx], hid[b_idx + len(rows), p_idx]])).float()

    def _share_prefixes(self) -> bool:
        return self.min_shared_prefix > 0 and self.cache.get(_SHARED_PREFIX_EXACT, True)

    def _logits_after_prefix(self, unique: list[tuple[int, ...]], wanted: Mapping[int, Iterable[int]],
                             plen: int, members: list[int]) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
        """`_logits_at` for sequences whose first `plen` tokens are equal and hold no wanted position:
        the prefix runs once (batch of one), each batch of suffixes after a copy of its KV cache. The
        first time on this LM, the first batch is also run in full and compared (`_SHARED_PREFIX_EXACT`):
        a model whose cache does not reproduce a full pass within its dtype's noise, or cannot be used
        this way at all (an error), never uses shared prefixes again."""
        cache = None
        for batch in self._batches([unique[i][plen:] for i in members], shared=plen):
            rows = [members[b] for b in batch]
            keys, b_idx, p_idx = _wanted_keys(rows, wanted, plen)
            if not self._share_prefixes():
                yield from self._plain_logits(unique, wanted, rows)
                continue
            checking = _SHARED_PREFIX_EXACT not in self.cache
            try:
                if cache is None:
                    cache = self.shared_prefix_cache(unique[members[0]][:plen])
                hid = self._after_cache(cache, [unique[i][plen:] for i in rows], plen)
                logits = self.head(hid[b_idx, p_idx]).float()
            except Exception:
                if not checking:
                    raise
                self.cache[_SHARED_PREFIX_EXACT] = False  # this model's cache cannot be reused so
                yield from self._plain_logits(unique, wanted, rows)
                continue
            if checking:
                _, ref = next(self._plain_logits(unique, wanted, rows))
                self.cache[_SHARED_PREFIX_EXACT] = _same_distribution(logits, ref, self.dtype)
                logits = logits if self.cache[_SHARED_PREFIX_EXACT] else ref
            yield keys, logits

    @torch.no_grad()
    def _score_positions(self, needs: list[tuple[tuple[int, ...], list[int]]]) -> list[torch.Tensor]:
        """For each (sequence, positions) return log-softmax rows [len(positions), V] at those positions."""
        return self._score_targets([], [], full=needs)[1]

    def _score_targets(self, needs: list[tuple[tuple[int, ...], list[int]]], targets: list[list[int]],
                       full: Sequence[tuple[tuple[int, ...], list[int]]] = ()
                       ) -> tuple[list[tuple[torch.Tensor, list[int]]], list[torch.Tensor]]:
        return self._score_targets_halves(needs, targets, full, 1)[0]

    @torch.no_grad()
    def _score_targets_halves(self, needs: list[tuple[tuple[int, ...], list[int]]], targets: list[list[int]],
                              full: Sequence[tuple[tuple[int, ...], list[int]]], halves: int
                              ) -> list[tuple[list[tuple[torch.Tensor, list[int]]], list[torch.Tensor]]]:
        """For each (sequence, positions) of `needs` and the token ids wanted at those positions: (log-probs
        of those ids [len(positions)], argmax ids); for each (sequence, positions) of `full`: log-softmax
        rows [len(positions), V]. Both from one set of forward passes (a sequence that is a prefix of
        another is computed inside it, so a prompt's next-token row comes with its targets' scores).
        Each batch is reduced to what was asked (a log-sum-exp, an argmax and the wanted logits per
        position) except the `full` rows, so memory does not grow with the number of scored targets.
        With `halves=2` every batch runs doubled (`paired_next_token_and_score`) and the result is one
        such pair per half; the first half's rows are keyed by sequence index + len(unique)."""
        if halves not in (1, 2):
            raise ValueError(f"halves must be 1 or 2, got {halves}")
        carriers, unique = self._carriers([s for s, _ in needs] + [s for s, _ in full])
        shift = len(unique)
        wanted: dict[int, dict[int, set[int]]] = {}  # carrier -> position -> token ids wanted there
        for (seq, pos), tgt in zip(needs, targets):
            at = wanted.setdefault(carriers[seq], {})
            for p, t in zip(pos, tgt):
                at.setdefault(p, set()).add(int(t))
        keep: set[tuple[int, int]] = set()
        for seq, pos in full:
            for p in pos:
                wanted.setdefault(carriers[seq], {}).setdefault(p, set())
                keep.add((carriers[seq], p))
        if halves == 2:
            wanted.update({ci + shift: at for ci, at in list(wanted.items())})
            keep |= {(ci + shift, p) for ci, p in keep}
        lse: dict[tuple[int, int], float] = {}
        top: dict[tuple[int, int], int] = {}
        picked: dict[tuple[int, int, int], float] = {}
        rows_kept: dict[tuple[int, int], torch.Tensor] = {}
        for keys, logits in self._logits_at(unique, wanted, doubled=halves == 2):
            norm = torch.logsumexp(logits, dim=-1)
            best = logits.argmax(-1).cpu().tolist()
            norms = norm.cpu().tolist()  # one device-to-host copy per batch, not one per position
            kept = [j for j, key in enumerate(keys) if key in keep]
            if kept:
                at = torch.tensor(kept, device=logits.device)
                for j, row in zip(kept, (logits[at] - norm[at, None]).cpu()):
                    rows_kept[keys[j]] = row
            rows, cols, owners = [], [], []
            for j, key in enumerate(keys):
                lse[key], top[key] = norms[j], best[j]
                for t in wanted[key[0]][key[1]]:
                    rows.append(j)
                    cols.append(t)
                    owners.append((key[0], key[1], t))
            if rows:
                vals = logits[torch.tensor(rows), torch.tensor(cols)].cpu().tolist()
                picked.update(zip(owners, vals))
        result = []
        for offset in ([shift, 0] if halves == 2 else [0]):
            out = []
            for (seq, pos), tgt in zip(needs, targets):
                ci = carriers[seq] + offset
                lp = [picked[(ci, p, int(t))] - lse[(ci, p)] for p, t in zip(pos, tgt)]
                out.append((torch.tensor(lp, dtype=torch.float32), [top[(ci, p)] for p in pos]))
            result.append((out, [torch.stack([rows_kept[(carriers[seq] + offset, p)] for p in pos]) for seq, pos in full]))
        return result

    # ----------------------------------------------------------------- the LM calls
    @torch.no_grad()
    def sequence_logprobs(self, windows: Sequence[Sequence[int]], prefix_ids: Sequence[int] = ()) -> list[torch.Tensor]:
        """For each token window w (ids without special tokens): log-probs of w[1:] given the sink
        prefix, `prefix_ids` and the window's earlier tokens. Used for perplexity. A context of
        `min_shared_prefix` tokens or more (an in-context edit's demonstrations before every window) runs
        once into a KV cache that each batch of windows reads."""
        ctx = list(self.prefix_ids) + list(prefix_ids)
        seqs = [tuple(ctx + list(w)) for w in windows]
        out: list[torch.Tensor] = [torch.zeros(0) for _ in windows]
        # a long context before every window (an in-context edit's demonstrations) runs once into a KV cache
        shared = len(ctx) if len(windows) > 1 and 0 < self.min_shared_prefix <= len(ctx) else 0
        prefix: list[Any] = []  # the context's KV cache, made by the first batch that uses it
        for batch in self._batches(seqs):
            hid = self._after_shared_context(seqs, batch, shared, prefix) if shared and self._share_prefixes() else None
            offset = shared if hid is not None else 0
            if hid is None:
                ids, mask = self.pad_right([seqs[i] for i in batch])
                hid = self.hidden_states(ids, mask)
            for r, i in enumerate(batch):
                n = len(windows[i])
                if n < 2:
                    continue
                pos = torch.arange(len(ctx) - offset, len(ctx) - offset + n - 1, device=hid.device)
                logp = torch.log_softmax(self.head(hid[r, pos]).float(), -1)
                tgt = torch.tensor(list(windows[i][1:]), dtype=torch.long, device=logp.device)
                out[i] = logp.gather(1, tgt[:, None])[:, 0].cpu()
        return out

    def _after_shared_context(self, seqs: Sequence[tuple[int, ...]], rows: Sequence[int], plen: int,
                              prefix: list[Any]) -> torch.Tensor | None:
        """Hidden states [len(rows), L, d] of the tokens after the first `plen` of `seqs[rows]` (which all
        share them), read after their KV cache: the shared tokens run once per call (`prefix` keeps the
        cache between batches). The first time on this LM the batch is also run in full and compared, as
        `_logits_after_prefix` does; a model whose cache does not reproduce the full pass, or cannot be
        used at all, gets None here (the caller runs full passes) and never uses shared prefixes again."""
        checking = _SHARED_PREFIX_EXACT not in self.cache
        try:
            if not prefix:
                prefix.append(self.shared_prefix_cache(seqs[rows[0]][:plen]))
            hid = self._after_cache(prefix[0], [seqs[i][plen:] for i in rows], plen)
        except Exception:
            if not checking:
                raise
            self.cache[_SHARED_PREFIX_EXACT] = False
            return None
        if checking:
            ids, mask = self.pad_right([seqs[i] for i in rows])
            ref = self.hidden_states(ids, mask)
            n = len(seqs[rows[0]]) - plen  # the first row is the longest (batches are sorted by length)
            at = torch.arange(max(0, n - 64), n)  # its last positions, the farthest from the cache
            self.cache[_SHARED_PREFIX_EXACT] = _same_distribution(self.head(hid[0, at]).float(),
                                                                  self.head(ref[0, plen + at]).float(), self.dtype)
            if not self.cache[_SHARED_PREFIX_EXACT]:
                return None
        return hid

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[ContinuationScore]:
        """Teacher-forced log-probs and argmax predictions of each continuation after its prompt."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        needs, targets = self._teacher_forced(prompts, continuations)
        return [ContinuationScore(target_ids=list(t_ids), logprobs=lp, argmax_ids=am)
                for t_ids, (lp, am) in zip(targets, self._score_targets(needs, targets)[0])]

    def _teacher_forced(self, prompts: Sequence[str], continuations: Sequence[str]
                        ) -> tuple[list[tuple[tuple[int, ...], list[int]]], list[list[int]]]:
        needs, targets = [], []
        for p, c in zip(prompts, continuations):
            p_ids, t_ids = self.encode_pair(p, c)
            seq, pos = teacher_forcing(p_ids, t_ids)
            needs.append((tuple(seq), pos))
            targets.append(t_ids)
        return needs, targets

    def next_token_and_score(self, prompts: Sequence[str], continuations: Sequence[str]
                             ) -> tuple[torch.Tensor, list[list[ContinuationScore]]]:
        """`next_token_logprobs(prompts)` and, per continuation c, `score(prompts, [c] * len(prompts))`, in
        one set of forward passes: each prompt's next-token row is read inside a sequence that continues
        it, so a prompt is run once for its distribution and all its continuations (the playground's
        probe: three passes' worth of rows become two). Same numbers as the separate calls, up to the
        float noise of a different batch layout."""
        return self._next_token_and_score(prompts, continuations, halves=1)[0]

    def paired_next_token_and_score(self, prompts: Sequence[str], continuations: Sequence[str]
                                    ) -> list[tuple[torch.Tensor, list[list[ContinuationScore]]]]:
        """`next_token_and_score` of the first and of the second half of doubled batches, from one set of
        forward passes: every batch runs as one batch of twice its rows (the same rows twice), and the
        results of its first half and of its second half come back apart, `[first, second]`. On a plain
        model both are equal; it is for a forward that treats the two halves differently
        (`methods.paired.without_and_with_top`: the model without and with its newest edit), where one
        pass of 2B rows costs less than two of B (on CPU a pass's fixed cost is reading the weights)."""
        return self._next_token_and_score(prompts, continuations, halves=2)

    def _next_token_and_score(self, prompts: Sequence[str], continuations: Sequence[str], halves: int
                              ) -> list[tuple[torch.Tensor, list[list[ContinuationScore]]]]:
        if not prompts:
            raise ValueError("next_token_and_score needs at least one prompt")
        needs, targets = self._teacher_forced([p for _ in continuations for p in prompts],
                                              [c for c in continuations for _ in prompts])
        full = []
        for p in prompts:
            ids = tuple(self.encode_prompt(p))
            full.append((ids, [len(ids) - 1]))
        n = len(prompts)
        out = []
        for scored, rows in self._score_targets_halves(needs, targets, full, halves):
            scores = [ContinuationScore(target_ids=list(t_ids), logprobs=lp, argmax_ids=am)
                      for t_ids, (lp, am) in zip(targets, scored)]
            out.append((torch.cat(rows, dim=0), [scores[i * n:(i + 1) * n] for i in range(len(continuations))]))
        return out

    def logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[torch.Tensor]:
        """Per-token log-probabilities of each continuation given its prompt (list of 1-D tensors)."""
        return [s.logprobs for s in self.score(prompts, continuations)]

    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        """Log-probabilities of the next token after each prompt: tensor [n_prompts, vocab]."""
        needs = []
        for p in prompts:
            ids = tuple(self.encode_prompt(p))
            needs.append((ids, [len(ids) - 1]))
        return torch.cat(self._score_positions(needs), dim=0)

    @torch.no_grad()
    def generate_ids(self, prompts: Sequence[str], max_new_tokens: int = 20, *, top_k: int | None = None,
                     seed: int | None = None, stop: Sequence[str] = (), stop_at_eos: bool = True) -> list[list[int]]:
        """Continuations (token ids, stopping at EOS) of each prompt: greedy by default, or top-k
        sampling at temperature 1 when `top_k` is given (seeded with `seed`; the caller's RNG state
        is untouched). Decoding settings are always explicit: the model's own generation config
        (temperature, top-p, repetition penalty) is never used. With `stop`, a continuation ends with
        the token that completes one of these strings in its text (a batch stops as soon as every row
        has), so long generations that the caller cuts at a delimiter are not decoded past it. With
        `stop_at_eos=False` every continuation is `max_new_tokens` long: an EOS token is sampled like
        any other and generation goes on after it (ROME's fluency protocol)."""
        out: list[list[int]] = [[] for _ in prompts]
        encoded = [tuple(self.encode_prompt(p)) for p in prompts]
        eos = self.tokenizer.eos_token_id
        stops = [s for s in stop if s]
        prefixes: dict[tuple[int, ...], Any] = {}  # the current shared prefix -> its KV cache
        for plen, batch in self._generation_batches(encoded, max_new_tokens):
            seqs = [encoded[i] for i in batch]
            if not (plen and self.cache.get(_GENERATION_PREFIX_EXACT, True)):
                plen = self._shared_generation_prefix(seqs)
            ids, mask = self._pad_after(seqs, plen)  # left padding of what follows the prefix: new tokens line up
            n = ids.shape[1]
            args = (max_new_tokens, top_k, None if seed is None else seed + batch[0], stops, stop_at_eos)
            if plen:
                gen = self._generate_after_prefix(seqs, plen, ids, mask, args, prefixes)
            else:
                gen = self._generate_batch(ids, mask, *args)
            for r, i in enumerate(batch):
                toks = gen[r, n:].tolist()
                if stop_at_eos and eos is not None and eos in toks:
                    toks = toks[: toks.index(eos)]
                out[i] = self._cut_at_stop(toks, stops) if stops else toks
        return out

    def _generation_batches(self, encoded: Sequence[tuple[int, ...]], max_new_tokens: int
                            ) -> Iterator[tuple[int, list[int]]]:
        """(shared prefix length, indices of the prompts `encoded`) per generation batch. Prompts that share
        a long token prefix (all but their last token: an in-context edit's demonstrations and fact, a
        few-shot task's examples) are grouped as scoring groups them (`shared_prefix_groups`), so each
        group's prefix runs once even when the call mixes several contexts, and batched by what follows
        it (a batch of one reads the group's cache too); the rest are batched by length (prefix 0). With
        `top_k` sampling, which rows share a batch decides each row's random draws (`seed` + the batch's
        first index), as it always did: a continuation is reproducible for the same prompts in one call."""
        padded = [s + (0,) * max_new_tokens for s in encoded]
        groups: list[tuple[int, list[int]]] = []
        rest = list(range(len(encoded)))
        if (len(encoded) > 1 and self.min_shared_prefix > 0 and self.cache.get(_GENERATION_PREFIX_EXACT, True)
                and self._generation_layout_safe()):
            last = {i: [len(s) - 1] for i, s in enumerate(encoded) if s}
            groups, rest = shared_prefix_groups(encoded, last, self.min_shared_prefix)
        for plen, members in groups:
            for batch in self._batches([padded[i][plen:] for i in members], shared=plen):
                yield plen, [members[b] for b in batch]
        for batch in self._batches([padded[i] for i in rest]):
            yield 0, [rest[b] for b in batch]

    def _generate_after_prefix(self, seqs: Sequence[tuple[int, ...]], plen: int, ids: torch.Tensor, mask: torch.Tensor,
                               args: tuple[Any, ...], prefixes: dict[tuple[int, ...], Any]) -> torch.Tensor:
        """`_generate_batch` of prompts sharing their first `plen` tokens, which run once (`prefixes` keeps
        the KV cache of the latest prefix: the batches of one group follow each other). The first time on this LM the batch is also generated
        plainly and compared token for token; on any difference or error the LM never does this again
        and the plain result is used (both have the same width: prefix + padding + suffix)."""
        checking = _GENERATION_PREFIX_EXACT not in self.cache
        try:
            key = seqs[0][:plen]
            if key not in prefixes:
                prefixes.clear()  # one cache at a time: a call may hold as many contexts as prompts
                prefixes[key] = self.shared_prefix_cache(key)
            gen = self._generate_batch(ids, mask, *args, cache=prefixes[key])
        except Exception:
            if not checking:
                raise
            gen = None
        if checking:
            plain = self._generate_batch(*self.pad_left(seqs), *args)
            n = ids.shape[1]
            exact = gen is not None and gen.shape == plain.shape and torch.equal(gen[:, n:], plain[:, n:])
            self.cache[_GENERATION_PREFIX_EXACT] = exact
            return gen if exact else plain
        return gen

    def _shared_generation_prefix(self, seqs: Sequence[tuple[int, ...]]) -> int:
        """Length of the token prefix the prompts of a generation batch share (all but each prompt's last
        token), when it is long enough to run once (`min_shared_prefix`) and this LM's cache reproduces
        plain generation; else 0."""
        if len(seqs) < 2 or self.min_shared_prefix <= 0 or not self.cache.get(_GENERATION_PREFIX_EXACT, True):
            return 0
        if not self._generation_layout_safe():
            return 0
        plen = min(len(s) for s in seqs) - 1
        for s in seqs[1:]:
            plen = min(plen, _common(seqs[0], s))
        return plen if plen >= self.min_shared_prefix else 0

    def _generation_layout_safe(self) -> bool:
        """Whether padding between a shared prefix and the rest of a prompt leaves generation unchanged:
        not on models with sliding-window attention (the padding would take window slots that left padding
        leaves alone, so a check that passes on short prompts says nothing about long ones), nor where
        the backbone takes no position ids (positions would count the padding)."""
        import inspect

        key = "lm.generation_layout_safe"
        if key not in self.cache:
            cfg = self.model.config
            text = getattr(cfg, "get_text_config", lambda: cfg)()
            sliding = getattr(text, "sliding_window", None) or any("sliding" in str(t) for t in (getattr(text, "layer_types", None) or ()))
            takes_positions = "position_ids" in inspect.signature(self.backbone.forward).parameters
            self.cache[key] = bool(takes_positions and not sliding)
        return self.cache[key]

    def _pad_after(self, seqs: Sequence[tuple[int, ...]], plen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`pad_left` of the prompts with the padding put after their shared first `plen` tokens."""
        ids, mask = self.pad_left([s[plen:] for s in seqs])
        if not plen:
            return ids, mask
        head = torch.tensor([seqs[0][:plen]]).expand(len(seqs), -1)
        return torch.cat([head, ids], dim=1), torch.cat([torch.ones_like(head), mask], dim=1)

    def _cut_at_stop(self, toks: list[int], stops: Sequence[str]) -> list[int]:
        """`toks` up to the first token whose text completes a stop string (tokens after it, which a
        batch row keeps producing until every row is done, are dropped)."""
        text = ""
        for k in range(len(toks)):
            text = self.tokenizer.decode(toks[: k + 1], skip_special_tokens=True)
            if any(s in text for s in stops):
                return toks[: k + 1]
        return toks

    def _generate_batch(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, top_k: int | None,
                        seed: int | None, stops: Sequence[str] = (), stop_at_eos: bool = True,
                        cache: Any = None) -> torch.Tensor:
        """`model.generate` on a left-padded batch; with `cache` (the KV cache of the batch's shared first
        tokens, batch of one), a copy of it repeated per row, so generation runs only what follows."""
        from transformers import GenerationConfig, StoppingCriteriaList

        # no stop: an empty list, not None (generate fills a None from the model's own generation config)
        eos: Any = self.tokenizer.eos_token_id if stop_at_eos else []
        if top_k is None:
            cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                   pad_token_id=self.pad_id, eos_token_id=eos)
        else:
            cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, top_k=int(top_k), top_p=1.0,
                                   temperature=1.0, num_beams=1, pad_token_id=self.pad_id, eos_token_id=eos)
        criteria = StoppingCriteriaList([_StopStrings(self.tokenizer, ids.shape[1], stops)]) if stops else None
        with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
            if seed is not None:
                torch.manual_seed(seed)
            kwargs: dict[str, Any] = {}
            if cache is not None:
                kwargs[self.cache_kwarg] = self.repeat_cache(cache, ids.shape[0])
            return self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                       generation_config=cfg, stopping_criteria=criteria, **kwargs)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 20, *, top_k: int | None = None,
                 seed: int | None = None, stop: Sequence[str] = ()) -> list[str]:
        """Continuations (text, without the prompt) of each prompt; see `generate_ids`. With `stop`, the
        text ends before the first stop string."""
        texts = [self.tokenizer.decode(t, skip_special_tokens=True)
                 for t in self.generate_ids(prompts, max_new_tokens, top_k=top_k, seed=seed, stop=stop)]
        return [cut_at_stop(t, stop) for t in texts] if stop else texts

    def __repr__(self) -> str:
        return f"LM({self.name!r}, arch={self.arch.model_type}, layers={self.n_layers}, device={self.device}, dtype={self.dtype})"


_HALF = (torch.bfloat16, torch.float16)
_SHARED_PREFIX_EXACT = "lm.shared_prefix_exact"  # LM cache key: whether a prefix's KV cache reproduces a full pass
_GENERATION_PREFIX_EXACT = "lm.shared_prefix_generation_exact"  # ... and gives the tokens of plain generation


def _wanted_keys(rows: Sequence[int], wanted: Mapping[int, Iterable[int]], offset: int
                 ) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
    """(keys (sequence index, position), batch row index, position - `offset`) of every wanted position of
    the sequences `rows`, in batch order."""
    keys, b_idx, p_idx = [], [], []
    for r, ci in enumerate(rows):
        for p in sorted(wanted.get(ci, ())):
            keys.append((ci, p))
            b_idx.append(r)
            p_idx.append(p - offset)
    return keys, torch.tensor(b_idx, dtype=torch.long), torch.tensor(p_idx, dtype=torch.long)


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def shared_prefix_groups(unique: Sequence[tuple[int, ...]], wanted: Mapping[int, Iterable[int]], min_len: int
                         ) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """([(prefix length, member indices)], other indices): groups of at least two sequences of `unique`
    whose first `prefix length` (≥ `min_len`) tokens are equal and contain none of their wanted
    positions. Sequences are taken in lexicographic order, so those with a common prefix are adjacent;
    a sequence joins a one-member group whenever they share `min_len` tokens, and a larger group while
    that keeps its prefix at least 3/4 as long as it was (a query that shares only the first
    demonstrations starts a group of its own). Sequences with no
    wanted position are left to the plain path."""
    if min_len <= 0:
        return [], list(range(len(unique)))
    groups: list[tuple[int, list[int]]] = []
    rest: list[int] = []
    open_: list[int] = []
    plen = 0

    def close() -> None:
        if len(open_) >= 2 and plen >= min_len:
            groups.append((plen, list(open_)))
        else:
            rest.extend(open_)

    for i in sorted(range(len(unique)), key=lambda i: unique[i]):
        first = min(wanted.get(i, ()), default=None)
        if first is None:
            rest.append(i)
            continue
        if open_:
            joined = min(plen, _common(unique[open_[0]], unique[i]), first)
            if joined >= min_len and (len(open_) == 1 or joined * 4 >= plen * 3):
                open_.append(i)
                plen = joined
                continue
            close()
        open_, plen = [i], first
    close()
    return groups, sorted(rest)


def _same_distribution(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether two sets of logits give the same log-probabilities up to the float noise of a different
    batch layout in `dtype` (a KV-cached pass multiplies other shapes than a full one). On SmolLM2 with
    a 1,400-token shared prefix, cached and full passes differ by ≤ 3e-5 nats in float32; in bfloat16
    both differ from float32 by up to 0.4 nats, and from each other by as much, hence the wider bound."""
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 1.0
    return bool((a.log_softmax(-1) - b.log_softmax(-1)).abs().max() <= tol)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` before the earliest occurrence of any of `stops` (unchanged if none occurs)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


class _StopStrings:
    """A transformers stopping criterion: per batch row, done once the generated text (after the
    `start` prompt positions) contains one of `stops`; rows already done stay done."""

    def __init__(self, tokenizer: Any, start: int, stops: Sequence[str]) -> None:
        self.tokenizer, self.start, self.stops = tokenizer, start, list(stops)
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for r in range(input_ids.shape[0]):
            if not self.done[r]:
                text = self.tokenizer.decode(input_ids[r, self.start :], skip_special_tokens=True)
                self.done[r] = any(s in text for s in self.stops)
        return self.done.clone()
