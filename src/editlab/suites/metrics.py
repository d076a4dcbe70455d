"""Every pitfall metric the suites report, with the metadata reports and listings read: direction,
range, unit and the paper or code that defines it. Definitions: `../shared/reference/pitfall-metrics.md`
and docs/pitfalls.md. This module imports nothing heavy (the CLI lists it without loading torch).

A suite row names a metric `split.metric` (e.g. `reverse.CS_imp`, `k=100.multihop`); `metric_info`
finds the entry from the part after the last dot.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import EditlabError
from ..registry import Registry


@dataclass(frozen=True)
class MetricInfo:
    name: str
    description: str
    higher_is_better: bool | None  # None: neither (a diagnostic)
    lo: float | None
    hi: float | None
    unit: str  # "fraction", "prob", "nats", "bits", "ppl", "ratio"
    source: str


METRICS: Registry[MetricInfo] = Registry("metric", EditlabError, case_sensitive=True)


def _m(name: str, description: str, higher: bool | None, lo: float | None, hi: float | None, unit: str, source: str) -> None:
    info = MetricInfo(name, description, higher, lo, hi, unit, source)
    METRICS.register(name, description, (lambda i=info: i), higher_is_better=higher, lo=lo, hi=hi, unit=unit, source=source)


_PITFALLS = "ConflictEdit/RoundEdit (Li et al., ICLR 2024; zjunlp/PitfallsKnowledgeEditing)"
_CFPLUS = "CounterFact+ (Hoelscher-Obermaier et al. 2023; apartresearch/specificityplus)"
_MQUAKE = "MQuAKE (Zhong et al. 2023)"
_EASYEDIT = "EasyEdit / KnowEdit token accuracy (Yao et al. 2023; Zhang et al. 2024)"

# conflict (section 2.1)
_m("Succ_single", "second edit applied alone to the unedited model beats the first edit's object", True, 0, 1, "fraction", _PITFALLS)
_m("CS", "after two tied edits the later fact beats the earlier one (coverage)", True, 0, 1, "fraction", _PITFALLS)
_m("CS_exp", "after two tied edits the explicitly edited later fact beats the earlier fact", True, 0, 1, "fraction", _PITFALLS)
_m("CS_imp", "after two tied edits the implied fact beats the earlier fact", True, 0, 1, "fraction", _PITFALLS)
_m("CM", "relative drop of the first edit's fact caused by the second edit, clipped at -1", True, -1, 1, "ratio", _PITFALLS)
_m("TFD", "relative drop of the tied (unedited) fact after both edits", False, None, 1, "ratio", _PITFALLS)
# distortion (section 2.2)
_m("Succ", "both legs of the round trip a->b->a succeed (half point each)", True, 0, 1, "fraction", _PITFALLS)
_m("D", "Jensen-Shannon divergence of the distribution over the subject's true objects, before vs after the round trip",
   False, 0, 0.6931471805599453, "nats", _PITFALLS)
_m("D_repo", "D divided by the number of objects, as the reference code computes it", False, 0, 0.6931471805599453, "nats",
   _PITFALLS)
_m("IR", "share of the subject's other true objects whose probability fell", False, 0, 1, "fraction", _PITFALLS)
_m("FR", "records where more than half of the other true objects lost probability", False, 0, 1, "fraction", _PITFALLS)
# multi-hop (section 2.3)
_m("edit_wise", "edited facts recalled by greedy generation from their cloze prompt", True, 0, 1, "fraction", _MQUAKE)
_m("instance_wise", "every fact of the new chain recalled", True, 0, 1, "fraction", _MQUAKE)
_m("multihop", "the new multi-hop answer generated for at least one of the case's questions", True, 0, 1, "fraction", _MQUAKE)
_m("multihop_cot", "multihop with chain-of-thought demonstrations", True, 0, 1, "fraction", _MQUAKE)
_m("hop_wise", "multihop_cot correct with every intermediate entity in the thoughts", True, 0, 1, "fraction", "PokeMQA (Gu et al. 2024)")
for _base in ("edit_wise", "instance_wise", "multihop", "multihop_cot", "hop_wise"):
    _m(f"{_base}_strict", f"{_base} with exact string equality after stripping (the MeLLo notebook's rule)", True, 0, 1,
       "fraction", _MQUAKE)
# specificity+ (section 2.4)
_m("NS", "neighbour prompts whose true object beats the new one", True, 0, 1, "fraction", _CFPLUS)
_m("NS+", "NS with the edit statement prefixed to each neighbour prompt", True, 0, 1, "fraction", _CFPLUS)
_m("NM", "mean margin g(true) - g(new) on neighbour prompts", True, -1, 1, "prob", _CFPLUS)
_m("NM+", "NM on the distracting prompts", True, -1, 1, "prob", _CFPLUS)
_m("NKL", "KL(edited || unedited) of the next-token distribution on neighbour prompts", False, 0, None, "nats", _CFPLUS)
_m("NKL+", "NKL on the distracting prompts", False, 0, None, "nats", _CFPLUS)
_m("NKL_repo", "NKL divided by the vocabulary size, as the reference code computes it", False, 0, None, "nats", _CFPLUS)
_m("NKL+_repo", "NKL+ divided by the vocabulary size, as the reference code computes it", False, 0, None, "nats", _CFPLUS)
_m("ES", "rewrite prompt: g(new) > g(true)", True, 0, 1, "fraction", "ROME (Meng et al. 2022)")
_m("PS", "paraphrase prompts: g(new) > g(true)", True, 0, 1, "fraction", "ROME (Meng et al. 2022)")
_m("Score", "harmonic mean of the dataset's ES, PS and NS", True, 0, 1, "fraction", "ROME (Meng et al. 2022)")
_m("Score+", "harmonic mean of the dataset's ES, PS, NS and NS+", True, 0, 1, "fraction", _CFPLUS)
# portability / KnowEdit (section 2.3, token accuracy)
_m("edit_succ", "teacher-forced token accuracy of the new target on the edit prompt", True, 0, 1, "fraction", _EASYEDIT)
_m("rephrase", "teacher-forced token accuracy of the new target on paraphrases", True, 0, 1, "fraction", _EASYEDIT)
_m("one_hop", "token accuracy of one-hop consequence questions", True, 0, 1, "fraction", _EASYEDIT)
_m("subject_replace", "token accuracy of the edit asked through an alias of the subject", True, 0, 1, "fraction", _EASYEDIT)
_m("inverse_relation", "token accuracy of the inverse-relation question", True, 0, 1, "fraction", _EASYEDIT)
_m("other_attribution", "unrelated attribute of the edited subject: argmax tokens unchanged", True, 0, 1, "fraction", _EASYEDIT)
_m("reasoning", "KnowEdit portability: reasoning (compositional) questions", True, 0, 1, "fraction", _EASYEDIT)
_m("subject_aliasing", "KnowEdit portability: the edit asked through a subject alias", True, 0, 1, "fraction", _EASYEDIT)
_m("logical_generalization", "KnowEdit portability: logical consequences", True, 0, 1, "fraction", _EASYEDIT)
_m("portability", "KnowEdit portability: mean over the record's portability groups", True, 0, 1, "fraction", _EASYEDIT)
_m("relation_specificity", "KnowEdit locality: other relations of the subject, argmax tokens unchanged", True, 0, 1, "fraction",
   _EASYEDIT)
_m("forgetfulness", "KnowEdit locality: facts that should survive the edit, argmax tokens unchanged", True, 0, 1, "fraction",
   _EASYEDIT)
_m("locality", "locality probes (zsRE loc, KnowEdit groups: mean over the record's groups): argmax tokens unchanged",
   True, 0, 1, "fraction", _EASYEDIT)
_m("portability_first_alias", "KnowEdit portability scoring only each probe's first alias (EasyEdit)", True, 0, 1,
   "fraction", _EASYEDIT)
_m("locality_first_alias", "KnowEdit locality scoring only each probe's first alias (EasyEdit)", True, 0, 1, "fraction",
   _EASYEDIT)
_m("fluency", "weighted bigram/trigram entropy of sampled generations", True, 0, None, "bits", "ROME (Meng et al. 2022)")

# dialogue robustness (suite `dialogue`; editlab's protocol, see suites/dialogue.py)
_DIALOGUE = "editlab's dialogue protocol after \"Is it Possible to Edit LLMs Robustly?\" (Ma et al. 2024)"
_m("success", "the turn's answer gives the new target", True, 0, 1, "fraction", _DIALOGUE)
_m("reversion", "the turn's answer goes back to the old object", False, 0, 1, "fraction", _DIALOGUE)
_m("confusion", "the turn's answer gives neither the new target nor the old object", False, 0, 1, "fraction", _DIALOGUE)

# probes at sequential checkpoints (editlab.probes; spec sections 2.5 and 2.7)
_MEH = "Model-Editing-Hurt (Gu et al. 2024) prompts; editlab's option-likelihood scoring"
_m("ppl_wikitext", "perplexity of WikiText-2 test, 512-token windows", False, 1, None, "ppl", "spec section 2.7")
_m("ppl_corpus", "perplexity of the default corpus sample, 512-token windows", False, 1, None, "ppl", "spec section 2.7")
_m("collapsed", "WikiText-2 perplexity above twice the unedited value (editlab's threshold)", False, 0, 1, "fraction",
   "editlab")
_m("nkl_fixed", "KL(edited || unedited) of the next-token distribution on 100 fixed unrelated prompts", False, 0, None,
   "nats", "spec section 2.7")
_m("nkl_fixed_top1", "fixed unrelated prompts whose most likely next token is unchanged", True, 0, 1, "fraction", "editlab")
_m("norm_growth_max", "largest |W_c - W_0|_F / |W_0|_F over the matrices the edits changed", False, 0, None, "ratio",
   "editlab (after Gupta et al. 2024)")
_m("norm_growth_mean", "mean |W_c - W_0|_F / |W_0|_F over the matrices the edits changed", False, 0, None, "ratio",
   "editlab (after Gupta et al. 2024)")
_m("norm_ratio_max", "largest |W_c|_F / |W_0|_F over the matrices the edits changed", None, 0, None, "ratio", "editlab")
_m("norm_ratio_mean", "mean |W_c|_F / |W_0|_F over the matrices the edits changed", None, 0, None, "ratio", "editlab")
_m("matrices_changed", "weight matrices the active edits changed", None, 0, None, "count", "editlab")
for _task, _what in (("sst2", "SST-2 sentiment"), ("rte", "RTE entailment"), ("boolq", "BoolQ yes/no")):
    _m(_task, f"{_what}: the more likely of the two option tokens is right", True, 0, 1, "fraction", _MEH)
    _m(f"{_task}_chance", f"{_what}: majority-class rate of the scored subset (chance level)", None, 0, 1, "fraction", _MEH)
    _m(f"{_task}_meh_answered", f"{_what}: greedy token parses as an option (MEH)", None, 0, 1, "fraction", _MEH)
    _m(f"{_task}_meh_acc_answered", f"{_what}: MEH accuracy over parsed answers", True, 0, 1, "fraction", _MEH)
    _m(f"{_task}_meh_acc_all", f"{_what}: MEH accuracy over all questions", True, 0, 1, "fraction", _MEH)
_m("nq", "NQ-open: a gold answer occurs as a word span of the 20-token greedy answer", True, 0, 1, "fraction", _MEH)
_m("gsm8k_extract", "GSM8K with the gold rationale in the prompt: first number of the answer equals the gold "
   "(answer extraction, not reasoning)", True, 0, 1, "fraction", _MEH)
_m("gsm8k_meh", "GSM8K extraction with MEH's substring rule", True, 0, 1, "fraction", _MEH)


def metric_info(name: str) -> MetricInfo:
    """The entry for a metric name, with or without its `split.` prefix and `unedited/` marker."""
    base = name.rsplit("/", 1)[-1]
    base = base.rsplit(".", 1)[-1] if base not in METRICS else base
    return METRICS.get(base)


def is_fraction(name: str) -> bool:
    """Whether a metric lies in [0, 1], for a 0..1 plot axis: a run's own retention / newest-edit curves
    and every registered metric of unit "fraction" (a split prefix is allowed); anything else is not."""
    if name.rsplit(".", 1)[-1].startswith(("retention_", "newest_")):
        return True
    try:
        return metric_info(name).unit == "fraction"
    except EditlabError:
        return False


__all__ = ["METRICS", "MetricInfo", "is_fraction", "metric_info"]
