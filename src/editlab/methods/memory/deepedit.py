"""DeepEdit (Wang et al. 2024, arXiv 2401.10471): knowledge editing as decoding with constraints, as an LM view.

A multi-hop question is answered one reasoning step at a time by a depth-first search. A search state is
(question, last entity, current entity, steps so far, depth). From a state the system proposes a step; the
step is checked against the edited facts (a conflicting fact *replaces* the step) and against the
constraints of the paper (the step must bring a new entity and continue from the current one); the
accepted candidates become children on a stack, best on top; depth `max_depth` (9) is pruned, and the
search ends when a step states the answer, whose value is then the *current entity* (the one the
constrained chain reached, not whatever the LM claims). Two ways to check the constraints:

- `constraints="lm"` (method `deepedit`): the LM writes each step (few-shot "Step:" prompt), names the
  entity a step ends on, judges yes/no whether a retrieved fact contradicts the step, and judges whether a
  step states the final answer: the four prompts of `PROMPTS`, written here (the reference repository
  has no licence). The top-`top_k` edited facts are retrieved (all-MiniLM-L6-v2 cosine) with the step
  minus its new entity as the query. A retrieved fact becomes a child when it continues from the current
  entity (mentions it and not the last one) or when the LM judges that it contradicts the step; with no
  such fact the step itself is the child. A fact's new entity is its edited object. Of a question's
  plan this mode uses only the first entity (the starting current entity).
- `constraints="symbolic"` (method `deepedit-symbolic`, card section DeepEdit 8): for models too small
  to judge (SmolLM2-135M). Steps follow the question's plan (first entity + one relation per hop, never
  the answers): the LM answers the hop after MQuAKE's relation demonstrations, and its answer to the
  bare cloze ("X is a citizen of") is the second candidate; a memory fact with the step's subject and
  relation (`facts_about`, entities matched by `same_entity`) conflicts with the step and its object
  replaces the LM's candidates (several facts on one (subject, relation), when a later edit changed it
  again, are tried most recent first). A candidate that is empty or returns to an entity already on the
  path is a dead end and the search backtracks to the next candidate. A question without a plan is
  refused (`DataFormatError`): symbolic checks have nothing to check it against.

Every question gets at most `max_calls` LM prompts; past that, or when the stack runs dry, the answer is
the current entity of the deepest state reached past the start, or empty (`info["stop"]` says which).
All questions of one `answer_multihop` call advance in lockstep, so each round of prompts is one batched
`generate` call on the system below. Decoding is greedy (temperature 0); a yes/no judgement that is neither counts as no
(the reference retries at temperature 1, which makes runs irreproducible).

Plain LM calls (`score`, `next_token_logprobs`, `generate`, `sequence_logprobs`: single prompts such as
CounterFact's cloze) get the single-hop behaviour shared with MeLLo (`views.RetrievedFactView`): the top-1 edited fact is
stated before the prompt when its cosine to the prompt reaches `threshold`; below it the prompt passes
unchanged.

Deviations from the reference notebook, all to bound cost or keep runs reproducible: one conflict judge
instead of three; the new entity is removed from the retrieval query by string deletion, not by an LM
"delete" prompt; an edited fact's new entity is its stored object, not re-extracted; the first "last
entity" is empty, not a placeholder; without a plan, the first current entity is empty; the final-answer
judge is asked from the second step on (a first step that states an answer would make the question's own
entity the answer: a small LM jumps to the answer at once).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Generator, Sequence

import torch

from ...errors import DataFormatError, EditMismatchError
from ...models.lm import LM
from ...requests import EditRequest
from ..base import Editor, Hparams
from ..edit import Edit
from ..patches import Patch, ViewPatch
from .multihop import (HOP_TOKENS, MultiHopAnswer, MultiHopQuestion, RelationPrompts, cut_hop, facts_about,
                       mentions_entity, same_entity)
from .hparams import CONSTRAINTS, DeepEditHparams, DeepEditSymbolicHparams
from .retriever import EditMemory, Retriever, check_threshold, record_for
from .views import RetrievedFactView, extend_below, extension_of

FORMAT = 1
# How a retrieved fact is stated before a single-hop prompt. Measured on SmolLM2-135M, counterfact-train
# records 100-129 (p(new) > p(true), efficacy / paraphrase): none 0.47 / 0.20, "{fact}.\n" 0.80 / 0.83,
# "Retrieved fact: {fact}.\n" 0.90 / 0.83, "New fact: {fact}.\n" 0.90 / 0.80.

# Our own few-shot prompts for the LM-judged mode (facts in them are real-world facts, none from MQuAKE).
# "step": the next reasoning step, one fact per line, the last line "So the answer is X." ; "entity": the
# entity a sentence ends on (its new entity); "conflict": whether an edited fact contradicts a step;
# "final": whether a step states the final answer. Each ends where the LM continues (one line).
PROMPTS: dict[str, str] = {
    "step": (
        "Answer the question with short steps, one fact per step, then the answer.\n\n"
        "Question: What is the capital of the country where the Eiffel Tower is located?\n"
        "Step: The Eiffel Tower is located in France.\n"
        "Step: The capital of France is Paris.\n"
        "Step: So the answer is Paris.\n\n"
        "Question: On which continent is the country of citizenship of Lionel Messi?\n"
        "Step: Lionel Messi is a citizen of Argentina.\n"
        "Step: Argentina is located in the continent of South America.\n"
        "Step: So the answer is South America.\n\n"
        "Question: What is the official language of the country where Toyota was founded?\n"
        "Step: Toyota was founded in Japan.\n"
        "Step: The official language of Japan is Japanese.\n"
        "Step: So the answer is Japanese.\n\n"
    ),
    "entity": (
        "Name the entity that each sentence ends on.\n\n"
        "Sentence: Lionel Messi is a citizen of Argentina.\nEntity: Argentina\n\n"
        "Sentence: The official language of Japan is Japanese.\nEntity: Japanese\n\n"
        "Sentence: Pride and Prejudice was written by Jane Austen.\nEntity: Jane Austen\n\n"
        "Sentence: So the answer is Paris.\nEntity: Paris\n\n"
    ),
    "conflict": (
        "Does the new fact contradict the statement? Answer yes or no.\n\n"
        "Statement: Lionel Messi is a citizen of Argentina.\nNew fact: Lionel Messi is a citizen of Spain.\n"
        "Contradiction: yes\n\n"
        "Statement: The official language of Japan is Japanese.\nNew fact: Toyota was founded in Japan.\n"
        "Contradiction: no\n\n"
        "Statement: The capital of France is Paris.\nNew fact: The capital of France is Lyon.\n"
        "Contradiction: yes\n\n"
        "Statement: Lionel Messi is a citizen of Argentina.\nNew fact: Lionel Messi plays football.\n"
        "Contradiction: no\n\n"
    ),
    "final": (
        "Does the sentence state the final answer? Answer yes or no.\n\n"
        "Sentence: Lionel Messi is a citizen of Argentina.\nFinal: no\n\n"
        "Sentence: So the answer is South America.\nFinal: yes\n\n"
        "Sentence: The capital of France is Paris.\nFinal: no\n\n"
        "Sentence: So the answer is Japanese.\nFinal: yes\n\n"
    ),
}
STEP_TOKENS = 40  # one step is one short sentence
JUDGE_TOKENS = 3  # "yes" / "no"
ENTITY_TOKENS = 12


def step_prompt(question: str, steps: Sequence[str]) -> str:
    return PROMPTS["step"] + f"Question: {question}\n" + "".join(f"Step: {s}\n" for s in steps) + "Step:"


def entity_prompt(sentence: str) -> str:
    return PROMPTS["entity"] + f"Sentence: {sentence}\nEntity:"


def conflict_prompt(step: str, fact: str) -> str:
    return PROMPTS["conflict"] + f"Statement: {step}\nNew fact: {fact}\nContradiction:"


def final_prompt(step: str) -> str:
    return PROMPTS["final"] + f"Sentence: {step}\nFinal:"


def parse_yes(text: str) -> bool | None:
    """True / False for an answer starting with yes / no (any case, punctuation ignored), else None."""
    words = re.findall(r"[a-z]+", text.lower())
    if not words:
        return None
    return True if words[0] == "yes" else False if words[0] == "no" else None


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def without_entity(sentence: str, entity: str) -> str:
    """`sentence` with its last mention of `entity` (case-insensitive) removed: the retrieval query, so
    that facts are found by what the step says about its subject, not by the answer it guessed."""
    if not entity:
        return sentence
    at = sentence.lower().rfind(entity.lower())
    if at < 0:
        return sentence
    return " ".join((sentence[:at] + sentence[at + len(entity):]).split()).rstrip(" .")


# ------------------------------------------------------------------------------------ the search
@dataclass(frozen=True)
class Ask:
    """One prompt for the LM below (greedy, `max_new_tokens`, cut at `stop`)."""

    prompt: str
    max_new_tokens: int
    stop: tuple[str, ...] = ("\n",)


@dataclass
class State:
    """A node of the search: `hop` is the plan position (symbolic mode); `steps` the accepted steps."""

    last: str
    current: str
    steps: tuple[str, ...]
    depth: int
    path: tuple[str, ...] = ()  # entities reached so far, start first (cycle check)
    hop: int = 0


class _OutOfCalls(Exception):
    pass


@dataclass
class SearchSettings:
    constraints: str
    max_depth: int
    max_calls: int
    top_k: int
    hop_tokens: int = HOP_TOKENS


Prompts = Generator[list[Ask], list[str], Any]


class Search:
    """The depth-first search for one question. `run()` is a generator that yields lists of `Ask` and is
    sent back the LM's texts, so a driver can batch the prompts of many questions (`answer_all`)."""

    def __init__(self, view: "DeepEditView", question: MultiHopQuestion, settings: SearchSettings) -> None:
        self.view, self.q, self.cfg = view, question, settings
        self.calls = 0
        self.lines: list[str] = [f"Question: {question.question}"]
        if question.has_plan:
            self.lines.append(f"Plan: {question.start} -> " + " -> ".join(question.relations))
        self.deepest: State | None = None

    # ---------------------------------------------------------------- helpers
    def log(self, state: State | None, text: str) -> None:
        self.lines.append(("  " * (state.depth + 1) if state is not None else "") + text)

    def ask(self, asks: list[Ask]) -> Prompts:
        if self.calls + len(asks) > self.cfg.max_calls:
            raise _OutOfCalls
        self.calls += len(asks)
        texts = yield asks
        return texts

    def finish(self, answer: str, stop: str, state: State | None) -> MultiHopAnswer:
        self.lines.append(f"Answer: {answer!r} ({stop}; {self.calls} LM prompts)")
        path = state.path if state is not None else ()
        entities = path[1:] if self.q.has_plan else path  # the entities reached, without the plan's start
        return MultiHopAnswer(answer, tuple(entities), "\n".join(self.lines),
                              {"stop": stop, "calls": self.calls, "constraints": self.cfg.constraints,
                               "depth": state.depth if state is not None else 0})

    def run(self) -> Prompts:
        start = self.q.start if self.q.has_plan else ""
        stack = [State("", start, (), 0, (start,) if start else ())]
        try:
            while stack:
                state = stack.pop()
                if self.deepest is None or state.depth > self.deepest.depth:
                    self.deepest = state  # among equally deep states the first popped (the preferred) is kept
                self.log(state, f"[depth {state.depth}] current={state.current or '-'} last={state.last or '-'}")
                plan_done = self.cfg.constraints == "symbolic" and state.hop >= len(self.q.relations)
                if state.depth >= self.cfg.max_depth and not plan_done:  # a finished plan is answered, not pruned
                    self.log(state, f"pruned: depth {state.depth} reaches max_depth={self.cfg.max_depth}")
                    continue
                expand = self.expand_symbolic if self.cfg.constraints == "symbolic" else self.expand_lm
                done, children = yield from expand(state)
                if done is not None:
                    return self.finish(done, "answer", state)
                if not children:
                    self.log(state, "dead end: backtrack")
                stack.extend(reversed(children))  # the best child is popped first
        except _OutOfCalls:
            self.log(None, f"stopped: max_calls={self.cfg.max_calls} LM prompts used")
            return self.finish(self.fallback(), "budget", self.deepest)
        return self.finish(self.fallback(), "exhausted", self.deepest)

    def fallback(self) -> str:
        """The answer of a search that found none: the current entity of the deepest state reached past
        the start (the start entity is the question's own, never its answer), else empty."""
        best = self.deepest
        return best.current if best is not None and best.depth > 0 else ""

    def _new_entity(self, state: State, entity: str) -> str | None:
        """Why `entity` cannot be the next entity (conciseness, coherence), or None when it can."""
        if not entity.strip():
            return "no new entity"
        if any(same_entity(entity, e) for e in state.path):
            return f"returns to {entity!r}, already on the path"
        return None

    def _child(self, state: State, step: str, entity: str, hop: int) -> State:
        return State(state.current, entity, state.steps + (step,), state.depth + 1, state.path + (entity,), hop)

    # ---------------------------------------------------------------- LM-judged constraints
    def expand_lm(self, state: State) -> Generator[list[Ask], list[str], tuple[str | None, list[State]]]:
        (raw,) = yield from self.ask([Ask(step_prompt(self.q.question, state.steps), STEP_TOKENS)])
        step = first_line(raw)
        self.log(state, f"step (LM): {step!r}")
        if not step:
            self.log(state, "rejected: empty step")
            return None, []
        if state.steps:  # before any accepted step the current entity is the question's own: never an answer
            (final,) = yield from self.ask([Ask(final_prompt(step), JUDGE_TOKENS)])
            if parse_yes(final):
                self.log(state, f"final step (LM judge: {final.strip()!r}): the answer is the current entity "
                                f"{state.current!r}")
                return state.current, []
            self.log(state, f"not the final answer (LM judge: {final.strip()!r})")
        (ent,) = yield from self.ask([Ask(entity_prompt(step), ENTITY_TOKENS)])
        entity = first_line(ent)
        query = without_entity(step, entity)
        self.log(state, f"new entity (LM): {entity!r}; retrieval query: {query!r}")
        children: list[State] = []
        if len(self.view.memory):
            hits = self.view.memory.search(self.view.retriever, [query], min(self.cfg.top_k, len(self.view.memory)))
            for score, i in zip(hits.scores[0].tolist(), hits.indices[0].tolist()):
                rec = self.view.memory.records[i]
                fact_entity = rec.triple[2] if rec.triple is not None else ""
                head = f"retrieved {rec.text!r} ({score:.2f})"
                if state.current and mentions_entity(rec.text, state.current) and not (
                        state.last and mentions_entity(rec.text, state.last)):
                    why = f"continues from the current entity {state.current!r}"
                else:
                    (verdict,) = yield from self.ask([Ask(conflict_prompt(step, rec.text), JUDGE_TOKENS)])
                    if not parse_yes(verdict):
                        self.log(state, f"{head}: rejected (LM judge: no conflict, {verdict.strip()!r})")
                        continue
                    why = "contradicts the step (LM judge: yes)"
                if not fact_entity:
                    (fe,) = yield from self.ask([Ask(entity_prompt(rec.text), ENTITY_TOKENS)])
                    fact_entity = first_line(fe)
                bad = self._new_entity(state, fact_entity)
                if bad:
                    self.log(state, f"{head}: rejected ({bad})")
                    continue
                self.log(state, f"{head}: accepted, {why}; replaces the step, new entity {fact_entity!r}")
                children.append(self._child(state, rec.text, fact_entity, state.hop))
        if not children:
            bad = self._new_entity(state, entity)
            if bad:
                self.log(state, f"step rejected ({bad})")
            else:
                self.log(state, "step accepted (no edited fact replaces it)")
                children.append(self._child(state, step, entity, state.hop))
        return None, children

    # ---------------------------------------------------------------- symbolic constraints
    def expand_symbolic(self, state: State) -> Generator[list[Ask], list[str], tuple[str | None, list[State]]]:
        rels = self.q.relations
        if state.hop >= len(rels):
            self.log(state, f"final: every hop of the plan is done; the answer is {state.current!r}")
            return state.current, []
        rel, entity = rels[state.hop], state.current
        prompts = self.view.relation_prompts
        cloze = prompts.cloze_for(rel, entity)
        facts = facts_about(self.view.memory, entity, rel)
        if facts:  # an edited fact on (subject, relation) conflicts with any step the LM could take here
            candidates = [(self.view.memory.records[i].text, self.view.memory.records[i].triple[2],  # type: ignore[index]
                           f"memory fact with subject {entity!r} and relation {rel} replaces the LM's step")
                          for i in facts]
            self.log(state, f"hop {state.hop + 1} {rel}: {len(facts)} edited fact(s) on ({entity!r}, {rel}); "
                            "the LM is not asked")
        else:
            qa, bare = yield from self.ask([Ask(prompts.qa_prompt(rel, entity), self.cfg.hop_tokens),
                                            Ask(cloze, self.cfg.hop_tokens)])
            candidates = []
            for how, raw in (("question", qa), ("cloze", bare)):
                ans = cut_hop(raw)
                if any(same_entity(ans, c[1]) for c in candidates):
                    continue
                candidates.append((f"{cloze} {ans}", ans, f"LM answer to the hop's {how}, no edited fact on "
                                   f"({entity!r}, {rel})"))
            self.log(state, f"hop {state.hop + 1} {rel}: no edited fact on ({entity!r}, {rel}); LM answers "
                            f"{cut_hop(qa)!r} (question) / {cut_hop(bare)!r} (cloze)")
        children = []
        for step, new, why in candidates:
            bad = self._new_entity(state, new)
            if bad:
                self.log(state, f"step {step!r}: rejected ({bad})")
                continue
            self.log(state, f"step {step!r}: accepted, {why}")
            children.append(self._child(state, step, new, state.hop + 1))
        return None, children


def answer_all(searches: Sequence[Search], system: Any) -> list[MultiHopAnswer]:
    """Runs the searches in lockstep: each round, the prompts every unfinished search asks are grouped by
    decoding settings and sent to `system.generate` as one batch."""
    results: list[MultiHopAnswer | None] = [None] * len(searches)
    running: dict[int, tuple[Prompts, list[Ask]]] = {}
    for i, s in enumerate(searches):
        gen = s.run()
        try:
            running[i] = (gen, next(gen))
        except StopIteration as stop:
            results[i] = stop.value
    while running:
        groups: dict[tuple[int, tuple[str, ...]], list[tuple[int, int]]] = {}
        for i, (_, asks) in running.items():
            for j, a in enumerate(asks):
                groups.setdefault((a.max_new_tokens, a.stop), []).append((i, j))
        texts: dict[int, list[str]] = {i: [""] * len(asks) for i, (_, asks) in running.items()}
        for (n, stop), where in groups.items():
            prompts = [running[i][1][j].prompt for i, j in where]
            for (i, j), t in zip(where, system.generate(prompts, n, stop=stop)):
                texts[i][j] = t
        for i in list(running):
            gen = running[i][0]
            try:
                running[i] = (gen, gen.send(texts[i]))
            except StopIteration as stop:
                results[i] = stop.value
                del running[i]
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:  # every search returns an answer; a gap would shift later answers onto other questions
        raise RuntimeError(f"DeepEdit: no answer for question(s) {missing}")
    return list(results)


# ------------------------------------------------------------------------------------ the view
class DeepEditView(RetrievedFactView):
    """Answers multi-hop questions by DeepEdit's constrained search (`answer_multihop`) and plain LM calls
    with the retrieved edited fact stated (`RetrievedFactView`). Config: {"format", "constraints",
    "max_depth", "max_calls", "top_k", "hop_tokens", "threshold", "relation_prompts", "memory": this edit's
    own facts, "extends", "below_facts"}; tensors: the memory's embeddings."""

    def __init__(self, inner: Any, config: dict[str, Any] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(inner, config, tensors)
        cfg = self.config
        try:
            self.memory = self.saved_memory("DeepEdit", FORMAT)
            self.settings = SearchSettings(str(cfg["constraints"]), int(cfg["max_depth"]), int(cfg["max_calls"]),
                                           int(cfg["top_k"]), int(cfg.get("hop_tokens", HOP_TOKENS)))
            self.threshold = self.scope_threshold = check_threshold(float(cfg["threshold"]), "threshold")
            self.relation_prompts_folder = str(cfg.get("relation_prompts") or "")
        except (KeyError, TypeError, ValueError) as e:
            raise EditMismatchError(f"DeepEdit view config is malformed: {e}") from None
        if self.settings.constraints not in CONSTRAINTS or not len(self.memory):
            raise EditMismatchError(f"DeepEdit view: constraints {self.settings.constraints!r}, "
                                    f"{len(self.memory)} facts")
        # An extension (`on=`) holds only its own facts and joins them to the view below, taking its
        # place: one memory per system, each edit saving only what it added (as IKE's view).
        if cfg.get("extends"):
            extend_below(self, DeepEditView, "DeepEdit", ("constraints", "max_depth", "max_calls", "top_k", "hop_tokens",
                                                         "threshold", "relation_prompts"))
        self._prompts: RelationPrompts | None = None

    @property
    def relation_prompts(self) -> RelationPrompts:
        """MQuAKE's per-relation prompts (symbolic mode), read on first use from `relation_prompts` or the
        benchmark data folder."""
        if self._prompts is None:
            self._prompts = RelationPrompts.load(self.relation_prompts_folder or None)
        return self._prompts

    def answer_multihop(self, questions: Sequence[MultiHopQuestion]) -> list[MultiHopAnswer]:
        """Each question answered by the constrained depth-first search (module docstring); the LM calls
        go to the system below this view, without the single-hop fact prefix."""
        qs = list(questions)
        for k, q in enumerate(qs):
            if not isinstance(q, MultiHopQuestion):
                raise DataFormatError(f"questions[{k}] is a {type(q).__name__}, not a MultiHopQuestion")
            if self.settings.constraints == "symbolic" and not q.has_plan:
                raise DataFormatError(f"questions[{k}] {q.question[:60]!r} has no plan (start entity and relations): "
                                      "symbolic DeepEdit follows the plan; use method 'deepedit' for questions alone")
        return answer_all([Search(self, q, self.settings) for q in qs], self.inner)



class DeepEditEditor(Editor):
    """Returns one `ViewPatch("deepedit")` holding this edit's facts; with `on=` (the previous edit of the
    same method, top of the stack) the view joins the facts below, so a sequence is one memory that each
    restore shortens by one step."""

    hparams_cls: ClassVar[type[Hparams]] = DeepEditHparams
    supports_batch: ClassVar[bool] = True
    supports_on: ClassVar[bool] = True

    def compute_patches(self, lm: LM, requests: list[EditRequest], hp: DeepEditHparams, on: Edit | None
                        ) -> tuple[list[Patch], dict[str, Any]]:
        below_facts = extension_of(on, DeepEditView, "DeepEdit", hp.embedder)
        records = [record_for(r) for r in requests]
        memory = EditMemory(hp.embedder)
        memory.add(records, Retriever(hp.embedder).embed([r.text for r in records]))
        tensors, mem_cfg = memory.state()
        config = {"format": FORMAT, "constraints": hp.constraints, "max_depth": hp.max_depth, "max_calls": hp.max_calls,
                  "top_k": hp.top_k, "hop_tokens": hp.hop_tokens, "threshold": hp.threshold,
                  "relation_prompts": hp.relation_prompts, "memory": mem_cfg, "extends": on is not None,
                  "below_facts": below_facts}
        view = DeepEditView(lm.edited, config, tensors)  # a malformed config fails here, before anything is installed
        no_relation = sum(r.triple is None or r.triple[1] is None for r in records)
        return [ViewPatch("deepedit", config, tensors)], {"facts": len(view.memory),
                                                           "facts_without_relation": no_relation}


class DeepEditSymbolicEditor(DeepEditEditor):
    """DeepEdit with deterministic constraints (`constraints="symbolic"` by default): for models too small
    to write and judge reasoning steps. Facts without a relation id (`extra["relation_id"]`) are stated
    for single-hop prompts but can never conflict with a hop (counted in the edit's info)."""

    hparams_cls: ClassVar[type[Hparams]] = DeepEditSymbolicHparams


__all__ = ["PROMPTS", "DeepEditEditor", "DeepEditHparams", "DeepEditSymbolicEditor", "DeepEditSymbolicHparams",
           "DeepEditView", "Search", "answer_all", "parse_yes", "without_entity"]
