"""`counterfact` and `zsre` suites: the classic single-edit scores plus the survey's portability
probes (does the edit reach its consequences?) and other attribution (does it leave the subject's
unrelated facts alone?). Definitions: spec sections 1 (portability acc, locality acc, GE) and 2.3.

Protocol (both suites, every split): per record score θ, apply the one edit, score θ', restore.

`counterfact` (ROME's full record format), two splits:
- `one_hop` (`counterfact_portability_gpt4.json`): probe `portability.New Question` -> `New Answer`;
- `subject_replace` (`counterfact_subject_replace.json`): probe
  `requested_rewrite.prompt.format(alternative_subject)` -> `target_new.str` (the edit asked through
  another name of the subject).
Per split: ES, PS, NS (mean-token probability comparisons, ROME), edit_succ / rephrase (teacher-forced
token accuracy of the new target on the edit prompt / paraphrases), the split's portability token
accuracy, and `other_attribution`: `unrelated_relation.question` -> `object` (an attribute of the
subject the edit should not touch), EasyEdit locality = share of teacher-forced argmax tokens equal
before and after the edit. Neither split file carries `unrelated_relation`; it lives in
`counterfact_distracting_neighbor.json`, which holds the same CounterFact cases (same case_id and
requested_rewrite), so it is joined by case_id and checked to describe the same edit: 602 of the 766
one-hop and 94 of the 213 subject-replace records get it, the others have no `other_attribution`.
The distracting neighbour (NS+, the edit statement prefixed to neighbour prompts) is the
`specificity-plus` suite's, not repeated here. With `fluency=True` (off by default: it samples 100
tokens per prompt) ROME's generation entropy over the record's 10 `generation_prompts`, seeded per record.
Dataset value `Score` per split: harmonic mean of the split's ES, PS, NS.

`zsre` (MEND format), three splits: `one_hop` (`zsre_mend_eval_portability_gpt4.json`: `portability.
New Question` -> `New Answer`), `inverse_relation` (`zsre_inverse_relation.json`: `inverse question` ->
`subject`), `subject_replace` (`zsre_subject_replace.json`: `alter_subject_question` -> `alt`).
Per split: edit_succ, rephrase, `locality` (`loc` -> `loc_ans`, argmax agreement; only the one-hop file
has it) and the split's portability token accuracy.

The unedited row holds every metric that reads the model alone (ES, PS, NS, token accuracies,
portability, fluency); `other_attribution` and `locality` compare θ' with θ and are left out of it.
Scoring reuses `editlab.eval.metrics.evaluate_requests`: each state is scored in one batched pass (the
unedited model twice: once for its argmax tokens on locality probes, which the edited passes compare
against, once for its own metrics). Token accuracy is teacher-forced per token (pitfall P6: a 3-token
answer with one right token scores 1/3); it is EasyEdit's scale, not comparable with generated-answer
exact match.
"""

from __future__ import annotations

import zlib
from abc import abstractmethod
from pathlib import Path
from typing import Any, Callable, Sequence

from ..data.counterfact import counterfact_full
from ..data.io import read_records
from ..data.zsre import zsre_mend
from ..errors import DataFormatError, EditRequestError
from ..eval.fluency import generation_fluency
from ..eval.metrics import evaluate_requests, generation_prompts, pre_edit
from ..requests import EditRequest
from .base import Editing, RecordFieldError, Suite, Unit, field_at, split_units, text_at
from .scoring import harmonic_mean, mean_token_probs, neighbourhood_scores


def loaded_request(loader: Callable[[dict[str, Any], Path, int], EditRequest], rec: dict[str, Any], path: Path,
                   i: int, where: str) -> EditRequest:
    """A record through its `editlab.data` loader; the loader's errors (a missing field, a subject
    absent from its prompt) become `RecordFieldError`, so that `on_bad` can skip such records."""
    try:
        return loader(rec, path, i)
    except RecordFieldError:
        raise
    except DataFormatError as e:  # already names the file and record
        raise RecordFieldError(str(e)) from None
    except EditRequestError as e:
        raise RecordFieldError(f"{where}: {e}") from None


def record_seed(seed: int, key: str) -> int:
    """A sampling seed per record (spec 2.6), the same for the unedited and every edited model, so
    that fluency differences are not sampling noise between two random draws."""
    return seed + zlib.crc32(key.encode())


class _SingleEditSuite(Suite):
    """Shared by `counterfact` and `zsre`: a unit holds the request to edit (carrying its evaluation
    probes) and optionally a second request whose only probe is a locality-type one; both are scored by
    `evaluate_requests` in one pass, the first for its scores, the second for its `locality_acc`."""

    splits: tuple[str, ...] = ()
    aux_metric = ""  # the row name of the second request's locality_acc

    def __init__(self, *, fluency: bool = False, seed: int = 0) -> None:
        self.fluency = fluency
        self.seed = seed

    def load(self, root: Path, limit: int | None = None, *, on_bad: str = "stop") -> list[Unit]:
        paths = self.data_paths(root)
        context = self._context(paths)
        return split_units(paths, self.splits, lambda split, path, i, rec, where: self._parse(split, path, i, rec, where, context),
                           limit=limit, on_bad=on_bad)

    def _context(self, paths: dict[str, Path]) -> Any:
        """Data shared by every record (a join table), read once in `load`."""
        return None

    @abstractmethod
    def _parse(self, split: str, path: Path, i: int, rec: Any, where: str, context: Any) -> Unit:
        """One record of `split` as a unit (raises `RecordFieldError` for a record lacking a field)."""

    @staticmethod
    def _requests(unit: Unit) -> list[EditRequest]:
        aux = unit.data.get("aux")
        return [unit.data["request"]] + ([aux] if aux is not None else [])

    def _row(self, unit: Unit, system: Any, pre: Any) -> dict[str, float]:
        reqs = self._requests(unit)
        rows = evaluate_requests(system, reqs, pre)
        out = {f"{unit.split}.{name}": rows[0][key] for key, name in self.renames(unit.split).items() if key in rows[0]}
        if len(rows) > 1 and "locality_acc" in rows[1]:
            out[f"{unit.split}.{self.aux_metric}"] = rows[1]["locality_acc"]
        if self.fluency:
            prompts = generation_prompts(unit.data["request"])
            values = generation_fluency(system, prompts, seed=record_seed(self.seed, unit.key))
            out[f"{unit.split}.fluency"] = sum(values) / len(values)
        return out

    @abstractmethod
    def renames(self, split: str) -> dict[str, str]:
        """`evaluate_requests` names -> this suite's metric names, for a split."""

    def unedited(self, lm: Any, unit: Unit) -> tuple[dict[str, float], Any]:
        reqs = self._requests(unit)
        # argmax tokens of θ on every locality-type probe (CounterFact's neighbour prompts included,
        # as evaluate_requests scores them with the other locality probes of a request)
        pre = pre_edit(lm, reqs) if any(r.locality or r.neighborhood for r in reqs) else None
        return self._row(unit, lm, None), pre

    def edited(self, editing: Editing, unit: Unit, state: Any) -> dict[str, float]:
        editing.push([unit.data["request"]])
        out = self._row(unit, editing.system, state)
        # the main request's locality_acc (argmax stability on neighbour prompts) is not a metric here
        return out


class CounterFactSuite(_SingleEditSuite):
    name = "counterfact"
    description = ("CounterFact with portability (one hop, subject replace), other attribution and optional "
                   "generation fluency")
    files = {"one_hop": "counterfact/counterfact_portability_gpt4.json",
             "subject_replace": "counterfact/counterfact_subject_replace.json",
             # not a split: the `unrelated_relation` probes of the same cases (joined by case_id)
             "unrelated_relation": "counterfact/counterfact_distracting_neighbor.json"}
    splits = ("one_hop", "subject_replace")
    metrics = tuple(f"{s}.{m}" for s in ("one_hop", "subject_replace")
                    for m in ("ES", "PS", "NS", "NS+", "NM+", "Score", "Score+", "edit_succ", "rephrase", s,
                              "other_attribution", "fluency"))
    protocol = "single edit per record: score θ, edit, score θ', restore (spec sections 1, 2.3, 2.6)"
    aux_metric = "other_attribution"

    def renames(self, split: str) -> dict[str, str]:
        return {"efficacy_score": "ES", "paraphrase_score": "PS", "neighborhood_score": "NS",
                "rewrite_acc": "edit_succ", "rephrase_acc": "rephrase", "portability_acc": split}

    def _context(self, paths: dict[str, Path]) -> dict[Any, dict[str, Any]]:
        return {rec["case_id"]: rec for rec in read_records(paths["unrelated_relation"]) if "case_id" in rec}

    def _parse(self, split: str, path: Path, i: int, rec: Any, where: str, context: Any) -> Unit:
        case = field_at(rec, "case_id", where)
        new = text_at(rec, "requested_rewrite.target_new.str", where)
        text_at(rec, "requested_rewrite.target_true.str", where)  # ES/PS/NS need it
        if split == "one_hop":
            probe = (text_at(rec, "portability.New Question", where), text_at(rec, "portability.New Answer", where))
        else:
            template = text_at(rec, "requested_rewrite.prompt", where)
            alias = text_at(rec, "alternative_subject", where)
            if "{}" not in template:
                raise RecordFieldError(f"{where}: requested_rewrite.prompt {template!r} has no '{{}}' for the subject")
            probe = (template.replace("{}", alias), new)  # = .format(alias)
        req = loaded_request(counterfact_full, rec, path, i, where).with_probes(portability=[probe])
        aux = None
        distracting: list[str] = []
        other = context.get(case)
        if other is not None and other.get("requested_rewrite") == rec.get("requested_rewrite"):
            # CounterFact+'s distracting neighbours of the same edit: its statement, then a neighbour prompt
            found = other.get("distracting_neighborhood_prompts")
            if isinstance(found, list):
                distracting = [p for p in found if isinstance(p, str) and p.strip()]
            ur = other.get("unrelated_relation")
            if isinstance(ur, dict) and isinstance(ur.get("question"), str) and isinstance(ur.get("object"), str) \
                    and ur["question"].strip() and ur["object"].strip():
                # a request without target_true: evaluate_requests scores only its rewrite prompt
                # (one extra sequence) and its locality probe
                aux = EditRequest.create(req.prompt, req.subject, req.target_new, None, req.case_id,
                                         locality=[(ur["question"], ur["object"])])
        return Unit(key=f"{split}:{case}", split=split, data={"request": req, "aux": aux, "distracting": distracting})

    def _row(self, unit: Unit, system: Any, pre: Any) -> dict[str, float]:
        """The shared scores, plus NS+ and NM+ on the record's CounterFact+ distracting neighbours (where
        the CounterFact+ file holds the same edit): 1[g(true) > g(new)] and g(true) − g(new) per prompt,
        g the mean token probability, as the `specificity-plus` suite computes them."""
        out = super()._row(unit, system, pre)
        req: EditRequest = unit.data["request"]
        prompts = unit.data.get("distracting") or []
        if prompts and req.target_true:
            g = mean_token_probs(system, [p for p in prompts for _ in (0, 1)],
                                 [t for _ in prompts for t in (req.target_true, req.target_new)])
            ns, nm = neighbourhood_scores(g[0::2], g[1::2])
            out[f"{unit.split}.NS+"], out[f"{unit.split}.NM+"] = ns, nm
        return out

    def summarize(self, rows: Sequence[dict[str, float]]) -> dict[str, float]:
        out = super().summarize(rows)
        for split in self.splits:
            # Score+ as CounterFact+ (and `specificity-plus`) defines it: ES, PS, NS and NS+; NS+ is the mean over
            # the records that have CounterFact+'s prompts (76 of the first 100), the others over all records
            for score, parts in (("Score", ("ES", "PS", "NS")), ("Score+", ("ES", "PS", "NS", "NS+"))):
                keys = [f"{split}.{m}" for m in parts]
                if all(k in out for k in keys):
                    out[f"{split}.{score}"] = harmonic_mean(out[k] for k in keys)
        return out


class ZsreSuite(_SingleEditSuite):
    name = "zsre"
    description = "zsRE token accuracy with portability (one hop, inverse relation, subject replace)"
    files = {"one_hop": "zsre/zsre_mend_eval_portability_gpt4.json",
             "inverse_relation": "zsre/zsre_inverse_relation.json",
             "subject_replace": "zsre/zsre_subject_replace.json"}
    splits = ("one_hop", "inverse_relation", "subject_replace")
    # only the one-hop file carries locality probes (loc, loc_ans)
    metrics = tuple(f"{s}.{m}" for s in ("one_hop", "inverse_relation", "subject_replace")
                    for m in ("edit_succ", "rephrase", s, "fluency")) + ("one_hop.locality",)
    protocol = "single edit per record: score θ, edit, score θ', restore (EasyEdit token accuracy, spec 2.3)"

    # where each split's portability probe is: (question field, answer field)
    PROBES = {"one_hop": ("portability.New Question", "portability.New Answer"),
              "inverse_relation": ("inverse question", "subject"),
              "subject_replace": ("alter_subject_question", "alt")}

    def renames(self, split: str) -> dict[str, str]:
        return {"rewrite_acc": "edit_succ", "rephrase_acc": "rephrase", "locality_acc": "locality",
                "portability_acc": split}

    def _parse(self, split: str, path: Path, i: int, rec: Any, where: str, context: Any) -> Unit:
        q_field, a_field = self.PROBES[split]
        probe = (text_at(rec, q_field, where), text_at(rec, a_field, where))
        text_at(rec, "rephrase", where)
        req = loaded_request(zsre_mend, rec, path, i, where).with_probes(portability=[probe])
        # the files carry no id: the record's position names it
        return Unit(key=f"{split}:{i}", split=split, data={"request": req, "aux": None})


__all__ = ["CounterFactSuite", "ZsreSuite", "loaded_request", "record_seed"]
