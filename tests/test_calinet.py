"""CaliNET on the tiny trained llama: zero-initialised slots are an exact no-op, training makes the
targets the argmax (single and batch), the KL term holds generic text closer to the base model,
sequential `on=` edits add groups of slots to one wrapper and restore LIFO bit-exact, a saved sequence
loads back to the same outputs, paraphrases are trained on only when asked, bad hyper-parameters."""

from __future__ import annotations

import pytest
import torch

from editlab.errors import HparamsError
from editlab.methods import Edit, get_editor, restore_all
from editlab.methods.adapters import calinet
from editlab.methods.adapters.side_units import SideUnits, Site
from editlab.models import load_lm
from editlab.requests import EditRequest

FACTS = [
    EditRequest.create("Michael Jordan plays", "Michael Jordan", "football", "basketball",
                       paraphrases=[("The sport of Michael Jordan is", "football")]),
    EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris"),
    EditRequest.create("Toyota was founded in", "Toyota", "Germany", "Japan"),
]
PROBES = ["Albert Einstein was born in", "Apple was founded by", "Lionel Messi plays"]


@pytest.fixture
def lm():
    return load_lm("tiny-trained-llama")


@pytest.fixture
def hp(corpus_file):
    return {"slots": 16, "steps": 60, "kl_texts": 4, "corpus": str(corpus_file)}


def _snapshot(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("activation", ["gated", "relu"])
def test_untrained_slots_are_an_exact_no_op(lm, hp, activation):
    hps = calinet.CaliNETHparams.for_model(lm, **{**hp, "activation": activation})
    base = lm.next_token_logprobs(PROBES)
    site = Site(lm, hps.layer, "calinet", activation)
    rows = calinet.init_slots(lm, site, FACTS[:1], hps)
    assert float(rows["keys"].detach().abs().sum()) > 0 and float(rows["values"].detach().abs().sum()) == 0
    with site.training(rows), torch.no_grad():
        assert torch.equal(lm.next_token_logprobs(PROBES), base)
    assert lm.model.get_submodule(site.path) is site.wrapper.base_layer  # put back


@pytest.mark.parametrize("activation", ["gated", "relu"])
def test_edit_and_batch_make_targets_the_argmax(lm, hp, activation):
    snap = _snapshot(lm)
    for reqs in (FACTS[:1], FACTS[:2]):
        edit = get_editor("calinet").apply(lm, reqs, **{**hp, "activation": activation})
        assert edit.info["path"] == f"model.layers.{lm.n_layers - 1 - lm.n_layers // 6}.mlp"
        assert lm.model.get_submodule(edit.info["path"]).n_rows == hp["slots"]
        for s in edit.lm.score([r.prompt for r in reqs], [r.target_new for r in reqs]):
            assert s.argmax_ids == s.target_ids
        edit.restore()
        assert _same(snap, _snapshot(lm))


def _generic_divergence(lm, base_system, edited_system, corpus):
    texts = [t for t in open(corpus).read().split("\n\n") if t.strip()][:4]
    b = base_system.next_token_logprobs(texts)
    e = edited_system.next_token_logprobs(texts)
    return float((b.exp() * (b - e)).sum(-1).mean())


def test_kl_term_keeps_generic_text_closer(lm, hp):
    fact = FACTS[0]
    # longer training makes the difference clear: with no early stop both runs train equally long
    common = {**hp, "steps": 40, "stop_nll": 0.0}
    free = get_editor("calinet").apply(lm, fact, **{**common, "kl_weight": 0.0})
    d_free = _generic_divergence(lm, load_lm("tiny-trained-llama"), free.lm, hp["corpus"])
    free.restore()
    held = get_editor("calinet").apply(lm, fact, **{**common, "kl_weight": 10.0})
    d_held = _generic_divergence(lm, load_lm("tiny-trained-llama"), held.lm, hp["corpus"])
    assert held.info["final"]["kl"] > 0
    held.restore()
    assert d_held < d_free, (d_held, d_free)


def test_sequential_groups_restore_lifo_and_reload(lm, hp, tmp_path):
    ed = get_editor("calinet")
    snaps, outs, edits = [_snapshot(lm)], [lm.next_token_logprobs(PROBES)], []
    for fact in FACTS:
        edits.append(ed.apply(lm, fact, on=edits[-1] if edits else None, **hp))
        snaps.append(_snapshot(lm))
        outs.append(edits[-1].lm.next_token_logprobs(PROBES))
    wrapper = lm.model.get_submodule(edits[0].info["path"])
    assert isinstance(wrapper, SideUnits) and wrapper.n_rows == 3 * hp["slots"]
    assert [e.info["extends"] for e in edits] == [False, True, True]
    last = edits[-1].lm.score([FACTS[-1].prompt], [FACTS[-1].target_new])[0]
    assert last.argmax_ids == last.target_ids
    for i, e in enumerate(edits):
        e.save(tmp_path / f"e{i}")
    for i in range(len(edits) - 1, -1, -1):
        edits[i].restore()
        assert _same(snaps[i], _snapshot(lm))
    loaded = [Edit.load(tmp_path / f"e{i}", lm) for i in range(len(edits))]
    assert torch.allclose(loaded[-1].lm.next_token_logprobs(PROBES), outs[-1], atol=1e-6)
    restore_all(lm)
    assert _same(snaps[0], _snapshot(lm))


def test_paraphrases_are_trained_on_only_when_asked(lm, hp):
    assert calinet.training_pairs(FACTS[:1], False) == [("Michael Jordan plays", "football")]
    assert calinet.training_pairs(FACTS[:1], True)[1] == ("The sport of Michael Jordan is", "football")
    edit = get_editor("calinet").apply(lm, FACTS[0], **{**hp, "train_on_paraphrases": True})
    assert edit.info["training_prompts"] == 2
    para = edit.lm.score(["The sport of Michael Jordan is"], ["football"])[0]
    assert para.argmax_ids == para.target_ids
    edit.restore()


@pytest.mark.parametrize("bad", [{"layer": -1}, {"slots": 0}, {"activation": "tanh"}, {"kl_weight": -1.0},
                                 {"lr": 0.0}, {"steps": 0}])
def test_bad_hparams_raise_and_change_nothing(lm, hp, bad):
    snap = _snapshot(lm)
    with pytest.raises(HparamsError):
        get_editor("calinet").apply(lm, FACTS[0], **{**hp, **bad})
    assert _same(snap, _snapshot(lm)) and lm.active_edits == []
