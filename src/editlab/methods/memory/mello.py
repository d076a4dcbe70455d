"""MeLLo — memory-based multi-hop editing (Zhong et al. 2023, arXiv 2305.14795) as an LM view.

No weight changes. The edited facts live in a memory (`record_for`: the statement "prompt target_new" and
the triple (subject, relation id, target_new)); the edited system answers a multi-hop question by a loop
in which the LM itself splits the question into sub-questions and checks each tentative answer against
the closest edited fact (`answer_multihop`, asked by the MQuAKE suite).

Two ways of decomposing (`decompose`):

- `"loop"` (method `mello`, the paper's procedure): the shipped few-shot prompt
  `mquake/prompts/MeLLo-prompt.txt` (read byte-exact from the benchmark data) + "\\n\\nQuestion: q\\n".
  Each round the LM continues greedily (at most `max_new_tokens`) until it writes "Retrieved fact:" or
  starts a new "\\n\\nQuestion:". A round holding "Final answer:" ends the question (the answer is the rest
  of that line). Otherwise its last "Subquestion:" line is the retrieval query: the top-`k` memory facts
  (MiniLM cosine) are appended as "Retrieved fact: <fact>.\\n" lines and the LM goes on — writing, as the
  demonstrations teach, whether the fact contradicts its "Generated answer:" and which intermediate answer
  it keeps. At most `max_hops` sub-questions are looked up; one more round may then give the final
  answer (the reference notebook's 4 calls in all allow only 3 sub-questions, so none of MQuAKE-hard's
  4-hop questions could finish there). All unfinished questions advance one round per batched
  `generate` call. A round with neither a final answer nor a sub-question (a parse failure), a question
  that reaches the hop bound, or one whose transcript no longer fits the model's context ends with the
  empty answer; each is counted (`MeLLoView.counts`, and `info["status"]` of the answer), never raised.
- `"oracle"` (method `mello-oracle`, method card section 8, for models too small to decompose): the
  question's *plan* (first entity, one relation id per hop; given by the suite, never the hop answers)
  replaces the LM's sub-questions. Hop by hop, batched across questions: a memory fact with the current
  entity as subject and the hop's relation (`facts_about`, the most recent edit first) gives the next
  entity; otherwise the LM answers the hop from MQuAKE's per-relation demonstrations (`answer_hops`).
  A question without a plan raises `DataFormatError`: falling back to the genuine loop would report
  another method's numbers under this one's name.

Plain LM calls (`score`, `next_token_logprobs`, `generate`, `sequence_logprobs`: single prompts such as
CounterFact's) follow MeLLo's single-hop step (`RetrievedFactView`): the query's last line (the whole of
a one-line prompt; the question of a few-shot prompt, with the line above a short cue such as
"Thoughts:") retrieves the top-1 edited fact and, when its cosine reaches `scope_threshold`,
"Retrieved fact: <fact>.\\n" is put right before that query; below the threshold the prompt passes
unchanged. This style, measured on CounterFact-train records 0-29 with SmolLM2-135M, is the one the
model copies most (new target preferred for 0.87 of the prompts, against 0.67 for the bare statement
"<fact>.\\n" and 0.27 without context). A fact that would push a prompt past the model's context is
left out for that prompt.

Several edits: a batch is one memory; a sequence through `on=` stores in each edit only its own facts and
its view joins the view below (one memory, one loop, whatever the length of the sequence), so each
restore removes exactly the facts of its edit. The few-shot prompts are read at question time (an edit
saved without them reloads; answering in loop mode then needs the data folder).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from ...errors import DataFormatError, EditMismatchError
from ...models.lm import LM
from ...requests import EditRequest
from ..base import Editor, Hparams
from ..edit import Edit
from ..patches import Patch, ViewPatch
from .multihop import (MultiHopAnswer, MultiHopQuestion, RelationPrompts, answer_hops, facts_about)
from .hparams import MODES, MeLLoHparams, MeLLoOracleHparams
from .retriever import EditMemory, Retriever, check_threshold, record_for
from .views import RetrievedFactView, extend_below, extension_of, fact_line

FORMAT = 1
PROMPT_FILE = "MeLLo-prompt.txt"
STOPS = ("Retrieved fact:", "\n\nQuestion:")
MIN_ROOM = 8  # fewer free context tokens than this: a round could not write a sub-question and its draft


# ------------------------------------------------------------------------------------ the few-shot prompt
def prompts_folder(folder: str = "") -> Path:
    """Where MeLLo's prompt files are: `folder`, or `mquake/prompts` of the benchmark data."""
    if folder:
        return Path(folder).expanduser()
    from ...paths import data_dir

    return data_dir() / "mquake" / "prompts"


@lru_cache(maxsize=4)
def _read_prompt(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(f"{p} is missing: MeLLo's few-shot prompt comes from MQuAKE's shipped prompt files "
                              "(set EDITLAB_DATA to the benchmark data folder, or the hyper-parameter prompts_dir)")
    try:
        return p.read_bytes().decode("utf-8")  # byte-exact: no newline translation, no strip
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{p}: cannot read as UTF-8 text ({e})") from None


def mello_prompt(folder: str = "") -> str:
    """The shipped MeLLo demonstrations, exactly as in the file."""
    return _read_prompt(str(prompts_folder(folder) / PROMPT_FILE))


def question_text(question: str) -> str:
    """What follows the demonstrations for one question."""
    return f"\n\nQuestion: {question.strip()}\n"


# ------------------------------------------------------------------------------------ parsing a round
@dataclass(frozen=True)
class Round:
    """What one generated round says: the final answer (None if it gives none), the last sub-question and
    the draft answer after it (None if absent), and the LM's checks of facts retrieved earlier as
    (verdict, intermediate answer kept) pairs."""

    final: str | None
    subquestion: str | None
    draft: str | None
    checks: tuple[tuple[str, str], ...] = ()

    @property
    def intermediates(self) -> tuple[str, ...]:
        return tuple(a for _, a in self.checks if a)


def _after(line: str, key: str) -> str:
    return line.split(key, 1)[1].strip()


def parse_round(text: str) -> Round:
    """Parse a round's generation (the text before the stop string). "Final answer:" anywhere ends the
    question with the rest of its line; otherwise the last non-empty "Subquestion:" line is the query and
    the last "Generated answer:" line after it the draft. Check lines are the model's own verdicts
    ("Retrieved fact [does not] contradict(s) ..., so the intermediate answer is: X")."""
    final = sub = draft = None
    checks: list[tuple[str, str]] = []
    for raw in text.split("\n"):
        line = raw.strip()
        if final is None and "Final answer:" in line:
            final = _after(line, "Final answer:")
        elif final is None and line.startswith("Subquestion:"):
            sub, draft = (_after(line, "Subquestion:") or None), None
        elif final is None and line.startswith("Generated answer:") and sub is not None:
            draft = _after(line, "Generated answer:")
        elif line.startswith("Retrieved fact") and "contradict" in line:
            verdict = "does not contradict" if "not contradict" in line else "contradicts"
            kept = _after(line, "intermediate answer is:").rstrip(".").strip() if "intermediate answer is:" in line else ""
            checks.append((verdict, kept))
    return Round(final, sub, draft, tuple(checks))


# ------------------------------------------------------------------------------------ the MeLLo view
@dataclass
class _Chain:
    """One question's progress through the loop."""

    question: MultiHopQuestion
    text: str  # the transcript after the demonstrations
    trace: list[str] = field(default_factory=list)
    entities: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    answer: str = ""
    status: str = ""  # "" while running; answered | parse_failure | hop_limit | context_full
    rounds: int = 0
    hops: int = 0
    pending: str = ""  # the sub-question waiting for its retrieved fact


class MeLLoView(RetrievedFactView):
    """Answers multi-hop questions by MeLLo's loop or by oracle decomposition (module docstring); plain
    LM calls get the single-hop step. Config: {"format", "decompose", "k", "max_hops", "max_new_tokens",
    "hop_tokens", "scope_threshold", "prompts_dir", "memory": EditMemory config of this edit's own facts,
    "extends": bool, "below_facts": facts of the MeLLo edit it extends}; tensors: the memory's
    embeddings. `counts` tallies how questions ended (answered, parse_failure, hop_limit, context_full,
    from_memory / from_lm hops in oracle mode) over the view's life."""

    def __init__(self, inner: Any, config: dict[str, Any] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(inner, config, tensors)
        cfg = self.config
        try:
            self.memory = self.saved_memory("MeLLo", FORMAT)
            self.decompose = str(cfg["decompose"])
            self.k = int(cfg["k"])
            self.max_hops = int(cfg["max_hops"])
            self.max_new_tokens = int(cfg["max_new_tokens"])
            self.hop_tokens = int(cfg["hop_tokens"])
            self.scope_threshold = check_threshold(float(cfg["scope_threshold"]), "scope_threshold")
            self.prompts_dir = str(cfg.get("prompts_dir", ""))
        except (KeyError, TypeError, ValueError) as e:
            raise EditMismatchError(f"MeLLo view config is malformed: {e}") from None
        if self.decompose not in MODES:
            raise EditMismatchError(f"MeLLo view: decompose {self.decompose!r} is not one of {list(MODES)}")
        if not len(self.memory):
            raise EditMismatchError("MeLLo view: the edit memory is empty")
        # An extension (`on=`) holds only its own facts: joined here to the facts of the MeLLo view below,
        # whose place it takes (one memory and one loop per question, not one per edit).
        if cfg.get("extends"):
            extend_below(self, MeLLoView, "MeLLo", ("decompose", "k", "max_hops", "max_new_tokens", "hop_tokens",
                                                   "scope_threshold", "prompts_dir"))
        self.counts: Counter[str] = Counter()

    # ---------------------------------------------------------------- multi-hop questions
    def answer_multihop(self, questions: Sequence[MultiHopQuestion]) -> list[MultiHopAnswer]:
        bad = [type(q).__name__ for q in questions if not isinstance(q, (MultiHopQuestion, str))]
        if bad:
            raise DataFormatError(f"MeLLo: a question must be a MultiHopQuestion or a string, not {bad[0]}")
        qs = [q if isinstance(q, MultiHopQuestion) else MultiHopQuestion(q) for q in questions]
        if not qs:
            return []
        return self._oracle(qs) if self.decompose == "oracle" else self._loop(qs)

    # -- the genuine loop
    def _loop(self, questions: list[MultiHopQuestion]) -> list[MultiHopAnswer]:
        demos = mello_prompt(self.prompts_dir)
        chains = [_Chain(q, question_text(q.question), [f"Question: {q.question.strip()}"]) for q in questions]
        limit = self._limit()
        while True:
            live = [c for c in chains if not c.status]
            if not live:
                break
            by_room: dict[int, list[_Chain]] = {}
            for c in live:
                room = self.max_new_tokens
                if limit is not None:
                    room = min(room, limit - len(self.base.encode_prompt(demos + c.text)))
                if room < MIN_ROOM:
                    self._end(c, "context_full", f"stopped: the transcript fills the model's context ({limit} tokens)")
                    continue
                by_room.setdefault(room, []).append(c)
            asking: list[_Chain] = []
            for room, group in by_room.items():
                gens = self.inner.generate([demos + c.text for c in group], room, stop=STOPS)
                for c, gen in zip(group, gens):
                    if self._take_round(c, gen):
                        asking.append(c)
            if asking:
                self._retrieve(asking)
        return [self._answer(c) for c in chains]

    def _take_round(self, c: _Chain, gen: str) -> bool:
        """Record round `gen` of chain `c`; True when it asks for a retrieved fact."""
        c.rounds += 1
        r = parse_round(gen)
        tag = f"[{c.rounds}]"
        for verdict, kept in r.checks:
            c.trace.append(f"{tag} verdict: the retrieved fact {verdict} the draft -> intermediate answer: {kept or '?'}")
        c.entities.extend(e for e in r.intermediates if e)
        if r.final is not None:
            c.answer = r.final
            self._end(c, "answered", f"Final answer: {r.final}")
            return False
        if r.subquestion is None:
            snippet = gen.strip().replace("\n", " | ")[:200]
            self._end(c, "parse_failure", f"{tag} parse failure: no 'Final answer:' and no 'Subquestion:' in {snippet!r}")
            return False
        c.trace.append(f"{tag} Subquestion: {r.subquestion}")
        c.trace.append(f"{tag} Generated answer: {r.draft if r.draft is not None else '(none)'}")
        if c.hops >= self.max_hops:
            self._end(c, "hop_limit", f"stopped: a sub-question after the last of max_hops={self.max_hops}")
            return False
        c.hops += 1
        c.text += gen if gen.endswith("\n") else gen.rstrip(" ") + "\n"
        c.pending = r.subquestion
        return True

    def _retrieve(self, chains: list[_Chain]) -> None:
        """The top-k facts for each chain's last sub-question (one batched search), appended."""
        queries = [c.pending for c in chains]
        hits = self.memory.search(self.retriever, queries, min(self.k, len(self.memory)))
        for c, scores, idx in zip(chains, hits.scores.tolist(), hits.indices.tolist()):
            for s, i in zip(scores, idx):
                fact = self.memory.records[i].text
                c.facts.append(fact)
                c.text += fact_line(fact)
                c.trace.append(f"[{c.rounds}] Retrieved fact (cosine {s:.2f}): {fact}")

    def _end(self, c: _Chain, status: str, line: str) -> None:
        c.status = status
        c.trace.append(line)
        self.counts[status] += 1

    @staticmethod
    def _answer(c: _Chain) -> MultiHopAnswer:
        return MultiHopAnswer(c.answer, tuple(c.entities), "\n".join(c.trace),
                              {"mode": "loop", "status": c.status, "rounds": c.rounds, "hops": c.hops,
                               "retrieved": list(c.facts)})

    # -- oracle decomposition
    def _oracle(self, questions: list[MultiHopQuestion]) -> list[MultiHopAnswer]:
        missing = [i for i, q in enumerate(questions) if not q.has_plan]
        if missing:
            raise DataFormatError(
                f"mello-oracle needs each question's plan (start entity and relation ids); question {missing[0]} "
                f"({questions[missing[0]].question[:60]!r}) has none: use method 'mello' for questions without a plan")
        prompts = RelationPrompts.load(self.prompts_dir or None)
        entity = [q.start for q in questions]
        traces = [[f"Question: {q.question.strip()}", f"plan: {q.start} -> " + " -> ".join(q.relations)]
                  for q in questions]
        paths: list[list[str]] = [[] for _ in questions]
        sources: list[list[str]] = [[] for _ in questions]
        for hop in range(max(len(q.relations) for q in questions)):
            ask: list[int] = []
            for i, q in enumerate(questions):
                if hop >= len(q.relations):
                    continue
                rel = q.relations[hop]
                found = facts_about(self.memory, entity[i], rel)
                if found:
                    fact = self.memory.records[found[0]]
                    traces[i].append(f"hop {hop + 1} ({rel}): {entity[i]} -> {fact.triple[2]}   "  # type: ignore[index]
                                     f"[memory: {fact.text}]")
                    entity[i] = fact.triple[2]  # type: ignore[index]
                    sources[i].append("memory")
                    paths[i].append(entity[i])
                    self.counts["from_memory"] += 1
                else:
                    ask.append(i)
            if ask:
                pairs = [(entity[i], questions[i].relations[hop]) for i in ask]
                got = answer_hops(self.inner, prompts, pairs, self.hop_tokens)
                for i, (ent, rel), ans in zip(ask, pairs, got):
                    traces[i].append(f"hop {hop + 1} ({rel}): {ent} -> {ans or '(empty)'}   "
                                     f"[LM: {prompts.question_for(rel, ent)}; no edited fact]")
                    entity[i] = ans
                    sources[i].append("lm")
                    paths[i].append(ans)
                    self.counts["from_lm"] += 1
        out = []
        for i, q in enumerate(questions):
            traces[i].append(f"Final answer: {entity[i]}")
            self.counts["answered"] += 1
            out.append(MultiHopAnswer(entity[i], tuple(paths[i]), "\n".join(traces[i]),
                                      {"mode": "oracle", "status": "answered", "sources": sources[i]}))
        return out



def mello_patch(requests: Sequence[EditRequest], hp: MeLLoHparams, below: MeLLoView | None = None,
                retriever: Retriever | None = None) -> ViewPatch:
    """The view patch holding `requests`' facts (and, with `below`, extending that view)."""
    records = [record_for(r) for r in requests]
    memory = EditMemory(hp.embedder)
    memory.add(records, (retriever or Retriever(hp.embedder)).embed([r.text for r in records]))
    tensors, mem_cfg = memory.state()
    config = {"format": FORMAT, "decompose": hp.decompose, "k": hp.k, "max_hops": hp.max_hops,
              "max_new_tokens": hp.max_new_tokens, "hop_tokens": hp.hop_tokens, "scope_threshold": hp.scope_threshold,
              "prompts_dir": hp.prompts_dir, "memory": mem_cfg, "extends": below is not None,
              "below_facts": len(below.memory) if below is not None else 0}
    return ViewPatch("mello", config, tensors)


class MeLLoEditor(Editor):
    """Returns one `ViewPatch("mello")`. With `on=` (the previous edit of the same method, the top of the
    stack) the new edit stores its own facts and its view joins the memory below."""

    hparams_cls: ClassVar[type[Hparams]] = MeLLoHparams
    supports_batch: ClassVar[bool] = True
    supports_on: ClassVar[bool] = True

    def compute_patches(self, lm: LM, requests: list[EditRequest], hp: MeLLoHparams, on: Edit | None
                        ) -> tuple[list[Patch], dict[str, Any]]:
        extension_of(on, MeLLoView, "MeLLo", hp.embedder)
        below = on.lm if on is not None else None
        patch = mello_patch(requests, hp, below)
        view = MeLLoView(lm.edited, patch.config, patch.tensors)  # a malformed config fails here, before install
        return [patch], {"facts": len(view.memory), "decompose": hp.decompose,
                         "with_relation": sum(r.triple is not None and r.triple[1] is not None
                                              for r in view.memory.records)}


class MeLLoOracleEditor(MeLLoEditor):
    """MeLLo with oracle decomposition (reported under its own name, method card section 8)."""

    hparams_cls: ClassVar[type[Hparams]] = MeLLoOracleHparams


__all__ = ["MeLLoEditor", "MeLLoHparams", "MeLLoOracleEditor", "MeLLoOracleHparams", "MeLLoView", "RetrievedFactView",
           "Round", "fact_line", "mello_patch", "mello_prompt", "parse_round", "question_text"]
