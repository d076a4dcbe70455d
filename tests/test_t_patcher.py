"""T-Patcher and the side-unit wrapper it shares with CaliNET: the wrapper's arithmetic on a hand-computed
case, exact base outputs where no unit fires, edits on the tiny trained llama (single, batch, a sequence
of five with `on=`), LIFO restore and save/load of a sequence, the memory cache, stacking with other
edits at the same MLP, and bad hyper-parameters."""

from __future__ import annotations

import pytest
import torch

from editlab.errors import HparamsError
from editlab.hooks import capture
from editlab.methods import Edit, get_editor, restore_all
from editlab.methods.adapters import t_patcher
from editlab.methods.adapters.side_units import SideUnits, mlp_path
from editlab.models import load_lm
from editlab.requests import EditRequest

FACTS = [
    EditRequest.create("Michael Jordan plays", "Michael Jordan", "football", "basketball"),
    EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris"),
    EditRequest.create("Toyota was founded in", "Toyota", "Germany", "Japan"),
    EditRequest.create("Albert Einstein was born in", "Albert Einstein", "Warsaw", "Ulm"),
    EditRequest.create("Marie Curie was born in", "Marie Curie", "Paris", "Warsaw"),
]
# a target whose first two tokens the toy model gets wrong (" Germany" is 4 tokens there, 2 mistaken)
MULTI = EditRequest.create("Michael Jordan plays", "Michael Jordan", "Germany", "basketball")
UNRELATED = ["Toyota was founded in", "Albert Einstein was born in", "The capital of France is",
             "Apple was founded by", "Lionel Messi plays", "Marie Curie was born in"]


@pytest.fixture
def lm():
    return load_lm("tiny-trained-llama")


@pytest.fixture
def hp(corpus_file):
    return {"steps": 60, "memory_size": 2000, "memory_top_k": 100, "corpus": str(corpus_file)}


def _snapshot(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _full_logits(lm, prompt):
    ids = torch.tensor([lm.encode_prompt(prompt)])
    with torch.no_grad():
        return lm.model(input_ids=ids).logits[0]


def _max_pre_activation(lm, path, prompt):
    """Largest unit pre-activation at any token of `prompt` (the wrapper installed at `path`)."""
    ids = torch.tensor([lm.encode_prompt(prompt)])
    got = []
    capture(lm.model, lambda: lm.backbone_forward(ids, torch.ones_like(ids)), inputs={path: got.append},
            stop_after=path)
    with torch.no_grad():
        pre, _ = lm.model.get_submodule(path).unit_activations(got[0])
    return float(pre.max())


# ------------------------------------------------------------------ the wrapper by hand
def _hand_wrapper(activation):
    base = torch.nn.Linear(3, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    w = SideUnits(base, 3, 2, activation)
    rows = {"keys": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), "bias": torch.tensor([0.0, -1.0]),
            "values": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    if activation == "gated":
        rows["up"] = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    w.update_rows(rows, torch.zeros(0, dtype=torch.long), {})
    return base, w


def test_relu_side_units_by_hand():
    base, w = _hand_wrapper("relu")
    x = torch.tensor([[2.0, 0.5, 1.0], [-1.0, 3.0, 0.0], [-1.0, 0.5, 0.0]])
    # row 0: pre = (2, -0.5) -> unit 0 only: + 2*(1, 2); row 1: pre = (-1, 2) -> unit 1: + 2*(3, 4);
    # row 2: pre = (-1, -0.5): nothing fires, base output
    want = base(x) + torch.tensor([[2.0, 4.0], [6.0, 8.0], [0.0, 0.0]])
    assert torch.allclose(w(x), want)
    assert torch.equal(w(x)[2], base(x)[2])
    # no token of the call fires: the base layer's output itself
    quiet = torch.tensor([[-1.0, 0.5, 7.0]])
    assert torch.equal(w(quiet), base(quiet))


def test_gated_and_silu_side_units_by_hand():
    base, w = _hand_wrapper("gated")
    x = torch.tensor([[2.0, 0.5, 1.0]])
    silu = torch.nn.functional.silu
    gate = silu(torch.tensor([2.0, -0.5]))
    up = torch.tensor([1.0, 3.5])
    want = base(x) + (gate * up) @ torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.allclose(w(x), want)
    base, w = _hand_wrapper("silu")
    assert torch.allclose(w(x), base(x) + gate @ torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_wrapper_keeps_the_blocks_children_reachable(lm):
    path = mlp_path(lm, 3)
    mlp = lm.model.get_submodule(path)
    down = lm.model.get_submodule(f"{path}.down_proj")
    w = SideUnits(mlp, 64, 64)
    from editlab.methods.adapters.inject import set_module

    set_module(lm.model, path, w)
    try:
        assert lm.model.get_submodule(f"{path}.down_proj") is down
        assert lm.model.get_parameter(f"{path}.down_proj.weight") is down.weight
        new = torch.nn.Identity()
        w.down_proj = new  # an assignment through the wrapper reaches the wrapped block
        assert mlp.down_proj is new and "down_proj" not in w._modules
        w.down_proj = down
    finally:
        set_module(lm.model, path, mlp)


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_frozen_prefix_replays_the_lower_blocks_exactly(lm, layer):
    from editlab.methods.adapters.side_units import FrozenPrefix

    ids, mask = lm.pad_right([lm.encode_prompt(p) for p in UNRELATED])
    full = lm.hidden_states(ids, mask)
    prefix = FrozenPrefix(lm, layer)
    first, again = prefix.hidden_states(ids, mask), prefix.hidden_states(ids, mask)
    assert prefix.active == (layer > 0)
    assert torch.equal(first, full) and torch.equal(again, full)
    blocks = lm.model.get_submodule(lm.arch.layers)
    assert all(type(b).__name__ != "_Replay" for b in blocks)  # the real blocks are back
    # a change at or above `layer` shows in the replayed forward (only the blocks below are frozen)
    with torch.no_grad():
        lm.model.get_submodule(f"{mlp_path(lm, 3)}.down_proj").weight.mul_(2)
    try:
        assert not torch.equal(prefix.hidden_states(ids, mask), full)
    finally:
        with torch.no_grad():
            lm.model.get_submodule(f"{mlp_path(lm, 3)}.down_proj").weight.div_(2)


# ------------------------------------------------------------------ editing
def test_edit_makes_target_the_argmax_and_leaves_silent_prompts_bit_identical(lm, hp):
    fact = FACTS[0]
    before = {p: _full_logits(lm, p) for p in UNRELATED}
    snap = _snapshot(lm)
    edit = get_editor("t-patcher").apply(lm, fact, **hp)
    path = edit.info["path"]
    assert path == mlp_path(lm, lm.n_layers - 1)  # the last MLP by default
    assert edit.info["units"] >= 1 and edit.info["prefix_replay"] and min(edit.info["query_preactivation"]) > 0
    score = edit.lm.score([fact.prompt], [fact.target_new])[0]
    assert score.argmax_ids == score.target_ids
    silent = [p for p in UNRELATED if _max_pre_activation(lm, path, p) <= 0]
    assert silent, "no unrelated prompt left silent: the test would prove nothing"
    for p in silent:  # no unit fires at any token: the base model's logits bit for bit
        assert torch.equal(_full_logits(lm, p), before[p]), p
    edit.restore()
    assert _same(snap, _snapshot(lm))


def _mistakes(lm, fact):
    s = lm.score([fact.prompt], [fact.target_new])[0]
    return sum(a != t for a, t in zip(s.argmax_ids, s.target_ids))


def test_batch_adds_each_requests_units(lm, hp):
    # default: one unit per mistaken target token of each request, at most 5
    facts = [FACTS[1], MULTI]
    want = [i for i, f in enumerate(facts) for _ in range(max(1, min(5, _mistakes(lm, f))))]
    assert len(want) > 2, "no request with several mistaken tokens: the test would prove less"
    edit = get_editor("t-patcher").apply(lm, facts, **{**hp, "steps": 300})
    assert edit.info["units"] == len(want) and edit.info["unit_requests"] == want
    assert lm.model.get_submodule(edit.info["path"]).n_rows == len(want)
    for s in edit.lm.score([f.prompt for f in facts], [f.target_new for f in facts]):
        assert s.argmax_ids == s.target_ids
    edit.restore()


def test_units_go_to_mistaken_target_tokens_by_default(lm, hp):
    fact = MULTI
    base = lm.score([fact.prompt], [fact.target_new])[0]
    mistakes = _mistakes(lm, fact)
    assert len(base.target_ids) >= 2 and mistakes >= 2
    edit = get_editor("t-patcher").apply(lm, fact, **{**hp, "steps": 300})  # default max_add_neuron_num
    assert edit.info["units"] == min(5, mistakes)
    assert lm.model.get_submodule(edit.info["path"]).n_rows == min(5, mistakes)
    score = edit.lm.score([fact.prompt], [fact.target_new])[0]
    assert score.argmax_ids == score.target_ids
    edit.restore()


def test_units_per_edit_are_capped_by_max_add_neuron_num(lm, hp):
    long = EditRequest.create("Toyota was founded in", "Toyota", "Warsaw Poland", "Japan")
    assert _mistakes(lm, long) > 5
    ed = get_editor("t-patcher")
    for cap, want in ((None, 5), (1, 1), (3, 3)):
        extra = {} if cap is None else {"max_add_neuron_num": cap}
        edit = ed.apply(lm, long, **{**hp, **extra, "steps": 5})
        assert edit.info["units"] == want and edit.info["unit_requests"] == [0] * want
        assert lm.model.get_submodule(edit.info["path"]).n_rows == want
        edit.restore()


def test_five_sequential_edits_are_retained_and_restore_lifo(lm, hp, tmp_path):
    ed = get_editor("t-patcher")
    snaps = [_snapshot(lm)]
    outs = [lm.next_token_logprobs(UNRELATED)]
    edits = []
    for i, fact in enumerate(FACTS):
        edits.append(ed.apply(lm, fact, on=edits[-1] if edits else None, **{**hp, "steps": 150}))
        snaps.append(_snapshot(lm))
        outs.append(edits[-1].lm.next_token_logprobs(UNRELATED))
        assert edits[-1].info["extends"] == (i > 0)
    wrapper = lm.model.get_submodule(edits[0].info["path"])
    units = sum(e.info["units"] for e in edits)
    assert isinstance(wrapper, SideUnits) and wrapper.n_rows == units >= 5
    assert isinstance(wrapper.base_layer, torch.nn.Module) and not isinstance(wrapper.base_layer, SideUnits)
    final = lm.score([f.prompt for f in FACTS], [f.target_new for f in FACTS])
    retained = sum(s.argmax_ids == s.target_ids for s in final)
    assert retained >= 4, [(s.argmax_ids, s.target_ids) for s in final]
    # save each edit, restore all, load them in order: same outputs
    for i, e in enumerate(edits):
        e.save(tmp_path / f"e{i}")
    for i in range(len(edits) - 1, -1, -1):
        edits[i].restore()
        assert _same(snaps[i], _snapshot(lm))
        assert torch.equal(lm.edited.next_token_logprobs(UNRELATED), outs[i])
    loaded = [Edit.load(tmp_path / f"e{i}", lm) for i in range(len(edits))]
    assert torch.allclose(loaded[-1].lm.next_token_logprobs(UNRELATED), outs[-1], atol=1e-6)
    assert lm.model.get_submodule(edits[0].info["path"]).n_rows == units
    restore_all(lm)
    assert _same(snaps[0], _snapshot(lm))


def test_memory_is_computed_once_per_sequence(lm, hp, monkeypatch):
    calls = []
    real = t_patcher.token_inputs
    monkeypatch.setattr(t_patcher, "token_inputs", lambda *a, **k: calls.append(1) or real(*a, **k))
    ed = get_editor("t-patcher")
    first = ed.apply(lm, FACTS[0], **hp)
    second = ed.apply(lm, FACTS[1], on=first, **hp)
    assert len(calls) == 1
    # an edit of another kind below changes the inputs of the MLP: the memory is recomputed
    ft = get_editor("ft-m").apply(lm, FACTS[2], layer=0, steps=5, lr=1e-2)
    third = ed.apply(lm, FACTS[3], **hp)
    assert len(calls) == 2
    for e in (third, ft, second, first):
        e.restore()


@pytest.mark.parametrize("memorize", [True, False])
def test_earlier_edits_join_the_memory_of_later_ones(lm, hp, memorize):
    # the reference's update_memory: a later unit learns to stay silent on the tokens of earlier edits
    ed = get_editor("t-patcher")
    first = ed.apply(lm, FACTS[0], **hp, memorize_edits=memorize)
    second = ed.apply(lm, FACTS[1], on=first, **{**hp, "steps": 150}, memorize_edits=memorize)
    def n_tokens(fact):  # prompt + target, less the last target token and the sink prefix
        p_ids, t_ids = lm.encode_pair(fact.prompt, fact.target_new)
        return len(p_ids) + len(t_ids) - 1 - len(lm.prefix_ids)

    assert first.info["memory_rows_from_edits"] == 0
    assert second.info["memory_rows_from_edits"] == (n_tokens(FACTS[0]) if memorize else 0)
    rows = t_patcher.edit_memory(lm, second.info["path"])
    assert rows.shape[0] == n_tokens(FACTS[0]) + n_tokens(FACTS[1])
    if memorize:
        assert second.info["memory_rows_firing"] == 0  # trained until no memory row fires
        unit = lm.model.get_submodule(second.info["path"]).rows()
        pre = rows[: n_tokens(FACTS[0])] @ unit["keys"][1] + unit["bias"][1]
        assert float(pre.max()) <= 0.0  # the second unit never fires on the first edit's tokens
    second.restore()
    first.restore()
    assert t_patcher.edit_memory(lm, second.info["path"]).shape[0] == 0


def test_memory_excludes_the_edit_prompt_itself(lm, hp):
    # the toy corpus contains "Michael Jordan plays basketball": those rows are the query itself
    edit = get_editor("t-patcher").apply(lm, FACTS[0], **hp)
    path = edit.info["path"]
    total = t_patcher.memory(lm, path, t_patcher.TPatcherHparams.for_model(lm, **hp)).shape[0]
    assert 0 < edit.info["memory_rows"] < total
    edit.restore()


def test_stacks_with_other_edits_at_the_same_mlp(lm, hp):
    snap = _snapshot(lm)
    modules = dict(lm.model.named_modules())
    patch = get_editor("t-patcher").apply(lm, FACTS[0], **hp)
    # a weight edit of the wrapped block's own projection, through the wrapper
    ft = get_editor("ft-m").apply(lm, FACTS[1], layer=lm.n_layers - 1, steps=10, lr=1e-2)
    # another adapter around the same block wraps the T-Patcher wrapper
    cali = get_editor("calinet").apply(lm, FACTS[2], layer=lm.n_layers - 1, slots=8, steps=20, kl_texts=0)
    outer = lm.model.get_submodule(patch.info["path"])
    assert isinstance(outer, SideUnits) and outer.owner == "calinet" and outer.base_layer.owner == "t-patcher"
    # a new T-Patcher edit (no on=) wraps the CaliNET wrapper in turn: it never adds rows to another
    # method's units
    fresh = get_editor("t-patcher").apply(lm, FACTS[3], **hp)
    assert fresh.info["extends"] is False
    for e in (fresh, cali, ft, patch):
        e.restore()
    assert _same(snap, _snapshot(lm)) and dict(lm.model.named_modules()) == modules


def test_extending_with_another_activation_is_refused(lm, hp):
    first = get_editor("t-patcher").apply(lm, FACTS[0], **hp)
    snap = _snapshot(lm)
    with pytest.raises(HparamsError, match="activation"):
        get_editor("t-patcher").apply(lm, FACTS[1], on=first, **{**hp, "activation": "silu"})
    assert _same(snap, _snapshot(lm)) and lm.active_edits == [first]
    first.restore()


@pytest.mark.parametrize("bad", [{"layer": 99}, {"margin2": 1.0}, {"margin1": -1.0}, {"lr": -1e-2},
                                 {"activation": "gated"}, {"memory_top_k": 0}, {"act_loss_thd": 0.0}])
def test_bad_hparams_raise_and_change_nothing(lm, hp, bad):
    snap = _snapshot(lm)
    with pytest.raises(HparamsError):
        get_editor("t-patcher").apply(lm, FACTS[0], **{**hp, **bad})
    assert _same(snap, _snapshot(lm)) and lm.active_edits == []


def test_stacks_with_an_adapter_inside_the_wrapped_block(lm, hp):
    """GRACE wraps the block's output projection: in either order the two wrappers nest, both edits
    act, and restoring gives the base modules and weights back."""
    from editlab.methods.base import METHODS

    try:
        grace = get_editor("grace")
    except Exception as e:  # the GRACE module is built elsewhere; this test needs it
        pytest.skip(f"grace unavailable: {e}")
    g_hp = {**METHODS.entry("grace").meta.get("tiny_hparams", {}), "layer": 2}
    snap, modules = _snapshot(lm), dict(lm.model.named_modules())
    for order in ("t-patcher first", "grace first"):
        if order == "t-patcher first":
            edits = [get_editor("t-patcher").apply(lm, FACTS[0], **{**hp, "layer": 2})]
            edits.append(grace.apply(lm, FACTS[1], **g_hp))
        else:
            edits = [grace.apply(lm, FACTS[1], **g_hp)]
            edits.append(get_editor("t-patcher").apply(lm, FACTS[0], **{**hp, "layer": 2}))
        assert isinstance(lm.model.get_submodule(mlp_path(lm, 2)), SideUnits)
        assert type(lm.model.get_submodule(f"{mlp_path(lm, 2)}.down_proj")).__name__ != "Linear"
        for s in lm.edited.score([f.prompt for f in FACTS[:2]], [f.target_new for f in FACTS[:2]]):
            assert s.argmax_ids == s.target_ids
        for e in reversed(edits):
            e.restore()
        assert _same(snap, _snapshot(lm)) and dict(lm.model.named_modules()) == modules


def test_extending_at_another_layer_is_refused_and_changes_nothing(lm, hp):
    from editlab.errors import EditStackError

    first = get_editor("t-patcher").apply(lm, FACTS[0], **hp)
    snap = _snapshot(lm)
    modules = dict(lm.model.named_modules())
    with pytest.raises(EditStackError, match="no t-patcher units"):
        get_editor("t-patcher").apply(lm, FACTS[1], on=first, **{**hp, "layer": 0})
    assert _same(snap, _snapshot(lm)) and dict(lm.model.named_modules()) == modules and lm.active_edits == [first]
    first.restore()


def test_extending_needs_units_the_named_edit_made(lm, hp):
    """on=B where B's units sit at another layer than the ones asked for: refused, even though the outermost
    module there is an earlier T-Patcher edit's wrapper (A's), which must not silently take B's rows."""
    from editlab.errors import CannotExtendError

    a = get_editor("t-patcher").apply(lm, FACTS[0], **{**hp, "layer": 0})
    b = get_editor("t-patcher").apply(lm, FACTS[1], **hp)  # default layer, a wrapper of its own
    snap = _snapshot(lm)
    with pytest.raises(CannotExtendError, match="no t-patcher units"):
        get_editor("t-patcher").apply(lm, FACTS[2], on=b, **{**hp, "layer": 0})
    assert _same(snap, _snapshot(lm)) and lm.active_edits == [a, b]
    b.restore()
    a.restore()


def test_memory_data_builds_the_memory_from_a_datasets_probes(lm, hp, tmp_path):
    import json

    recs = [{"subject": f"Company {i}", "src": f"What is the product made by Company {i}?", "alt": "uniforms",
             "answers": ["shoes"], "rephrase": f"What does Company {i} make?",
             "loc": f"nq question: who wrote play number {i}", "loc_ans": f"Author {i}"} for i in range(30)]
    f = tmp_path / "train.json"
    f.write_text(json.dumps(recs))
    hpd = t_patcher.TPatcherHparams.for_model(lm, **{**hp, "memory_data": str(f)})
    path = mlp_path(lm, hpd.layer)
    rows = t_patcher.memory(lm, path, hpd)
    texts = [f"who wrote play number {i} Author {i}" for i in range(30)]
    assert torch.equal(rows, t_patcher.token_inputs(lm, path, texts, hpd.memory_size).to(rows.device))
    edit = get_editor("t-patcher").apply(lm, FACTS[0], **{**hp, "memory_data": str(f)})
    assert edit.info["memory_rows"] == rows.shape[0]
    edit.restore()
    with pytest.raises(HparamsError, match=r"memory_data: data file not found"):
        get_editor("t-patcher").hparams(lm, **{**hp, "memory_data": str(tmp_path / "nope.json")})
