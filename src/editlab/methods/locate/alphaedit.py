"""AlphaEdit: null-space constrained knowledge editing (Fang et al., 2025).

A MEMIT-style update (targets and layer spreading from `spread.py`) projected onto the null space of the
keys the model must keep mapping as before, so that their outputs cannot move:

    E[k kᵀ] = U Λ Uᵀ,   P = Û Ûᵀ  (Û: eigenvectors spanning the "null space" of the preserved keys)
    Δ = (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K Rᵀ,   ΔW = Δᵀ

with K the template-averaged keys of this batch (columns), R its spread residuals and K_p the keys of
the earlier edits in the same sequence (so a new edit also leaves those where they were). Because
(P M + αI)⁻¹ P = P (M P + αI)⁻¹, ΔW = (…) P: ΔW k = 0 exactly for every k with P k = 0.

The null space:
- `null_space="threshold"` (the paper): eigenvalues of E[kkᵀ] below `nullspace_threshold` (2e-2). The
  threshold is absolute: on SmolLM2-135M 1,023–1,352 of 1,536 eigenvalues fall below it and they carry
  20–48 % of the key energy (method cards §2), so the paper's threshold protects little there.
- `null_space="energy"`: the directions left after the top eigenvectors that hold `null_space_energy` of
  the trace, which means the same on every model. The dimension is reported in the edit's info.
`l2_mode="relative"` scales α by tr(P K Kᵀ)/n (α is absolute in the paper, hence scale-dependent).

`l2_mode="relative"` keeps the ratio between fit and regularisation fixed, but then ‖ΔW‖ grows as the
keys' reach into the null space ‖P k‖/‖k‖ shrinks; that reach is reported per layer and request in
`info["solve"][layer]["key_reach"]` (the paper's absolute α bounds ‖ΔW‖ instead).

Sequential editing: with `apply(..., on=previous)` the keys of `previous` and of the chain of edits it
extends (each records the edit it was applied on, `info["extends"]`) are K_p; an AlphaEdit edit applied
without `on=` starts a new chain. Each edit stores the keys of its requests, measured with its own update
in place (as the reference accumulates them), as a `SolverState`; restoring an edit forgets them too.
The running Σ K_pᵀK_p of the newest chain is kept with the LM, so each edit adds one Gram update.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import HparamsError
from ...models.lm import LM
from ...requests import EditRequest
from ...stats import second_moments
from ..base import Editor
from .shared import PreparesContextTemplates
from ..edit import Edit
from ..patches import Patch, SolverState, WeightDelta
from .hparams import L2_MODES, NULL_SPACE_MODES, AlphaEditHparams  # noqa: F401 (re-exported)
from .spread import spread_over_layers

STATE = "alphaedit.keys"



def null_space_projector(cov: torch.Tensor, mode: str, threshold: float, energy: float) -> torch.Tensor:
    """P = Û Ûᵀ (float64) over the eigenvectors of the symmetric `cov` that the preserved keys barely use:
    eigenvalue < `threshold` ('threshold'), or outside the top eigenvectors holding `energy` of the
    trace ('energy')."""
    vals, vecs = torch.linalg.eigh(cov.double())  # ascending
    if mode == "threshold":
        null = vals < threshold
    else:
        vals = vals.clamp(min=0)
        cum = torch.cumsum(vals, 0)  # energy of the smallest eigenvalues
        null = cum <= (1 - energy) * cum[-1]
    u = vecs[:, null]
    return u @ u.T


def projector(lm: LM, layer: int, cov: torch.Tensor, hp: AlphaEditHparams) -> torch.Tensor:
    """The layer's projector, computed once per (statistics, null-space setting) for this LM (the
    statistics are always the base model's). A null space of dimension 0 would make every edit a no-op
    (absolute α) or a singular solve (relative α), so it is refused."""
    value = hp.nullspace_threshold if hp.null_space == "threshold" else hp.null_space_energy
    key = (layer, hp.corpus, hp.mom2_n_tokens, hp.null_space, value)
    memo = lm.cache.setdefault("alphaedit_projectors", {})
    if key not in memo:
        p = null_space_projector(cov, hp.null_space, hp.nullspace_threshold, hp.null_space_energy)
        if float(torch.trace(p)) < 0.5:
            setting = (f"nullspace_threshold={hp.nullspace_threshold}" if hp.null_space == "threshold"
                       else f"null_space_energy={hp.null_space_energy}")
            raise HparamsError(f"AlphaEdit: {setting} leaves no null space at layer {layer} (every direction "
                               "carries preserved keys); raise the threshold or lower the energy")
        memo[key] = p
    return memo[key]


def alphaedit_update(keys: torch.Tensor, resid: torch.Tensor, proj: torch.Tensor, prev_kk: torch.Tensor | None,
                     alpha: float, alpha_mode: str = "absolute") -> tuple[torch.Tensor, float]:
    """ΔW (out, in) = [(P (Kᵀ K + K_pᵀ K_p) + α I)⁻¹ P Kᵀ R]ᵀ for keys K [n, in] and residuals R [n, out]
    (rows = requests); `prev_kk` = K_pᵀ K_p of the earlier edits. Float64. Returns (ΔW, α used)."""
    k, r, p = keys.double(), resid.double(), proj.double()
    kk = k.T @ k
    if prev_kk is not None:
        kk = kk + prev_kk.double()
    a = alpha * (float(((k @ p) * k).sum()) / k.shape[0] if alpha_mode == "relative" else 1.0)  # tr(P KᵀK)/n
    lhs = p @ kk + a * torch.eye(kk.shape[0], dtype=kk.dtype)
    return torch.linalg.solve(lhs, p @ (k.T @ r)).T, a


def _chain(on: Edit) -> list[Edit]:
    """`on` and the edits it extends, newest first: each AlphaEdit edit records the id of the edit it
    was applied `on` (`info["extends"]`), so an edit stacked without `on=` starts a new chain."""
    stack = on.base_lm.active_edits
    chain, i = [on], stack.index(on)
    while i > 0 and chain[-1].info.get("extends") == stack[i - 1].id and stack[i - 1].method == on.method:
        i -= 1
        chain.append(stack[i])
    return chain


def _keys_of(edit: Edit) -> SolverState | None:
    return next((p for p in edit.patches if isinstance(p, SolverState) and p.name == STATE), None)


def _gram(state: SolverState) -> dict[int, torch.Tensor]:
    return {int(name.split(".")[1]): k.double().T @ k.double() for name, k in state.tensors.items()}


def _add(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    return {l: a[l] + b[l] if l in a and l in b else a.get(l, b.get(l)) for l in set(a) | set(b)}


def _previous_keys(lm: LM, on: Edit | None) -> tuple[dict[int, torch.Tensor], int]:
    """(layer -> Σ Kᵀ K, number of edits) over `on` and the chain of edits it extends. The running sum
    of the newest chain is kept with the LM, so a long sequence costs one Gram update per edit."""
    if on is None:
        return {}, 0
    chain = _chain(on)
    memo = lm.cache.get("alphaedit_chain")
    top = _keys_of(on)
    if memo is not None and memo[0] is top and memo[2] == len(chain):
        return memo[1], len(chain)
    total: dict[int, torch.Tensor] = {}
    for e in chain:
        state = _keys_of(e)
        if state is not None:
            total = _add(total, _gram(state))
    return total, len(chain)


class AlphaEditEditor(PreparesContextTemplates, Editor):
    name = "alphaedit"
    hparams_cls = AlphaEditHparams
    supports_batch = True
    supports_on = True

    def compute_patches(self, lm: LM, requests: list[EditRequest], hp: AlphaEditHparams,
                        on: Edit | None) -> tuple[list[Patch], dict[str, Any]]:
        covs = second_moments(lm, hp.layers, hp.corpus, hp.mom2_n_tokens)
        prev, n_prev = _previous_keys(lm, on)
        diag: dict[str, Any] = {}

        def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
            p = projector(lm, layer, covs[layer], hp)
            upd, alpha = alphaedit_update(keys, resid, p, prev.get(layer), hp.l2, hp.l2_mode)
            k = keys.double()
            # how much of the keys the null space can reach: small values mean large updates
            reach = ((k @ p.double()).norm(dim=-1) / k.norm(dim=-1).clamp(min=1e-12)).tolist()
            diag[str(layer)] = {"null_dim": int(round(float(torch.trace(p)))), "alpha": alpha, "key_reach": reach}
            return upd

        out = spread_over_layers(lm, requests, hp, solve, "AlphaEdit", final_keys=True)
        assert out.final_keys is not None
        patches: list[Patch] = [WeightDelta(name, d) for name, d in out.deltas.items()]
        state = SolverState(STATE, {f"layer.{l}": k.float() for l, k in out.final_keys.items()})
        patches.append(state)
        lm.cache["alphaedit_chain"] = (state, _add(prev, _gram(state)), n_prev + 1)
        return patches, {**out.info, "solve": diag, "earlier_edits_protected": n_prev,
                         "extends": on.id if on is not None else None}
