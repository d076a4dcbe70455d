"""KN: knowledge neurons (Dai et al., 2022).

A fact is attributed to MLP units ("neurons": entries of the MLP's intermediate activation, the input
of its output projection — `silu(g)·u` on SwiGLU models) by integrated gradients, and the edit moves
those units' value vectors (their columns of the output projection) away from the old answer's output
embedding and toward the new one's.

1. **Attribution.** For each prompt (the request's prompt and, with `use_paraphrases`, its
   paraphrases) and each layer l of `layers`, the activation vector a at the prompt's last position
   (after the shared answer tokens, below) is
   scaled from the zero baseline, a ← (k/M)·a for k = 1..M (M = `ig_steps`), and
   Attr_i = a_i · (1/M) Σ_k ∂P(y*)/∂a_i, with P(y*) the probability of the true answer's first token at
   that position. "First" generalises the paper's single-token answers: where the old and new answers
   begin with the same tokens (" New York" -> " New Delhi"; on SmolLM2 every number, which starts with
   a lone space token), each prompt is followed by those shared tokens and y* is the old answer's first
   differing token (`attribution_inputs`, each prompt with its own shared tokens; a paraphrase whose
   answers never part is left out); answers where one begins the other cannot be written. As in the
   reference implementations the whole layer's vector is scaled at once, so
   the attributions of one layer add up to ≈ P(a) − P(a = 0) (completeness). Earlier positions never
   change, so the prompt minus its last token runs once into a KV cache and every (layer, step) row is
   a one-token forward pass; rows for many layers and steps share one batch.
2. **Selection.** Per prompt, the coarse set is the units with Attr > t·max Attr (t =
   `adaptive_threshold`, max over all attributed layers). A unit is kept if it is in the coarse sets
   of at least a fraction p (`share_ratio`) of the prompts; as in the paper, p is moved by
   `share_step` until `min_neurons`..`max_neurons` units remain, and the most attributed ones are kept
   if it cannot get under the maximum.
3. **Edit.** For each kept unit i with value vector w_i (column i of W_out):
   w_i ← w_i + s_i·(−λ1 (‖w_i‖/‖e_old‖) e_old + λ2 (‖w_i‖/‖e_new‖) e_new), where e are the rows of the
   output embedding for the old (true, or the model's greedy answer when none is given) and new
   answers' tokens at that first differing position, as they continue the prompt. s_i = 1 in the paper. With `sign_aware`,
   s_i = sign(a_i) (mean over prompts): the unit adds a_i·w_i to the residual, and SiLU/GELU units are
   often negative (about half of SmolLM2's), where the unsigned update pushes toward the OLD answer.

One request per edit (as in the paper and EasyEdit). Nothing is sampled: the method is deterministic.

Integrated gradients run with subnormal floats flushed to zero (`numerics.flush_denormals`): a model broken
by many sequential edits is full of them, and they made one edit after 100 KN edits on SmolLM2 take 111 s
instead of 14 s. On a healthy model the edit is bit-identical either way (tests/test_numerics.py); where
P(y*) itself is below 1.2e-38 every attribution flushes to zero and the edit is refused (no neuron).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ...errors import EditRequestError, EditlabError
from ...hooks import hooks
from ...models.lm import LM
from ...numerics import flush_denormals
from ...requests import EditRequest
from ..base import Editor
from .hparams import PAPER_MIN_IG_STEPS, KNHparams  # noqa: F401 (re-exported)
from .shared import SuffixRunner


# ---------------------------------------------------------------------------------- attribution
@dataclass
class Attribution:
    """Integrated-gradients results for P prompts over L layers of m units (CPU, float32)."""

    layers: list[int]
    attr: torch.Tensor  # [P, L, m] Attr_i
    act: torch.Tensor  # [P, L, m] the unscaled activation a_i at the prompt's last position
    prob: torch.Tensor  # [P] unedited P(y*) at the prompt's last position


def integrated_gradients(
    lm: LM,
    prompt_ids: Sequence[Sequence[int]],
    target_ids: Sequence[int],
    layers: Sequence[int],
    steps: int,
    batch_size: int = 128,
) -> Attribution:
    """Attr = a · (1/M) Σ_{k=1..M} ∂P(target | prompt; a ← (k/M)·a)/∂a for the MLP intermediate
    activation a at each prompt's last position, one layer scaled at a time. `prompt_ids` are token
    ids as `lm.encode_pair` gives a prompt's (KN appends the answer tokens the old and new answers
    share); `target_ids[j]` is the token whose probability is attributed for prompt j."""
    if len(prompt_ids) != len(target_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(target_ids)} targets")
    if any(len(s) == 0 for s in prompt_ids):
        raise ValueError("empty prompt")
    if not layers or steps < 1:
        raise ValueError(f"need at least one layer and one step, got layers={list(layers)}, steps={steps}")
    n_p, n_l = len(prompt_ids), len(layers)
    # everything before the last token is the same in every row: one cached prefix per prompt
    runner = SuffixRunner(lm, prompt_ids, [len(s) - 1 for s in prompt_ids])
    rows = [(j, li, k) for j in range(n_p) for li in range(n_l) for k in range(1, steps + 1)]
    act: torch.Tensor | None = None
    gsum: torch.Tensor | None = None
    prob = torch.zeros(n_p)
    tgt = torch.as_tensor(list(target_ids), dtype=torch.long)
    dev = lm.device
    with torch.enable_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            fns = {}
            for li in sorted({li for _, li, _ in chunk}):
                sel = torch.tensor([r for r, (_, l2, _) in enumerate(chunk) if l2 == li], device=dev)
                alpha = torch.tensor([chunk[r][2] / steps for r in sel.tolist()], device=dev)
                fns[lm.arch.mlp_out_path(layers[li])] = _scaling_hook(li, sel, alpha, store)
            with hooks(lm.model, pre=fns):
                hid = runner.run([j for j, _, _ in chunk])
            logits = lm.head(hid[:, -1]).float()
            j_idx = torch.tensor([j for j, _, _ in chunk], device=dev)
            p = torch.softmax(logits, -1).gather(1, tgt.to(dev)[j_idx][:, None])[:, 0]
            lis = sorted(store)
            grads = torch.autograd.grad(p.sum(), [store[li][1] for li in lis])
            if act is None:
                m = store[lis[0]][0].shape[-1]
                act, gsum = torch.zeros(n_p, n_l, m), torch.zeros(n_p, n_l, m)
            assert gsum is not None
            for li, g in zip(lis, grads):
                a, _ = store[li]
                js = torch.tensor([j for j, l2, _ in chunk if l2 == li])
                gsum[:, li].index_add_(0, js, g.detach().float().cpu())
                act[js, li] = a.cpu()  # the same a in every step row of (prompt, layer)
            for r, (j, _, k) in enumerate(chunk):
                if k == steps:  # α = 1: the unedited network
                    prob[j] = float(p[r].detach())
    assert act is not None and gsum is not None
    return Attribution(list(layers), act * gsum / steps, act, prob)


def _scaling_hook(li: int, sel: torch.Tensor, alpha: torch.Tensor, store: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    """Pre-hook for one output projection: in rows `sel`, replace the last position's input a by a
    leaf α·a (kept in `store` with a, so its gradient can be taken); other rows pass unchanged."""

    def pre(_m: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        a = x[sel, -1].detach().float()
        scaled = (a * alpha[:, None]).requires_grad_(True)
        store[li] = (a, scaled)
        new = x.clone()
        new[sel, -1] = scaled.to(x.dtype)
        return (new, *args[1:])

    return pre


# ---------------------------------------------------------------------------------- selection
@dataclass
class Selection:
    neurons: list[tuple[int, int]]  # (layer, unit index), most attributed first
    scores: list[float]  # mean attribution over prompts, per kept unit
    share_ratio: float  # p finally used
    coarse_sizes: list[int]  # coarse-set size per prompt


def coarse_sets(attr: torch.Tensor, threshold: float) -> list[set[tuple[int, int]]]:
    """Per prompt, the (layer position, unit) pairs with Attr > t·max Attr (max over every attributed
    layer of that prompt). A prompt whose largest attribution is not positive contributes nothing."""
    out = []
    for a in attr:
        top = float(a.max())
        if top <= 0:
            out.append(set())
            continue
        out.append({(int(l), int(i)) for l, i in torch.nonzero(a > threshold * top).tolist()})
    return out


def _shared(coarse: list[set[tuple[int, int]]], ratio: float) -> set[tuple[int, int]]:
    """Units in the coarse sets of more than a fraction `ratio` of the prompts (the paper's "shared by
    more than p% of prompts", as the reference's `count > p·n`; and of at least one)."""
    need = max(1, math.floor(ratio * len(coarse) + 1e-9) + 1)
    counts: dict[tuple[int, int], int] = {}
    for s in coarse:
        for u in s:
            counts[u] = counts.get(u, 0) + 1
    return {u for u, c in counts.items() if c >= need}


def select_neurons(attr: torch.Tensor, layers: Sequence[int], threshold: float, share_ratio: float,
                   share_step: float, min_neurons: int, max_neurons: int) -> Selection:
    """Coarse sets by the adaptive threshold, then the sharing filter, with p moved by `share_step`
    (down while fewer than `min_neurons` units pass, up while more than `max_neurons` do); at most
    `max_neurons` units are returned, the most attributed (mean over prompts) first."""
    coarse = coarse_sets(attr, threshold)
    mean = attr.mean(0)
    p = share_ratio
    kept = _shared(coarse, p)
    if share_step > 0:
        while len(kept) < min_neurons and p > 0:
            p = max(0.0, round(p - share_step, 10))
            kept = _shared(coarse, p)
        while len(kept) > max_neurons and p < 1:
            nxt = min(1.0, round(p + share_step, 10))
            more = _shared(coarse, nxt)
            if len(more) < min_neurons:
                break  # the next step would leave too few: truncate instead
            p, kept = nxt, more
    ranked = sorted(kept, key=lambda u: (-float(mean[u]), u))[:max_neurons]
    return Selection([(layers[l], i) for l, i in ranked], [float(mean[u]) for u in ranked], p,
                     [len(s) for s in coarse])


# ---------------------------------------------------------------------------------- edit
def neuron_deltas(lm: LM, neurons: Sequence[tuple[int, int]], signs: Sequence[float], e_old: torch.Tensor,
                  e_new: torch.Tensor, lambda_erase: float, lambda_enhance: float) -> dict[str, torch.Tensor]:
    """Dense deltas of the MLP output projections (parameter name -> tensor in the parameter's own
    layout and dtype) that change only the kept units' columns:
    Δw_i = s_i·(−λ1 (‖w_i‖/‖e_old‖) e_old + λ2 (‖w_i‖/‖e_new‖) e_new)."""
    e_old = e_old.detach().float().cpu()
    e_new = e_new.detach().float().cpu()
    u_old = e_old / e_old.norm().clamp(min=1e-12)
    u_new = e_new / e_new.norm().clamp(min=1e-12)
    by_layer: dict[int, list[tuple[int, float]]] = {}
    for (layer, idx), s in zip(neurons, signs):
        by_layer.setdefault(layer, []).append((idx, s))
    out: dict[str, torch.Tensor] = {}
    for layer, units in sorted(by_layer.items()):
        path = lm.arch.mlp_out_path(layer)
        weight = lm.base_module(path).weight
        w = lm.arch.as_matrix(weight.detach()).float().cpu()  # (out, in): column i is unit i's value
        d = torch.zeros_like(w)
        for idx, s in units:
            norm = w[:, idx].norm()
            d[:, idx] = s * norm * (lambda_enhance * u_new - lambda_erase * u_old)
        out[lm.param_name(path)] = lm.arch.from_matrix(d).to(weight.dtype)
    return out


@dataclass
class Divergence:
    """Where an edit's old and new answers part: after `shared` answer tokens (0 when their first tokens
    differ, the paper's single-token case), the old answer continues with `old` and the new with `new`."""

    shared: int
    old: int
    new: int


def first_difference(old_ids: Sequence[int], new_ids: Sequence[int]) -> Divergence | None:
    """The first position where two answers' tokens differ; None where one begins the other."""
    k = next((j for j, (a, b) in enumerate(zip(old_ids, new_ids)) if a != b), None)
    return None if k is None else Divergence(k, int(old_ids[k]), int(new_ids[k]))


def attribution_inputs(lm: LM, prompts: Sequence[str], req: EditRequest
                       ) -> tuple[list[list[int]], list[int], Divergence | None]:
    """Per prompt (the edit prompt first), where its old answer (`target_true`, or when that is None the
    model's greedy answer, read under teacher forcing of the new one) and the new answer part: the prompt's
    ids followed by the answer tokens they share, and the old answer's token there (y*, whose probability
    integrated gradients attribute). A paraphrase whose answers never part is left out. Returns
    (sequences, y*, the edit prompt's divergence: None when it has none, and then nothing is kept)."""
    greedy = lm.score(list(prompts), [req.target_new] * len(prompts)) if req.target_true is None else None
    seqs: list[list[int]] = []
    olds: list[int] = []
    first: Divergence | None = None
    for n, p in enumerate(prompts):
        p_ids, new_ids = lm.encode_pair(p, req.target_new)
        old_ids = lm.encode_pair(p, req.target_true)[1] if req.target_true is not None \
            else list(greedy[n].argmax_ids)  # type: ignore[index]
        at = first_difference(old_ids, new_ids)
        if n == 0:
            if at is None:
                return [], [], None
            first = at
        if at is None:
            continue
        seqs.append(list(p_ids) + list(new_ids[: at.shared]))
        olds.append(at.old)
    return seqs, olds, first


class KNEditor(Editor):
    name = "kn"
    hparams_cls = KNHparams
    supports_batch = False

    def compute_deltas(self, lm: LM, requests: list[EditRequest], hp: KNHparams) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        req = requests[0]
        prompts = [req.prompt]
        if hp.use_paraphrases:
            prompts += [p for p, _ in req.paraphrases if p not in prompts]
        seqs, old_ids, at = attribution_inputs(lm, prompts, req)
        if at is None:  # the erase and enhance terms would be one token: nothing would change
            why = (f"the model already answers {req.target_new!r}" if req.target_true is None else
                   f"{req.target_new!r} and {req.target_true!r} have none: one begins the other")
            raise EditRequestError(
                f"KN edits the first answer token where the old and new answers differ, and {why}; KN cannot "
                "write this fact, use another method")
        new_id = at.new
        with flush_denormals():  # a model broken by many edits makes subnormals, ~8x slower (numerics.py)
            ig = integrated_gradients(lm, seqs, old_ids, hp.layers, hp.ig_steps, hp.batch_size)
        sel = select_neurons(ig.attr, hp.layers, hp.adaptive_threshold, hp.share_ratio, hp.share_step,
                             hp.min_neurons, hp.max_neurons)
        if not sel.neurons:
            raise EditlabError(
                f"KN found no knowledge neuron for {req.prompt!r} -> {req.target_true!r}: no unit of layers "
                f"{hp.layers} has a positive attribution (P(answer) = {[round(float(x), 4) for x in ig.prob]}); "
                "the model may not know the fact, or try other layers")
        layer_pos = {l: i for i, l in enumerate(hp.layers)}
        mean_act = ig.act.mean(0)
        acts = [float(mean_act[layer_pos[l], i]) for l, i in sel.neurons]
        signs = [(-1.0 if a < 0 else 1.0) if hp.sign_aware else 1.0 for a in acts]
        emb = lm.module(lm.arch.lm_head).weight
        deltas = neuron_deltas(lm, sel.neurons, signs, emb[old_ids[0]], emb[new_id], hp.lambda_erase,
                               hp.lambda_enhance)
        info = {
            "neurons": [[l, i] for l, i in sel.neurons],
            "attribution": sel.scores,
            "activation": acts,
            "signs": signs,
            "share_ratio_used": sel.share_ratio,
            "coarse_sizes": sel.coarse_sizes,
            "prompts": len(seqs),
            "shared_answer_tokens": at.shared,
            "p_old": [float(x) for x in ig.prob],
            "old_token": old_ids[0],
            "new_token": new_id,
        }
        return deltas, info
