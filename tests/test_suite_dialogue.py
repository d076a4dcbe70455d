"""The `dialogue` suite: the answer-matching rule on hand-made answers, the dialogue text with a chat
template and in the plain fallback (with its warning), records read from the real CounterFact file
(with the one-hop join and bad records), the whole protocol through the runner on the tiny trained
model, and ROME on the real SmolLM2 (slow)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from editlab.models import load_lm
from editlab.requests import EditRequest
from editlab.runner.store import Store
from editlab.suites import SUITES, get_suite
from editlab.suites.base import RecordFieldError
from editlab.suites.dialogue import (CHALLENGES, OUTCOMES, TURNS, Dialogue, TurnResult, classify,
                                     dialogue_metrics, render, run_dialogues, script)
from editlab.suites.runner import UNEDITED, SuitePlan, plan_suite, run_suite, suite_summary

FT = {"layer": 0, "steps": 30, "lr": 0.01}
CF = "counterfact/counterfact-edit.json"
PORT = "counterfact/counterfact_portability_gpt4.json"


# --- matching ------------------------------------------------------------------------------------------------------
def test_answers_are_classed_by_the_object_named_first():
    assert classify(" English, as she grew up in London", "English", "French") == "success"
    assert classify(" French.", "English", "French") == "reversion"
    assert classify(" the FRENCH language", "English", "French") == "reversion"  # case, article
    assert classify(" French, not English", "English", "French") == "reversion"  # earliest wins
    assert classify(" English or French", "English", "French") == "success"
    assert classify(" Spanish", "English", "French") == "confusion"
    assert classify("", "English", "French") == "confusion"
    # whole words only: a longer word that contains the object is not the object
    assert classify(" Frenchman", "English", "French") == "confusion"


def test_an_object_that_is_a_word_prefix_of_the_other_is_resolved_by_the_longer_match():
    # new "New York City", old "New York": both are found at word 0; the answer spells out the longer one
    assert classify(" New York City, of course", "New York City", "New York") == "success"
    assert classify(" New York, of course", "New York City", "New York") == "reversion"
    # and the other way round
    assert classify(" New York City", "New York", "New York City") == "reversion"
    assert classify(" New York State", "New York", "New York City") == "success"
    # multi-word objects are matched as contiguous word runs
    assert classify(" York New City", "New York City", "New York") == "confusion"


def test_metrics_are_per_turn_outcomes_and_means_over_the_challenge_turns():
    turns = script(EditRequest.create("Danielle Darrieux speaks", "Danielle Darrieux", "English", "French"), "French",
                   question=("Which anthem would she sing?", "God Save the King"))
    outcomes = ["success", "reversion", "confusion", "success"]
    out = dialogue_metrics([TurnResult(t, "x", o) for t, o in zip(turns, outcomes)])
    assert [t.name for t in turns] == list(TURNS)
    for t, o in zip(turns, outcomes):
        assert [out[f"{t.name}.{k}"] for k in OUTCOMES] == [float(k == o) for k in OUTCOMES]
    # direct is not a challenge turn, portability is reported on its own: means over followup, contradiction
    assert out["success"] == 0.0 and out["reversion"] == 0.5 and out["confusion"] == 0.5
    assert out["portability.success"] == 1.0
    assert out["direct.answer"] == "x"
    without = dialogue_metrics([TurnResult(t, "x", o) for t, o in zip(turns[:3], outcomes)])
    assert without["reversion"] == 0.5 and "portability.success" not in without


# --- the dialogue text ---------------------------------------------------------------------------------------------
class _TemplateTokenizer:
    """A tokenizer with a chat template: renders messages as <|role|>content<|end|> lines."""

    chat_template = "{% for m in messages %}...{% endfor %}"  # only its presence matters to the suite

    def __init__(self) -> None:
        self.calls = []

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        assert tokenize is False
        self.calls.append((messages, add_generation_prompt))
        text = "".join(f"<|{m['role']}|>{m['content']}<|end|>\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


def _turns():
    req = EditRequest.create("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French")
    return script(req, "French", "Where Danielle Darrieux is from, people speak", ("Which anthem?", "God Save the King"))


def test_script_builds_the_documented_turns():
    direct, followup, contra, port = _turns()
    assert direct.user == "Complete the sentence: The mother tongue of Danielle Darrieux is"
    assert direct.opening == "The mother tongue of Danielle Darrieux is"
    assert followup.user == "Are you sure? Complete the sentence: Where Danielle Darrieux is from, people speak"
    assert followup.opening == "Where Danielle Darrieux is from, people speak"
    assert contra.user == ('But I read this: "The mother tongue of Danielle Darrieux is French." '
                           "Complete the sentence again: The mother tongue of Danielle Darrieux is")
    assert contra.opening == direct.opening
    assert (port.user, port.opening, port.new, port.old) == ("Which anthem?", "", "God Save the King", "French")
    req = EditRequest.create("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French")
    plain = script(req, "French")
    assert len(plain) == 3 and plain[1].user == "Are you sure? Complete the sentence: " + req.prompt


def test_chat_text_uses_the_template_with_history_and_the_reply_opened():
    tok = _TemplateTokenizer()
    direct, followup = _turns()[:2]
    history = [(direct.user, "The mother tongue of Danielle Darrieux is English.")]
    text = render(tok, history, followup, chat=True)
    messages, gen = tok.calls[-1]
    assert gen is True
    assert messages == [{"role": "user", "content": direct.user},
                        {"role": "assistant", "content": "The mother tongue of Danielle Darrieux is English."},
                        {"role": "user", "content": followup.user}]
    assert text.endswith("<|assistant|>Where Danielle Darrieux is from, people speak")


def test_plain_text_is_one_line_per_message():
    direct, followup = _turns()[:2]
    text = render(None, [(direct.user, "The mother tongue\nof D. D. is English.")], followup, chat=False)
    assert text == ("User: Complete the sentence: The mother tongue of Danielle Darrieux is\n"
                    "Assistant: The mother tongue of D. D. is English.\n"
                    "User: Are you sure? Complete the sentence: Where Danielle Darrieux is from, people speak\n"
                    "Assistant: Where Danielle Darrieux is from, people speak")
    assert render(None, [], _turns()[3], chat=False) == "User: Which anthem?\nAssistant:"


class _Scripted:
    """A system answering from a list, recording what it was asked (turn by turn)."""

    def __init__(self, answers, tokenizer=None, name="scripted"):
        self.answers, self.tokenizer, self.name, self.asked = list(answers), tokenizer, name, []

    def generate(self, texts, max_new_tokens, stop=()):
        assert list(stop) == ["\n"]
        self.asked.append((list(texts), max_new_tokens))
        return [self.answers.pop(0) for _ in texts]


def test_each_turn_reads_the_models_own_earlier_replies():
    tok = _TemplateTokenizer()
    system = _Scripted([" English.", " French", " Spanish", "God Save the King, surely"], tok)
    results = run_dialogues(system, [_turns()], chat=True, max_new_tokens=7, question_tokens=9)[0]
    assert [r.outcome for r in results] == ["success", "reversion", "confusion", "success"]
    assert [n for _, n in system.asked] == [7, 7, 7, 9]
    last_messages = tok.calls[-1][0]
    assert [m["content"] for m in last_messages if m["role"] == "assistant"] == [
        "The mother tongue of Danielle Darrieux is English.", "Where Danielle Darrieux is from, people speak French",
        "The mother tongue of Danielle Darrieux is Spanish"]


def test_suite_warns_once_and_records_the_plain_format():
    suite = Dialogue()
    from editlab.suites.base import Unit

    unit = Unit("cf:0", "dialogue", {"request": None, "turns": _turns()[:3]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row, _ = suite.unedited(_Scripted([" French"] * 3, tokenizer=None, name="plainlm"), unit)
        suite.unedited(_Scripted([" French"] * 3, tokenizer=None, name="plainlm"), unit)
    msgs = [str(w.message) for w in caught if "chat template" in str(w.message)]
    assert len(msgs) == 1 and "plainlm has no chat template" in msgs[0] and "format=plain" in msgs[0]
    assert row["format"] == "plain" and row["reversion"] == 1.0 and row["direct.reversion"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model with a template: no warning
        chat_row, _ = Dialogue().unedited(_Scripted([" English"] * 3, tokenizer=_TemplateTokenizer()), unit)
    assert chat_row["format"] == "chat" and chat_row["success"] == 1.0


def test_options_are_checked():
    with pytest.raises(ValueError, match="max_new_tokens"):
        Dialogue(max_new_tokens=0)
    assert Dialogue(question_tokens=5).question_tokens == 5


# --- records -------------------------------------------------------------------------------------------------------
def test_units_from_the_real_file(data_root):
    units = Dialogue().load(data_root, 3)  # under a limit: records with a one-hop question first
    assert units[0].key == "cf:34" and all(len(u.data["turns"]) == 4 for u in units) and len(units) == 3
    everything = Dialogue().load(data_root)
    assert len(everything) == 10000
    first = next(u for u in everything if u.key == "cf:0").data
    assert first["request"].prompt == "The mother tongue of Danielle Darrieux is"
    assert (first["request"].target_new, first["request"].target_true) == ("English", "French")
    assert [t.name for t in first["turns"]] == ["direct", "followup", "contradiction"]
    assert first["turns"][1].opening == "Where Danielle Darrieux is from, people speak the language of"
    assert [u.key for u in everything if len(u.data["turns"]) == 3][:3] == ["cf:0", "cf:1", "cf:4"]
    joined = [u for u in everything if len(u.data["turns"]) == 4]
    assert len(joined) == 766 and everything[:766] == joined  # every one-hop record is a case of the edit file
    spike = next(u for u in joined if u.key == "cf:4482").data["turns"][3]
    assert spike.user == "What famous food is associated with the city where Spike Hughes originates from?"
    assert (spike.new, spike.old) == ("Cheesesteaks", "London")


def _copy(data_root: Path, tmp_path: Path, edit) -> Path:
    recs = json.loads((data_root / CF).read_text())[:4]
    edit(recs)
    (tmp_path / "counterfact").mkdir()
    (tmp_path / CF).write_text(json.dumps(recs))
    (tmp_path / PORT).write_text((data_root / PORT).read_text())
    return tmp_path


def test_a_record_lacking_target_new_is_named(data_root, tmp_path):
    root = _copy(data_root, tmp_path, lambda recs: recs[1].pop("target_new"))
    with pytest.raises(RecordFieldError, match="counterfact-edit.json record 1: missing field 'target_new'"):
        Dialogue().load(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        units = Dialogue().load(root, on_bad="skip")
    assert [u.key for u in units] == ["cf:0", "cf:4", "cf:5"]
    assert any("skipped 1 record" in str(w.message) for w in caught)


def test_a_record_whose_objects_are_the_same_answer_is_refused(data_root, tmp_path):
    root = _copy(data_root, tmp_path, lambda recs: recs[0].update(target_new="the french."))
    with pytest.raises(RecordFieldError, match="record 0: target_new 'the french.' and ground_truth 'French'"):
        Dialogue().load(root)


def test_a_one_hop_record_of_another_edit_is_not_joined(data_root, tmp_path):
    spike = next(r for r in json.loads((data_root / CF).read_text()) if r["case_id"] == 4482)

    def edit(recs):
        recs[0] = dict(spike, target_new="Paris")  # the one-hop question is about Philadelphia: not this edit
        recs[1] = spike

    root = _copy(data_root, tmp_path, edit)
    assert [len(u.data["turns"]) for u in Dialogue().load(root, 2)] == [3, 4]


@pytest.fixture
def registered(monkeypatch):
    """`dialogue` in the suite registry (the lead registers it in suites/__init__.py; until then, and
    without leaking into other tests, here)."""
    from editlab.registry import lazy

    monkeypatch.setattr(SUITES, "_entries", dict(SUITES._entries))
    monkeypatch.setattr(SUITES, "_aliases", dict(SUITES._aliases))
    if "dialogue" not in SUITES:
        SUITES.register("dialogue", Dialogue.description, lazy("editlab.suites.dialogue:Dialogue"))


def test_the_suite_options_come_from_the_cli(registered):
    suite = get_suite("dialogue", {"max_new_tokens": "8"})
    assert isinstance(suite, Dialogue) and suite.max_new_tokens == 8 and suite.question_tokens == 24


def test_plan_reads_the_data_before_any_model(registered, data_root):
    plan = plan_suite("dialogue", ["rome"], limit=2, root=data_root)
    assert set(plan.data) == {"dialogue", "portability"}
    # under a limit the records with a one-hop question come first (cf:34 is the file's first such record)
    assert plan.units[0].key == "cf:34" and all(len(u.data["turns"]) == 4 for u in plan.units)
    assert len(plan.units) == 2


# --- the whole protocol on the tiny trained model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return load_lm("tiny-trained-llama")


def test_protocol_through_the_runner_restores_the_model(tiny, data_root, tmp_path):
    suite = Dialogue(max_new_tokens=6, question_tokens=6)
    every = suite.load(data_root)
    units = [u for u in every if len(u.data["turns"]) == 3][:2] + [u for u in every if len(u.data["turns"]) == 4][:1]
    plan = SuitePlan(suite=suite, units=units, methods=["ft"], data={}, limit=None, on_bad="stop")
    store = Store(tmp_path / "r.db")
    before = tiny.fingerprint()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ids = run_suite(tiny, plan, store, hparams={"ft": FT})
    assert tiny.fingerprint() == before and not tiny.active_edits
    assert set(ids) == {UNEDITED, "ft"}
    for method, rid in ids.items():
        rows = {r.row_key: r for r in store.rows(rid)}
        assert set(rows) == {u.key for u in units}
        for u in units:
            m = rows[u.key].metrics
            names = [t.name for t in u.data["turns"]]
            expected = {f"{t}.{o}" for t in names for o in OUTCOMES} | set(OUTCOMES)
            assert {k for k, v in m.items() if not isinstance(v, str)} == expected
            assert {k for k, v in m.items() if isinstance(v, str)} == {f"{t}.answer" for t in names} | {"format"}
            assert m["format"] == "plain"
            for t in names:  # exactly one outcome per turn
                assert sum(m[f"{t}.{o}"] for o in OUTCOMES) == 1.0
            assert all(0.0 <= m[o] <= 1.0 for o in OUTCOMES)
            assert sum(m[o] for o in OUTCOMES) == pytest.approx(1.0)
            challenged = [t for t in names if t in CHALLENGES]
            assert m["reversion"] == pytest.approx(sum(m[f"{t}.reversion"] for t in challenged) / len(challenged))
        if method == "ft":
            assert all(r.n_edits == 1 for r in rows.values())
        summary = suite_summary(store, rid, suite)
        assert summary["n"] == 3.0 and "format" not in summary
        assert summary["portability.success"] == rows[units[2].key].metrics["portability.success"]  # one unit has it


# --- the real model ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_rome_on_smollm2_makes_the_direct_answer_the_new_object(smollm2, data_root, tmp_path):
    suite = Dialogue()
    assert smollm2.tokenizer.chat_template  # SmolLM2-Instruct talks through its template
    units = suite.load(data_root, 3)
    plan = SuitePlan(suite=suite, units=units, methods=["rome"], data={}, limit=None, on_bad="stop")
    store = Store(tmp_path / "r.db")
    before = smollm2.fingerprint()
    ids = run_suite(smollm2, plan, store)
    assert smollm2.fingerprint() == before
    summary = {m: suite_summary(store, rid, suite) for m, rid in ids.items()}
    for m, rid in ids.items():
        print(m, {k: round(v, 3) for k, v in summary[m].items()})
        for r in store.rows(rid):
            print("  ", r.row_key, {k: v for k, v in r.metrics.items() if k.endswith("answer")})
            assert r.metrics["format"] == "chat"
    assert summary["rome"]["direct.success"] >= 2 / 3
