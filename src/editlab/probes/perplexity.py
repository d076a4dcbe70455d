"""`perplexity` probe: language-model collapse as edits accumulate (spec section 2.7).

Two texts, each tokenized once (no special tokens) and cut into consecutive 512-token windows from the
start; the loss is taken on positions 1..511 of each window and PPL = exp(token-weighted mean NLL):

- `ppl_wikitext`: WikiText-2 raw test (`wikitext/wikitext-2-raw-test.txt`), the first 8,192 tokens
  (budget quick) or 65,536 (full);
- `ppl_corpus`: the built-in Wikipedia sample that covariance statistics are computed on (the default
  corpus), the first 2,048 tokens (quick) or 16,384 (full).

`collapsed` is 1 when `ppl_wikitext` exceeds twice its unedited value (editlab's threshold, not a
paper's), else 0. Scored through the system's `sequence_logprobs`, so a weight edit and an LM view are
measured by the same code (a view reads each window after its own context: IKE's demonstrations,
SERAC's retrieved edit where in scope).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

from .base import Probe, ProbeError

WINDOW = 512
TOKENS = {"quick": {"wikitext": 8_192, "corpus": 2_048}, "full": {"wikitext": 65_536, "corpus": 16_384}}
COLLAPSE_FACTOR = 2.0


def windows_of(ids: list[int], n_tokens: int, window: int = WINDOW) -> list[list[int]]:
    """Consecutive windows of `window` tokens over the first `n_tokens` ids (a last, shorter window
    is kept if it has at least two tokens)."""
    ids = ids[:n_tokens]
    return [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]


class Perplexity(Probe):
    name = "perplexity"
    description = "WikiText-2 test and default-corpus perplexity in 512-token windows; collapse flag"
    metrics: ClassVar[tuple[str, ...]] = ("ppl_wikitext", "ppl_corpus", "collapsed")
    headline: ClassVar[tuple[str, ...]] = ("ppl_wikitext", "ppl_corpus")
    files = ("wikitext/wikitext-2-raw-test.txt",)

    def prepare(self, lm: Any) -> None:
        from ..stats import get_corpus

        sizes = TOKENS[self.budget]
        window = min(WINDOW, int(getattr(lm.config, "max_position_embeddings", WINDOW) or WINDOW))
        wiki = (self.root / self.files[0]).read_text(encoding="utf-8")
        corpus = "\n\n".join(get_corpus().texts)
        tok = lm.tokenizer
        self.windows = {}
        for metric, text, size, where in (("ppl_wikitext", wiki, sizes["wikitext"], str(self.root / self.files[0])),
                                          ("ppl_corpus", corpus, sizes["corpus"], "the default corpus")):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) < 2:
                # no window to score: a perplexity of 1.0 would read as a perfect model, never as collapse
                raise ProbeError(f"perplexity: {where} has {len(ids)} token(s); {metric} needs text to score")
            if len(ids) < size:
                warnings.warn(f"perplexity: {where} has {len(ids)} tokens, fewer than the {self.budget} budget of "
                              f"{size}; {metric} is measured on all of them", stacklevel=2)
            self.windows[metric] = windows_of(ids, size, window)
        self.window = window
        self.base = self._measure(lm)

    def _measure(self, system: Any) -> dict[str, float]:
        from ..eval.perplexity import perplexity

        return {k: perplexity(system, w) for k, w in self.windows.items()}

    def measure(self, system: Any, lm: Any) -> dict[str, float]:
        if system is lm and not lm.active_edits:
            values = dict(self.base)  # the unedited model, measured in prepare
        else:
            values = self._measure(system)
        values["collapsed"] = float(values["ppl_wikitext"] > COLLAPSE_FACTOR * self.base["ppl_wikitext"])
        return values

    def info(self) -> dict[str, Any]:
        n = {k: sum(len(w) - 1 for w in ws) for k, ws in getattr(self, "windows", {}).items()}
        return {**super().info(), "window": getattr(self, "window", WINDOW), "tokens": TOKENS[self.budget],
                "scored_tokens": n, "collapse_factor": COLLAPSE_FACTOR}
