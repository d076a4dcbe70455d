"""`knowedit` suite: KnowEdit (Zhang et al. 2024) with its portability and locality groups.

Splits (`knowedit/`): `recent` (wiki_recent_recent_train.json), `counterfact`
(wiki_counterfact_test_cf-generate-10.json: the test split published KnowEdit figures use, JSON Lines;
26 of its 885 records hold a probe with no answer), `zsre` (ccks_ZsRE-test-all.json), `wikibio`
(WikiBio_wikibio-test-all.json: edit `text` -> `labels`, locality only). Protocol: per record score θ,
apply the one edit, score θ', restore.

Metrics per split (EasyEdit's teacher-forced token scale, pitfall P6):
- `edit_succ`: token accuracy of `target_new` after `prompt`; `rephrase` where the record has a
  `rephrase_prompt` (zsre).
- portability groups `reasoning`, `subject_aliasing`, `logical_generalization` (`portability.{Reasoning,
  Subject_Aliasing, Logical_Generalization}[]`): token accuracy of the probe's answer; `portability` = the
  mean over the record's groups of each group's mean (spec 2.3), so a record with one reasoning and
  three aliasing probes weighs the two groups equally.
- locality groups `relation_specificity`, `forgetfulness`: share of teacher-forced argmax tokens on the
  probe's answer equal before and after the edit; `locality` = mean of the group means.
- `fluency` (option, off by default): ROME's n-gram entropy of 100-token samples from the edit prompt
  (and its rephrase), seeded per record; EasyEdit samples once from the edit prompt.
Groups a record lacks (or holds as an empty list) are absent from its row, never zero.

Answers: `ground_truth` is a string, a list of aliases, or a list of answers each a list of aliases
(wiki_recent: "the siblings are" [["Hildegard Tamm"], ["Olof Tamm"], ...]). Every alias of every answer
counts, and a probe scores its BEST alias (the maximum over aliases of its token accuracy, or of its
argmax agreement for locality). EasyEdit keeps only the first alias; `portability_first_alias` and
`locality_first_alias` report that variant from the same scores. A probe with no non-empty alias at all
is a record lacking a field (stop or skip, as `on_bad` says). The unedited row holds edit_succ, rephrase,
the portability groups and fluency; locality compares θ' with θ and is left out of it. Each model state is
scored in one batched pass over every (prompt, alias) pair; the unedited pass's argmax tokens are the
state the edited pass compares with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..data.knowedit import knowedit, wikibio
from ..eval.fluency import generation_fluency
from ..eval.metrics import generation_prompts
from ..requests import EditRequest
from .base import Editing, RecordFieldError, Suite, Unit, field_at, split_units, text_at
from .portability import loaded_request, record_seed
from .scoring import agreement

PORTABILITY_GROUPS = {"Reasoning": "reasoning", "Subject_Aliasing": "subject_aliasing",
                      "Logical_Generalization": "logical_generalization"}
LOCALITY_GROUPS = {"Relation_Specificity": "relation_specificity", "Forgetfulness": "forgetfulness"}
SPLITS = ("recent", "counterfact", "zsre", "wikibio")

Probe = tuple[str, list[str]]  # (prompt, aliases; the first is EasyEdit's answer)


def aliases(ground_truth: Any) -> list[str]:
    """Every answer string of a KnowEdit `ground_truth` (a string, a list of strings, or a list of alias
    lists), in file order, stripped, empty ones and repeats dropped."""
    items = ground_truth if isinstance(ground_truth, list) else [ground_truth]
    out: list[str] = []
    for item in items:
        for alias in item if isinstance(item, list) else [item]:
            if isinstance(alias, str) and alias.strip() and alias.strip() not in out:
                out.append(alias.strip())
    return out


def mean_of_group_means(groups: dict[str, Sequence[float]]) -> float | None:
    """A record's KnowEdit Portability/Locality: the mean over its groups of each group's mean (spec
    2.3); None when it has no group."""
    means = [sum(v) / len(v) for v in groups.values() if v]
    return sum(means) / len(means) if means else None


def _groups(rec: Any, section: str, names: dict[str, str], where: str) -> dict[str, list[Probe]]:
    """A record's `portability` or `locality` block as {group metric: [(prompt, aliases)]}."""
    block = rec.get(section)
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise RecordFieldError(f"{where}: field {section!r} must be an object of probe groups, got {block!r:.60}")
    out: dict[str, list[Probe]] = {}
    for key, items in block.items():
        if key not in names:
            raise RecordFieldError(f"{where}: unknown {section} group {key!r} (known: {', '.join(names)})")
        if not isinstance(items, list):
            raise RecordFieldError(f"{where}: field '{section}.{key}' must be a list of probes")
        probes = []
        for j, it in enumerate(items):
            prompt = text_at(it, "prompt", f"{where} {section}.{key}.{j}")
            answers = aliases(field_at(it, "ground_truth", f"{where} {section}.{key}.{j}"))
            if not answers:
                raise RecordFieldError(f"{where}: field '{section}.{key}.{j}.ground_truth' has no non-empty answer")
            probes.append((prompt, answers))
        if probes:
            out[names[key]] = probes
    return out


class KnowEditSuite(Suite):
    name = "knowedit"
    description = "KnowEdit: edit success, portability and locality groups (recent, counterfact, zsre, wikibio)"
    files = {"recent": "knowedit/wiki_recent_recent_train.json",
             "counterfact": "knowedit/wiki_counterfact_test_cf-generate-10.json",
             "zsre": "knowedit/ccks_ZsRE-test-all.json",
             "wikibio": "knowedit/WikiBio_wikibio-test-all.json"}
    metrics = tuple(f"{s}.{m}" for s in SPLITS
                    for m in ("edit_succ", "rephrase", *PORTABILITY_GROUPS.values(), "portability",
                              "portability_first_alias", *LOCALITY_GROUPS.values(), "locality", "locality_first_alias",
                              "fluency"))
    protocol = "single edit per record: score θ, edit, score θ', restore (EasyEdit token accuracy, spec 2.3)"

    def __init__(self, *, fluency: bool = False, seed: int = 0) -> None:
        self.fluency = fluency
        self.seed = seed

    def load(self, root: Path, limit: int | None = None, *, on_bad: str = "stop") -> list[Unit]:
        return split_units(self.data_paths(root), SPLITS, self._parse, limit=limit, on_bad=on_bad)

    @staticmethod
    def _parse(split: str, path: Path, i: int, rec: Any, where: str) -> Unit:
        if split == "wikibio":
            for f in ("text", "labels", "concept"):
                text_at(rec, f, where)
            req = loaded_request(wikibio, rec, path, i, where)
        else:
            for f in ("prompt", "subject", "target_new"):
                text_at(rec, f, where)
            req = loaded_request(knowedit, rec, path, i, where)
        # the loader's probes keep one alias per answer and merge the groups: the suite keeps its own
        req = req.with_probes(portability=[], locality=[])
        data = {"request": req, "portability": _groups(rec, "portability", PORTABILITY_GROUPS, where),
                "locality": _groups(rec, "locality", LOCALITY_GROUPS, where)}
        key = rec.get("case_id", i)  # the files carry no id: the record's position names it
        return Unit(key=f"{split}:{key}", split=split, data=data)

    def _score(self, system: Any, unit: Unit) -> tuple[dict[str, float], list[list[int]]]:
        """One batched pass: the metrics that read this system alone, and the argmax ids of every
        locality (prompt, alias) pair in `_pairs` order."""
        req: EditRequest = unit.data["request"]
        prompts = [req.prompt] + [p for p, _ in req.paraphrases]
        pairs = [(p, req.target_new) for p in prompts]
        port, loc = self._pairs(unit.data["portability"]), self._pairs(unit.data["locality"])
        pairs += port + loc
        scores = system.score([p for p, _ in pairs], [a for _, a in pairs])
        s = unit.split
        out = {f"{s}.edit_succ": scores[0].token_accuracy}
        if req.paraphrases:
            out[f"{s}.rephrase"] = sum(x.token_accuracy for x in scores[1 : len(prompts)]) / len(req.paraphrases)
        port_scores = scores[len(prompts) : len(prompts) + len(port)]
        acc = iter([x.token_accuracy for x in port_scores])
        out.update(self._group_metrics(s, "portability", unit.data["portability"], lambda: next(acc)))
        loc_argmax = [list(x.argmax_ids) for x in scores[len(prompts) + len(port) :]]
        if self.fluency:
            values = generation_fluency(system, generation_prompts(req), seed=record_seed(self.seed, unit.key))
            out[f"{s}.fluency"] = sum(values) / len(values)
        return out, loc_argmax

    @staticmethod
    def _pairs(groups: dict[str, list[Probe]]) -> list[tuple[str, str]]:
        return [(p, a) for probes in groups.values() for p, answers in probes for a in answers]

    @staticmethod
    def _group_metrics(split: str, section: str, groups: dict[str, list[Probe]], next_value: Any) -> dict[str, float]:
        """Best-alias group means, their mean, and the first-alias mean, consuming one value per
        (probe, alias) from `next_value` in `_pairs` order."""
        best: dict[str, list[float]] = {}
        first: dict[str, list[float]] = {}
        for group, probes in groups.items():
            for _, answers in probes:
                values = [next_value() for _ in answers]
                best.setdefault(group, []).append(max(values))
                first.setdefault(group, []).append(values[0])
        out = {f"{split}.{g}": sum(v) / len(v) for g, v in best.items()}
        overall, overall_first = mean_of_group_means(best), mean_of_group_means(first)
        if overall is not None and overall_first is not None:
            out[f"{split}.{section}"] = overall
            out[f"{split}.{section}_first_alias"] = overall_first
        return out

    def unedited(self, lm: Any, unit: Unit) -> tuple[dict[str, float], Any]:
        return self._score(lm, unit)

    def edited(self, editing: Editing, unit: Unit, state: Any) -> dict[str, float]:
        editing.push([unit.data["request"]])
        out, post = self._score(editing.system, unit)
        agree = iter([agreement(a, b) for a, b in zip(post, state, strict=True)])
        out.update(self._group_metrics(unit.split, "locality", unit.data["locality"], lambda: next(agree)))
        return out


__all__ = ["KnowEditSuite", "LOCALITY_GROUPS", "PORTABILITY_GROUPS", "aliases", "mean_of_group_means"]
