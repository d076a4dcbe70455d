"""Writing a batch of target hidden states into several MLP layers: the scheme MEMIT introduced and that
EMMET, AlphaEdit and PMET reuse. MEMIT, EMMET and AlphaEdit differ only in the solve at each layer; PMET
targets the last layer's MLP output instead of its block output and spreads by √(layers left).

For requests i with target hidden states z_i at the output of the last edited block L (found by the
shared value optimisation), the layers l₁ < … < l_R are edited in order. At layer l_j:

- keys K [n, in] are the inputs of the MLP output projection at the subject's last token, averaged
  within each template group and then across groups (the bare prompt is its own group);
- the residual is R = (z − h_L) / (R − j), with h_L the output of block L at the bare prompt measured
  with the weights as updated so far: each layer writes its share of what is still missing;
- a method-specific `LayerSolver` returns ΔW_l (out, in) from (K, R), which is added before the next
  layer's keys are measured.

The model is left exactly as it was: the updates are undone at the end and returned as deltas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...errors import HparamsError
from ...models.lm import LM
from ...requests import EditRequest
from .hparams import MultiLayerHparams, parse_template_groups
from .shared import (
    capture_at_subject,
    context_templates,
    group_mean,
    optimize_values,
    refuse_post_mlp_norm,
)

# (layer, keys [n, in] float64, residuals [n, out] float64) -> ΔW [out, in] float64
LayerSolver = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]



@dataclass
class SpreadResult:
    deltas: dict[str, torch.Tensor]  # parameter name -> ΔW in the parameter's layout (CPU)
    info: dict[str, Any]
    final_keys: dict[int, torch.Tensor] | None  # layer -> keys [n, in] measured with every update in place


def spread_over_layers(lm: LM, requests: list[EditRequest], hp: MultiLayerHparams, solve: LayerSolver,
                       method: str, *, final_keys: bool = False) -> SpreadResult:
    """Optimise the targets at the last layer's block output, then write them into `hp.layers` with
    `solve` (see the module docstring). With `final_keys`, also measure each layer's keys once every
    layer is updated (AlphaEdit adds those to the keys it protects in later edits)."""
    refuse_post_mlp_norm(lm, method)
    templates, sizes = template_set(lm, hp)
    last = lm.arch.block_path(hp.layers[-1])
    delta, h_init, info = optimize_values(lm, requests, templates, last, hp.value_config())
    return write_targets(lm, requests, hp, templates, sizes, h_init + delta, last, solve, method, info,
                         final_keys=final_keys)


def template_set(lm: LM, hp: MultiLayerHparams) -> tuple[list[str], list[int]]:
    """The context templates (bare prompt first) and their group sizes, for keys' group averaging."""
    groups = context_templates(lm, parse_template_groups(hp.context_templates), hp.seed)
    return [t for g in groups for t in g], [len(g) for g in groups]


def write_targets(lm: LM, requests: list[EditRequest], hp: MultiLayerHparams, templates: list[str],
                  sizes: list[int], target: torch.Tensor, target_path: str, solve: LayerSolver, method: str,
                  info: dict[str, Any], *, final_keys: bool = False, spread: str = "linear") -> SpreadResult:
    """Write `target` [n, d] (wanted output of `target_path` at the bare prompts' last subject token)
    into the MLP output projections of `hp.layers`, first to last. At the i-th layer the residual is
    (target − current output) / (layers left), or / √(layers left) with `spread="sqrt"` (PMET)."""
    z = target.double()
    last = target_path
    names = {l: lm.param_name(lm.arch.mlp_out_path(l)) for l in hp.layers}
    params = {l: lm.model.get_parameter(names[l]) for l in hp.layers}
    originals = {l: p.detach().clone() for l, p in params.items()}
    totals: dict[str, torch.Tensor] = {}
    after: dict[int, torch.Tensor] | None = None
    try:
        for i, l in enumerate(hp.layers):
            kpath = lm.arch.mlp_out_path(l)
            # one pass for both: keys over all templates, current h_L at the bare prompt (template 0)
            got = capture_at_subject(lm, requests, templates, {kpath: "in", last: "out"})
            keys, cur = group_mean(got[kpath], sizes).double(), got[last][:, 0].double()
            left = len(hp.layers) - i
            resid = (z - cur) / (left ** 0.5 if spread == "sqrt" else left)
            upd = solve(l, keys, resid)
            if not torch.isfinite(upd).all():
                raise HparamsError(f"{method}: the update at layer {l} is not finite; the solve is ill-conditioned "
                                   "for these hyper-parameters (raise the regularisation)")
            d = lm.arch.from_matrix(upd.to(params[l].dtype))
            with torch.no_grad():
                params[l].add_(d.to(params[l].device))
            totals[names[l]] = d.cpu()
        if final_keys:
            paths = {lm.arch.mlp_out_path(l): "in" for l in hp.layers}
            got = capture_at_subject(lm, requests, templates, paths)
            after = {l: group_mean(got[lm.arch.mlp_out_path(l)], sizes).double().cpu() for l in hp.layers}
        with torch.no_grad():
            cur = capture_at_subject(lm, requests, templates[:1], {last: "out"})[last][:, 0].double()
        info = {**info, "templates": len(templates),
                "target_error": float(((z - cur).norm(dim=-1) / z.norm(dim=-1).clamp(min=1e-9)).mean())}
    finally:
        with torch.no_grad():
            for l, p in params.items():
                p.copy_(originals[l])
    return SpreadResult(totals, info, after)
