"""`conflict`: ConflictEdit (Li et al., ICLR 2024, "Unveiling the Pitfalls of Knowledge Editing").

Two edits that logically collide are applied one after the other; the question is whether the model
ends up holding the later fact or keeps the earlier one (spec section 2.1). Three splits:
- coverage: the same (subject, relation) edited twice, o → o₁ then o₁ → o₂ (CS, CM, Succ_single);
- reverse: e₁ (s, r, o₁) and e₂ on the reverse relation of o₁ (CS_exp, CS_imp, CM), where the implied
  fact is (e₂.new, e₁.r, e₁.new);
- composite: e₂ contradicts what e₁ implies through a tied, unedited fact t = triples[prerequisites[0]]
  (CS_exp, CS_imp, CM, TFD), the implied fact being (e₁.s, e₁.r, e₂.new).

A fact's probability P̄ is the mean of g(o|x) over X(s, r) = the relation's own prompt plus its 10
paraphrases from the prompts file (11 prompts). Per record (the reference order): θ → θ' with e₁,
θ' → θ'' with e₂ on top; score θ''; undo back to θ' and score the first edit's fact there; coverage also
applies e₂ alone to θ (θ₃) for Succ_single. TFD compares θ'' with P̄_θ(t) from the unedited pass.

Unedited row (on θ): the same comparisons of the same objects, under the same names: coverage.CS and
coverage.Succ_single (both are 1[P̄_θ(o₂) > P̄_θ(o₁)] there), CS_exp and CS_imp of reverse and
composite. CM needs θ' and TFD is 0 by definition on θ, so neither is in that row.

Records without ids are keyed `split:index`. An edit whose new object equals its old one (1 coverage and
24 composite records: an edit that asserts the existing fact) is kept, as the reference runs it, with no
`target_true` (EditRequest refuses a target_true equal to target_new).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import DataFormatError
from ..requests import EditRequest
from .base import Editing, RecordFieldError, Suite, Unit, field_at, split_units, text_at
from .scoring import fact_probs, probe_prompt

# ------------------------------------------------------------------ per-record formulas (pure)


def beats(p_later: float, p_earlier: float) -> float:
    """1 if the first fact is strictly more probable than the second, else 0 (CS, CS_exp, CS_imp,
    Succ_single: a tie is not a win, as in the reference's `>`)."""
    return 1.0 if p_later > p_earlier else 0.0


def conflict_magnitude(p_after_first: float, p_after_second: float) -> float:
    """CM = max((P̄_θ'(k_o) − P̄_θ''(k_o)) / P̄_θ'(k_o), −1): the share of the first edit's fact that the
    second edit took away; clipped at −1 because a second edit can raise it many-fold."""
    if p_after_first <= 0:
        raise ValueError(f"CM is undefined when the first edit's fact has probability {p_after_first} after it")
    return max((p_after_first - p_after_second) / p_after_first, -1.0)


def tied_fact_damage(p_unedited: float, p_after_both: float) -> float:
    """TFD = (P̄_θ(t) − P̄_θ''(t)) / P̄_θ(t), relative to the unedited model and not clipped (the
    reference's `FFD`)."""
    if p_unedited <= 0:
        raise ValueError(f"TFD is undefined when the tied fact has probability {p_unedited} before editing")
    return (p_unedited - p_after_both) / p_unedited


# ------------------------------------------------------------------ data helpers (also used by distortion)

Fact = tuple[tuple[str, ...], str]  # (prompt set X(s, r), object)


def read_relation_prompts(path: Path) -> dict[str, list[str]]:
    """The prompts file of the Pitfalls data: relation id -> paraphrase templates, each with one '{}'."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataFormatError(f"{path}: cannot read the relation prompts ({e})") from None
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected an object mapping relation ids to prompt lists")
    for rel, prompts in data.items():
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.count("{}") == 1 for p in prompts):
            raise DataFormatError(f"{path}: prompts of relation {rel!r} must be a list of strings with one '{{}}' each")
    return data


def load_with_prompts(suite: Any, root: Path, splits: Sequence[str], limit: int | None, on_bad: str) -> list[Unit]:
    """Units of a Pitfalls-data suite: every split's records parsed by `suite._unit(split, prompts, i, rec,
    where)` with the relation prompts file (`files["prompts"]`) read once."""
    paths = suite.data_paths(root)
    prompts = read_relation_prompts(paths["prompts"])
    return split_units(paths, splits, lambda split, path, i, rec, where: suite._unit(split, prompts, i, rec, where),
                       limit=limit, on_bad=on_bad)


def prompt_set(template: str, paraphrases: Sequence[str], subject: str) -> tuple[str, ...]:
    """X(s, r): the relation's own prompt followed by its paraphrases, each filled with the subject."""
    return tuple(t.format(subject) for t in (template, *paraphrases))


def fact_at(block: Any, where: str, prompts: dict[str, list[str]], *, obj: str = "object") -> Fact:
    """The fact (X(subject, relation), `obj`.label) of an edit or triple block of a record."""
    subject = text_at(block, "subject.label", where)
    template = text_at(block, "relation.prompt", where)
    rel = text_at(block, "relation.id", where)
    if template.count("{}") != 1:
        raise RecordFieldError(f"{where}: field 'relation.prompt' {template!r} must hold one '{{}}' for the subject")
    if rel not in prompts:
        raise RecordFieldError(f"{where}: relation.id {rel!r} has no paraphrases in the prompts file")
    return prompt_set(template, prompts[rel], subject), text_at(block, f"{obj}.label", where)


def edit_request(block: Any, where: str, case_id: str, *, old: str = "object") -> EditRequest:
    """The EditRequest of an edit block: relation.prompt filled with the subject, `old` -> new_object."""
    subject = text_at(block, "subject.label", where)
    template = text_at(block, "relation.prompt", where)
    new = text_at(block, "new_object.label", where)
    true = text_at(block, f"{old}.label", where)
    if true.strip().casefold() == new.strip().casefold():
        true = None  # an edit asserting the existing fact (kept, as the reference runs it)
    return EditRequest.create(prompt=probe_prompt(template.format(subject)), subject=subject, target_new=new,
                              target_true=true, case_id=case_id)


# ------------------------------------------------------------------ the suite


@dataclass(frozen=True)
class ConflictCase:
    """One record: the two edits and the facts scored on the edited models."""

    e1: EditRequest
    e2: EditRequest
    k_o: Fact  # (e₁.s, e₁.r, e₁.new): the earlier fact
    k_exp: Fact  # (e₂.s, e₂.r, e₂.new): the later, explicitly edited fact
    k_imp: Fact | None  # reverse/composite: the later fact implied through the rule
    old_on_e2: Fact | None  # coverage: (e₂.s, e₂.r, e₁.new), Succ_single's rival on θ₃
    tied: Fact | None  # composite: t = triples[prerequisites[0]]


SPLITS = ("coverage", "reverse", "composite")


class Conflict(Suite):
    name = "conflict"
    description = "ConflictEdit: two logically tied edits in a row; does the later fact win, what does it cost"
    files = {"coverage": "pitfalls/GPT2-XL_coverage_edit.json", "reverse": "pitfalls/GPT2-XL_reverse_edit.json",
             "composite": "pitfalls/GPT2-XL_composite_edit.json", "prompts": "pitfalls/GPT2-XL_conflict_prompts.json"}
    metrics = ("coverage.CS", "coverage.CM", "coverage.Succ_single", "reverse.CS_exp", "reverse.CS_imp", "reverse.CM",
               "composite.CS_exp", "composite.CS_imp", "composite.CM", "composite.TFD")
    protocol = ("e1, then e2 on top (θ''), undo to θ' after e1; coverage also e2 alone on θ; "
                "P̄ over 11 prompts (spec section 2.1)")

    def refuses_unit(self, editor: Any, unit: Unit) -> str | None:
        if unit.split == "coverage" and not editor.reedits_prompts:
            return (f"a coverage record re-edits the prompt it just edited (o → o₁, then o₁ → o₂) and method "
                    f"{editor.name!r} refuses to edit a prompt it already edited to another answer")
        return None

    def load(self, root: Path, limit: int | None = None, *, on_bad: str = "stop") -> list[Unit]:
        return load_with_prompts(self, root, SPLITS, limit, on_bad)

    @staticmethod
    def _unit(split: str, prompts: dict[str, list[str]], i: int, rec: Any, where: str) -> Unit:
        edits = field_at(rec, "edits", where)
        if not isinstance(edits, list) or len(edits) != 2:
            raise RecordFieldError(f"{where}: field 'edits' must hold exactly two edits")
        w1, w2 = f"{where} edits[0]", f"{where} edits[1]"
        case_id = f"{split}:{i}"
        e1, e2 = edit_request(edits[0], w1, case_id), edit_request(edits[1], w2, case_id)
        k_o = fact_at(edits[0], w1, prompts, obj="new_object")
        k_exp = fact_at(edits[1], w2, prompts, obj="new_object")
        k_imp = old_on_e2 = tied = None
        if split == "coverage":
            old_on_e2 = (k_exp[0], k_o[1])
        elif split == "reverse":
            # (e₂.new, e₁.r, e₁.new): the reverse of the second edit, asked with the first relation
            template, rel = text_at(edits[0], "relation.prompt", w1), text_at(edits[0], "relation.id", w1)
            k_imp = (prompt_set(template, prompts[rel], k_exp[1]), k_o[1])
        else:
            # (e₁.s, e₁.r, e₂.new): the first edit's subject and relation now implied to hold e₂'s object
            k_imp = (k_o[0], k_exp[1])
            prereq = field_at(rec, "prerequisites.0", where)
            tied = fact_at(field_at(rec, f"triples.{prereq}", where), f"{where} triples[{prereq}]", prompts)
        return Unit(case_id, split, ConflictCase(e1, e2, k_o, k_exp, k_imp, old_on_e2, tied))

    @staticmethod
    def _facts(case: ConflictCase) -> list[Fact]:
        """The facts scored on θ and θ'', in a fixed order: k_o, k_exp, then k_imp or tied where the
        split has them."""
        facts = [case.k_o, case.k_exp]
        if case.k_imp is not None:
            facts.append(case.k_imp)
        if case.tied is not None:
            facts.append(case.tied)
        return facts

    def unedited(self, lm: Any, unit: Unit) -> tuple[dict[str, float], Any]:
        case: ConflictCase = unit.data
        p = fact_probs(lm, self._facts(case))
        s = unit.split
        if s == "coverage":
            return {f"{s}.CS": beats(p[1], p[0]), f"{s}.Succ_single": beats(p[1], p[0])}, None
        metrics = {f"{s}.CS_exp": beats(p[1], p[0]), f"{s}.CS_imp": beats(p[2], p[0])}
        return metrics, (p[3] if case.tied is not None else None)

    def edited(self, editing: Editing, unit: Unit, state: Any) -> dict[str, float]:
        case: ConflictCase = unit.data
        s = unit.split
        at_theta = editing.push([case.e1])
        after_e1 = editing.push([case.e2])  # sequential: e₂ on top of e₁, no restore in between
        p2 = fact_probs(editing.system, self._facts(case))
        editing.undo(after_e1)
        p1_ko = fact_probs(editing.system, [case.k_o])[0]
        cm = conflict_magnitude(p1_ko, p2[0])
        if s == "coverage":
            editing.undo(at_theta)
            editing.push([case.e2])  # θ₃: the second edit alone on the unedited model
            p3_new, p3_old = fact_probs(editing.system, [case.k_exp, case.old_on_e2 or case.k_o])
            return {f"{s}.CS": beats(p2[1], p2[0]), f"{s}.CM": cm, f"{s}.Succ_single": beats(p3_new, p3_old)}
        out = {f"{s}.CS_exp": beats(p2[1], p2[0]), f"{s}.CS_imp": beats(p2[2], p2[0]), f"{s}.CM": cm}
        if case.tied is not None:
            out[f"{s}.TFD"] = tied_fact_damage(state, p2[3])
        return out


__all__ = ["Conflict", "ConflictCase", "beats", "conflict_magnitude", "edit_request", "fact_at", "prompt_set",
           "read_relation_prompts", "tied_fact_damage"]
