"""`nkl` probe: how far the whole next-token distribution moved on prompts no edit is about.

`nkl_fixed` = mean over a fixed set of 100 unrelated prompts of KL(q_edited(.|x) || q_unedited(.|x)),
summed over the whole vocabulary, in nats (spec section 2.7; the direction is the CounterFact+ one,
`post||pre`, without the reference code's division by the vocabulary size). The prompts are the
`locality_prompt` fields of the first 100 distinct records of `counterfact/counterfact-val.json`,
a split disjoint from the edit streams (`counterfact-edit`, portability records), the same at both
budgets. `nkl_fixed_top1` is the share of those prompts whose most likely next token is unchanged.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from .base import Probe, ProbeError

N_PROMPTS = 100


class NeighbourhoodKL(Probe):
    name = "nkl"
    description = "KL(edited || unedited) of the next-token distribution on 100 fixed unrelated prompts"
    metrics: ClassVar[tuple[str, ...]] = ("nkl_fixed", "nkl_fixed_top1")
    headline: ClassVar[tuple[str, ...]] = ("nkl_fixed",)
    files = ("counterfact/counterfact-val.json",)

    def read_prompts(self) -> list[str]:
        path = self.root / self.files[0]
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ProbeError(f"probe 'nkl': cannot read {path}: {e}") from None
        prompts: list[str] = []
        for i, rec in enumerate(records if isinstance(records, list) else []):
            p = rec.get("locality_prompt") if isinstance(rec, dict) else None
            if not isinstance(p, str) or not p.strip():
                raise ProbeError(f"probe 'nkl': {path.name} record {i} has no 'locality_prompt'")
            p = p.strip()
            if p not in prompts:
                prompts.append(p)
            if len(prompts) == N_PROMPTS:
                return prompts
        raise ProbeError(f"probe 'nkl': {path.name} holds {len(prompts)} distinct locality prompts; it needs {N_PROMPTS}")

    def check(self) -> None:
        super().check()
        self.prompts = self.read_prompts()

    def prepare(self, lm: Any) -> None:
        self.prompts = self.read_prompts()
        self.base = lm.next_token_logprobs(self.prompts).float()

    def measure(self, system: Any, lm: Any) -> dict[str, float]:
        if system is lm and not lm.active_edits:
            return {"nkl_fixed": 0.0, "nkl_fixed_top1": 1.0}
        cur = system.next_token_logprobs(self.prompts).float()
        kl = (cur.exp() * (cur - self.base)).sum(-1).clamp_min(0.0)
        top1 = (cur.argmax(-1) == self.base.argmax(-1)).float()
        return {"nkl_fixed": float(kl.mean()), "nkl_fixed_top1": float(top1.mean())}

    def info(self) -> dict[str, Any]:
        return {**super().info(), "prompts": N_PROMPTS}
