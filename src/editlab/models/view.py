"""`LMView`: an edited *system* that answers the LM calls differently without touching weights.

Parameter-preserving methods that change prompts or route queries (IKE's demonstrations, SERAC's
router, MeLLo's memory loop, DeepEdit's constrained decoding) return a view; `edit.lm` is that view, and
every metric scores it through the same calls it uses for a weight-edited model: `score` / `logprobs`,
`next_token_logprobs`, `generate` / `generate_ids` and `sequence_logprobs`. Anything a view does not
override is answered by the system below it (`inner`: the LM or the view of the edit underneath).
View classes register in `VIEWS` so saved edits can name them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import EditMismatchError
from ..registry import Registry, lazy


class LMView:
    """Delegates every LM call and attribute to `inner`; subclasses override what they change."""

    def __init__(self, inner: Any, config: dict[str, Any] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.inner = inner
        self.config = dict(config or {})
        self.tensors = dict(tensors or {})

    @property
    def base(self) -> Any:
        """The underlying `LM` (below every view)."""
        inner = self.inner
        while isinstance(inner, LMView):
            inner = inner.inner
        return inner

    def __getattr__(self, name: str) -> Any:
        # only called for attributes not found on the view itself
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[Any]:
        return self.inner.score(prompts, continuations)

    def logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[torch.Tensor]:
        return [s.logprobs for s in self.score(prompts, continuations)]

    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.inner.next_token_logprobs(prompts)

    def generate_ids(self, prompts: Sequence[str], max_new_tokens: int = 20, **kw: Any) -> list[list[int]]:
        return self.inner.generate_ids(prompts, max_new_tokens, **kw)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 20, **kw: Any) -> list[str]:
        from .lm import cut_at_stop

        texts = [self.base.tokenizer.decode(t, skip_special_tokens=True)
                 for t in self.generate_ids(prompts, max_new_tokens, **kw)]
        stop = kw.get("stop") or ()
        return [cut_at_stop(t, stop) for t in texts] if stop else texts

    def sequence_logprobs(self, windows: Sequence[Sequence[int]], prefix_ids: Sequence[int] = ()) -> list[torch.Tensor]:
        return self.inner.sequence_logprobs(windows, prefix_ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"


class PrefixView(LMView):
    """Puts a fixed text before every prompt (config: {"prefix": str}). The base of in-context editing:
    the continuation is scored and generated after prefix + prompt; raw token windows (perplexity)
    are read with the prefix's tokens as context."""

    def __init__(self, inner: Any, config: dict[str, Any] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(inner, config, tensors)
        if not isinstance(self.config.get("prefix"), str):
            raise EditMismatchError("prefix view needs a string 'prefix' in its config")
        self.prefix: str = self.config["prefix"]

    def _wrap(self, prompts: Sequence[str]) -> list[str]:
        return [self.prefix + p for p in prompts]

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[Any]:
        return self.inner.score(self._wrap(prompts), continuations)

    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.inner.next_token_logprobs(self._wrap(prompts))

    def generate_ids(self, prompts: Sequence[str], max_new_tokens: int = 20, **kw: Any) -> list[list[int]]:
        return self.inner.generate_ids(self._wrap(prompts), max_new_tokens, **kw)

    def sequence_logprobs(self, windows: Sequence[Sequence[int]], prefix_ids: Sequence[int] = ()) -> list[torch.Tensor]:
        ctx = self.base.tokenizer(self.prefix, add_special_tokens=False)["input_ids"]
        return self.inner.sequence_logprobs(windows, list(ctx) + list(prefix_ids))


VIEWS: Registry[type[LMView]] = Registry("LM view", EditMismatchError)
VIEWS.register("prefix", "a fixed text put before every prompt (in-context editing's base)", lambda: PrefixView)
VIEWS.register("ike", "IKE: retrieved demonstrations and the new fact(s) put before each prompt",
               lazy("editlab.methods.memory.ike:IKEView"))
VIEWS.register("serac", "SERAC: a scope classifier routes each prompt to the base model or to the in-context counterfactual",
               lazy("editlab.methods.memory.serac:SERACView"))
VIEWS.register("mello", "MeLLo: multi-hop questions answered by decomposition with retrieved edited facts",
               lazy("editlab.methods.memory.mello:MeLLoView"))
VIEWS.register("deepedit", "DeepEdit: multi-hop reasoning as depth-first decoding constrained by retrieved edited facts",
               lazy("editlab.methods.memory.deepedit:DeepEditView"))
