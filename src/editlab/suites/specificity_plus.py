"""`specificity-plus` (alias `cfplus`): CounterFact+ (Hoelscher-Obermaier et al. 2023).

Neighbourhood score asks whether prompts about *other* subjects of the same relation still prefer
their true object to the edit's new one. CounterFact+ adds the edit statement in front of each
neighbour prompt ("Spike Hughes originates from Philadelphia. Max Mosley originates from"): an edit
that fires on the new object's mere presence in context, rather than on its subject, fails there.
It also measures the shift of the whole next-token distribution on those prompts (NKL).

Per record (`counterfact/counterfact_distracting_neighbor.json`), unedited model θ then edited θ':
- ES, PS: rewrite / paraphrase prompts with g(new) > g(true) (for Score, Score+).
- NS, NS+: mean over the 10 neighbour / 10 distracting prompts of 1[g(true|x) > g(new|x)];
  NM, NM+: mean of g(true|x) − g(new|x).
- NKL, NKL+: mean over the prompts of KL(q_θ'(·|x) ‖ q_θ(·|x)) in nats over the whole vocabulary (the
  first next token); NKL_repo / NKL+_repo divide by |V| as the reference code does (its `batchmean` on a
  1-D vector, pitfall P2 in the spec).
Dataset: means, plus Score = harmonic mean of ES, PS, NS and Score+ = the same with NS+.

The unedited row holds ES, PS, NS, NS+, NM, NM+, Score, Score+ on θ. NS+ on θ is not NS on θ: the
prefix lifts the new object for the unedited model too (case 4482: 60-fold), so NS+ is read against its
own unedited value. The reference matched pre- and post-edit passes by file position; rows here are keyed
by case_id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..data.io import read_records
from ..requests import EditRequest
from .base import Editing, RecordFieldError, Suite, Unit, collect_units, field_at, text_at, texts_at
from .scoring import harmonic_mean, mean_token_probs, neighbourhood_scores


def next_token_kl(post_logprobs: torch.Tensor, pre_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(q_post ‖ q_pre) in nats per row of two [n, V] log-probability tensors."""
    post = post_logprobs.double()
    return (post.exp() * (post - pre_logprobs.double())).sum(-1)


class SpecificityPlus(Suite):
    name = "specificity-plus"
    description = "CounterFact+: NS with the edit statement prefixed (NS+) and neighbourhood KL"
    files = {"cfplus": "counterfact/counterfact_distracting_neighbor.json"}
    metrics = ("ES", "PS", "NS", "NS+", "NM", "NM+", "NKL", "NKL+", "NKL_repo", "NKL+_repo", "Score", "Score+")
    protocol = "single edit per record: score θ, edit, score θ', restore (spec section 2.4)"

    def load(self, root: Path, limit: int | None = None, *, on_bad: str = "stop") -> list[Unit]:
        path = self.data_paths(root)["cfplus"]
        return collect_units(list(enumerate(read_records(path))), self._parse, path=path, limit=limit, on_bad=on_bad)

    @staticmethod
    def _parse(i: int, rec: Any, where: str) -> Unit:
        rw = field_at(rec, "requested_rewrite", where)
        template = text_at(rw, "prompt", where + " requested_rewrite")
        subject = text_at(rw, "subject", where + " requested_rewrite")
        new = text_at(rw, "target_new.str", where + " requested_rewrite")
        true = text_at(rw, "target_true.str", where + " requested_rewrite")
        if "{}" not in template:
            raise RecordFieldError(f"{where}: requested_rewrite.prompt {template!r} has no '{{}}' for the subject")
        neigh = texts_at(rec, "neighborhood_prompts", where)
        distract = texts_at(rec, "distracting_neighborhood_prompts", where)
        paraphrases = texts_at(rec, "paraphrase_prompts", where)  # PS, Score and Score+ need them
        case = rec.get("case_id", i)
        request = EditRequest.create(prompt=template.format(subject), subject=subject, target_new=new, target_true=true,
                                     case_id=str(case))
        return Unit(key=f"cfplus:{case}", split="cfplus",
                    data={"request": request, "paraphrases": paraphrases, "neighbour": neigh, "distracting": distract})

    @staticmethod
    def _score(system: Any, data: dict[str, Any]) -> tuple[dict[str, float], torch.Tensor]:
        req: EditRequest = data["request"]
        groups = {"rewrite": [req.prompt], "paraphrase": data["paraphrases"], "neighbour": data["neighbour"],
                  "distracting": data["distracting"]}
        prompts: list[str] = []
        targets: list[str] = []
        for ps in groups.values():
            for p in ps:
                prompts += [p, p]
                targets += [req.target_new, req.target_true or ""]
        g = mean_token_probs(system, prompts, targets)
        out: dict[str, float] = {}
        at = 0
        for name, ps in groups.items():
            g_new, g_true = g[at : at + 2 * len(ps) : 2], g[at + 1 : at + 2 * len(ps) : 2]
            at += 2 * len(ps)
            if not ps:
                continue
            if name in ("rewrite", "paraphrase"):
                out["ES" if name == "rewrite" else "PS"] = sum(n > t for n, t in zip(g_new, g_true)) / len(ps)
            else:
                ns, nm = neighbourhood_scores(g_true, g_new)
                suffix = "" if name == "neighbour" else "+"
                out["NS" + suffix], out["NM" + suffix] = ns, nm
        dists = system.next_token_logprobs(data["neighbour"] + data["distracting"])
        return out, dists

    def unedited(self, lm: Any, unit: Unit) -> tuple[dict[str, float], Any]:
        return self._score(lm, unit.data)

    def edited(self, editing: Editing, unit: Unit, state: Any) -> dict[str, float]:
        editing.push([unit.data["request"]])
        out, post = self._score(editing.system, unit.data)
        kl = next_token_kl(post, state)
        n = len(unit.data["neighbour"])
        vocab = post.shape[-1]
        out["NKL"] = float(kl[:n].mean())
        out["NKL+"] = float(kl[n:].mean())
        out["NKL_repo"] = out["NKL"] / vocab
        out["NKL+_repo"] = out["NKL+"] / vocab
        return out

    def summarize(self, rows: Sequence[dict[str, float]]) -> dict[str, float]:
        out = super().summarize(rows)
        if all(k in out for k in ("ES", "PS", "NS")):
            out["Score"] = harmonic_mean(out[k] for k in ("ES", "PS", "NS"))
            if "NS+" in out:
                out["Score+"] = harmonic_mean(out[k] for k in ("ES", "PS", "NS", "NS+"))
        return out


__all__ = ["SpecificityPlus", "neighbourhood_scores", "next_token_kl"]
