"""Machinery shared by locate-and-edit methods (ROME, MEMIT and the rest of the family):

- context templates: the bare prompt "{}" plus groups of short random prefixes sampled once per model
  (seeded, cached), so keys can be averaged over contexts the subject appears in. ROME averages flat over
  all templates (k*); MEMIT averages within each group, then across groups (the bare prompt is a group);
- `capture_at_subject`: activations (module inputs or outputs) at each request's last subject token, one
  row per template, with the forward pass stopped at the deepest module needed;
- `optimize_values`: the vector δ per request that, added to a module's output at the last subject
  token, makes the model predict the new target, as in ROME's `compute_v` / MEMIT's `compute_z`:
  loss = NLL(target | templated prompts) + kl_factor·KL(P_δ ‖ P_0) at the subject's last token of
  "{subject} is a" + weight_decay·‖δ‖/‖v_init‖², stop when that total is below `stop_loss`, and
  ‖δ‖ ≤ clamp_norm_factor·‖v_init‖, where v_init is the unedited value at the BARE prompt. All requests
  are optimized in one batch (their losses are independent); a converged request leaves the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ...errors import HparamsError, UnsupportedArchitectureError
from ...batching import pad_batch, positions_from_mask, teacher_forcing
from ...hooks import blocks_replayed, capture, hooks, output_tensor, replace_output
from ...memory import release_freed_memory
from ...models.lm import LM
from ...requests import EditRequest
from .hparams import LocateHparams, TemplateGroups, parse_template_groups  # noqa: F401 (re-exported)

_REPLAY_CHECKED = "locate.suffix_replay_exact"  # LM cache key: whether replayed blocks give a full pass's result
_TEMPLATE_STARTS = ["The", "Therefore", "Because", "I", "You", "It", "In", "When"]


def context_templates(lm: LM, groups: Sequence[tuple[int, int]], seed: int = 0) -> list[list[str]]:
    """[["{}"], group 1, group 2, ...]: each group holds `count` prefixes of about `length` tokens sampled
    from the model (top-k 5), each ending in ". {}". Cached per model; a forked RNG leaves the caller's
    random state untouched."""
    key = ("context_templates", tuple(tuple(g) for g in groups), seed, tuple(lm.prefix_ids))
    if key in lm.cache:
        return lm.cache[key]
    out_groups: list[list[str]] = [["{}"]]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for length, count in groups:
            group: list[str] = []
            if count > 0:
                starts = [_TEMPLATE_STARTS[i % len(_TEMPLATE_STARTS)] for i in range(count)]
                enc = [lm.encode_prompt(s) for s in starts]
                width = max(len(e) for e in enc)
                ids = [[lm.pad_id] * (width - len(e)) + e for e in enc]
                mask = [[0] * (width - len(e)) + [1] * len(e) for e in enc]
                # the start word is the prefix's first token (as the references count max_out_len)
                gen = lm.model.generate(
                    input_ids=torch.tensor(ids, device=lm.device),
                    attention_mask=torch.tensor(mask, device=lm.device),
                    max_new_tokens=max(1, length - 1),
                    min_new_tokens=max(1, length - 1),
                    do_sample=True,
                    top_k=5,
                    pad_token_id=lm.pad_id,
                )
                for s, row in zip(starts, gen[:, width:].tolist()):
                    text = s + lm.tokenizer.decode(row, skip_special_tokens=True)
                    text = " ".join(text.replace("{", " ").replace("}", " ").split())
                    group.append(text + ". {}")
            out_groups.append(group)
    lm.cache[key] = out_groups
    return out_groups


class PreparesContextTemplates:
    """`Editor.prepare` for methods whose hyper-parameters name `context_templates` (ROME and the MEMIT
    family): the templates are sampled from the model once (about a second on SmolLM2 on CPU) and kept
    in `lm.cache`; put before `Editor` in the bases."""

    def prepare(self, lm: LM, hp: Any) -> None:
        context_templates(lm, parse_template_groups(hp.context_templates), hp.seed)


def flat_mean(x: torch.Tensor) -> torch.Tensor:
    """ROME's k*: mean over all templates. x: [n, T, d] -> [n, d]."""
    return x.mean(1)


def group_mean(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """MEMIT's key: mean within each template group, then across groups. x: [n, T, d] -> [n, d]."""
    sizes = [s for s in sizes if s > 0]
    if sum(sizes) != x.shape[1]:
        raise ValueError(f"group sizes {sizes} do not add up to {x.shape[1]} templates")
    return torch.stack([part.mean(1) for part in torch.split(x, sizes, dim=1)], 0).mean(0)


def refuse_post_mlp_norm(lm: LM, method: str) -> None:
    """ROME/MEMIT treat the MLP output projection's output as what joins the residual stream; a norm
    after the MLP (Gemma 3) makes that map nonlinear, so the closed-form solves would miss their target."""
    if lm.arch.mlp_post_norm:
        raise UnsupportedArchitectureError(
            f"{method} cannot edit {lm.arch.model_type}: its MLP output passes through "
            f"{lm.arch.mlp_post_norm} before the residual, which breaks the key -> value algebra"
        )


def _templated(requests: Sequence[EditRequest], templates: Sequence[str]) -> list[tuple[int, str]]:
    return [(r, t.format(req.prompt)) for r, req in enumerate(requests) for t in templates]


def capture_at_subject(
    lm: LM,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    targets: dict[str, str],
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Each module's input ("in") or output ("out") at the last subject token of every request in every
    template. Returns path -> tensor [n_requests, n_templates, dim] (float32, CPU)."""
    items = _templated(requests, templates)
    seqs = [lm.encode_prompt(text) for _, text in items]
    pos = [lm.subject_last_index(text, requests[r].subject) for r, text in items]
    rows_out: dict[str, list[torch.Tensor]] = {}
    depths = {p: _depth(lm, p) for p in targets}
    top = max(depths.values())
    # end the pass after the last module needed; when that is ambiguous (two submodules of one block,
    # e.g. the MLP and its own output projection) run the whole forward instead
    deepest = next(p for p, d in depths.items() if d == top) if list(depths.values()).count(top) == 1 else None
    for start in range(0, len(seqs), batch_size):
        rows = list(range(start, min(start + batch_size, len(seqs))))
        ids, mask = lm.pad_right([seqs[i] for i in rows])
        b = torch.arange(len(rows))
        p = torch.tensor([pos[i] for i in rows])
        got: dict[str, torch.Tensor] = {}

        def keep(path: str):
            def fn(x: torch.Tensor) -> None:
                got[path] = x[b, p].float()
            return fn

        with torch.no_grad():
            capture(lm.model, lambda: lm.backbone_forward(ids, mask),
                    inputs={path: keep(path) for path, k in targets.items() if k == "in"},
                    outputs={path: keep(path) for path, k in targets.items() if k == "out"},
                    stop_after=deepest)
        for path, v in got.items():
            rows_out.setdefault(path, []).append(v.cpu())
    return {path: torch.cat(v).reshape(len(requests), len(templates), -1) for path, v in rows_out.items()}


class SuffixRunner:
    """Runs many sequences whose tokens before `edit_pos` never change: the prefixes are computed
    once (left-padded, no grad) into a KV cache; each call runs only the suffixes from the edit
    position on, attending to a copy of that cache. Exact: causal attention means prefix states do
    not depend on anything added at or after the edit position.

    `replay_below=l`: nothing added during the runs sits below block l, so blocks 0 … l-1 give the same
    output at every call. The first call over all rows records block l-1's output and later calls
    replay it (`hooks.blocks_replayed`), computing only blocks l… . Whether a replayed pass equals a full
    one is checked once per LM (on any difference it is never used for that LM). Hooks on modules inside
    the replayed blocks fire on the first call only."""

    def __init__(self, lm: LM, seqs: Sequence[Sequence[int]], edit_pos: Sequence[int], replay_below: int = 0) -> None:
        import copy

        self._copy = copy.deepcopy
        self.lm = lm
        self._below = 0
        self._state: tuple[torch.Tensor, Any] | None = None  # block l-1's output (tensor, structure)
        self.replay_below(replay_below)
        self._cache_kw = lm.cache_kwarg
        plen = [int(e) for e in edit_pos]
        P = max(plen)
        suffixes = [list(s[e:]) for s, e in zip(seqs, plen)]
        self.P = P
        pre_ids, pre_mask = pad_batch([list(s[:e]) for s, e in zip(seqs, plen)], lm.pad_id, "left", width=max(P, 1))
        suf_ids, suf_mask = pad_batch(suffixes, lm.pad_id, "right")
        S = suf_ids.shape[1]
        dev = lm.device
        self.suf_ids = suf_ids.to(dev)
        self.suf_pos = (torch.tensor(plen)[:, None] + torch.arange(S)[None, :]).to(dev)
        self.cache = None
        if P:
            self.full_mask = torch.cat([pre_mask, suf_mask], dim=1).to(dev)
            pos = positions_from_mask(pre_mask)
            with torch.no_grad():
                self.cache = lm.prefix_cache(pre_ids, pre_mask, pos)
        else:
            self.full_mask = suf_mask.to(dev)

    def nbytes(self) -> int:
        """Bytes held by the prefixes' KV cache and the recorded block output (once recorded)."""
        state = 0 if self._state is None else self._state[0].numel() * self._state[0].element_size()
        if self.cache is None:
            return state
        layers = getattr(self.cache, "layers", None)
        if layers is not None:
            return state + sum(t.numel() * t.element_size() for layer in layers for t in
                               (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))
        return state + sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(self.cache)
                           if isinstance(t, torch.Tensor))

    def replay_below(self, layer: int) -> None:
        """Replay blocks 0 … layer-1 from the second call on (0: never); set before the first call."""
        self._below = layer if layer > 0 and self.lm.cache.get(_REPLAY_CHECKED, True) else 0

    def _kwargs(self, idx: torch.Tensor, every_row: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"position_ids": self.suf_pos[idx]}
        if self.cache is not None:
            cache = self._copy(self.cache)
            if not every_row:
                cache.batch_select_indices(idx)
            kwargs.update({self._cache_kw: cache, "use_cache": True})
        return kwargs

    def run(self, rows: Sequence[int]) -> torch.Tensor:
        idx = torch.tensor(list(rows), device=self.lm.device)
        every_row = list(rows) == list(range(self.suf_ids.shape[0]))
        ids, mask = self.suf_ids[idx], self.full_mask[idx]
        if self._below and self._state is not None:
            state, template = self._state
            out = state[idx] if template is None else replace_output(template, state[idx])
            with blocks_replayed(self.lm.model, self.lm.arch.layers, self._below, out):
                return self.lm.backbone_forward(ids, mask, **self._kwargs(idx, every_row))
        if not (self._below and every_row):
            return self.lm.backbone_forward(ids, mask, **self._kwargs(idx, every_row))
        got: list[Any] = []
        with hooks(self.lm.model, forward={self.lm.arch.block_path(self._below - 1): lambda _m, _i, o: got.append(o)}):
            hid = self.lm.backbone_forward(ids, mask, **self._kwargs(idx, every_row))
        if len(got) != 1:  # the block was not called once: replay could not stand in for it
            self._below = 0
            return hid
        state = output_tensor(got[0]).detach()
        out = state if isinstance(got[0], torch.Tensor) else replace_output(got[0], state)
        if _REPLAY_CHECKED not in self.lm.cache:
            with torch.no_grad(), blocks_replayed(self.lm.model, self.lm.arch.layers, self._below, out):
                again = self.lm.backbone_forward(ids, mask, **self._kwargs(idx, every_row))
            self.lm.cache[_REPLAY_CHECKED] = bool(torch.allclose(again.float(), hid.detach().float(), rtol=1e-4, atol=1e-5))
        if self.lm.cache[_REPLAY_CHECKED]:
            self._state = (state, None if isinstance(got[0], torch.Tensor) else out)
        else:
            self._below = 0
        return hid


def _depth(lm: LM, path: str) -> tuple[int, int]:
    prefix = lm.arch.layers + "."
    if path.startswith(prefix):
        rest = path[len(prefix) :]
        layer = int(rest.split(".")[0])
        return (layer, 1 if rest.isdigit() else 0)  # a block's output comes after its submodules
    return (10**6, 0)


@dataclass
class ValueOptConfig:
    steps: int
    lr: float
    kl_factor: float
    weight_decay: float
    clamp_norm_factor: float
    stop_loss: float  # early stop when the TOTAL loss (NLL + KL + decay) is below this (references: 5e-2)
    kl_prompt: str = "{} is a"
    prefix_cache: bool = True  # run the tokens before the edit position once (exact; faster)
    # with the prefix cache: replay the blocks below the lowest edited layer instead of recomputing them
    # at every step (exact: nothing below that layer changes during the optimisation; faster)
    layer_replay: bool = True
    # PMET's schedule: once every target token is the argmax, the NLL weight drops to 0.1× and the
    # request stops as soon as its weighted KL is ≤ 0.01. Off for ROME/MEMIT (their references lack it).
    nll_drop: bool = False
    # rows per forward/backward pass; gradients are accumulated over the chunks of a step, so this
    # bounds memory without changing the result
    chunk_rows: int = 64
    # memory for the prefixes' KV caches kept across steps (MB); beyond it they are recomputed per step
    cache_mb: int = 256



def weight_decay_term(delta: torch.Tensor, v_init: torch.Tensor, factor: float) -> torch.Tensor:
    """factor·‖δ‖/‖v_init‖² per row, as ROME/MEMIT compute it (not the squared ratio)."""
    return factor * delta.norm(dim=-1) / v_init.norm(dim=-1).clamp(min=1e-6) ** 2


def kl_term(cur_logp: torch.Tensor, init_logp: torch.Tensor) -> torch.Tensor:
    """KL(P_δ ‖ P_0) per row from log-probabilities: Σ P_δ (log P_δ − log P_0)."""
    return (cur_logp.exp() * (cur_logp - init_logp)).sum(-1)


def kl_rows(lm: LM, requests: Sequence[EditRequest], kl_prompt: str) -> list[tuple[list[int], int]]:
    """(ids, subject's last index) of each request's KL prompt. δ is added at that index and the KL is
    taken there too: it protects what the model says about the subject right at the edited token."""
    out = []
    for req in requests:
        text = kl_prompt.format(req.subject)
        out.append((lm.encode_prompt(text), lm.subject_last_index(text, req.subject)))
    return out


def _chunks(req_rows: dict[int, list[int]], max_rows: int) -> list[list[int]]:
    """Requests grouped in order so that each group has at most `max_rows` rows (a request is never
    split; one larger than the limit is a group of its own)."""
    out: list[list[int]] = []
    size = 0
    for r, rows in req_rows.items():
        if out and size + len(rows) <= max_rows:
            out[-1].append(r)
            size += len(rows)
        else:
            out.append([r])
            size = len(rows)
    return out


def optimize_values(
    lm: LM,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    edit_path: str | Sequence[str],
    cfg: ValueOptConfig,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Find δ (one per request) added to `edit_path`'s output at the last subject token.

    `templates[0]` must be the bare prompt "{}". Returns (delta [n, d], v_init [n, d], info) where
    v_init is `edit_path`'s unedited output at the bare prompt (neither templates nor KL rows enter it).
    With a list of paths (PMET: attention and MLP outputs), one δ per request and path is optimised
    jointly, each with its own decay term and clamp: delta and v_init are then [n, paths, d].

    Each step runs the requests in chunks of at most `cfg.chunk_rows` rows and accumulates their
    gradients before one optimiser step. The requests' losses are independent, so the result does not
    depend on the chunking; memory grows with the chunk, not with the batch."""
    if not templates or templates[0] != "{}":
        raise ValueError("templates[0] must be the bare prompt '{}'")
    if cfg.chunk_rows < 1:
        raise HparamsError(f"chunk_rows must be >= 1, got {cfg.chunk_rows}")
    if cfg.cache_mb < 0:
        raise HparamsError(f"cache_mb must be >= 0, got {cfg.cache_mb}")
    paths = [edit_path] if isinstance(edit_path, str) else list(edit_path)
    n_p = len(paths)
    n = len(requests)
    n_t = len(templates)
    rows_ids: list[list[int]] = []
    row_req: list[int] = []
    row_edit_pos: list[int] = []
    row_tgt: list[tuple[list[int], list[int]]] = []  # (positions predicting target, target ids)
    for r, text in _templated(requests, templates):
        p_ids, t_ids = lm.encode_pair(text, requests[r].target_new)
        seq, positions = teacher_forcing(p_ids, t_ids)
        rows_ids.append(seq)
        row_req.append(r)
        row_edit_pos.append(lm.subject_last_index(text, requests[r].subject))
        row_tgt.append((positions, t_ids))
    bare_row = {r * n_t: r for r in range(n)}  # row index -> request, for the bare-prompt rows
    kl_row: dict[int, int] = {}  # row index -> request
    if cfg.kl_factor > 0:
        for r, (ids, pos_) in enumerate(kl_rows(lm, requests, cfg.kl_prompt)):
            kl_row[len(rows_ids)] = r
            rows_ids.append(ids)
            row_req.append(r)
            row_edit_pos.append(pos_)
            row_tgt.append(([], []))

    # δ lives in the residual width, which is the output width of any MLP output projection
    dim = lm.arch.as_matrix(lm.base_module(lm.arch.mlp_out_path(0)).weight).shape[0]
    delta = torch.zeros(n, n_p, dim, device=lm.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    v_init = torch.zeros(n, n_p, dim, device=lm.device)
    nll_weight = torch.ones(n, device=lm.device)  # the NLL weight of the next step (PMET's schedule)
    loss_weight = nll_weight.clone()  # the weight the current step's loss was computed with
    kl_ref: dict[int, torch.Tensor] = {}  # request -> unedited log-probabilities at its KL row
    active = list(range(n))
    final = {k: torch.full((n,), float("nan")) for k in ("nll", "kl", "wd", "loss")}
    steps_used = torch.zeros(n, dtype=torch.long)
    result = torch.zeros(n, n_p, dim)
    history: list[list[float]] = []
    req_rows = {r: [i for i, q in enumerate(row_req) if q == r] for r in range(n)}
    chunks = _chunks(req_rows, cfg.chunk_rows)
    # chunk -> (runner, its rows): the prefixes' KV caches are kept across steps while they fit in
    # `cfg.cache_mb`; chunks beyond that rebuild theirs at each step (one no-grad prefix pass), so memory
    # stays bounded for any batch size
    runners: dict[int, tuple[SuffixRunner, list[int]]] = {}
    depths = [_depth(lm, path)[0] for path in paths]
    replay_below = min(depths) if cfg.layer_replay and max(depths) < 10**6 else 0
    state_bytes = torch.empty(0, dtype=lm.dtype).element_size()
    budget = cfg.cache_mb * 2**20
    cached_bytes = [0]

    def chunk_losses(c: int, reqs_c: list[int], first: bool) -> tuple[torch.Tensor, ...]:
        """Forward the chunk's active rows; per-request NLL, KL (both [n], zero elsewhere) and the
        number of target tokens not predicted as the argmax."""
        rows = [i for r in reqs_c for i in req_rows[r]]
        rq = torch.tensor([row_req[i] for i in rows], device=lm.device)
        b = torch.arange(len(rows), device=lm.device)
        if cfg.prefix_cache:
            if c in runners:
                runner, all_rows = runners[c]
            else:
                # only the chunk's active rows: a rebuilt runner never holds finished requests
                all_rows = rows if cached_bytes[0] >= budget else [i for r in chunks[c] for i in req_rows[r]]
                runner = SuffixRunner(lm, [rows_ids[i] for i in all_rows], [row_edit_pos[i] for i in all_rows])
                # a kept runner also records one block output per suffix token for the replay
                size = runner.nbytes() + (runner.suf_ids.numel() * dim * state_bytes if replay_below else 0)
                if cached_bytes[0] + size <= budget:  # kept for the next steps while within the budget
                    runner.replay_below(replay_below)  # a runner rebuilt at every step would record for nothing
                    runners[c] = (runner, all_rows)
                    cached_bytes[0] += size
                else:
                    cached_bytes[0] = budget  # from now on every runner that is not kept is rebuilt per step
            local = {i: j for j, i in enumerate(all_rows)}
            # only the tokens from the edit position on are recomputed; δ sits at suffix position 0
            p = torch.zeros(len(rows), dtype=torch.long, device=lm.device)
            offset = [row_edit_pos[i] for i in rows]
        else:
            ids, mask = lm.pad_right([rows_ids[i] for i in rows])
            p = torch.tensor([row_edit_pos[i] for i in rows], device=lm.device)
            offset = [0] * len(rows)
        captured: dict[int, torch.Tensor] = {}

        def add_delta(k: int) -> Any:
            def fn(_m: Any, _i: Any, out: Any) -> Any:
                h = output_tensor(out)
                if first and k not in captured:  # the first pass (a replay check may run it again)
                    captured[k] = h[b, p].detach().float()
                add = torch.zeros_like(h)
                add[b, p] = delta[rq, k].to(h.dtype)
                return replace_output(out, h + add)
            return fn

        with hooks(lm.model, forward={path: add_delta(k) for k, path in enumerate(paths)}):
            if cfg.prefix_cache:
                hid = runner.run([local[i] for i in rows])
            else:
                hid = lm.backbone_forward(ids, mask)
        if first:  # every request is active at step 0: its bare row gives v_init
            for j, i in enumerate(rows):
                if i in bare_row:
                    for k in range(n_p):
                        v_init[bare_row[i], k] = captured[k][j]
        # target NLL per row (mean over its target tokens), then per request (mean over its templates)
        tp, tt, trow = [], [], []
        kb, kp, kreq = [], [], []
        for j, i in enumerate(rows):
            for pos_, tid in zip(*row_tgt[i]):
                tp.append(pos_ - offset[j])
                tt.append(tid)
                trow.append(j)
            if i in kl_row:
                kb.append(j)
                kp.append(row_edit_pos[i] - offset[j])
                kreq.append(kl_row[i])
        trow_t = torch.tensor(trow, device=lm.device)
        tt_t = torch.tensor(tt, device=lm.device)
        # one head call for the target and the KL positions: the head's [vocab, d] weight is read once
        # per pass (forward and backward) instead of twice, which on CPU is most of the head's cost
        at_rows = torch.tensor(trow + kb, device=lm.device)
        at_pos = torch.tensor(tp + kp, device=lm.device)
        logp_all = torch.log_softmax(lm.head(hid[at_rows, at_pos]).float(), -1)
        logp = logp_all[: len(tp)]
        tok_nll = -logp.gather(1, tt_t[:, None])[:, 0]
        row_nll = torch.zeros(len(rows), device=logp.device).index_add(0, trow_t, tok_nll)
        row_cnt = torch.zeros(len(rows), device=logp.device).index_add(0, trow_t, torch.ones_like(tok_nll))
        is_tgt = row_cnt > 0
        req_nll = torch.zeros(n, device=logp.device).index_add(0, rq[is_tgt], row_nll[is_tgt] / row_cnt[is_tgt])
        req_nll = req_nll / n_t
        req_kl = torch.zeros(n, device=logp.device)
        if kb:
            kl_logp = logp_all[len(tp):]
            if first:  # δ = 0 at step 0: the unedited distribution
                for j, r in enumerate(kreq):
                    kl_ref[r] = kl_logp[j].detach()
            ref = torch.stack([kl_ref[r] for r in kreq])
            req_kl = req_kl.index_add(0, torch.tensor(kreq, device=lm.device), kl_term(kl_logp, ref))
        with torch.no_grad():  # target tokens of the chunk's rows not predicted as the argmax, per request
            hit = (logp.argmax(-1) == tt_t).float()
            miss = torch.zeros(n, device=logp.device).index_add(0, rq[trow_t], 1 - hit)
        return req_nll, req_kl, miss

    def finished(r: int, loss: float, kl: float, missed: float) -> bool:
        """Whether request r stops at this step (its δ as just evaluated is kept). PMET's schedule also
        sets the NLL weight of its next step."""
        if loss < cfg.stop_loss:
            return True
        if cfg.nll_drop:  # every target token of every template row predicted as the argmax?
            if missed == 0:
                nll_weight[r] = 0.1
                return cfg.kl_factor * kl <= 0.01
            nll_weight[r] = 1.0
        return False

    for step in range(cfg.steps):
        opt.zero_grad()
        last_step = step == cfg.steps - 1
        req_nll = torch.zeros(n, device=lm.device)
        req_kl = torch.zeros(n, device=lm.device)
        done: list[int] = []
        for c, chunk in enumerate(chunks):
            reqs_c = [r for r in chunk if r in active]
            if not reqs_c:
                continue
            with torch.set_grad_enabled(not last_step):  # the last step's gradient is never used
                nll_c, kl_c, miss_c = chunk_losses(c, reqs_c, step == 0)
                act_c = torch.tensor(reqs_c, device=lm.device)
                wd_c = sum(weight_decay_term(delta[act_c, k], v_init[act_c, k], cfg.weight_decay) for k in range(n_p))
                loss_r = nll_weight[act_c] * nll_c[act_c] + cfg.kl_factor * kl_c[act_c] + wd_c  # weights change below
            # each request's stop depends only on its own terms, so it is decided here, and only the
            # requests that go on are back-propagated (their gradients are all an Adam step uses)
            vals = loss_r.detach().cpu().tolist()
            kls = kl_c[act_c].detach().cpu().tolist()
            missed = miss_c[act_c].cpu().tolist()
            keep = []
            for j, r in enumerate(reqs_c):
                if finished(r, vals[j], kls[j], missed[j]):
                    done.append(r)
                else:
                    keep.append(j)
            if keep and not last_step:
                loss_r[torch.tensor(keep, device=lm.device)].sum().backward()  # frees this chunk's activations
            req_nll += nll_c.detach()
            req_kl += kl_c.detach()
            del nll_c, kl_c, loss_r, wd_c
        with torch.no_grad():
            req_wd = sum(weight_decay_term(delta[:, k], v_init[:, k], cfg.weight_decay) for k in range(n_p))
            act = torch.tensor(active, device=lm.device)
            # the loss as evaluated at this step (NLL weights as they were before `finished` changed them)
            req_loss = torch.zeros(n, device=lm.device)
            req_loss[act] = loss_weight[act] * req_nll[act] + cfg.kl_factor * req_kl[act] + req_wd[act]
            history.append(req_loss.cpu().tolist())
            for k, v in (("nll", req_nll), ("kl", req_kl), ("wd", req_wd), ("loss", req_loss)):
                final[k][act.cpu()] = v[act].float().cpu()
            steps_used[act.cpu()] += 1
            loss_weight.copy_(nll_weight)
            for r in done:  # converged: keep the δ that was just evaluated
                result[r] = delta[r].detach().float().cpu()
        release_freed_memory()  # the chunks' activations are freed; hand the heap back (peak RSS)
        if len(done) == len(active) or last_step:
            break
        opt.step()
        with torch.no_grad():
            max_norm = cfg.clamp_norm_factor * v_init.norm(dim=-1)
            scale = (max_norm / delta.norm(dim=-1).clamp(min=1e-12)).clamp(max=1.0)
            delta.mul_(scale[..., None])
        active = [r for r in active if r not in done]
    with torch.no_grad():
        for r in active:
            result[r] = delta[r].detach().float().cpu()
    info = {
        "final_nll": final["nll"].tolist(),
        "final_kl": final["kl"].tolist(),
        "final_loss": final["loss"].tolist(),
        "steps": steps_used.tolist(),
        "loss_history": history,
        "chunks": len(chunks),
    }
    if isinstance(edit_path, str):
        return result[:, 0], v_init[:, 0].float().cpu(), info
    return result, v_init.float().cpu(), info
