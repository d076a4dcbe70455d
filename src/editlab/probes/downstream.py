"""`downstream` probe: general ability as edits accumulate (spec section 2.5), on five of the
Model-Editing-Hurt (MEH) tasks with MEH's prompts verbatim and the first n rows of each file.

Scoring (the spec's recommended probe, which keeps MEH's prompts and fixes its scoring):

- SST-2, RTE, BoolQ (`sst2`, `rte`, `boolq`): the option with the higher next-token log-probability
  wins (" positive"/" negative", " True"/" False", " yes"/" no"); one batched
  `system.next_token_logprobs` per task, so weight edits and LM views are scored by the same call. An
  option that is not one token for the model's tokenizer (checked in `prepare`) is scored instead by its
  mean token log-probability through `system.score`. A tie counts as wrong (the system has no
  preference). `<task>_chance` is the majority-class rate of the scored rows, printed beside the score:
  a task at chance is at floor and its change is not interpreted.
- MEH's own variant (`<task>_meh_answered`, `_meh_acc_answered`, `_meh_acc_all`): the greedy first
  token, parsed as MEH parses it (SST-2: contains "positive"/"negative"; RTE: contains "true"/"false";
  BoolQ: equals " yes"/" no"; all case-insensitive). Greedy decoding of one token is the argmax of the
  next-token distribution, so it is read off the same `next_token_logprobs` call instead of a second
  forward pass through `generate` (the LM and every view answer both calls on the same prompt text).
  `acc_answered` is left out when no output parses (an accuracy over no answers is undefined; MEH
  prints "error" there), so a checkpoint never shows a 0 that is not one; `answered` = 0 says so.
- NQ-open (`nq`): greedy 20 tokens; correct when some word span of the SQuAD-normalised generation
  equals a normalised gold answer, counted once per question. Only the generation is searched (MEH's
  script also searches the prompt's passage and counts some questions twice, spec pitfall P7).
- GSM8K (`gsm8k_extract`): the prompt contains the gold rationale, so this measures answer
  extraction, not reasoning. Greedy 5 tokens; correct when the first number of the output (commas
  removed) equals the gold `#### N`. `gsm8k_meh` is MEH's rule: N occurs as a substring. Five tokens
  is MEH's limit; with a tokenizer that writes one token per digit after a space token (SmolLM2), a
  gold of five or more digits, or a number written with a thousands comma, cannot be produced in
  full: 2 of the quick 32 rows, 14 of the full 300, so the score's ceiling there is about 0.94-0.95.

Sizes are fixed per budget (`SIZES`) so that runs with the same budget are comparable; a file with
fewer rows than its budget, a missing field or a malformed value raises `ProbeError` naming the file,
line and field. The TSV files are read with `csv.QUOTE_NONE`: the RTE sentences contain quotation marks
that belong to the text. MEH's script reads them with `csv.reader`'s default quoting, which drops the
quotation marks around a field that starts with one: 1 of the quick 64 RTE rows and 8 of the full 300
differ from MEH's prompts that way (a deliberate deviation: the text as the file holds it).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from ..requests import _context_limit
from ..suites.scoring import normalize_answer
from .base import Probe, ProbeError

TASKS = ("sst2", "rte", "boolq", "nq", "gsm8k")
CLASSIFICATION = ("sst2", "rte", "boolq")
FILES = {
    "sst2": "downstream/test-SentimentAnalysis.tsv",
    "rte": "downstream/test-NLI.tsv",
    "boolq": "downstream/test-ClosedDomainQA.jsonl",
    "nq": "downstream/test-OpenDomainQA.jsonl",
    "gsm8k": "downstream/test-reasoning.jsonl",
}
SIZES: dict[str, dict[str, int]] = {
    # quick: half the spec's recommended sizes (128/128/64/64/64), so that every probe together stays near
    # the 90 s per checkpoint on a 2-core CPU with a 135M model (SE <= 0.09 at p = 0.5); full:
    # the spec's 300 each (SE <= 0.029)
    "quick": {"sst2": 64, "rte": 64, "boolq": 32, "nq": 32, "gsm8k": 32},
    "full": {t: 300 for t in TASKS},
}
# tokens generated per prompt (MEH's settings); a prompt plus these must fit the model's context
NEW_TOKENS = {"sst2": 1, "rte": 1, "boolq": 1, "nq": 20, "gsm8k": 5}
# the two answer options of each classification task; label index 0 is the first option
OPTIONS = {"sst2": (" positive", " negative"), "rte": (" True", " False"), "boolq": (" yes", " no")}

_MEH = ("meh_answered", "meh_acc_answered", "meh_acc_all")


def _task_metrics(task: str) -> tuple[str, ...]:
    if task in CLASSIFICATION:
        return (task, f"{task}_chance", *(f"{task}_{m}" for m in _MEH))
    return ("nq",) if task == "nq" else ("gsm8k_extract", "gsm8k_meh")


# ----------------------------------------------------------------------------- prompts (MEH, verbatim)
def sst2_prompt(sentence: str) -> str:
    return ("For each snippet of text,label the sentiment of the text as positive or negative.The answer should be "
            f"exact 'positive' or 'negative'. text: {sentence} answer:")


def rte_prompt(sentence1: str, sentence2: str) -> str:
    return f"{sentence1} entails the {sentence2}. True or False? answer:"


def boolq_prompt(passage: str, question: str) -> str:
    return ("Please answer the given question based on the passage. The answer should be exact 'yes' or 'no'. "
            f"passage: {passage} question: {question}. answer:")


def nq_prompt(passage: str, question: str) -> str:
    return f"Refer to the passage below and answer the following question. Passage: {passage} Question: {question}"


def gsm8k_prompt(question: str, rationale: str) -> str:
    return f"Q: {question} A:Let's think step by step. {rationale} Therefore, the answer (arabic numerals) is:"


# ----------------------------------------------------------------------------- scoring rules
def span_match(output: str, golds: Sequence[str]) -> bool:
    """Whether a word span of the SQuAD-normalised `output` equals some normalised gold answer (a gold
    that normalises to nothing never matches). One truth value per question, however many golds match."""
    words = normalize_answer(output).split()
    for gold in golds:
        g = normalize_answer(gold).split()
        if g and any(words[i : i + len(g)] == g for i in range(len(words) - len(g) + 1)):
            return True
    return False


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def first_number(text: str) -> Decimal | None:
    """The first number in `text` with thousands commas removed ("1,800" -> 1800; "18." -> 18), or None."""
    m = _NUMBER.search(text.replace(",", ""))
    return Decimal(m.group()) if m else None


def _as_number(text: str) -> Decimal | None:
    """`text` as a number ("1,800" -> 1800), or None when it is not exactly one finite number."""
    try:
        value = Decimal(text.strip().replace(",", ""))
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def gsm8k_extract_correct(output: str, gold: str) -> bool:
    """editlab's GSM8K rule: the output's first number equals the gold number (compared as numbers)."""
    got, want = first_number(output), _as_number(gold)
    return got is not None and want is not None and got == want


def gsm8k_meh_correct(output: str, gold: str) -> bool:
    """MEH's GSM8K rule: the gold answer string occurs in the output (so " 180" passes for 18)."""
    return gold in output


def meh_parse(task: str, output: str) -> int | None:
    """MEH's parse of a classification output: the option index it names (0 = positive / True / yes,
    1 = negative / False / no), or None for an output MEH counts as "others"."""
    low = output.lower()
    if task == "sst2":
        return 0 if "positive" in low else 1 if "negative" in low else None
    if task == "rte":
        return 0 if "true" in low else 1 if "false" in low else None
    if task == "boolq":
        return 0 if low == " yes" else 1 if low == " no" else None
    raise ProbeError(f"task {task!r} has no MEH parse; classification tasks: {', '.join(CLASSIFICATION)}")


def majority_rate(labels: Sequence[Any]) -> float:
    """Share of the most frequent label (the accuracy of always answering it); 0 for no labels."""
    if not labels:
        return 0.0
    counts: dict[Any, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    return max(counts.values()) / len(labels)


# ----------------------------------------------------------------------------- reading the files
@dataclass
class TaskData:
    """One task's prepared rows: prompts, gold labels (option index) or answers, and file lines."""

    task: str
    prompts: list[str]
    golds: list[Any]
    lines: list[int] = field(default_factory=list)


class _Reader:
    """Reads the first `n` records of one file and reports any problem as `ProbeError` with its place."""

    def __init__(self, path: Path, rel: str, n: int) -> None:
        self.path, self.rel, self.n = path, rel, n

    def fail(self, line: int | None, msg: str) -> ProbeError:
        where = f"{self.rel} ({self.path})" + (f", line {line}" if line is not None else "")
        return ProbeError(f"downstream probe: {where}: {msg}")

    def _open(self) -> Any:
        if not self.path.is_file():
            raise self.fail(None, "file not found (set EDITLAB_DATA to the benchmark data folder)")
        return open(self.path, encoding="utf-8", newline="")

    def _short(self, got: int) -> ProbeError:
        return self.fail(None, f"has {got} records, the budget needs the first {self.n}")

    def tsv(self, fields: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
        """(line number, {field: text}) of the first n data rows of a tab-separated file with a header."""
        out: list[tuple[int, dict[str, str]]] = []
        try:
            with self._open() as f:
                rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                header = next(rows, None)
                if header is None:
                    raise self.fail(1, "empty file (expected a header line)")
                for name in fields:
                    if name not in header:
                        raise self.fail(1, f"header has no field {name!r} (found {header})")
                col = {name: header.index(name) for name in fields}
                for row in rows:
                    if len(out) == self.n:
                        break
                    line = rows.line_num
                    if not any(c.strip() for c in row):
                        continue
                    rec = {}
                    for name, j in col.items():
                        if j >= len(row) or not row[j].strip():
                            raise self.fail(line, f"missing field {name!r}")
                        rec[name] = row[j]
                    out.append((line, rec))
        except UnicodeDecodeError as e:
            raise self.fail(None, f"not UTF-8 text ({e})") from None
        if len(out) < self.n:
            raise self._short(len(out))
        return out

    def jsonl(self) -> list[tuple[int, dict[str, Any]]]:
        """(line number, record) of the first n JSON objects of a JSON-lines file (blank lines skipped)."""
        out: list[tuple[int, dict[str, Any]]] = []
        try:
            with self._open() as f:
                for line, text in enumerate(f, start=1):
                    if len(out) == self.n:
                        break
                    if not text.strip():
                        continue
                    try:
                        rec = json.loads(text)
                    except json.JSONDecodeError as e:
                        raise self.fail(line, f"not valid JSON ({e.msg})") from None
                    if not isinstance(rec, dict):
                        raise self.fail(line, "a record must be a JSON object")
                    out.append((line, rec))
        except UnicodeDecodeError as e:
            raise self.fail(None, f"not UTF-8 text ({e})") from None
        if len(out) < self.n:
            raise self._short(len(out))
        return out

    def text(self, line: int, rec: dict[str, Any], name: str) -> str:
        value = rec.get(name)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(line, f"missing field {name!r} (a non-empty string)")
        return value


def _read_sst2(r: _Reader) -> TaskData:
    d = TaskData("sst2", [], [])
    for line, rec in r.tsv(("sentence", "label")):
        if rec["label"].strip() not in ("0", "1"):
            raise r.fail(line, f"field 'label' is {rec['label']!r}, expected 1 (positive) or 0 (negative)")
        d.prompts.append(sst2_prompt(rec["sentence"]))
        d.golds.append(0 if rec["label"].strip() == "1" else 1)
        d.lines.append(line)
    return d


def _read_rte(r: _Reader) -> TaskData:
    d = TaskData("rte", [], [])
    for line, rec in r.tsv(("sentence1", "sentence2", "label")):
        label = rec["label"].strip()
        if label not in ("entailment", "not_entailment"):
            raise r.fail(line, f"field 'label' is {label!r}, expected entailment or not_entailment")
        d.prompts.append(rte_prompt(rec["sentence1"], rec["sentence2"]))
        d.golds.append(0 if label == "entailment" else 1)
        d.lines.append(line)
    return d


def _read_boolq(r: _Reader) -> TaskData:
    d = TaskData("boolq", [], [])
    for line, rec in r.jsonl():
        passage, question = r.text(line, rec, "passage"), r.text(line, rec, "question")
        if not isinstance(rec.get("answer"), bool):
            raise r.fail(line, "missing field 'answer' (true or false)")
        d.prompts.append(boolq_prompt(passage, question))
        d.golds.append(0 if rec["answer"] else 1)
        d.lines.append(line)
    return d


def _read_nq(r: _Reader) -> TaskData:
    d = TaskData("nq", [], [])
    for line, rec in r.jsonl():
        question = r.text(line, rec, "question")
        answers, output = rec.get("answer"), rec.get("output")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise r.fail(line, "missing field 'answer' (a non-empty list of strings)")
        if not isinstance(output, list) or not output or not isinstance(output[0], str):
            raise r.fail(line, "missing field 'output' (a list whose first item is the passage)")
        d.prompts.append(nq_prompt(output[0], question))
        d.golds.append(list(answers))
        d.lines.append(line)
    return d


def _read_gsm8k(r: _Reader) -> TaskData:
    d = TaskData("gsm8k", [], [])
    for line, rec in r.jsonl():
        question, answer = r.text(line, rec, "question"), r.text(line, rec, "answer")
        if "#### " not in answer:
            raise r.fail(line, "field 'answer' has no '#### N' final answer")
        rationale, _, gold = answer.partition("#### ")
        gold = gold.strip()
        if _as_number(gold) is None:
            raise r.fail(line, f"field 'answer' ends in '#### {gold}', not a number")
        d.prompts.append(gsm8k_prompt(question, rationale))
        d.golds.append(gold)
        d.lines.append(line)
    return d


_READERS: dict[str, Callable[[_Reader], TaskData]] = {
    "sst2": _read_sst2, "rte": _read_rte, "boolq": _read_boolq, "nq": _read_nq, "gsm8k": _read_gsm8k}


# ----------------------------------------------------------------------------- the probe
class Downstream(Probe):
    """SST-2, RTE, BoolQ, NQ-open and GSM8K answer extraction with MEH's prompts (see the module
    docstring for each score). `tasks` limits the probe to some of them."""

    name = "downstream"
    description = "general ability: SST-2, RTE, BoolQ, NQ-open, GSM8K answer extraction (MEH prompts), with chance levels"
    metrics: ClassVar[tuple[str, ...]] = tuple(m for t in TASKS for m in _task_metrics(t))
    headline: ClassVar[tuple[str, ...]] = ("gsm8k_extract", "sst2", "rte", "boolq", "nq")
    files: ClassVar[tuple[str, ...]] = tuple(FILES[t] for t in TASKS)
    SIZES: ClassVar[dict[str, dict[str, int]]] = SIZES

    def __init__(self, budget: str = "quick", data_root: Path | None = None,
                 tasks: Sequence[str] | None = None) -> None:
        super().__init__(budget=budget, data_root=data_root)
        if isinstance(tasks, str):
            tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        chosen = list(TASKS) if tasks is None else list(tasks)
        unknown = [t for t in chosen if t not in TASKS]
        if unknown or not chosen:
            what = f"unknown task(s) {', '.join(map(repr, unknown))}" if unknown else "no task chosen"
            raise ProbeError(f"downstream probe: {what}; choose from {', '.join(TASKS)}")
        self.tasks: tuple[str, ...] = tuple(t for t in TASKS if t in chosen)  # canonical order, no repeats
        self.files = tuple(FILES[t] for t in self.tasks)  # check() looks only for the chosen tasks' files
        self.data: dict[str, TaskData] = {}
        self.option_ids: dict[str, tuple[int | None, int | None]] = {}
        self.prompt_tokens: dict[str, int] = {}
        self.prepared = False

    @property
    def task_metrics(self) -> tuple[str, ...]:
        """The metric names `measure` returns for the chosen tasks."""
        return tuple(m for t in self.tasks for m in _task_metrics(t))

    # ------------------------------------------------------------------ prepare
    def check(self) -> None:
        """The chosen tasks' files exist and their first n rows (n from the budget) hold every field
        (read here, before any model loads; `ProbeError` names the file, line and field)."""
        super().check()
        self.data = {task: _READERS[task](self._reader(task)) for task in self.tasks}

    def check_model(self, lm: Any) -> None:
        """Every prompt fits the model's context with its generated tokens (tokenizer only)."""
        limit = _context_limit(lm)
        for task, data in self.read().items():
            reader = self._reader(task)
            total = 0
            for prompt, line in zip(data.prompts, data.lines):
                n = len(lm.encode_prompt(prompt))
                total += n
                if limit is not None and n + NEW_TOKENS[task] > limit:
                    raise reader.fail(line, f"the {task} prompt is {n} tokens, which with {NEW_TOKENS[task]} generated "
                                      f"exceeds the model's context of {limit} tokens; leave the downstream probe out of "
                                      f"--probes for this model (editlab pitfalls: --only without collapse; in Python: "
                                      f"Downstream(tasks=...) without {task})")
            self.prompt_tokens[task] = total

    def prepare(self, lm: Any) -> None:
        """Read the chosen tasks' rows, build the prompts, check that each fits the model's context with
        its generated tokens and which answer options are single tokens. Tokenizer only: no forward pass
        (the runner measures checkpoint 0 itself)."""
        self.prepared = False
        self.check_model(lm)
        for task, data in self.data.items():
            if task in CLASSIFICATION:
                self.option_ids[task] = tuple(self._single_token(lm, data.prompts, opt) for opt in OPTIONS[task])
        self.prepared = True

    def _reader(self, task: str) -> _Reader:
        return _Reader(self.root / FILES[task], FILES[task], self.SIZES[self.budget][task])

    def read(self) -> dict[str, TaskData]:
        """Read the chosen tasks' first n rows (n from the budget) and build their prompts (no model
        needed, read once: `check` already did it); `ProbeError` names the file, line and field of any
        problem."""
        if set(self.data) != set(self.tasks):
            self.check()
        return self.data

    @staticmethod
    def _single_token(lm: Any, prompts: Sequence[str], option: str) -> int | None:
        """The option's token id when it continues every prompt as the same single token, else None."""
        ids = {tuple(lm.encode_pair(p, option)[1]) for p in prompts}
        if len(ids) == 1:
            (only,) = ids
            if len(only) == 1:
                return int(only[0])
        return None

    # ------------------------------------------------------------------ measure
    def measure(self, system: Any, lm: Any) -> dict[str, float]:
        if not self.prepared:
            raise ProbeError("downstream probe: measure() called before a successful prepare()")
        out: dict[str, float] = {}
        for task in self.tasks:
            if task in CLASSIFICATION:
                out.update(self._classify(task, system, lm))
            elif task == "nq":
                d = self.data[task]
                gens = system.generate(d.prompts, max_new_tokens=NEW_TOKENS[task])
                out["nq"] = _mean(span_match(g, golds) for g, golds in zip(gens, d.golds))
            else:
                d = self.data[task]
                gens = system.generate(d.prompts, max_new_tokens=NEW_TOKENS[task])
                out["gsm8k_extract"] = _mean(gsm8k_extract_correct(g, n) for g, n in zip(gens, d.golds))
                out["gsm8k_meh"] = _mean(gsm8k_meh_correct(g, n) for g, n in zip(gens, d.golds))
        return out

    def option_scores(self, task: str, system: Any) -> tuple[list[tuple[float, float]], list[int]]:
        """Per prompt of `task`: (score of option 0, score of option 1), and the greedy next-token id.
        Single-token options are read off one `next_token_logprobs` call; others are their mean token
        log-probability from `system.score`."""
        d = self.data[task]
        lp = system.next_token_logprobs(d.prompts)
        greedy = lp.argmax(dim=-1).tolist()
        cols: list[list[float]] = []
        for opt, tid in zip(OPTIONS[task], self.option_ids[task]):
            if tid is not None:
                cols.append(lp[:, tid].tolist())
            else:
                cols.append([-s.mean_nll for s in system.score(d.prompts, [opt] * len(d.prompts))])
        return list(zip(cols[0], cols[1])), greedy

    def _classify(self, task: str, system: Any, lm: Any) -> dict[str, float]:
        d = self.data[task]
        scores, greedy = self.option_scores(task, system)
        correct = [(0 if a > b else 1 if b > a else -1) == gold for (a, b), gold in zip(scores, d.golds)]
        parsed = [meh_parse(task, lm.tokenizer.decode([t], skip_special_tokens=True)) for t in greedy]
        answered = [(p, gold) for p, gold in zip(parsed, d.golds) if p is not None]
        right = sum(p == gold for p, gold in answered)
        n = len(d.golds)
        out = {
            task: _mean(correct),
            f"{task}_chance": majority_rate(d.golds),
            f"{task}_meh_answered": len(answered) / n,
            f"{task}_meh_acc_all": right / n,
        }
        if answered:  # no parsed answer: an accuracy over none is undefined (MEH prints "error"), not 0
            out[f"{task}_meh_acc_answered"] = right / len(answered)
        return out

    def info(self) -> dict[str, Any]:
        sizes = self.SIZES[self.budget]
        return {**super().info(), "tasks": list(self.tasks), "sizes": {t: sizes[t] for t in self.tasks},
                "new_tokens": {t: NEW_TOKENS[t] for t in self.tasks},
                "option_scoring": {t: ["next_token" if i is not None else "mean_logprob" for i in ids]
                                   for t, ids in self.option_ids.items()},
                "prompt_tokens": dict(self.prompt_tokens)}


def _mean(values: Any) -> float:
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else 0.0


__all__ = ["CLASSIFICATION", "Downstream", "FILES", "OPTIONS", "SIZES", "TASKS", "first_number", "gsm8k_extract_correct",
           "gsm8k_meh_correct", "majority_rate", "meh_parse", "span_match"]
