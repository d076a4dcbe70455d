"""The `mquake` suite: its per-case formulas on the spec's worked example (case 7417), its data parsing and
grouping (the Portal conflict, shared facts), bad records, and the whole protocol on the tiny model."""

import json
import shutil
import warnings
from types import SimpleNamespace

import pytest

from editlab.models import load_lm
from editlab.runner.store import Store
from editlab.suites.base import Editing, RecordFieldError, SuiteError
from editlab.suites.mquake import (MQuAKE, MQuAKEBatch, cot_prompt, cut_cloze, edit_wise_hits, group_cases,
                                   group_requests, hop_wise, instance_wise, mentions, multihop, multihop_cot,
                                   multihop_prompt, parse_case, split_cot)
from editlab.suites.runner import UNEDITED, SuitePlan, run_suite

# Case 7417 (spec 2.3): Hey Jude -> Madonna -> Narendra Modi -> Australia -> Arabic.
NEW_ANSWER = ["Arabic", "ar", "Arabian language", "Arabic language"]
OLD_ANSWER = ["English", "en", "eng", "English language"]
MIDDLE = [["Madonna", "Madonna Ciccone"], ["Narendra Modi", "Modi", "NaMo"], ["Australia", "Oz", "AU", "AUS"]]
THOUGHTS = (" Hey Jude was performed by Madonna. The director of Madonna is Narendra Modi. Narendra Modi is a "
            "citizen of Australia. The official language of Australia is Arabic.\nAnswer: Arabic language.")


def case_7417(data_root):
    records = json.loads((data_root / "mquake" / "MQuAKE-hard.json").read_text())
    return records, next(r for r in records if r["case_id"] == 7417)


# --- per-case formulas --------------------------------------------------------------------------------------
def test_multihop_worked_example_matches_after_normalisation_only():
    outs = [" Arabic language.\nQ: Who is the spouse of Joe Biden? A: Jill Biden", " English", " Paris"]
    assert multihop(outs, NEW_ANSWER)  # "arabic language" is an alias; one question of three suffices
    assert not multihop(outs, NEW_ANSWER, strict=True)  # the MeLLo rule: "Arabic language." is not an alias
    assert multihop([" Arabic\n"], NEW_ANSWER, strict=True)
    assert multihop(outs, OLD_ANSWER)  # the unedited row asks the same questions with the original golds
    assert not multihop([" Paris", " French", "\nArabic"], NEW_ANSWER)  # the answer is cut at the first newline


def test_cloze_cut_at_first_newline_or_period():
    assert cut_cloze(" Madonna. She sang\nmore") == " Madonna"
    assert cut_cloze(" Narendra Modi\nThe") == " Narendra Modi"
    outs = [" Madonna, the singer.", " Narendra Modi.", " India", " Arabic\n"]
    golds = [["Madonna"], ["Narendra Modi", "Modi"], ["Australia", "AU"], NEW_ANSWER]
    assert edit_wise_hits(outs, golds) == 2  # "Madonna, the singer" is not "Madonna"; India is wrong
    assert not instance_wise(outs, golds)
    assert instance_wise([" Madonna.", " Modi", " AU.", " Arabic"], golds)
    assert edit_wise_hits([" madonna"], [["Madonna"]], strict=True) == 0


def test_cot_answer_is_after_the_last_answer_marker_and_stops_at_the_next_question():
    text = THOUGHTS + "\n\nQuestion: Who is the spouse of the US president?\nThoughts: x\nAnswer: Jill Biden"
    thoughts, answer = split_cot(text)
    assert answer == " Arabic language."
    assert thoughts.endswith("is Arabic.\n") and "Jill" not in thoughts
    assert split_cot(" no answer here") == (" no answer here", "")
    assert multihop_cot([" nothing", text], NEW_ANSWER)
    assert not multihop_cot([" nothing", text], NEW_ANSWER, strict=True)
    assert not multihop_cot([" The answer is Arabic"], NEW_ANSWER)  # no "Answer:" marker, no answer


def test_hop_wise_needs_every_intermediate_entity_in_the_thoughts():
    assert hop_wise([THOUGHTS], NEW_ANSWER, MIDDLE)
    # an alias suffices ("Modi" for Narendra Modi)
    assert hop_wise([THOUGHTS.replace("Narendra Modi", "Modi")], NEW_ANSWER, MIDDLE)
    # Australia missing from the thoughts (named only in the answer): right answer, wrong route
    no_aus = " Madonna's director is Narendra Modi, a citizen of a land.\nAnswer: Arabic (Australia)"
    assert multihop_cot([no_aus], NEW_ANSWER + ["Arabic (Australia)"])
    assert not hop_wise([no_aus], NEW_ANSWER + ["Arabic (Australia)"], MIDDLE)
    # all entities named but a wrong final answer
    assert not hop_wise([THOUGHTS.replace("Answer: Arabic language.", "Answer: English")], NEW_ANSWER, MIDDLE)
    # the entities must be in the same question's thoughts as the right answer
    assert not hop_wise([" Madonna and Narendra Modi.\nAnswer: Arabic", THOUGHTS.replace("Arabic language", "Hindi")],
                        NEW_ANSWER, MIDDLE)


def test_mentions_match_whole_words_after_normalisation():
    assert mentions("The citizen of Australia.", ["AU", "Australia"])
    assert not mentions("The citizen of Australia.", ["AU"])  # not inside a word
    assert mentions("the  MADONNA's director", ["Madonna's"])
    assert not mentions("madonna", ["Madonna"], strict=True)
    assert mentions("Madonna", ["Madonna"], strict=True)


def test_prompts_follow_the_shipped_demonstration_layout():
    assert multihop_prompt("D", "Who?") == "D\nQ: Who? A:"
    assert cot_prompt("D", "Who?") == "D\n\nQuestion: Who?\nThoughts:"


# --- data ---------------------------------------------------------------------------------------------------
def test_parse_case_7417_gives_both_chains(data_root):
    _, rec = case_7417(data_root)
    case = parse_case(0, rec, "MQuAKE-hard.json record 0")
    assert case.case_id == "7417"
    assert [r.prompt for r in case.requests][:2] == ["Hey Jude was performed by", "The director of Madonna is"]
    assert [(r.target_true, r.target_new) for r in case.requests][3] == ("English", "Arabic")
    assert case.new.facts[3] == ("The official language of Australia is", tuple(NEW_ANSWER))
    # the original chain's second hop is about The Beatles, so the true object's aliases are not borrowed
    assert case.old.facts[1] == ("The director of Madonna is", ("Guy Oseary",))
    assert case.old.hops[1][0] == "The director of The Beatles is"
    assert case.new.intermediates[2][0] == "Australia" and len(case.new.intermediates) == 3
    assert case.old.answer == tuple(OLD_ANSWER) and case.new.answer == tuple(NEW_ANSWER)


def test_demonstration_files_are_read_byte_exact(data_root):
    suite = MQuAKE()
    suite.load(data_root, 1)
    raw = (data_root / "mquake" / "prompts" / "multihop-prompts.txt").read_bytes()
    assert suite.demos["multihop"].encode() == raw
    assert suite.demos["multihop"].endswith("A: Elizabeth II")  # the file ends without a newline
    assert "Who was Dodge Ram SRT-10 created by? Dodge\n" in suite.demos["multihop"]  # kept as shipped (P8)


def test_portal_conflict_drops_the_later_case_of_a_group(data_root):
    records = json.loads((data_root / "mquake" / "MQuAKE-hard.json").read_text())
    cases = [parse_case(i, r, f"record {i}") for i, r in enumerate(records) if r["case_id"] in (7417, 7699, 8563)]
    groups, notes = group_cases(cases, None)
    assert [c.case_id for c in groups[0]] == ["7417", "7699"]
    assert len(notes) == 1 and "8563" in notes[0] and "Portal" in notes[0]
    groups, notes = group_cases(cases, 1)  # apart, both are edited
    assert [[c.case_id for c in g] for g in groups] == [["7417"], ["7699"], ["8563"]] and not notes
    groups, notes = group_cases(cases, 2)  # the trailing case does not fill a group of 2
    assert [[c.case_id for c in g] for g in groups] == [["7417", "7699"]] and "left out" in notes[0]


def test_facts_shared_by_cases_of_a_group_are_edited_once(data_root):
    records = json.loads((data_root / "mquake" / "MQuAKE-hard.json").read_text())
    cases = [parse_case(i, r, f"record {i}") for i, r in enumerate(records[:40])]
    facts = [f for c in cases for f in c.facts]
    reqs = group_requests(cases)
    assert len(reqs) == len(set(facts)) < len(facts)
    assert reqs[:4] == list(cases[0].requests)  # list order kept


@pytest.mark.filterwarnings("ignore:.*do not fill a group")
def test_batch_variant_groups_100_and_all_with_a_warning(data_root):
    with pytest.warns(UserWarning, match="8563"):
        units = MQuAKEBatch().load(data_root)
    assert [u.split for u in units] == ["k=100"] * 3 + ["k=all"]
    assert [len(u.data) for u in units] == [100, 100, 100, 307]
    assert units[0].key.startswith("k=100:7417,7430,")
    assert len({u.key for u in units}) == len(units)
    units = MQuAKEBatch(k=[100]).load(data_root, 1)
    assert len(units) == 1 and len(units[0].data) == 100


def test_k_option_is_validated():
    assert MQuAKE(k="all").k == (None,)
    assert MQuAKE(k=[1, "100", "all"]).k == (1, 100, None)
    for bad in (0, -3, "most", [], [1, 1], True):
        with pytest.raises(SuiteError):
            MQuAKE(k=bad)
    assert "k=1.hop_wise" not in MQuAKE(cot=False).metric_names()
    assert "k=all.hop_wise_strict" in MQuAKE(k="all").metric_names()


def _data_copy(tmp_path, data_root, records):
    (tmp_path / "mquake").mkdir()
    shutil.copytree(data_root / "mquake" / "prompts", tmp_path / "mquake" / "prompts")
    (tmp_path / "mquake" / "MQuAKE-hard.json").write_text(json.dumps(records))
    return tmp_path


def test_record_lacking_a_field_stops_or_is_skipped(tmp_path, data_root):
    records = json.loads((data_root / "mquake" / "MQuAKE-hard.json").read_text())[:3]
    del records[1]["new_answer_alias"]
    root = _data_copy(tmp_path, data_root, records)
    with pytest.raises(RecordFieldError, match=r"record 1 \(case_id 7430\).*'new_answer_alias'"):
        MQuAKE().load(root)
    with pytest.warns(UserWarning, match="skipped 1 record"):
        units = MQuAKE().load(root, on_bad="skip")
    assert [u.key for u in units] == ["k=1:7417", "k=1:7437"]


def test_rewrite_that_cannot_make_an_edit_request_is_a_record_error(tmp_path, data_root):
    records = json.loads((data_root / "mquake" / "MQuAKE-hard.json").read_text())[:1]
    records[0]["requested_rewrite"][2]["target_new"]["str"] = "India"  # equals target_true
    with pytest.raises(RecordFieldError, match=r"requested_rewrite\.2"):
        MQuAKE().load(_data_copy(tmp_path, data_root, records))


# --- the protocol on the tiny model ---------------------------------------------------------------------------
class Scripted:
    """A system whose generations are known: it answers every prompt of case 7417 as `answers` says (by
    the prompt's last line), so the suite's prompt layout and metric wiring can be checked exactly."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def generate(self, prompts, max_new_tokens, stop=()):
        self.calls.append((len(prompts), max_new_tokens))
        return [next((a for key, a in self.answers.items() if p.endswith(key)), " nothing") for p in prompts]


def test_scores_of_a_known_system_on_case_7417(data_root):
    suite = MQuAKE()
    unit = suite.load(data_root, 1)[0]
    q0 = unit.data[0].questions[0]
    system = Scripted({
        "Hey Jude was performed by": " Madonna.", "The director of Madonna is": " Narendra Modi\n",
        "Narendra Modi is a citizen of": " India.", "The official language of Australia is": " Arabic",
        f"Q: {q0} A:": " Arabic language.\nQ:", f"Question: {q0}\nThoughts:": THOUGHTS + "\n\nQuestion: x",
    })
    out = suite._aggregate(unit.split, suite._outcomes(system, unit.data, "new"))
    assert out["k=1.edit_wise"] == 0.75 and out["k=1.instance_wise"] == 0.0
    assert out["k=1.multihop"] == 1.0 and out["k=1.multihop_strict"] == 0.0
    assert out["k=1.multihop_cot"] == 1.0 and out["k=1.hop_wise"] == 1.0 and out["k=1.hop_wise_strict"] == 0.0
    # one short call (the 4 clozes, shared by edit- and instance-wise, and 3 questions), one chain-of-thought call
    assert system.calls == [(4 + 3, 16), (3, 128)]
    pre = suite._aggregate(unit.split, suite._outcomes(system, unit.data, "old"))
    assert pre["k=1.multihop"] == 0.0 and pre["k=1.multihop_cot"] == 0.0
    assert pre["k=1.edit_wise"] == 0.25  # " India." is the true object of "Narendra Modi is a citizen of"


class OwnProcedure(Scripted):
    """A system that answers multi-hop questions itself (as MeLLo's and DeepEdit's views do)."""

    def __init__(self, answers, final):
        super().__init__(answers)
        self.final, self.asked = final, []

    def answer_multihop(self, questions):
        from editlab.methods.memory.multihop import MultiHopAnswer

        self.asked.extend(questions)
        return [MultiHopAnswer(self.final(i)) for i in range(len(questions))]


def test_a_system_with_its_own_multihop_procedure_is_asked_each_question_with_the_plan(data_root):
    suite = MQuAKE(cot=False)
    unit = suite.load(data_root, 1)[0]
    case = unit.data[0]
    assert case.start == "Hey Jude" and case.relations == ("P175", "P1037", "P27", "P37")
    assert all(r.extra["relation_id"] == rel for r, (_, rel, _) in zip(case.requests, case.facts))
    system = OwnProcedure({}, lambda i: "Arabic" if i == 2 else "English")
    out = suite._aggregate(unit.split, suite._outcomes(system, unit.data, "new"))
    assert [q.question for q in system.asked] == list(case.questions)
    assert all(q.start == "Hey Jude" and q.relations == case.relations for q in system.asked)
    assert out["k=1.multihop"] == 1.0  # one of the three questions answered with the new answer
    # the few-shot multi-hop prompts are not asked of such a system; the clozes still are
    assert system.calls == [(4, 16)]
    wrong = OwnProcedure({}, lambda i: "English")
    assert suite._aggregate(unit.split, suite._outcomes(wrong, unit.data, "new"))["k=1.multihop"] == 0.0


def test_a_view_stacked_on_a_multihop_view_is_asked_the_few_shot_prompts(data_root):
    """Review fix: a view on top of a MeLLo/DeepEdit view delegates unknown attributes to it; asking the
    lower view's procedure would skip the top edit, so only the top system's own class counts."""
    from editlab.methods.memory.multihop import answers_multihop
    from editlab.models.view import LMView

    below = OwnProcedure({}, lambda i: "Arabic")
    assert answers_multihop(below)
    class Top(LMView):  # a view that changes nothing, over a system that has only `generate`
        def generate(self, prompts, max_new_tokens=20, **kw):
            return self.inner.generate(prompts, max_new_tokens, **kw)

    top = Top(below)
    assert callable(getattr(top, "answer_multihop", None)) and not answers_multihop(top)
    suite = MQuAKE(cot=False)
    unit = suite.load(data_root, 1)[0]
    suite._outcomes(top, unit.data, "new")
    assert below.asked == [] and below.calls == [(4 + 3, 16)]  # clozes and the three few-shot questions


@pytest.fixture(scope="module")
def tiny():
    return load_lm("tiny-llama")


def test_whole_protocol_on_the_tiny_model_leaves_it_unchanged(tiny, data_root, tmp_path):
    suite = MQuAKE()
    units = suite.load(data_root, 3)
    before = tiny.fingerprint()
    plan = SuitePlan(suite=suite, units=units, methods=["ft"], data={}, limit=3, on_bad="stop")
    store = Store(tmp_path / "r.db")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*exceeded the model's predefined maximum length")
        runs = run_suite(tiny, plan, store, hparams={"ft": {"steps": 2}})
    assert tiny.fingerprint() == before and not tiny.active_edits
    names = set(suite.metric_names())
    for method in (UNEDITED, "ft"):
        rows = list(store.rows(runs[method]))
        assert [r.row_key for r in rows] == ["k=1:7417", "k=1:7430", "k=1:7437"]
        for r in rows:
            assert set(r.metrics) == names
            assert all(0.0 <= v <= 1.0 for v in r.metrics.values())
    assert all(r.n_edits == 1 for r in store.rows(runs["ft"]))  # FT takes a case's 4 facts in one batch


def test_a_group_is_one_batch_edit_for_batch_methods(tiny, data_root):
    suite = MQuAKE(k=3, cot=False)
    unit = suite.load(data_root, 1)[0]
    editing = Editing(tiny, "ft", {"steps": 1})
    before = tiny.fingerprint()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*exceeded the model's predefined maximum length")
        out = suite.edited(editing, unit, None)
    assert editing.n_edits == 1 and len(editing.stack[0].requests) == len(group_requests(unit.data))
    editing.undo(0)
    assert tiny.fingerprint() == before
    assert set(out) == set(suite.metric_names()) and "k=3.multihop_cot" not in out


def test_a_method_stating_fewer_facts_than_a_chain_has_hops_gets_a_note(data_root):
    suite = MQuAKE(k=2, cot=False)
    units = suite.load(data_root, 2)
    need = max(len(c.new.facts) for u in units for c in u.data)
    assert need == 4  # MQuAKE-hard: every hop edited
    notes = suite.method_notes("ike", SimpleNamespace(facts_per_query=1), units)
    assert len(notes) == 1 and "facts_per_query=1" in notes[0] and "--set facts_per_query=4" in notes[0]
    assert suite.method_notes("ike", SimpleNamespace(facts_per_query=4), units) == []
    assert suite.method_notes("rome", SimpleNamespace(layers=[4]), units) == []  # no such setting: nothing to say


def test_the_runner_shows_the_suite_s_note_for_ike(tiny, data_root, tmp_path, monkeypatch):
    suite = MQuAKE(cot=False)
    units = suite.load(data_root, 1)
    plan = SuitePlan(suite=suite, units=units, methods=["ike"], data={}, limit=1, on_bad="stop")
    monkeypatch.setattr(MQuAKE, "unedited", lambda self, lm, unit: (_ for _ in ()).throw(RuntimeError("stop")))
    with warnings.catch_warnings(record=True) as seen, pytest.raises(RuntimeError, match="stop"):
        warnings.simplefilter("always")
        run_suite(tiny, plan, Store(tmp_path / "r.db"), hparams={"ike": {"pool": "builtin", "n_demos": 0}})
    assert [str(w.message) for w in seen if "facts_per_query" in str(w.message)] == [
        suite.method_notes("ike", SimpleNamespace(facts_per_query=1), units)[0]]
