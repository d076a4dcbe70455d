"""Causal tracing (ROME, Meng et al. 2022, section 2.1): where in the network a fact is recalled.

Three runs per prompt: a *clean* run, a *corrupted* run whose subject-token input embeddings carry
Gaussian noise (several seeded samples, batched), and many *restored* runs, each corrupted like the
second but with one (token, layer) state put back to its clean value. The probability of the true
answer's first token in a restored run, against the corrupted one, is the state's indirect effect.

States (`kind`): `hidden` is a block's output (the residual stream), `mlp` the MLP output projection's
output (`ArchSpec.mlp_out`) and `attn` the attention module's output (`ArchSpec.attn`); a kind may
restore a *window* of consecutive layers centred on each layer (the paper's MLP and attention figures
restore 10). Restorations are batched along the batch dimension, and two exact shortcuts avoid work
whose result is known (both are checked against the plain computation in the tests):

* causal attention: a state restored at token t changes nothing before t, so positions < t are not
  recomputed; their keys and values come from the corrupted run through a KV cache;
* layer skipping: every layer below the first restored one holds exactly the corrupted run's state, so
  those blocks are swapped for a module that replays that state instead of recomputing it.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..errors import UnsupportedArchitectureError
from ..hooks import blocks_replayed, hooks, output_tensor, replace_output
from .kinds import DEFAULT_WINDOWS, KINDS, KindSpec, TracingError, UnknownFactError, parse_kinds  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from ..models import LM

DEFAULT_MIN_PROB = 0.01  # below this clean probability the model does not know the answer: nothing to trace

Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------- results
@dataclass
class TraceResult:
    """One prompt's trace for one kind: `scores[t, l]` is p(answer) with the state at token t restored
    at layer l (a window centred on l when `window > 1`), averaged over the noise samples. Tokens before
    the subject are identical in the clean and corrupted runs, so their row equals `low`."""

    prompt: str
    subject: str
    answer: str
    answer_id: int
    kind: str
    window: int
    tokens: list[str]
    subject_range: tuple[int, int]  # [first, last + 1) token positions of the subject
    scores: torch.Tensor  # [n_tokens, n_layers], float32
    low: float  # p(answer) in the corrupted run
    high: float  # p(answer) in the clean run
    samples: int
    noise_std: float
    seconds: float = 0.0

    @property
    def indirect_effect(self) -> torch.Tensor:
        """p(restored) - p(corrupted) for every (token, layer)."""
        return self.scores - self.low

    def peak(self) -> tuple[int, int, float]:
        """(token position, layer, indirect effect) of the largest indirect effect."""
        ie = self.indirect_effect
        flat = int(torch.argmax(ie))
        t, layer = divmod(flat, ie.shape[1])
        return t, layer, float(ie[t, layer])

    def save_png(self, path: str | Path) -> Path:
        from .plot import plot_trace

        return plot_trace(self, path)

    def to_dict(self) -> dict[str, Any]:
        t, layer, ie = self.peak()
        return {
            "prompt": self.prompt, "subject": self.subject, "answer": self.answer, "answer_id": self.answer_id,
            "kind": self.kind, "window": self.window, "tokens": self.tokens, "subject_range": list(self.subject_range),
            "scores": self.scores.tolist(), "low": self.low, "high": self.high, "samples": self.samples,
            "noise_std": self.noise_std, "seconds": self.seconds,
            "peak": {"token": t, "token_text": self.tokens[t], "layer": layer, "indirect_effect": ie},
        }



def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored around `layer`: `window` consecutive layers centred on it, clipped to the model."""
    lo = max(0, layer - window // 2)
    hi = min(n_layers, layer - (-window // 2))
    return range(lo, hi)


# ---------------------------------------------------------------------------------------------- noise
def embedding_std(lm: LM, corpus: str | None = None, n_tokens: int = 20_000) -> float:
    """Standard deviation of the input embeddings of real text (the first `n_tokens` tokens of the
    offline Wikipedia sample by default), cached per LM.

    Real text rather than the rows of the embedding matrix: the noise should be scaled to the inputs
    the model actually sees, and a vocabulary holds many rare or unused rows whose spread says nothing
    about them. The embedding module's output is measured, so a model that scales its embeddings
    (Gemma) gets noise on the same scale."""
    key = f"tracing.embedding_std:{corpus or 'default'}:{n_tokens}"
    if key in lm.cache:
        return float(lm.cache[key])
    from ..stats.corpus import get_corpus

    ids: list[int] = []
    for text in get_corpus(corpus).texts:
        ids += lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            break
    if not ids:
        raise TracingError("the text sample for the noise level holds no tokens")
    emb = lm.module(lm.arch.embed)
    with torch.no_grad():
        vecs = emb(torch.tensor(ids[:n_tokens], device=lm.device)[None]).float()
    std = float(vecs.std())
    lm.cache[key] = std
    return std


# ---------------------------------------------------------------------------------------------- inputs
def subject_range(lm: LM, prompt: str, subject: str) -> tuple[int, int]:
    """[first, last + 1) positions (in `lm.encode_prompt(prompt)`) of the tokens that cover the last
    occurrence of `subject` in `prompt`."""
    if not subject or not subject.strip():
        raise TracingError("subject is empty")
    start = prompt.rfind(subject)
    if start < 0:
        raise TracingError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    end = start + len(subject)
    last = lm.subject_last_index(prompt, subject)
    pre = len(lm.prefix_ids)
    enc = lm.tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    offsets = enc.get("offset_mapping") if hasattr(enc, "get") else None
    first = None
    if offsets:
        for i, (a, b) in enumerate(offsets):
            if b > a and b > start and a < end:
                first = pre + i
                break
    if first is None:  # slow tokenizers: count the tokens of the text before the subject
        first = len(lm.encode_prompt(prompt[:start].rstrip())) if prompt[:start].strip() else pre
        first = min(first, last)
    return first, last + 1


def answer_token(lm: LM, prompt: str, answer: str) -> int:
    """Id of the first token of `answer` as a continuation of `prompt`."""
    if not answer or not answer.strip():
        raise TracingError("answer is empty")
    _, t_ids = lm.encode_pair(prompt, answer)
    if not t_ids:
        raise TracingError(f"answer {answer!r} encodes to no tokens")
    return int(t_ids[0])


# ---------------------------------------------------------------------------------------------- machinery
@dataclass
class _Restoration:
    token: int
    layer: int  # the layer the result is reported at (the window's centre)
    layers: range  # the layers restored


@dataclass
class _Prepared:
    """Everything one prompt's restored runs share: ids, noise, clean states and the corrupted run."""

    ids: list[int]
    subj: tuple[int, int]
    answer_id: int
    noise: torch.Tensor  # [samples, n_subject_tokens, d]
    clean: dict[str, list[torch.Tensor]]  # kind -> per layer [T, d]
    corrupted_blocks: list[torch.Tensor]  # per layer [samples, T, d]
    block_templates: list[Any]  # per layer: the block's output structure when it is not a bare tensor
    corrupted_kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    low: float
    high: float


class CausalTracer:
    """Causal traces of one `LM`. Holds the options; `trace(prompt, subject)` runs one prompt.

    `samples`: noise samples per prompt (ROME: 10), drawn from a generator seeded with `seed`, the same
    for every restoration of a prompt. `noise_scale`: the noise std in units of `noise_std` (default
    the measured `embedding_std`; ROME: 3). `pass_tokens`: about how many tokens (rows x
    sequence length) one forward pass of restorations holds (capped by the LM's `max_batch_tokens`).
    `fast`: use the exact KV-cache and layer-replay shortcuts (automatically off where the model's
    forward takes no cache); `fast=False` computes every restored run in full (the reference)."""

    def __init__(self, lm: LM, *, samples: int = 10, noise_scale: float = 3.0, noise_std: float | None = None,
                 seed: int = 0, pass_tokens: int = 512, fast: bool = True, min_prob: float = DEFAULT_MIN_PROB) -> None:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise TracingError(f"samples must be a positive integer, got {samples!r}")
        if not math.isfinite(noise_scale) or noise_scale < 0:
            raise TracingError(f"noise scale must be a finite number >= 0, got {noise_scale!r}")
        if noise_std is not None and (not math.isfinite(noise_std) or noise_std < 0):
            raise TracingError(f"noise std must be a finite number >= 0, got {noise_std!r}")
        if pass_tokens < 1:
            raise TracingError(f"pass_tokens must be positive, got {pass_tokens!r}")
        if not 0 <= min_prob < 1:
            raise TracingError(f"min_prob must be in [0, 1), got {min_prob!r}")
        self.lm = lm
        self.samples = samples
        self.noise_scale = float(noise_scale)
        self._noise_std = noise_std
        self.seed = seed
        self.pass_tokens = pass_tokens
        self.min_prob = min_prob
        self.n_layers = lm.n_layers
        self._paths = self._check_arch()
        self.fast = fast and self._takes_cache()

    # ------------------------------------------------------------------ set-up checks
    def _check_arch(self) -> dict[str, list[str]]:
        arch, model = self.lm.arch, self.lm.model
        paths = {
            "hidden": [arch.block_path(i) for i in range(self.n_layers)],
            "mlp": [arch.mlp_out_path(i) for i in range(self.n_layers)],
            "attn": [f"{arch.block_path(i)}.{arch.attn}" for i in range(self.n_layers)],
        }
        for p in [arch.embed, arch.layers, *[q for ps in paths.values() for q in ps]]:
            try:
                model.get_submodule(p)
            except AttributeError:
                raise UnsupportedArchitectureError(
                    f"causal tracing cannot find module {p!r} in this {arch.model_type} model; its ArchSpec does not "
                    "match the model's structure") from None
        return paths

    def _takes_cache(self) -> bool:
        try:
            from transformers import DynamicCache  # noqa: F401
        except ImportError:
            return False
        if len(set((getattr(self.lm.model, "hf_device_map", None) or {}).values())) > 1:
            return False  # replayed blocks would bypass accelerate's device placement of a split model
        params = inspect.signature(self.lm.backbone.forward).parameters
        return "cache" in params

    @property
    def noise_std(self) -> float:
        if self._noise_std is None:
            self._noise_std = embedding_std(self.lm)
        return self._noise_std

    def check_kinds(self, kinds: Sequence[KindSpec]) -> None:
        for k in kinds:
            if k.window > self.n_layers:
                raise TracingError(f"window {k.window} of kind {k.kind!r} is past the model's {self.n_layers} layers")

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def trace(self, prompt: str, subject: str, answer: str | None = None,
              kinds: str | Sequence[str | KindSpec] = "hidden,mlp,attn", window: int | None = None,
              progress: Progress | None = None) -> dict[str, TraceResult]:
        """Trace one prompt for each kind; returns {kind label: TraceResult}. `answer`: the true answer
        (its first token is scored); default the model's greedy next token. Raises `UnknownFactError`
        when the clean probability of the answer is below `min_prob`."""
        specs = parse_kinds(kinds, window, self.n_layers)
        self.check_kinds(specs)
        t0 = time.perf_counter()
        prep = self.prepare(prompt, subject, answer)
        setup = time.perf_counter() - t0
        plans = {k.label: self._plan(prep, k) for k in specs}
        total = sum(len(p) for p in plans.values())
        done = 0
        out: dict[str, TraceResult] = {}
        tokens = [self.lm.tokenizer.decode([i]) for i in prep.ids]
        ans = answer if answer is not None else self.lm.tokenizer.decode([prep.answer_id])
        for k in specs:
            tk = time.perf_counter()
            T = len(prep.ids)
            scores = torch.full((T, self.n_layers), prep.low, dtype=torch.float32)
            for token, chunk in plans[k.label]:
                probs = self._run(prep, k.kind, token, chunk)
                for r, p in zip(chunk, probs):
                    scores[token, r.layer] = p
                done += 1
                if progress:
                    progress(done, total)
            out[k.label] = TraceResult(
                prompt=prompt, subject=subject, answer=ans, answer_id=prep.answer_id, kind=k.kind, window=k.window,
                tokens=tokens, subject_range=prep.subj, scores=scores, low=prep.low, high=prep.high,
                samples=self.samples, noise_std=self.noise_std * self.noise_scale,
                seconds=time.perf_counter() - tk + setup / len(specs))
        return out

    # ------------------------------------------------------------------ preparation
    @torch.no_grad()
    def prepare(self, prompt: str, subject: str, answer: str | None = None) -> _Prepared:
        """Clean and corrupted runs of one prompt (shared by all its restorations and kinds)."""
        lm = self.lm
        subj = subject_range(lm, prompt, subject)
        ids = lm.encode_prompt(prompt)
        T = len(ids)
        clean: dict[str, list[torch.Tensor]] = {k: [torch.empty(0)] * self.n_layers for k in KINDS}

        def keep(kind: str, layer: int) -> Callable[..., None]:
            def fn(_m: Any, _i: Any, out: Any) -> None:
                clean[kind][layer] = output_tensor(out)[0].detach().clone()
            return fn

        fwd = {self._paths[k][i]: keep(k, i) for k in KINDS for i in range(self.n_layers)}
        x = torch.tensor([ids], device=lm.device)
        with torch.no_grad(), hooks(lm.model, forward=fwd):
            hid = lm.backbone_forward(x, torch.ones_like(x))
        probs = self._probs(hid[:, -1])[0]
        if answer is None:
            answer_id = int(torch.argmax(probs))
        else:
            answer_id = answer_token(lm, prompt, answer)
        high = float(probs[answer_id])
        if high < self.min_prob:
            raise UnknownFactError(
                f"the model gives {lm.tokenizer.decode([answer_id])!r} probability {high:.2g} after {prompt!r} "
                f"(top-1: {lm.tokenizer.decode([int(torch.argmax(probs))])!r}): it does not know this fact, so "
                f"there is no recall to locate; lower min_prob (--min-prob 0) to trace anyway")

        d = clean["hidden"][0].shape[-1]
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.samples, subj[1] - subj[0], d, generator=gen) * (self.noise_std * self.noise_scale)
        noise = noise.to(device=lm.device, dtype=lm.dtype)

        # corrupted run: block outputs (replayed under layer skipping) and keys/values (the KV cache)
        S = self.samples
        blocks: list[torch.Tensor] = [torch.empty(0)] * self.n_layers
        templates: list[Any] = [None] * self.n_layers

        def keep_block(layer: int) -> Callable[..., None]:
            def fn(_m: Any, _i: Any, out: Any) -> None:
                blocks[layer] = output_tensor(out).detach().clone()
                templates[layer] = None if isinstance(out, torch.Tensor) else out  # the output's structure
            return fn

        fwd = {self._paths["hidden"][i]: keep_block(i) for i in range(self.n_layers)}
        fwd[lm.arch.embed] = self._noise_hook(noise, subj, 0, 1)
        xs = x.repeat(S, 1)
        kwargs: dict[str, Any] = {}
        cache = None
        if self.fast:
            from transformers import DynamicCache

            cache = DynamicCache(config=lm.config)
            kwargs = {"cache": cache, "use_cache": True}
        with torch.no_grad(), hooks(lm.model, forward=fwd):
            hid = lm.backbone_forward(xs, torch.ones_like(xs), **kwargs)
        low = float(self._probs(hid[:, -1])[:, answer_id].mean())
        kv = None
        if cache is not None:
            kv = [(layer.keys, layer.values) for layer in cache.layers]
            if len(kv) != self.n_layers or any(k is None or k.shape[-2] != T for k, _ in kv):
                kv = None  # e.g. a sliding-window cache shorter than the prompt: compute in full instead
        return _Prepared(ids=ids, subj=subj, answer_id=answer_id, noise=noise, clean=clean,
                         corrupted_blocks=blocks, block_templates=templates, corrupted_kv=kv, low=low, high=high)

    def _probs(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.lm.head(last_hidden).float(), dim=-1)

    def _noise_hook(self, noise: torch.Tensor, subj: tuple[int, int], offset: int, repeats: int) -> Callable[..., Any]:
        """Embedding hook adding noise sample s to rows s*repeats ... s*repeats + repeats - 1 at the
        subject positions (shifted by `offset` when the run starts at token `offset`)."""
        a, b = max(subj[0], offset), subj[1]

        def fn(_m: Any, _i: Any, out: Any) -> Any:
            if a >= b:
                return None
            h = output_tensor(out)
            rows = noise[:, a - subj[0]: b - subj[0]].repeat_interleave(repeats, dim=0)
            h = h.clone()
            h[:, a - offset: b - offset] += rows
            return replace_output(out, h)

        return fn

    # ------------------------------------------------------------------ planning and restored runs
    def _plan(self, prep: _Prepared, k: KindSpec) -> list[tuple[int, list[_Restoration]]]:
        """Forward passes for one kind: (token, restorations) chunks, each one pass. Tokens before the
        subject are skipped (their states are the same in the clean and corrupted runs)."""
        T = len(prep.ids)
        plan = []
        for token in range(prep.subj[0], T):
            rs = [_Restoration(token, layer, window_layers(layer, k.window, self.n_layers)) for layer in range(self.n_layers)]
            width = T - token if self.fast and prep.corrupted_kv is not None else T
            # a pass costs a fixed overhead per layer plus its tokens: short (late-token) passes take more
            # restorations at once, long ones fewer, so that layer skipping still saves work
            per = max(1, min(self.pass_tokens, self.lm.max_batch_tokens) // (self.samples * width))
            plan += [(token, rs[i:i + per]) for i in range(0, len(rs), per)]
        return plan

    def _run(self, prep: _Prepared, kind: str, token: int, chunk: list[_Restoration]) -> list[float]:
        """p(answer) of each restoration in `chunk` (all at `token`), averaged over the noise samples."""
        lm, S, R = self.lm, self.samples, len(chunk)
        fast = self.fast and prep.corrupted_kv is not None
        start = token if fast else 0
        ids = torch.tensor([prep.ids[start:]], device=lm.device).repeat(S * R, 1)
        mask = torch.ones(S * R, len(prep.ids), dtype=torch.long, device=lm.device)
        # rows are sample-major: row s*R + r is restoration r under noise sample s
        by_layer: dict[int, list[int]] = {}
        for r, rest in enumerate(chunk):
            for layer in rest.layers:
                by_layer.setdefault(layer, []).append(r)
        fwd: dict[str, Callable[..., Any]] = {}
        for layer, rs in by_layer.items():
            rows = torch.tensor([s * R + r for s in range(S) for r in rs], device=lm.device)
            fwd[self._paths[kind][layer]] = self._patch_hook(rows, token - start, prep.clean[kind][layer][token])
        kwargs: dict[str, Any] = {}
        replay = contextlib.nullcontext()
        if fast:
            first_run = min(min(r.layers) for r in chunk) + (1 if kind == "hidden" else 0)
            if token > 0:
                from transformers import DynamicCache

                data = [(k[..., :token, :].repeat_interleave(R, dim=0), v[..., :token, :].repeat_interleave(R, dim=0))
                        for k, v in prep.corrupted_kv]  # type: ignore[union-attr]
                kwargs = {"cache": DynamicCache(data, config=lm.config), "use_cache": True}
            if first_run > 0:
                # blocks below the first restored layer replay the corrupted run's output of the last of them
                state = prep.corrupted_blocks[first_run - 1][:, start:].repeat_interleave(R, dim=0)
                template = prep.block_templates[first_run - 1]
                replay = blocks_replayed(lm.model, lm.arch.layers, first_run,
                                         state if template is None else replace_output(template, state))
            if first_run == 0:
                fwd[lm.arch.embed] = self._noise_hook(prep.noise, prep.subj, start, R)
        else:
            fwd[lm.arch.embed] = self._noise_hook(prep.noise, prep.subj, 0, R)
        with torch.no_grad(), replay, hooks(lm.model, forward=fwd):
            hid = lm.backbone_forward(ids, mask, **kwargs)
        p = self._probs(hid[:, -1])[:, prep.answer_id].view(S, R).mean(0)
        return p.tolist()

    @staticmethod
    def _patch_hook(rows: torch.Tensor, pos: int, value: torch.Tensor) -> Callable[..., Any]:
        def fn(_m: Any, _i: Any, out: Any) -> Any:
            h = output_tensor(out)
            h[rows, pos] = value.to(h.dtype)
            return None  # changed in place

        return fn
