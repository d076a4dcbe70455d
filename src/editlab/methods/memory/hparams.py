"""Hyper-parameters of the memory and in-context methods (IKE, SERAC, MeLLo, DeepEdit), with the settings
they share, torch-free so that the CLI checks `--set` before torch is imported. Each method module
re-exports its class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...errors import HparamsError
from ...requests import _context_limit
from ..hparams import Hparams, warn_if_evaluation_data
from .prompting import check_chat

if TYPE_CHECKING:
    from ...models.lm import LM


DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


def check_threshold(value: float, name: str = "threshold") -> float:
    """A cosine-similarity threshold must be a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise HparamsError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


HOP_TOKENS = 16  # greedy tokens for one hop's answer (MQuAKE's answers are at most 6 SmolLM2 tokens)


# ------------------------------------------------------------------------------------ the editor
@dataclass
class IKEHparams(Hparams):
    """`pool`: dataset name or file of demonstration facts (a training split; "builtin" for a small
    one); `pool_size`: its first N records (0 = all); `n_demos`: demonstrations per fact (the paper's
    k = 32, scaled down for short contexts); `ratio`: copy : update : retain; `facts_per_query`: edited
    facts stated per prompt; `scope_threshold`: cosine below which a prompt gets no context (0 = off);
    `max_context_tokens`: cap below the model's context (0 = the model's); `embedder`: sentence encoder;
    `chat`: the context as the user's turn of the model's chat template, the prompt opening the
    assistant's (instruction models; methods/memory/prompting.py)."""

    pool: str = "counterfact-train"
    pool_size: int = 0
    n_demos: int = 32
    ratio: list[int] = field(default_factory=lambda: [4, 12, 16])
    facts_per_query: int = 1
    scope_threshold: float = 0.0
    max_context_tokens: int = 0
    seed: int = 0
    embedder: str = DEFAULT_EMBEDDER
    chat: bool = False

    @classmethod
    def defaults_for(cls, lm: LM) -> dict[str, Any]:
        limit = _context_limit(lm)
        return {"n_demos": 32 if limit is None else max(0, min(32, limit // 64))}

    def validate(self, lm: LM) -> None:
        if not isinstance(self.pool, str) or not self.pool.strip():
            raise HparamsError("pool must name a dataset or a file of demonstration facts")
        warn_if_evaluation_data("IKE's demonstration pool", [self.pool])
        for name in ("pool_size", "n_demos", "max_context_tokens"):
            if getattr(self, name) < 0:
                raise HparamsError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_demos > 1000:
            raise HparamsError(f"n_demos={self.n_demos} is out of range (0..1000)")
        if self.facts_per_query < 1:
            raise HparamsError(f"facts_per_query must be >= 1, got {self.facts_per_query}")
        if len(self.ratio) != 3 or any(type(w) is not int or w < 0 for w in self.ratio) or sum(self.ratio) == 0:
            raise HparamsError(f"ratio must be three non-negative integers (copy, update, retain), not all 0; got {self.ratio}")
        check_threshold(self.scope_threshold, "scope_threshold")
        if not isinstance(self.embedder, str) or not self.embedder.strip():
            raise HparamsError("embedder must name a sentence encoder")
        check_chat(lm, self.chat)


SCOPES = ("learned", "cosine")


# ------------------------------------------------------------------------------------ the editor
@dataclass
class SERACHparams(Hparams):
    """`scope`: "learned" (trained head) or "cosine" (route when the cosine to an edit's prompt reaches
    `threshold`); `threshold`: p(in scope) (learned) or cosine (cosine) at which a prompt is routed, in
    [0, 1]; `k`: candidate edits scored per prompt; `train_data`: training splits for the head (never
    evaluation records); `train_records`: first N records of each (0 = all); `train_group`: edits per
    training memory; `embedder`: sentence encoder; `chat`: the statement as the user's turn of the model's
    chat template and the prompt opening the assistant's (instruction models; methods/memory/prompting.py)."""

    scope: str = "learned"
    threshold: float = 0.5
    k: int = 5
    train_data: list[str] = field(default_factory=lambda: ["counterfact-train", "zsre-train"])
    train_records: int = 1000
    train_group: int = 200
    embedder: str = DEFAULT_EMBEDDER
    chat: bool = False

    def validate(self, lm: LM) -> None:
        self._check_choice("scope", self.scope, SCOPES)
        check_threshold(self.threshold)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= 1000:
            raise HparamsError(f"k must be an integer in 1..1000, got {self.k!r}")
        if self.scope == "learned":
            if not isinstance(self.train_data, list) or not self.train_data or not all(
                    isinstance(d, str) and d.strip() for d in self.train_data):
                raise HparamsError(f"train_data must be a non-empty list of dataset names or files, got {self.train_data!r}")
            warn_if_evaluation_data("SERAC's scope-head train_data", self.train_data)
            if self.train_records < 0:
                raise HparamsError(f"train_records must be >= 0 (0 = all), got {self.train_records}")
            if self.train_group < 2:
                raise HparamsError(f"train_group must be >= 2 (edits per training memory), got {self.train_group}")
        if not isinstance(self.embedder, str) or not self.embedder.strip():
            raise HparamsError("embedder must name a sentence encoder")
        check_chat(lm, self.chat)


MODES = ("loop", "oracle")


# ------------------------------------------------------------------------------------ the editors
@dataclass
class MeLLoHparams(Hparams):
    """`decompose`: "loop" (the LM writes sub-questions) or "oracle" (the question's relation chain);
    `k`: facts retrieved per sub-question; `max_hops`: sub-questions looked up per question (one more
    round may give the final answer); `max_new_tokens`: tokens per round; `hop_tokens`: tokens of one
    oracle hop's LM answer; `scope_threshold`: cosine from which plain LM calls get the retrieved fact
    (0.6: 86 % of CounterFact-train paraphrases in scope, 9 % of neighbour prompts against 150 facts);
    `prompts_dir`: folder of MQuAKE's prompt files ("" = the benchmark data's); `embedder`: sentence
    encoder (the paper's Contriever is not shipped; all-MiniLM-L6-v2 is)."""

    decompose: str = "loop"
    k: int = 1
    max_hops: int = 4
    max_new_tokens: int = 256
    hop_tokens: int = HOP_TOKENS
    scope_threshold: float = 0.6
    prompts_dir: str = ""
    embedder: str = DEFAULT_EMBEDDER

    def validate(self, lm: LM) -> None:
        self._check_choice("decompose", self.decompose, MODES)
        for name, top in (("k", 100), ("max_hops", 32), ("max_new_tokens", 4096), ("hop_tokens", 256)):
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= top:
                raise HparamsError(f"{name} must be an integer in 1..{top}, got {value!r}")
        check_threshold(self.scope_threshold, "scope_threshold")
        if not isinstance(self.prompts_dir, str):
            raise HparamsError("prompts_dir must be a folder path (or empty for the benchmark data's)")
        if not isinstance(self.embedder, str) or not self.embedder.strip():
            raise HparamsError("embedder must name a sentence encoder")


@dataclass
class MeLLoOracleHparams(MeLLoHparams):
    decompose: str = "oracle"


CONSTRAINTS = ("lm", "symbolic")


# ------------------------------------------------------------------------------------ the editors
@dataclass
class DeepEditHparams(Hparams):
    """`constraints`: "lm" (the LM writes and judges steps) or "symbolic" (plan + relation-keyed facts);
    `max_depth`: states this deep are pruned (the reference's 9); `max_calls`: LM prompts per question;
    `top_k`: facts retrieved per step (reference 2); `hop_tokens`: tokens of a hop answer (symbolic);
    `threshold`: cosine at which a single-hop prompt gets the retrieved fact stated; `relation_prompts`:
    folder of MQuAKE's prompt files ("" = the benchmark data's); `embedder`: sentence encoder."""

    constraints: str = "lm"
    max_depth: int = 9
    max_calls: int = 60
    top_k: int = 2
    hop_tokens: int = HOP_TOKENS
    threshold: float = 0.5  # MiniLM cosine to the own fact, same 30 records: prompts >= 0.72, paraphrases
    # 0.48-0.85 (10th percentile 0.57), neighbourhood prompts 0.01-0.59 (90th percentile 0.47)
    relation_prompts: str = ""
    embedder: str = DEFAULT_EMBEDDER

    def validate(self, lm: LM) -> None:
        self._check_choice("constraints", self.constraints, CONSTRAINTS)
        for name, low, high in (("max_depth", 1, 100), ("max_calls", 1, 100_000), ("top_k", 1, 100),
                                ("hop_tokens", 1, 512)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise HparamsError(f"{name} must be an integer in {low}..{high}, got {value!r}")
        check_threshold(self.threshold, "threshold")
        if not isinstance(self.embedder, str) or not self.embedder.strip():
            raise HparamsError("embedder must name a sentence encoder")
        if not isinstance(self.relation_prompts, str):
            raise HparamsError("relation_prompts must be a folder path or ''")


@dataclass
class DeepEditSymbolicHparams(DeepEditHparams):
    constraints: str = "symbolic"
