"""`distortion` (alias `roundedit`): RoundEdit knowledge distortion (Li et al., ICLR 2024).

A subject with several true objects for one relation (1-N: "fpart has use(s), such as" data migration,
data synchronization, computer file management) is edited a → b and then back b → a. Even when the round
trip "succeeds", the model's belief over the subject's *other* true objects has moved: the edit has
distorted knowledge it was never asked to touch (spec section 2.2).

Per record: on θ score P̄(a) and P̄(o) for o ∈ O⁻ (the true objects other than a, labels de-duplicated
first: the reference's `list.remove` left a second copy of a in 8 records, pitfall P3); apply a → b (θ'),
then b → a on top (θ''); score a, b, O⁻ on θ''; undo back to θ' and score a, b there. P̄ is the mean of
g(o|x) over the relation's prompt and its 10 paraphrases (`GPT2-XL_round_prompts.json`).
- Succ = ½·1[P̄_θ'(b) > P̄_θ'(a)] + ½·1[P̄_θ''(a) > P̄_θ''(b)];
- D = JS(P, Q) in nats, P/Q the normalised [P̄(a), P̄(o) for o ∈ O⁻] on θ / θ''; D_repo = D/(1+|O⁻|),
  what the reference's `js_div` computes (pitfall P1) and, as far as the repository shows, what the
  paper prints;
- IR = share of O⁻ with P̄_θ(o) > P̄_θ''(o); FR = 1[IR > 0.5].

`DistortionMLE` (`distortion-mle`) is the paper's Multi-Label Edit fix: the way back is one batch edit
b → o for every true object o, so it needs a method that edits a batch.

The unedited row is empty: on θ, D, IR and FR are 0 and Succ is ½ by definition, so no number there
would say anything about the model. Records have no ids: units are keyed `easy:index` / `hard:index`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..requests import EditRequest
from .base import Editing, RecordFieldError, Suite, SuiteError, Unit, field_at, text_at
from .conflict import edit_request, load_with_prompts, prompt_set
from .scoring import fact_probs, js_divergence, normalize_dist

# ------------------------------------------------------------------ per-record formulas (pure)


def round_success(p1_a: float, p1_b: float, p2_a: float, p2_b: float) -> float:
    """Succ of a round trip: half a point for b beating a after a → b (θ'), half for a beating b after
    b → a (θ'')."""
    return 0.5 * float(p1_b > p1_a) + 0.5 * float(p2_a > p2_b)


def distortion_metrics(before: Sequence[float], after: Sequence[float]) -> dict[str, float]:
    """D, D_repo, IR and FR of one record from P̄ of [a, *O⁻] on the unedited model (`before`) and
    after the round trip (`after`), in the same order; `a` first and at least one other object."""
    if len(before) != len(after) or len(before) < 2:
        raise ValueError(f"need P̄ of a and at least one other true object on both models, got {len(before)} "
                         f"and {len(after)} values")
    d = js_divergence(normalize_dist(before), normalize_dist(after))
    others = list(zip(before[1:], after[1:]))
    ir = sum(1 for b, a in others if b > a) / len(others)
    return {"D": d, "D_repo": d / len(before), "IR": ir, "FR": float(ir > 0.5)}


# ------------------------------------------------------------------ the suite


@dataclass(frozen=True)
class RoundCase:
    """One record: the edit there (a → b) and back (b → a, or b → every true object for MLE)."""

    there: EditRequest
    back: EditRequest
    back_multi: tuple[EditRequest, ...]  # MLE: b -> o for o in the de-duplicated true objects
    prompts: tuple[str, ...]  # X(s, r)
    a: str
    b: str
    others: tuple[str, ...]  # O⁻, de-duplicated, in file order


SPLITS = ("easy", "hard")


class Distortion(Suite):
    name = "distortion"
    description = "RoundEdit: edit a fact a→b and back b→a; how far the subject's other true objects moved"
    files = {"easy": "pitfalls/GPT2-XL_easy.json", "hard": "pitfalls/GPT2-XL_hard.json",
             "prompts": "pitfalls/GPT2-XL_round_prompts.json"}
    metrics = tuple(f"{s}.{m}" for s in SPLITS for m in ("Succ", "D", "D_repo", "IR", "FR"))
    protocol = "a→b, then b→a on top (θ''), undo to θ'; P̄ over 11 prompts (spec section 2.2)"
    mle = False  # the way back as one batch edit to every true object (Multi-Label Edit)

    def check_method(self, editor: Any) -> None:
        if not editor.reedits_prompts:
            raise SuiteError(f"suite {self.name!r} edits each prompt a→b and then, on top, re-edits the same prompt "
                             f"back; method {editor.name!r} refuses to edit a prompt it already edited to another "
                             "answer, so it cannot make any of its round trips (use a method that replaces a "
                             "re-edited answer, e.g. 'grace')")
        if self.mle and not editor.supports_batch:
            raise SuiteError(f"suite {self.name!r} edits every true object in one batch on the way back; method "
                             f"{editor.name!r} edits one request at a time (use suite 'distortion' instead)")

    def load(self, root: Path, limit: int | None = None, *, on_bad: str = "stop") -> list[Unit]:
        return load_with_prompts(self, root, SPLITS, limit, on_bad)

    @staticmethod
    def _unit(split: str, prompts: dict[str, list[str]], i: int, rec: Any, where: str) -> Unit:
        edit = field_at(rec, "edit", where)
        w = f"{where} edit"
        subject = text_at(edit, "subject.label", w)
        template = text_at(edit, "relation.prompt", w)
        rel = text_at(edit, "relation.id", w)
        if template.count("{}") != 1:
            raise RecordFieldError(f"{w}: field 'relation.prompt' {template!r} must hold one '{{}}' for the subject")
        if rel not in prompts:
            raise RecordFieldError(f"{w}: relation.id {rel!r} has no paraphrases in the prompts file")
        a, b = text_at(edit, "object.label", w), text_at(edit, "new_object.label", w)
        true_objects = field_at(rec, "true_objects", where)
        if not isinstance(true_objects, list):
            raise RecordFieldError(f"{where}: field 'true_objects' must be a list")
        labels = list(dict.fromkeys(text_at(o, "label", f"{where} true_objects[{j}]")
                                    for j, o in enumerate(true_objects)))
        others = tuple(o for o in labels if o != a)
        if not others:
            raise RecordFieldError(f"{where}: field 'true_objects' holds no object besides edit.object {a!r}")
        if a not in labels:
            labels.insert(0, a)  # never in this data; keeps the MLE batch restoring a as well
        case_id = f"{split}:{i}"
        there = edit_request(edit, w, case_id)
        back = EditRequest.create(prompt=there.prompt, subject=subject, target_new=a, target_true=b, case_id=case_id)
        multi = tuple(EditRequest.create(prompt=there.prompt, subject=subject, target_new=o,
                                         target_true=None if o.strip().casefold() == b.strip().casefold() else b,
                                         case_id=case_id) for o in labels)
        x = prompt_set(template, prompts[rel], subject)
        return Unit(case_id, split, RoundCase(there, back, multi, x, a, b, others))

    def unedited(self, lm: Any, unit: Unit) -> tuple[dict[str, float], Any]:
        case: RoundCase = unit.data
        before = fact_probs(lm, [(case.prompts, o) for o in (case.a, *case.others)])
        return {}, before

    def edited(self, editing: Editing, unit: Unit, state: Any) -> dict[str, float]:
        case: RoundCase = unit.data
        editing.push([case.there])
        after_there = editing.push(list(case.back_multi) if self.mle else [case.back])  # θ'' on top of θ'
        p2 = fact_probs(editing.system, [(case.prompts, o) for o in (case.a, case.b, *case.others)])
        editing.undo(after_there)
        p1_a, p1_b = fact_probs(editing.system, [(case.prompts, case.a), (case.prompts, case.b)])
        s = unit.split
        out = {f"{s}.Succ": round_success(p1_a, p1_b, p2[0], p2[1])}
        out.update({f"{s}.{k}": v for k, v in distortion_metrics(state, [p2[0], *p2[2:]]).items()})
        return out


class DistortionMLE(Distortion):
    name = "distortion-mle"
    description = "RoundEdit with the Multi-Label Edit fix: the way back edits every true object in one batch"
    protocol = ("a→b, then one batch b→o for every true object o (θ''), undo to θ'; "
                "P̄ over 11 prompts (spec 2.2, MLE)")
    mle = True


__all__ = ["Distortion", "DistortionMLE", "RoundCase", "distortion_metrics", "round_success"]
