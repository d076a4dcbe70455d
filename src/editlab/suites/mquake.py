"""`mquake` / `mquake-batch`: MQuAKE (Zhong et al. 2023), multi-hop questions over edited facts.

An edit that makes the model say "Hey Jude was performed by Madonna" should also change the answer to
"What is the official language of the country of citizenship of the manager of Hey Jude's performer?".
MQuAKE checks whether it does: each case is a chain of single-hop facts whose edited versions entail a
new multi-hop answer. Data: `mquake/MQuAKE-hard.json` (every case 4 hops, all edited) and the shipped
demonstration files `multihop-prompts.txt` / `multihop-cot-prompts.txt`, read byte-exact (the first has
one demonstration without "A:"; it is kept as shipped, spec P8).

Protocol (spec section 2.3): k cases are edited together (every `requested_rewrite` fact of the group in
one edit for batch methods, one after another in list order otherwise), scored on that model by greedy
generation, then the model is restored. A unit is one group; `k` is a suite option (1, 100 or "all").
Per group (each case's value, then the mean over the group's cases):
- `edit_wise`: share of the edited facts whose cloze prompt generates the new object (≤16 tokens, cut at
  the first newline or period);
- `instance_wise`: every hop of the new chain recalled from its cloze;
- `multihop`: ≥1 of the case's 3 questions answered with the new answer (shipped demonstrations +
  "\\nQ: q A:", cut at the first newline);
- `multihop_cot`: the same with the chain-of-thought demonstrations (≤128 tokens, cut at
  "\\n\\nQuestion:", answer after the last "Answer:");
- `hop_wise`: `multihop_cot` right on a question whose thoughts also name every intermediate entity.
A system that answers multi-hop questions by its own procedure (MeLLo, DeepEdit: `answer_multihop`,
methods/memory/multihop.py) is asked each question directly for `multihop`, with the case's plan (first
entity and hop relations, never the hop answers) for its oracle-decomposition modes; the other metrics
ask it the same prompts as every method. Answers match after SQuAD normalisation; `*_strict` repeat each metric with exact string equality
(the MeLLo notebook's rule). The unedited row asks the same prompts with the original chain's golds.

Across the file one `(subject, relation)` is edited to two objects (Portal, P178): a group holding both
keeps the earlier case and leaves the later one out, with a warning. Identical facts shared by several
cases of a group are edited once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..data.io import read_records
from ..errors import DataFormatError, EditRequestError
from ..requests import EditRequest
from .base import Editing, RecordFieldError, Suite, SuiteError, Unit, collect_units, field_at, text_at
from .scoring import answer_match, normalize_answer

CLOZE_TOKENS = 16  # spec 2.3: edit-wise and instance-wise generations
MULTIHOP_TOKENS = 16  # editlab's choice: the spec gives no cap; shipped demonstration answers are ≤ 6 tokens
COT_TOKENS = 128  # spec 2.3
COT_STOP = "\n\nQuestion:"
COT_ANSWER = "Answer:"

BASE_METRICS = ("edit_wise", "instance_wise", "multihop", "multihop_cot", "hop_wise")
COT_METRICS = ("multihop_cot", "hop_wise")


# ----------------------------------------------------------------------------- per-case formulas
def cut_cloze(text: str) -> str:
    """A cloze generation up to its first newline or period (spec 2.3: edit-wise, instance-wise)."""
    for stop in ("\n", "."):
        text = text.split(stop, 1)[0]
    return text


def cut_multihop(text: str) -> str:
    """A standard multi-hop answer up to its first newline."""
    return text.split("\n", 1)[0]


def split_cot(text: str) -> tuple[str, str]:
    """(thoughts, answer) of a chain-of-thought generation: cut at the first "\\n\\nQuestion:", the answer
    is the text after the last "Answer:" and the thoughts everything before it (no "Answer:": all of it is
    thoughts and the answer is empty)."""
    text = text.split(COT_STOP, 1)[0]
    at = text.rfind(COT_ANSWER)
    if at < 0:
        return text, ""
    return text[:at], text[at + len(COT_ANSWER):]


def mentions(text: str, names: Iterable[str], *, strict: bool = False) -> bool:
    """Whether `text` names one of `names`: as whole words after SQuAD normalisation of both (so "Modi"
    is found in "...is Narendra Modi." but "AU" is not found in "Australia"), or as an exact substring
    with `strict`."""
    if strict:
        return any(n.strip() and n.strip() in text for n in names)
    hay = f" {normalize_answer(text)} "
    return any(f" {norm} " in hay for norm in (normalize_answer(n) for n in names) if norm)


def edit_wise_hits(outputs: Sequence[str], golds: Sequence[Sequence[str]], *, strict: bool = False) -> int:
    """How many edited facts were recalled: generation `outputs[j]` of fact j's cloze, cut, matches one of
    `golds[j]` (its object and aliases)."""
    return sum(answer_match(cut_cloze(o), g, strict=strict) for o, g in zip(outputs, golds, strict=True))


def instance_wise(outputs: Sequence[str], golds: Sequence[Sequence[str]], *, strict: bool = False) -> bool:
    """Every hop of the chain recalled: each hop's cloze generation, cut, matches that hop's golds."""
    return edit_wise_hits(outputs, golds, strict=strict) == len(golds)


def multihop(outputs: Sequence[str], golds: Sequence[str], *, strict: bool = False) -> bool:
    """At least one of the case's questions answered (generation cut at its first newline) with a gold."""
    return any(answer_match(cut_multihop(o), golds, strict=strict) for o in outputs)


def multihop_cot(outputs: Sequence[str], golds: Sequence[str], *, strict: bool = False) -> bool:
    """At least one chain-of-thought generation whose final answer matches a gold."""
    return any(answer_match(split_cot(o)[1], golds, strict=strict) for o in outputs)


def hop_wise(outputs: Sequence[str], golds: Sequence[str], intermediates: Sequence[Sequence[str]], *,
             strict: bool = False) -> bool:
    """At least one chain-of-thought generation right on the final answer whose thoughts also name every
    intermediate entity of the chain (each given as its answer and aliases)."""
    for o in outputs:
        thoughts, answer = split_cot(o)
        if answer_match(answer, golds, strict=strict) and all(
                mentions(thoughts, m, strict=strict) for m in intermediates):
            return True
    return False


def multihop_prompt(demos: str, question: str) -> str:
    return demos + "\nQ: " + question.strip() + " A:"


def cot_prompt(demos: str, question: str) -> str:
    return demos + "\n\nQuestion: " + question.strip() + "\nThoughts:"


# ----------------------------------------------------------------------------- parsed cases
Golds = tuple[str, ...]


@dataclass(frozen=True)
class Chain:
    """One reading of a case: the edited chain (new objects) or the original one. `facts` are the edited
    facts' cloze prompts with their golds (edit-wise), `hops` every hop's cloze with its golds
    (instance-wise), `answer` the multi-hop golds, `intermediates` the golds of hops 1..n-1 (hop-wise)."""

    facts: tuple[tuple[str, Golds], ...]
    hops: tuple[tuple[str, Golds], ...]
    answer: Golds
    intermediates: tuple[Golds, ...]


@dataclass(frozen=True)
class Case:
    case_id: str
    requests: tuple[EditRequest, ...]
    facts: tuple[tuple[str, str, str], ...]  # (subject, relation id, new object) per request
    questions: tuple[str, ...]
    new: Chain
    old: Chain
    start: str = ""  # the chain's first entity and each hop's relation id: the plan of an oracle
    relations: tuple[str, ...] = ()  # decomposition (methods/memory/multihop.py), never the answers


def _aliases(rec: Any, path: str, where: str) -> tuple[str, ...]:
    aliases = field_at(rec, path, where)
    if not isinstance(aliases, list):
        raise RecordFieldError(f"{where}: field {path!r} must be a list")
    return tuple(str(a) for a in aliases)


def _golds(rec: Any, path: str, where: str) -> Golds:
    return (text_at(rec, path + ".answer", where), *_aliases(rec, path + ".answer_alias", where))


def _hops(rec: Any, key: str, where: str) -> list[tuple[str, Golds]]:
    hops = field_at(rec, key, where)
    if not isinstance(hops, list) or not hops:
        raise RecordFieldError(f"{where}: field {key!r} must be a non-empty list")
    return [(text_at(rec, f"{key}.{i}.cloze", where), _golds(rec, f"{key}.{i}", where)) for i in range(len(hops))]


def parse_case(index: int, rec: Any, where: str) -> Case:
    """A `Case` from one MQuAKE record; a missing field raises `RecordFieldError` naming it."""
    case_id = str(field_at(rec, "case_id", where))
    where = f"{where} (case_id {case_id})"
    rewrites = field_at(rec, "requested_rewrite", where)
    if not isinstance(rewrites, list) or not rewrites:
        raise RecordFieldError(f"{where}: field 'requested_rewrite' must be a non-empty list")
    new_hops, old_hops = _hops(rec, "new_single_hops", where), _hops(rec, "single_hops", where)
    if len(new_hops) != len(old_hops):
        raise RecordFieldError(f"{where}: 'new_single_hops' and 'single_hops' differ in length")
    idx = field_at(rec, "orig.edit_triples_idx", where)
    if not isinstance(idx, list) or len(idx) != len(rewrites) or not all(
            isinstance(i, int) and 0 <= i < len(new_hops) for i in idx):
        raise RecordFieldError(f"{where}: field 'orig.edit_triples_idx' must give a hop index for each "
                               "requested_rewrite")
    requests, facts, new_facts, old_facts = [], [], [], []
    for j, hop in enumerate(idx):
        f = f"requested_rewrite.{j}"
        template, subject = text_at(rec, f + ".prompt", where), text_at(rec, f + ".subject", where)
        target_new = text_at(rec, f + ".target_new.str", where)
        target_true = text_at(rec, f + ".target_true.str", where)
        relation = text_at(rec, f + ".relation_id", where)
        try:
            prompt = template.format(subject)
            req = EditRequest.create(prompt=prompt, subject=subject, target_new=target_new, target_true=target_true,
                                     case_id=case_id, extra={"relation_id": relation})
        except (EditRequestError, IndexError, KeyError, ValueError) as e:
            raise RecordFieldError(f"{where}: field {f!r} does not make an edit request ({e})") from None
        requests.append(req)
        facts.append((subject, relation, target_new))
        # Aliases name the hop's object: the new hop's object is the edit's target (spec 2.3); the original
        # hop at that index may be about another subject ("The director of The Beatles"), so its aliases
        # are used only where its object is the edit's true object.
        new_facts.append((prompt, (target_new, *new_hops[hop][1][1:])))
        old_hop = old_hops[hop][1]
        old_facts.append((prompt, (target_true, *(old_hop[1:] if old_hop[0] == target_true else ()))))
    keyed = {}
    for s, r, o in facts:
        if keyed.setdefault((s, r), o) != o:
            raise RecordFieldError(f"{where}: requested_rewrite edits ({s!r}, {r}) to two different objects")
    questions = field_at(rec, "questions", where)
    if not isinstance(questions, list) or not questions:
        raise RecordFieldError(f"{where}: field 'questions' must be a non-empty list")
    questions = [text_at(rec, f"questions.{i}", where) for i in range(len(questions))]
    new_answer = (text_at(rec, "new_answer", where), *_aliases(rec, "new_answer_alias", where))
    old_answer = (text_at(rec, "answer", where), *_aliases(rec, "answer_alias", where))
    new = Chain(tuple(new_facts), tuple(new_hops), new_answer, tuple(g for _, g in new_hops[:-1]))
    old = Chain(tuple(old_facts), tuple(old_hops), old_answer, tuple(g for _, g in old_hops[:-1]))
    triples = field_at(rec, "orig.triples", where)
    labeled = field_at(rec, "orig.triples_labeled", where)
    if (not isinstance(triples, list) or len(triples) != len(new_hops) or not isinstance(labeled, list) or not labeled
            or not all(isinstance(t, list) and len(t) == 3 for t in (*triples, *labeled))):
        raise RecordFieldError(f"{where}: fields 'orig.triples' and 'orig.triples_labeled' must list one "
                               "[subject, relation, object] per hop")
    start = text_at(rec, "orig.triples_labeled.0.0", where)
    relations = tuple(text_at(rec, f"orig.triples.{i}.1", where) for i in range(len(triples)))
    return Case(case_id, tuple(requests), tuple(facts), tuple(questions), new, old, start, relations)


def read_prompt_file(path: Path) -> str:
    """A demonstration file exactly as shipped (bytes decoded as UTF-8; no newline translation, no strip)."""
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: cannot read as UTF-8 text ({e})") from None


def group_cases(cases: Sequence[Case], k: int | None) -> tuple[list[list[Case]], list[str]]:
    """Consecutive groups of `k` cases (`None`: one group of all), and warnings. A trailing group with
    fewer than k cases is left out (it would not be a k-edit episode). Within a group, a case editing a
    (subject, relation) that an earlier case of the group edits to another object is left out."""
    notes: list[str] = []
    size = len(cases) if k is None else k
    chunks = [list(cases[i:i + size]) for i in range(0, len(cases), size)] if size else []
    if k is not None and chunks and len(chunks[-1]) < k:
        notes.append(f"k={k}: the last {len(chunks[-1])} case(s) do not fill a group of {k} and are left out")
        chunks.pop()
    groups = []
    for chunk in chunks:
        seen: dict[tuple[str, str], tuple[str, str]] = {}
        kept = []
        for case in chunk:
            clash = next(((s, r, seen[(s, r)]) for s, r, o in case.facts
                          if (s, r) in seen and seen[(s, r)][0] != o), None)
            if clash:
                s, r, (o, first) = clash
                notes.append(f"case {case.case_id} edits ({s!r}, {r}) to another object than case {first} ({o!r}) "
                             f"in the same group; case {case.case_id} is left out of that group")
                continue
            for s, r, o in case.facts:
                seen.setdefault((s, r), (o, case.case_id))
            kept.append(case)
        groups.append(kept)
    return groups, notes


def group_requests(cases: Sequence[Case]) -> list[EditRequest]:
    """The requests of a group in list order, each distinct fact once."""
    out, seen = [], set()
    for case in cases:
        for fact, req in zip(case.facts, case.requests):
            if fact not in seen:
                seen.add(fact)
                out.append(req)
    return out


def _k_label(k: int | None) -> str:
    return "all" if k is None else str(k)


def _parse_k(value: Any) -> tuple[int | None, ...]:
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise SuiteError("mquake: k needs at least one group size")
    out: list[int | None] = []
    for v in values:
        if isinstance(v, str) and v.strip().lower() == "all":
            out.append(None)
        elif isinstance(v, str) and v.strip().isdigit():
            out.append(int(v))
        elif isinstance(v, int) and not isinstance(v, bool):
            out.append(v)
        else:
            raise SuiteError(f"mquake: k must be a positive integer or 'all', got {v!r}")
        if out[-1] is not None and out[-1] < 1:
            raise SuiteError(f"mquake: k must be a positive integer or 'all', got {v!r}")
    if len(set(out)) != len(out):
        raise SuiteError(f"mquake: k values repeat: {values!r}")
    return tuple(out)


# ----------------------------------------------------------------------------- the suite
class MQuAKE(Suite):
    """MQuAKE with groups of `k` cases per edit episode (`k`: an int, "all", or several of them, one split
    each, named `k=K`); `cot=False` leaves out the chain-of-thought metrics (128 generated tokens for
    each of a case's 3 questions, the bulk of the suite's cost)."""

    name = "mquake"
    description = "MQuAKE multi-hop questions after editing every fact of their chains (k=1)"
    files = {"cases": "mquake/MQuAKE-hard.json", "multihop": "mquake/prompts/multihop-prompts.txt",
             "cot": "mquake/prompts/multihop-cot-prompts.txt"}
    metrics = BASE_METRICS + tuple(m + "_strict" for m in BASE_METRICS)
    protocol = ("edit the facts of k cases together (batch, else in order), answer by greedy generation, restore "
                "(spec section 2.3)")
    default_k: tuple[Any, ...] = (1,)

    def __init__(self, k: Any = None, *, cot: bool = True) -> None:
        self.k = _parse_k(self.default_k if k is None else k)
        self.cot = bool(cot)
        self.demos: dict[str, str] = {}
        self._pre: dict[tuple[str, str], dict[str, float]] = {}  # (model fingerprint, case id) -> outcome

    def metric_names(self) -> list[str]:
        """Every metric name a row of this configuration holds (`k=K.metric`)."""
        base = [m for m in self.metrics if self.cot or m.removesuffix("_strict") not in COT_METRICS]
        return [f"k={_k_label(k)}.{m}" for k in self.k for m in base]

    def load(self, root: Path, limit: int | None = None, *, on_bad: str = "stop") -> list[Unit]:
        paths = self.data_paths(root)
        self.demos = {"multihop": read_prompt_file(paths["multihop"]), "cot": read_prompt_file(paths["cot"])}
        need = None if None in self.k or limit is None else limit * max(k for k in self.k if k is not None)
        records = read_records(paths["cases"])
        cases = [u.data for u in collect_units(list(enumerate(records)), self._parse, path=paths["cases"], limit=need,
                                               on_bad=on_bad)]
        units: list[Unit] = []
        for k in self.k:
            groups, notes = group_cases(cases, k)
            for note in notes:
                warnings.warn(f"{paths['cases'].name}: {note}", stacklevel=2)
            if not groups:
                raise SuiteError(f"suite {self.name!r}: k={k} needs {k} usable cases, "
                                 f"{paths['cases'].name} gave {len(cases)}")
            split = f"k={_k_label(k)}"
            units += [Unit(key=f"{split}:" + ",".join(c.case_id for c in g), split=split, data=g)
                      for g in groups[:limit]]
        return units

    def method_notes(self, method: str, hparams: Any, units: Sequence[Unit]) -> list[str]:
        """A method that states a fixed number of retrieved facts per prompt (IKE's `facts_per_query`)
        and fewer than a question's edited hops cannot be scored on composition: its few-shot question
        sees only some of the facts it needs."""
        per_query = getattr(hparams, "facts_per_query", None)
        need = max((len(c.new.facts) for u in units for c in u.data), default=0)
        if not isinstance(per_query, int) or per_query >= need:
            return []
        return [f"{method} states {per_query} edited fact(s) per prompt (facts_per_query={per_query}) but these "
                f"cases' questions need up to {need}: its multihop scores retrieval as much as composition; "
                f"pass --set facts_per_query={need} to state every fact of a chain"]

    @staticmethod
    def _parse(i: int, rec: Any, where: str) -> Unit:
        case = parse_case(i, rec, where)
        return Unit(key=case.case_id, split="case", data=case)

    # -- scoring
    def _outcomes(self, system: Any, cases: Sequence[Case], which: str) -> list[dict[str, float]]:
        """Per-case values of every metric on `system` against the `which` ("new" or "old") chain, with
        one generation call for the short answers and one for the chains of thought."""
        if not self.demos:
            raise SuiteError("mquake: load() the suite before scoring (it reads the demonstration files)")
        chains = [getattr(c, which) for c in cases]
        own = self._own_answers(system, cases)
        short: dict[str, str] = {}
        for case, chain in zip(cases, chains):
            for p, _ in (*chain.facts, *chain.hops):
                short[p] = ""
            if own is None:
                for q in case.questions:
                    short[multihop_prompt(self.demos["multihop"], q)] = ""
        # stop strings end each row's decoding at the delimiter the cuts below apply anyway (same text)
        short = dict(zip(short, system.generate(list(short), max(CLOZE_TOKENS, MULTIHOP_TOKENS), stop=("\n",))))
        long: dict[str, str] = {}
        if self.cot:
            prompts = list(dict.fromkeys(cot_prompt(self.demos["cot"], q) for c in cases for q in c.questions))
            long = dict(zip(prompts, system.generate(prompts, COT_TOKENS, stop=(COT_STOP,))))
        out = []
        for case, chain in zip(cases, chains):
            facts = [short[p] for p, _ in chain.facts]
            hops = [short[p] for p, _ in chain.hops]
            std = (own[case.case_id] if own is not None
                   else [short[multihop_prompt(self.demos["multihop"], q)] for q in case.questions])
            row: dict[str, float] = {"n_facts": float(len(facts))}
            for strict, sfx in ((False, ""), (True, "_strict")):
                row["edit_hits" + sfx] = float(edit_wise_hits(facts, [g for _, g in chain.facts], strict=strict))
                row["instance_wise" + sfx] = float(instance_wise(hops, [g for _, g in chain.hops], strict=strict))
                row["multihop" + sfx] = float(multihop(std, chain.answer, strict=strict))
                if self.cot:
                    cot = [long[cot_prompt(self.demos["cot"], q)] for q in case.questions]
                    row["multihop_cot" + sfx] = float(multihop_cot(cot, chain.answer, strict=strict))
                    row["hop_wise" + sfx] = float(hop_wise(cot, chain.answer, chain.intermediates, strict=strict))
            out.append(row)
        return out

    @staticmethod
    def _own_answers(system: Any, cases: Sequence[Case]) -> dict[str, list[str]] | None:
        """A system that answers multi-hop questions by its own procedure (MeLLo, DeepEdit) is asked the
        case's questions directly, with the case's plan, for the `multihop` metric; None for others."""
        from ..methods.memory.multihop import MultiHopQuestion, answers_multihop

        if not answers_multihop(system):
            return None
        asks = [MultiHopQuestion(q, c.start, c.relations) for c in cases for q in c.questions]
        answers = list(system.answer_multihop(asks))
        if len(answers) != len(asks):
            raise SuiteError(f"mquake: {type(system).__name__}.answer_multihop gave {len(answers)} answers for "
                             f"{len(asks)} questions")
        it = iter(answers)
        return {c.case_id: [next(it).answer for _ in c.questions] for c in cases}

    @staticmethod
    def _aggregate(split: str, rows: Sequence[dict[str, float]]) -> dict[str, float]:
        """Group values: edit-wise over all edited facts of the group, the rest the mean over its cases."""
        n = len(rows)
        out: dict[str, float] = {}
        for sfx in ("", "_strict"):
            out[f"{split}.edit_wise{sfx}"] = sum(r["edit_hits" + sfx] for r in rows) / sum(r["n_facts"] for r in rows)
            for m in BASE_METRICS[1:]:
                if m + sfx in rows[0]:
                    out[f"{split}.{m}{sfx}"] = sum(r[m + sfx] for r in rows) / n
        return out

    def unedited(self, lm: Any, unit: Unit) -> tuple[dict[str, float], Any]:
        cases: list[Case] = unit.data
        # Unedited outcomes depend on the case only, not on its group: cache them so that k=100 and
        # k=all do not regenerate 128-token chains of thought for the same cases.
        model = lm.base_fingerprint if not getattr(lm, "active_edits", ()) else None
        if model is None:
            return self._aggregate(unit.split, self._outcomes(lm, cases, "old")), None
        todo = [c for c in cases if (model, c.case_id) not in self._pre]
        if todo:
            for case, row in zip(todo, self._outcomes(lm, todo, "old")):
                self._pre[(model, case.case_id)] = row
        rows = [self._pre[(model, c.case_id)] for c in cases]
        return self._aggregate(unit.split, rows), None

    def edited(self, editing: Editing, unit: Unit, state: Any) -> dict[str, float]:
        cases: list[Case] = unit.data
        editing.push(group_requests(cases), batch=True)
        return self._aggregate(unit.split, self._outcomes(editing.system, cases, "new"))


class MQuAKEBatch(MQuAKE):
    """MQuAKE with 100 cases per edit and with all cases in one edit (splits `k=100`, `k=all`)."""

    name = "mquake-batch"
    description = "MQuAKE multi-hop questions after editing the facts of 100 cases, and of all cases, at once"
    default_k = (100, "all")


__all__ = ["Case", "Chain", "MQuAKE", "MQuAKEBatch", "cot_prompt", "cut_cloze", "cut_multihop", "edit_wise_hits",
           "group_cases", "group_requests", "hop_wise", "instance_wise", "mentions", "multihop", "multihop_cot",
           "multihop_prompt", "parse_case", "read_prompt_file", "split_cot"]
