"""Shared pieces of the multi-hop memory methods (MeLLo, DeepEdit): the question a suite asks, the answer
it gets back, MQuAKE's per-relation prompts, hop answering by the LM and symbolic fact lookup in an edit
memory.

A method whose edited system answers multi-hop questions by its own procedure (decomposition, retrieval,
search) exposes `answer_multihop(questions) -> list[MultiHopAnswer]` on its `LMView`; the MQuAKE suite
asks such a system through that call instead of its few-shot prompt (`answers_multihop`). A question
carries its text and, where the data gives it, the *plan*: the chain's first entity and the relation id
of every hop. The plan is what the "oracle decomposition" modes use (method card: SmolLM2-135M cannot
decompose questions); it names relations, never the answers of the hops.

Relation prompts come from MQuAKE's shipped files (`mquake/prompts/` of the benchmark data):
`templates_cloze_templates.json` ("[X] is a citizen of __"), `templates_question_templates.json`
("What is the country of citizenship of [X]?") and `rel-prompts.json` (eight "Q: … A: …" demonstrations
per relation, used to answer one hop by greedy generation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from ...errors import DataFormatError
from ...suites.scoring import normalize_answer
from .hparams import HOP_TOKENS
from .retriever import EditMemory

PROMPT_FILES = {"cloze": "templates_cloze_templates.json", "question": "templates_question_templates.json",
                "demos": "rel-prompts.json"}


@dataclass(frozen=True)
class MultiHopQuestion:
    """A multi-hop question; `start` and `relations` (Wikidata ids such as "P27", one per hop) are the
    plan, empty where the data gives none."""

    question: str
    start: str = ""
    relations: tuple[str, ...] = ()

    @property
    def has_plan(self) -> bool:
        return bool(self.start) and bool(self.relations)


@dataclass(frozen=True)
class MultiHopAnswer:
    """The final answer (already cut to the answer text), the entities reached hop by hop, and a
    human-readable trace of how the answer was found (prompts, generations, retrieved facts, verdicts)."""

    answer: str
    entities: tuple[str, ...] = ()
    trace: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def answers_multihop(system: Any) -> bool:
    """Whether `system` (an LM or view) itself answers multi-hop questions by its own procedure. Looked
    up on its class: a view stacked on a MeLLo view delegates unknown attributes to it, and asking the
    lower view would skip the edit on top."""
    return callable(getattr(type(system), "answer_multihop", None))


# ----------------------------------------------------------------------------- relation prompts
@dataclass(frozen=True)
class RelationPrompts:
    """Per relation id: cloze template, question template and few-shot demonstrations."""

    cloze: dict[str, str]
    question: dict[str, str]
    demos: dict[str, str]

    @classmethod
    def load(cls, folder: str | Path | None = None) -> "RelationPrompts":
        """Read the three files from `folder` (default: `mquake/prompts` in the benchmark data)."""
        return _load(str(Path(folder).expanduser()) if folder is not None else str(_default_folder()))

    def _template(self, table: dict[str, str], relation: str, kind: str) -> str:
        t = table.get(relation)
        if t is None:
            raise DataFormatError(f"no {kind} template for relation {relation!r} in MQuAKE's prompt files "
                                  f"({len(table)} relations known)")
        return t

    def cloze_for(self, relation: str, entity: str) -> str:
        """"[X] is a citizen of __" -> "Narendra Modi is a citizen of" (the blank is always last)."""
        t = self._template(self.cloze, relation, "cloze")
        return t.replace("[X]", entity).removesuffix("__").rstrip()

    def question_for(self, relation: str, entity: str) -> str:
        return self._template(self.question, relation, "question").replace("[X]", entity)

    def qa_prompt(self, relation: str, entity: str) -> str:
        """The relation's demonstrations followed by "Q: <question> A:" (the shipped "Q: … A: …" style)."""
        demos = self.demos.get(relation, "")
        head = demos.rstrip("\n") + "\n" if demos else ""
        return f"{head}Q: {self.question_for(relation, entity)} A:"


def _default_folder() -> Path:
    from ...paths import data_dir

    return data_dir() / "mquake" / "prompts"


@lru_cache(maxsize=4)
def _load(folder: str) -> RelationPrompts:
    root = Path(folder)
    tables: dict[str, dict[str, str]] = {}
    for key, name in PROMPT_FILES.items():
        path = root / name
        if not path.is_file():
            raise DataFormatError(f"{path} is missing: the multi-hop methods' relation prompts come from MQuAKE's "
                                    "prompt files (set EDITLAB_DATA to the benchmark data folder)")
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataFormatError(f"{path}: not readable JSON ({e})") from None
        if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
            raise DataFormatError(f"{path}: expected an object of relation id -> text")
        tables[key] = table
    return RelationPrompts(tables["cloze"], tables["question"], tables["demos"])


def cut_hop(text: str) -> str:
    """A generated hop answer up to its first newline or period, stripped."""
    for stop in ("\n", "."):
        text = text.split(stop, 1)[0]
    return text.strip()


def answer_hops(system: Any, prompts: RelationPrompts, pairs: Sequence[tuple[str, str]],
                max_new_tokens: int = HOP_TOKENS) -> list[str]:
    """The LM's answer to each (entity, relation) hop: greedy generation after the relation's
    demonstrations and question, cut at the first newline or period. One batched call."""
    if not pairs:
        return []
    texts = [prompts.qa_prompt(rel, ent) for ent, rel in pairs]
    return [cut_hop(t) for t in system.generate(texts, max_new_tokens, stop=("\n",))]


# ----------------------------------------------------------------------------- symbolic lookup
def same_entity(a: str, b: str) -> bool:
    """Entity names equal after SQuAD normalisation (case, punctuation, articles)."""
    na, nb = normalize_answer(a), normalize_answer(b)
    return bool(na) and na == nb


def facts_about(memory: EditMemory, entity: str, relation: str | None = None) -> list[int]:
    """Indices of the memory's facts whose triple has subject `entity` (and relation `relation` when
    given), the most recent edit first (a later edit of the same fact overrides an earlier one)."""
    out = []
    for i in range(len(memory.records) - 1, -1, -1):
        tri = memory.records[i].triple
        if tri is None or not same_entity(tri[0], entity):
            continue
        if relation is not None and tri[1] != relation:
            continue
        out.append(i)
    return out


def mentions_entity(text: str, entity: str) -> bool:
    """Whether `text` names `entity` as whole words after SQuAD normalisation."""
    ne = normalize_answer(entity)
    return bool(ne) and f" {ne} " in f" {normalize_answer(text)} "


__all__ = ["HOP_TOKENS", "MultiHopAnswer", "MultiHopQuestion", "RelationPrompts", "answer_hops", "answers_multihop",
           "cut_hop", "facts_about", "mentions_entity", "same_entity"]
