"""`dialogue`: does an edit survive a conversation? After the edit, a short multi-turn exchange asks for
the new fact, asks again in other words, contradicts it with the old fact and asks a question that
needs it; each answer is classed as the new object (success), the old one (reversion) or neither
(confusion). The survey's "future prospects" pitfall; spec row "reversion / confusion rate" (no
shipped benchmark: the protocol below is editlab's own, built from CounterFact records).

Data: `counterfact/counterfact-edit.json` (EasyEdit's compact CounterFact: `prompt` with the subject
filled in, `subject`, `target_new`, `ground_truth`, `rephrase_prompt`). One unit per record; the edit is
the record's own request (`prompt` -> `target_new`). `counterfact/counterfact_portability_gpt4.json` is
joined by `case_id` (kept only where it describes the same edit: 766 records of the file) for its one-hop
question (`portability.New Question` -> `New Answer`). Under a limit, the records that have such a
question come first (each group in file order), so that every dialogue of a limited run has all four
turns.

Protocol: one dialogue per unit, run on the unedited model (the baseline row) and on each edited
system, greedy decoding, every answer cut at the first newline. Turns, in order, each one sees the
whole conversation before it, the assistant's earlier turns holding the model's own generated replies:
  0 `direct`:        user "Complete the sentence: {prompt}"; the assistant's reply begins with
                     `{prompt}` (the answer is its continuation, at most `max_new_tokens` tokens);
  1 `followup`:      user "Are you sure? Complete the sentence: {rephrase}" (`rephrase_prompt`, or
                     `prompt` where the record has none); the reply begins with `{rephrase}`;
  2 `contradiction`: user 'But I read this: "{prompt} {ground_truth}." Complete the sentence again:
                     {prompt}'; the reply begins with `{prompt}`;
  3 `portability`:   only for records with a joined one-hop question: user "{New Question}"; the reply
                     is free (at most `question_tokens` tokens).
Prompts go through the model's chat template (`tokenizer.chat_template`, with the generation prompt
opened and the reply's beginning appended, as `methods/memory/prompting.join` does). A tokenizer without
one gets plain lines "User: ...\\nAssistant: ..." instead, with one warning; every row records
`format` ("chat" or "plain"), and the generated answers as `{turn}.answer`.

Matching (`classify`): the answer and both objects are normalised (`scoring.normalize_answer`: lower
case, no punctuation or articles) and split into words; an object is found where its words occur as a
contiguous run. The object found earliest in the answer is the answer; at the same position (one object
is a word prefix of the other, "New York" / "New York City") the longer one, which is the one the answer
actually spells out. No object found: confusion. Objects: `target_new` (success) and `ground_truth`
(reversion); on the portability turn `New Answer` (success) and `ground_truth` (reversion: the record
gives no pre-edit answer to the question, so reversion there means the answer names the old object).
Records whose two objects normalise to the same words are not valid dialogue units.

Metrics per unit: `{turn}.success`, `{turn}.reversion`, `{turn}.confusion` (0 or 1, exactly one is 1)
for each turn run, and `success`, `reversion`, `confusion` = their means over the two challenge turns
(followup, contradiction; `direct` is left out: it is the edit's efficacy in chat form, the question
being whether what it achieved holds under challenge; `portability` is reported on its own, since the
right answer to a one-hop question is not the edited object itself, so an answer that reverts to the old
chain rarely names `ground_truth` and its reversion is a lower bound). Dataset values are
means over units (lower is better for reversion and confusion). On the unedited model `reversion` is
the model's knowledge of the old fact and `success` the rate at which it says the counterfactual on its
own: read edited values against it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..data.counterfact import counterfact_compact
from ..data.io import read_records
from ..requests import EditRequest
from .base import Editing, RecordFieldError, Suite, Unit, collect_units, field_at, text_at
from .portability import loaded_request
from .scoring import normalize_answer, probe_prompt

TURNS = ("direct", "followup", "contradiction", "portability")
CHALLENGES = ("followup", "contradiction")  # the turns the overall reversion / confusion / success average over
OUTCOMES = ("success", "reversion", "confusion")
STOP = ("\n",)


@dataclass(frozen=True)
class Turn:
    """One user turn: what the user says, the text the assistant's reply begins with ("" for a free
    answer), and the objects its answer is classed against."""

    name: str
    user: str
    opening: str
    new: str
    old: str


@dataclass(frozen=True)
class TurnResult:
    turn: Turn
    answer: str  # the generated continuation (after `opening`), cut at the first newline
    outcome: str  # one of OUTCOMES


def _find(words: Sequence[str], target: Sequence[str]) -> int | None:
    """Index of the first contiguous occurrence of `target` in `words` (None if absent or empty)."""
    n = len(target)
    if not n:
        return None
    for i in range(len(words) - n + 1):
        if list(words[i : i + n]) == list(target):
            return i
    return None


def classify(answer: str, new: str, old: str) -> str:
    """"success", "reversion" or "confusion" for a generated answer (rule in the module docstring):
    the object whose normalised words occur earliest in the answer, the longer one at a tie."""
    words = normalize_answer(answer).split()
    hits = []
    for rank, (outcome, obj) in enumerate((("success", new), ("reversion", old))):
        target = normalize_answer(obj).split()
        at = _find(words, target)
        if at is not None:
            hits.append((at, -len(target), rank, outcome))
    return min(hits)[3] if hits else "confusion"


def script(request: EditRequest, old: str, rephrase: str | None = None,
           question: tuple[str, str] | None = None) -> tuple[Turn, ...]:
    """The dialogue's turns for one edit (protocol in the module docstring)."""
    prompt = probe_prompt(request.prompt)
    again = probe_prompt(rephrase) if rephrase and rephrase.strip() else prompt
    new = request.target_new
    turns = [
        Turn("direct", f"Complete the sentence: {prompt}", prompt, new, old),
        Turn("followup", f"Are you sure? Complete the sentence: {again}", again, new, old),
        Turn("contradiction", f'But I read this: "{prompt} {old}." Complete the sentence again: {prompt}', prompt, new, old),
    ]
    if question is not None:
        turns.append(Turn("portability", question[0].strip(), "", question[1], old))
    return tuple(turns)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def render(tokenizer: Any, history: Sequence[tuple[str, str]], turn: Turn, chat: bool) -> str:
    """The text the model continues for `turn` after the `(user, assistant)` exchanges of `history`:
    the chat template with the assistant's turn opened and `turn.opening` appended, or the plain
    "User:/Assistant:" lines (one line per message, so that a reply ends at the newline)."""
    if chat:
        messages = [m for u, a in history for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
        messages.append({"role": "user", "content": turn.user})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + turn.opening
    lines = [f"User: {_one_line(u)}\nAssistant: {_one_line(a)}\n" for u, a in history]
    opening = f" {turn.opening}" if turn.opening else ""
    return "".join(lines) + f"User: {_one_line(turn.user)}\nAssistant:{opening}"


def has_chat_template(system: Any) -> bool:
    return bool(getattr(getattr(system, "tokenizer", None), "chat_template", None))


def run_dialogues(system: Any, scripts: Sequence[Sequence[Turn]], *, chat: bool, max_new_tokens: int = 12,
                  question_tokens: int = 24) -> list[list[TurnResult]]:
    """Play each script against `system`, all in lockstep: turn k of every script that has one is one
    batched `system.generate` call (turns of one script are sequential: each reads the earlier
    replies). A reply kept in the history is the turn's opening followed by the generated answer."""
    tokenizer = getattr(system, "tokenizer", None)
    results: list[list[TurnResult]] = [[] for _ in scripts]
    histories: list[list[tuple[str, str]]] = [[] for _ in scripts]
    for k in range(max((len(s) for s in scripts), default=0)):
        live = [i for i, s in enumerate(scripts) if len(s) > k]
        by_budget: dict[int, list[int]] = {}
        for i in live:
            by_budget.setdefault(max_new_tokens if scripts[i][k].opening else question_tokens, []).append(i)
        for budget, rows in by_budget.items():
            texts = [render(tokenizer, histories[i], scripts[i][k], chat) for i in rows]
            answers = system.generate(texts, budget, stop=list(STOP))
            for i, answer in zip(rows, answers):
                turn = scripts[i][k]
                results[i].append(TurnResult(turn, answer, classify(answer, turn.new, turn.old)))
                histories[i].append((turn.user, _one_line(f"{turn.opening}{answer}") or turn.opening))
    return results


def dialogue_metrics(results: Sequence[TurnResult]) -> dict[str, Any]:
    """Per-turn 0/1 outcomes, their means over the challenge turns, and each turn's answer."""
    out: dict[str, Any] = {}
    for r in results:
        for o in OUTCOMES:
            out[f"{r.turn.name}.{o}"] = float(r.outcome == o)
        out[f"{r.turn.name}.answer"] = r.answer
    challenged = [r for r in results if r.turn.name in CHALLENGES]
    for o in OUTCOMES:
        if challenged:
            out[o] = sum(r.outcome == o for r in challenged) / len(challenged)
    return out


class Dialogue(Suite):
    name = "dialogue"
    description = ("an edit challenged in a multi-turn chat (follow-up, contradiction, one-hop question): "
                   "reversion to the old object and confusion per turn")
    files = {"dialogue": "counterfact/counterfact-edit.json",
             # not a split: one-hop questions of the same cases, joined by case_id
             "portability": "counterfact/counterfact_portability_gpt4.json"}
    metrics = tuple(f"{t}.{o}" for t in TURNS for o in OUTCOMES) + OUTCOMES
    protocol = ("single edit per record, then a 3-4 turn greedy chat (direct, follow-up, contradiction, one-hop "
                "question) on θ and θ'; answers classed as new / old / neither object")

    def __init__(self, *, max_new_tokens: int = 12, question_tokens: int = 24) -> None:
        for label, value in (("max_new_tokens", max_new_tokens), ("question_tokens", question_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        self.max_new_tokens = max_new_tokens
        self.question_tokens = question_tokens
        self._warned_plain = False

    def load(self, root: Path, limit: int | None = None, *, on_bad: str = "stop") -> list[Unit]:
        paths = self.data_paths(root)
        questions = self._questions(paths["portability"])
        path = paths["dialogue"]
        records = list(enumerate(read_records(path)))
        # the records with a one-hop question first (each in file order), so that a limited run's
        # dialogues all have the turn that needs the new fact
        records = ([(i, r) for i, r in records if isinstance(r, dict) and r.get("case_id") in questions]
                   + [(i, r) for i, r in records if not (isinstance(r, dict) and r.get("case_id") in questions)])
        return collect_units(records,
                             lambda i, rec, where: self._parse(path, i, rec, where, questions),
                             path=path, limit=limit, on_bad=on_bad)

    @staticmethod
    def _questions(path: Path) -> dict[Any, tuple[tuple[str, str, str, str], tuple[str, str]]]:
        """case_id -> ((prompt, subject, target_new, target_true), (question, answer)) of the one-hop
        file's usable records; the join keeps a question only where the edit is the same."""
        out = {}
        for rec in read_records(path):
            try:
                rw = rec["requested_rewrite"]
                edit = (rw["prompt"].replace("{}", rw["subject"]), rw["subject"], rw["target_new"]["str"],
                        rw["target_true"]["str"])
                q, a = rec["portability"]["New Question"], rec["portability"]["New Answer"]
            except (KeyError, TypeError, AttributeError):
                continue
            if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
                out[rec.get("case_id")] = (edit, (q, a))
        return out

    @staticmethod
    def _parse(path: Path, i: int, rec: Any, where: str, questions: dict[Any, Any]) -> Unit:
        for key in ("prompt", "subject", "target_new", "ground_truth"):
            text_at(rec, key, where)
        new, old = rec["target_new"], rec["ground_truth"]
        if not normalize_answer(new).split() or not normalize_answer(old).split() \
                or normalize_answer(new) == normalize_answer(old):
            raise RecordFieldError(f"{where}: target_new {new!r} and ground_truth {old!r} must be two different "
                                   "answers after normalisation (lower case, no punctuation or articles)")
        request = loaded_request(counterfact_compact, rec, path, i, where)
        rephrase = rec.get("rephrase_prompt") if isinstance(rec.get("rephrase_prompt"), str) else None
        case = field_at(rec, "case_id", where) if "case_id" in rec else i
        joined = questions.get(case)
        question = None
        if joined is not None and joined[0] == (request.prompt, request.subject, new, old):
            question = joined[1]
        return Unit(key=f"cf:{case}", split="dialogue",
                    data={"request": request, "turns": script(request, old, rephrase, question)})

    def _chat(self, system: Any) -> bool:
        chat = has_chat_template(system)
        if not chat and not self._warned_plain:
            self._warned_plain = True
            warnings.warn(f"{getattr(system, 'name', 'this model')} has no chat template: the dialogue suite uses "
                          "plain 'User: ... / Assistant: ...' lines instead (rows record format=plain)", stacklevel=4)
        return chat

    def _play(self, system: Any, unit: Unit) -> dict[str, Any]:
        chat = self._chat(system)
        results = run_dialogues(system, [unit.data["turns"]], chat=chat, max_new_tokens=self.max_new_tokens,
                                question_tokens=self.question_tokens)[0]
        return {**dialogue_metrics(results), "format": "chat" if chat else "plain"}

    def unedited(self, lm: Any, unit: Unit) -> tuple[dict[str, float], Any]:
        return self._play(lm, unit), None

    def edited(self, editing: Editing, unit: Unit, state: Any) -> dict[str, float]:
        editing.push([unit.data["request"]])
        return self._play(editing.system, unit)


__all__ = ["CHALLENGES", "Dialogue", "OUTCOMES", "TURNS", "Turn", "TurnResult", "classify", "dialogue_metrics", "has_chat_template", "render",
           "run_dialogues", "script"]
