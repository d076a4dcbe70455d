"""Machinery shared by locate-and-edit methods (ROME, MEMIT and the rest of the family):

- context templates: short random prefixes generated once per model, so keys and values are averaged
  over contexts the subject can appear in;
- `capture_at_subject`: activations (module inputs or outputs) at each request's last subject token,
  averaged over templates, with the forward pass stopped at the deepest module needed;
- `optimize_values`: the vector δ per request that, added to a module's output at the last subject
  token, makes the model predict the new target (NLL) while keeping the subject's "essence"
  distribution (KL) and δ's size (weight decay, norm clamp) in check. All requests are optimized in
  one batch; a request whose loss has converged leaves the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ...hooks import StopForward, hooks, output_tensor, replace_output
from ...models.lm import LM
from ...requests import EditRequest

_TEMPLATE_STARTS = ["The", "Therefore", "Because", "I", "You", "It", "In", "When"]


def context_templates(lm: LM, n: int, length: int, seed: int = 0) -> list[str]:
    """["{}"] plus `n` prefixes of about `length` tokens sampled from the model (cached per model).
    Sampling uses a forked RNG so the caller's random state is untouched."""
    key = ("context_templates", n, length, seed)
    if key in lm.cache:
        return lm.cache[key]
    templates = ["{}"]
    if n > 0:
        starts = [_TEMPLATE_STARTS[i % len(_TEMPLATE_STARTS)] for i in range(n)]
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            ids, mask = [], []
            enc = [lm.encode_prompt(s) for s in starts]
            width = max(len(e) for e in enc)
            for e in enc:
                ids.append([lm.pad_id] * (width - len(e)) + e)
                mask.append([0] * (width - len(e)) + [1] * len(e))
            out = lm.model.generate(
                input_ids=torch.tensor(ids, device=lm.device),
                attention_mask=torch.tensor(mask, device=lm.device),
                max_new_tokens=length,
                do_sample=True,
                top_k=5,
                pad_token_id=lm.pad_id,
            )
        for s, row in zip(starts, out[:, width:].tolist()):
            text = s + lm.tokenizer.decode(row, skip_special_tokens=True)
            text = " ".join(text.replace("{", " ").replace("}", " ").split())
            templates.append(text + ". {}")
    lm.cache[key] = templates
    return templates


def _templated(requests: Sequence[EditRequest], templates: Sequence[str]) -> list[tuple[int, str]]:
    return [(r, t.format(req.prompt)) for r, req in enumerate(requests) for t in templates]


def capture_at_subject(
    lm: LM,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    targets: dict[str, str],
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Average (over templates) of each module's input ("in") or output ("out") at the last subject
    token of every request. Returns path -> tensor [n_requests, dim] (float32)."""
    items = _templated(requests, templates)
    seqs, pos, owner = [], [], []
    for r, text in items:
        seqs.append(lm.encode_prompt(text))
        pos.append(lm.subject_last_index(text, requests[r].subject))
        owner.append(r)
    sums: dict[str, torch.Tensor] = {}
    deepest = max(targets, key=lambda p: _depth(lm, p))
    backbone = lm.model.get_submodule(lm.arch.backbone)
    for start in range(0, len(seqs), batch_size):
        rows = list(range(start, min(start + batch_size, len(seqs))))
        ids, mask = lm.pad_right([seqs[i] for i in rows])
        b = torch.arange(len(rows))
        p = torch.tensor([pos[i] for i in rows])
        got: dict[str, torch.Tensor] = {}

        def make(path: str, kind: str):
            if kind == "in":
                def pre(_m: Any, inputs: tuple[Any, ...]) -> None:
                    got[path] = inputs[0][b, p].float()
                    if path == deepest:
                        raise StopForward
                return pre

            def fwd(_m: Any, _i: Any, out: Any) -> None:
                got[path] = output_tensor(out)[b, p].float()
                if path == deepest:
                    raise StopForward
            return fwd

        fwd_hooks = {path: make(path, k) for path, k in targets.items() if k == "out"}
        pre_hooks = {path: make(path, k) for path, k in targets.items() if k == "in"}
        with torch.no_grad(), hooks(lm.model, forward=fwd_hooks, pre=pre_hooks):
            try:
                backbone(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
            except StopForward:
                pass
        own = torch.tensor([owner[i] for i in rows])
        for path, v in got.items():
            acc = sums.setdefault(path, torch.zeros(len(requests), v.shape[-1]))
            acc.index_add_(0, own, v.cpu())
    return {path: s / len(templates) for path, s in sums.items()}


class _SuffixRunner:
    """Runs many sequences whose tokens before `edit_pos` never change: the prefixes are computed
    once (left-padded, no grad) into a KV cache; each call runs only the suffixes from the edit
    position on, attending to a copy of that cache. Exact: causal attention means prefix states do
    not depend on anything added at or after the edit position."""

    def __init__(self, lm: LM, seqs: Sequence[Sequence[int]], edit_pos: Sequence[int]) -> None:
        import copy

        self._copy = copy.deepcopy
        self.lm = lm
        self.backbone = lm.model.get_submodule(lm.arch.backbone)
        n = len(seqs)
        plen = [int(e) for e in edit_pos]
        P = max(plen)
        suffixes = [list(s[e:]) for s, e in zip(seqs, plen)]
        S = max(len(x) for x in suffixes)
        self.P = P
        pre_ids = torch.full((n, max(P, 1)), lm.pad_id, dtype=torch.long)
        pre_mask = torch.zeros((n, max(P, 1)), dtype=torch.long)
        for i, (s, e) in enumerate(zip(seqs, plen)):
            if e:
                pre_ids[i, P - e : P] = torch.tensor(list(s[:e]))
                pre_mask[i, P - e : P] = 1
        suf_ids = torch.full((n, S), lm.pad_id, dtype=torch.long)
        suf_mask = torch.zeros((n, S), dtype=torch.long)
        for i, x in enumerate(suffixes):
            suf_ids[i, : len(x)] = torch.tensor(x)
            suf_mask[i, : len(x)] = 1
        dev = lm.device
        self.suf_ids = suf_ids.to(dev)
        self.suf_pos = (torch.tensor(plen)[:, None] + torch.arange(S)[None, :]).to(dev)
        self.cache = None
        if P:
            self.full_mask = torch.cat([pre_mask, suf_mask], dim=1).to(dev)
            pos = (pre_mask.cumsum(1) - 1).clamp(min=0)
            with torch.no_grad():
                out = self.backbone(input_ids=pre_ids.to(dev), attention_mask=pre_mask.to(dev),
                                    position_ids=pos.to(dev), use_cache=True)
            self.cache = out.past_key_values
        else:
            self.full_mask = suf_mask.to(dev)

    def run(self, rows: Sequence[int]) -> torch.Tensor:
        idx = torch.tensor(list(rows), device=self.lm.device)
        kwargs: dict[str, Any] = {}
        if self.cache is not None:
            cache = self._copy(self.cache)
            if list(rows) != list(range(self.suf_ids.shape[0])):
                cache.batch_select_indices(idx)
            kwargs = {"past_key_values": cache, "use_cache": True}
        out = self.backbone(input_ids=self.suf_ids[idx], attention_mask=self.full_mask[idx],
                            position_ids=self.suf_pos[idx], **kwargs)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state


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
    stop_nll: float
    kl_prompt: str = "{} is a"
    prefix_cache: bool = True  # run the tokens before the edit position once (exact; faster)


def optimize_values(
    lm: LM,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    edit_path: str,
    cfg: ValueOptConfig,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Find δ (one per request) added to `edit_path`'s output at the last subject token.

    Returns (delta [n, d], original output v0 averaged over templates [n, d], info)."""
    tok = lm.tokenizer
    n = len(requests)
    rows_ids: list[list[int]] = []
    row_req: list[int] = []
    row_edit_pos: list[int] = []
    row_tgt: list[tuple[list[int], list[int]]] = []  # (positions predicting target, target ids)
    for r, text in _templated(requests, templates):
        p_ids, t_ids = lm.encode_pair(text, requests[r].target_new)
        rows_ids.append(p_ids + t_ids[:-1] if len(t_ids) > 1 else p_ids)
        row_req.append(r)
        row_edit_pos.append(lm.subject_last_index(text, requests[r].subject))
        row_tgt.append((list(range(len(p_ids) - 1, len(p_ids) - 1 + len(t_ids))), t_ids))
    kl_rows: list[int] = []
    kl_pos: list[int] = []
    if cfg.kl_factor > 0:
        for r, req in enumerate(requests):
            text = cfg.kl_prompt.format(req.subject)
            ids = lm.encode_prompt(text)
            kl_rows.append(len(rows_ids))
            kl_pos.append(len(ids) - 1)
            rows_ids.append(ids)
            row_req.append(r)
            row_edit_pos.append(lm.subject_last_index(text, req.subject))
            row_tgt.append(([], []))

    backbone = lm.model.get_submodule(lm.arch.backbone)
    # δ lives in the residual width, which is the output width of any MLP output projection
    dim = lm.arch.as_matrix(lm.module(lm.arch.mlp_out_path(0)).weight).shape[0]
    delta = torch.zeros(n, dim, device=lm.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    v0_sum = torch.zeros(n, dim)
    v0_count = torch.zeros(n)
    kl_ref: torch.Tensor | None = None
    active = list(range(n))
    final_nll = torch.full((n,), float("nan"))
    steps_used = torch.zeros(n, dtype=torch.long)
    result = torch.zeros(n, dim)
    history: list[list[float]] = []
    req_rows = {r: [i for i, q in enumerate(row_req) if q == r] for r in range(n)}
    runner = _SuffixRunner(lm, rows_ids, row_edit_pos) if cfg.prefix_cache else None

    for step in range(cfg.steps):
        rows = [i for r in active for i in req_rows[r]]
        rq = torch.tensor([row_req[i] for i in rows], device=lm.device)
        captured: list[torch.Tensor] = []
        if runner is not None:
            # only the tokens from the edit position on are recomputed; δ sits at suffix position 0
            b = torch.arange(len(rows), device=lm.device)
            p = torch.zeros(len(rows), dtype=torch.long, device=lm.device)
            offset = [row_edit_pos[i] for i in rows]
        else:
            ids, mask = lm.pad_right([rows_ids[i] for i in rows])
            b = torch.arange(len(rows), device=lm.device)
            p = torch.tensor([row_edit_pos[i] for i in rows], device=lm.device)
            offset = [0] * len(rows)

        def add_delta(_m: Any, _i: Any, out: Any) -> Any:
            h = output_tensor(out)
            if step == 0:
                captured.append(h[b, p].detach().float().cpu())
            add = torch.zeros_like(h)
            add[b, p] = delta[rq].to(h.dtype)
            return replace_output(out, h + add)

        with hooks(lm.model, forward={edit_path: add_delta}):
            if runner is not None:
                hid = runner.run(rows)
            else:
                hid = backbone(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
                hid = hid[0] if isinstance(hid, tuple) else hid.last_hidden_state
        if step == 0:
            v0_sum.index_add_(0, rq.cpu(), captured[0])
            v0_count.index_add_(0, rq.cpu(), torch.ones(len(rows)))
        # target NLL per row, then per request (mean over its templated rows)
        tb, tp, tt, trow = [], [], [], []
        kb, kp, kreq = [], [], []
        for j, i in enumerate(rows):
            if row_tgt[i][0]:
                for pos_, tid in zip(*row_tgt[i]):
                    tb.append(j)
                    tp.append(pos_ - offset[j])
                    tt.append(tid)
                    trow.append(j)
            if i in kl_rows:
                kb.append(j)
                kp.append(kl_pos[kl_rows.index(i)] - offset[j])
                kreq.append(row_req[i])
        logp = torch.log_softmax(lm.head(hid[torch.tensor(tb), torch.tensor(tp)]).float(), -1)
        tok_nll = -logp.gather(1, torch.tensor(tt, device=logp.device)[:, None])[:, 0]
        trow_t = torch.tensor(trow, device=logp.device)
        row_nll = torch.zeros(len(rows), device=logp.device).index_add(0, trow_t, tok_nll)
        row_cnt = torch.zeros(len(rows), device=logp.device).index_add(0, trow_t, torch.ones_like(tok_nll))
        is_tgt = row_cnt > 0
        req_nll = torch.zeros(n, device=logp.device).index_add(0, rq[is_tgt], row_nll[is_tgt] / row_cnt[is_tgt])
        req_nll = req_nll / len(templates)
        loss_vec = req_nll.clone()
        if kb:
            kl_logp = torch.log_softmax(lm.head(hid[torch.tensor(kb), torch.tensor(kp)]).float(), -1)
            if kl_ref is None:  # δ = 0 at step 0: the unedited distribution
                kl_ref = torch.zeros(n, kl_logp.shape[-1], device=kl_logp.device)
                kl_ref[torch.tensor(kreq)] = kl_logp.detach()
            ref = kl_ref[torch.tensor(kreq)]
            kl = (ref.exp() * (ref - kl_logp)).sum(-1)
            loss_vec = loss_vec.index_add(0, torch.tensor(kreq, device=kl.device), cfg.kl_factor * kl)
        v0 = (v0_sum / v0_count.clamp(min=1)[:, None]).to(lm.device)
        v0_norm = v0.norm(dim=-1).clamp(min=1e-6)
        wd = cfg.weight_decay * (delta.norm(dim=-1) / v0_norm) ** 2
        act = torch.tensor(active, device=lm.device)
        loss = (loss_vec[act] + wd[act]).sum()
        with torch.no_grad():
            history.append(req_nll.detach().cpu().tolist())
            final_nll[act.cpu()] = req_nll[act].detach().cpu()
            steps_used[act.cpu()] += 1
        done = [r for r in active if float(req_nll[r].detach()) < cfg.stop_nll]
        with torch.no_grad():
            for r in done:  # converged: keep the δ that was just evaluated
                result[r] = delta[r].detach().float().cpu()
        if len(done) == len(active) or step == cfg.steps - 1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            max_norm = cfg.clamp_norm_factor * v0_norm
            scale = (max_norm / delta.norm(dim=-1).clamp(min=1e-12)).clamp(max=1.0)
            delta.mul_(scale[:, None])
        active = [r for r in active if r not in done]
    with torch.no_grad():
        for r in active:
            result[r] = delta[r].detach().float().cpu()
    v0 = v0_sum / v0_count.clamp(min=1)[:, None]
    info = {"final_nll": final_nll.tolist(), "steps": steps_used.tolist(), "nll_history": history}
    return result, v0, info
