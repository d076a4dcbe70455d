"""WISE: side memories beside one MLP output projection, routed per token (methods/adapters/wise.py)."""

from __future__ import annotations

import pytest
import torch

from editlab.errors import EditMismatchError, HparamsError
from editlab.hooks import capture
from editlab.methods import Edit, get_editor, restore_all
from editlab.methods.adapters.ties import ties_merge, trim
from editlab.methods.adapters.wise import WISEWrapper, pack_bits, shard_mask, unpack_bits
from editlab.models import load_lm
from editlab.requests import EditRequest

HP = {"layer": 2, "n_iter": 50}
FACTS = [
    EditRequest.create("Michael Jordan plays", "Michael Jordan", "football", "basketball"),
    EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris"),
    EditRequest.create("Albert Einstein was born in", "Albert Einstein", "Warsaw", "Ulm"),
    EditRequest.create("The capital of Japan is", "Japan", "Rome", "Tokyo"),
    EditRequest.create("Danielle Darrieux speaks", "Danielle Darrieux", "German", "French"),
]
UNRELATED = ["Python is a programming language.", "London is the capital of England.",
             "Apple was founded by Steve Jobs in California.", "The Colosseum is located in the city of"]


@pytest.fixture
def lm():
    return load_lm("tiny-trained-llama")


def _snapshot(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _lp(system, req):
    return float(system.score([req.prompt], [req.target_new])[0].logprobs.sum())


def _path(lm):
    return lm.arch.mlp_out_path(HP["layer"])


# ------------------------------------------------------------------ the wrapper on a hand-made case
def _table_rows(shard, mask_idx, values, threshold, n=6):
    mask = torch.zeros(n, dtype=torch.bool)
    mask[mask_idx] = True
    return {"shard": torch.tensor([shard]), "mask": pack_bits(mask)[None],
            "values": torch.tensor([values], dtype=torch.float32),
            "act_min": torch.tensor([threshold]), "threshold": torch.tensor([threshold])}


def test_wrapper_forward_by_hand():
    base = torch.nn.Linear(3, 2, bias=True)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    w = WISEWrapper(base, 2, 3, k=2)
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert torch.equal(w(x), base(x))  # no memory yet: the base layer itself
    # shard 0: D = [[1, 0, 0], [0, 0, 2]] (flat entries 0 and 5), ε = 1.5
    w.update_rows(_table_rows(0, [0, 5], [1.0, 2.0], 1.5), torch.zeros(0, dtype=torch.long), {})
    out = w(x)
    # x0: D x = [1, 0], Δ = 1 <= 1.5 -> base; x1: D x = [0, 2], Δ = 2 > 1.5 -> base + [0, 2]; x2: Δ = 0 -> base
    assert torch.equal(out[0], base(x[0])) and torch.equal(out[2], base(x[2]))
    assert torch.allclose(out[1], torch.tensor([3.5, 5.5]) + torch.tensor([0.0, 2.0]))
    # shard 1: D = [[0, 3, 0], [0, 0, 0]] (flat entries 1 and 3, the second 0), ε = 0.5: x2 now routes to it
    w.update_rows(_table_rows(1, [1, 3], [3.0, 0.0], 0.5), torch.zeros(0, dtype=torch.long), {})
    out = w(x)
    assert torch.allclose(out[2], base(x[2]) + torch.tensor([3.0, 0.0]))
    # x0 fires nowhere (shard 0: 1 <= 1.5, shard 1: 0), x1 only in shard 0
    assert torch.equal(out[0], base(x[0]))
    assert torch.allclose(out[1], base(x[1]) + torch.tensor([0.0, 2.0]))
    # both fire on x = [1, 1, 1] (Δ0 = ‖[1, 2]‖ = 2.24 > 1.5, Δ1 = 3 > 0.5): the larger score wins
    both = torch.ones(1, 3)
    assert torch.allclose(w(both), base(both) + torch.tensor([3.0, 0.0]))
    # a shard's newest row is its memory: a second row for shard 0 replaces D there
    w.update_rows(_table_rows(0, [0, 5], [5.0, 0.0], 1.5), torch.zeros(0, dtype=torch.long), {})
    assert torch.allclose(w(x)[0], base(x[0]) + torch.tensor([5.0, 0.0]))


def test_ties_merge_by_hand():
    d = torch.tensor([[3.0, -2.0, 0.0, 1.0], [1.0, 1.0, 0.0, -4.0]])
    # signs elected from the sums [4, -1, 0, -3] -> [+, -, +, -]; the mean over the agreeing non-zero entries
    assert torch.equal(ties_merge(d), torch.tensor([2.0, -2.0, 0.0, -4.0]))
    # density 0.5 keeps 2 of 4 entries of each: [3, -2, 0, 0] and [0, 2, 0, -4] (from [1, 2, 0, -4])
    d2 = torch.tensor([[3.0, -2.0, 0.0, 1.0], [1.0, 2.0, 0.0, -4.0]])
    assert torch.equal(trim(d2[1], 0.5), torch.tensor([0.0, 2.0, 0.0, -4.0]))
    assert torch.equal(ties_merge(d2, density=0.5), torch.tensor([3.0, 2.0, 0.0, -4.0]))
    # weights [1, 3]: weighted [[2, 1], [12, -3]], sums [14, -2]; entry 0 (2 + 12) / 4, entry 1 -3 / 3
    w = ties_merge(torch.tensor([[2.0, 1.0], [4.0, -1.0]]), weights=[1, 3])
    assert torch.allclose(w, torch.tensor([3.5, -1.0]))
    # one delta at density 1 is itself; a delta sparser than the density keeps all its entries
    assert torch.equal(ties_merge(d[:1]), d[0])
    assert torch.equal(trim(torch.tensor([0.0, 5.0, 0.0, 0.0]), 0.53), torch.tensor([0.0, 5.0, 0.0, 0.0]))
    with pytest.raises(ValueError):
        trim(d[0], 0.0)


def test_wrapper_merges_full_groups_of_shards_by_hand():
    base = torch.nn.Linear(3, 2, bias=False)
    w = WISEWrapper(base, 2, 3, k=2, save_freq=1, merge_shards=2, density=1.0)
    none = torch.zeros(0, dtype=torch.long)
    w.update_rows(_table_rows(0, [0, 5], [1.0, 2.0], 1.5), none, {})
    assert w.memory_groups() == [([0], False)]  # the group's second shard is not there yet: shard 0 alone
    w.update_rows(_table_rows(1, [0, 1], [3.0, -1.0], 0.5), none, {})
    assert w.memory_groups() == [([0, 1], True)]
    deltas, eps = w.memories(torch.device("cpu"))
    # entry 0: both +, mean 2; entry 1: -1 (shard 1 alone); entry 5: 2 (shard 0 alone); ε the smaller one
    assert torch.equal(deltas[0], torch.tensor([[2.0, -1.0, 0.0], [0.0, 0.0, 2.0]])) and eps.tolist() == [0.5]
    x = torch.tensor([[1.0, 0.0, 0.0]])  # D x = [2, 0], Δ = 2 > 0.5
    assert torch.allclose(w(x), base(x) + torch.tensor([2.0, 0.0]))
    w.update_rows(_table_rows(2, [2, 3], [4.0, 0.0], 0.7), none, {})
    assert w.memory_groups() == [([0, 1], True), ([2], False)] and w.memories(torch.device("cpu"))[0].shape[0] == 2
    # the groups are derived from the rows: the config survives a rebuild, and without it nothing merges
    rows = {t: getattr(w, t).clone() for t in WISEWrapper.tables}
    again = WISEWrapper.from_config(base, w.config(), {})
    again.update_rows(rows, none, {})
    assert again.memory_groups() == [([0, 1], True), ([2], False)]
    for bad in ({"merge_shards": -1}, {"density": 0.0}, {"density": 2.0}, {"merge_shards": 2, "save_freq": 0}):
        with pytest.raises(EditMismatchError, match="merge settings"):
            WISEWrapper.from_config(base, {**w.config(), **bad}, {})
    old = WISEWrapper.from_config(base, {"d_out": 2, "d_in": 3, "k": 2}, {})
    old.update_rows(rows, none, {})
    assert old.memory_groups() == [([0], False), ([1], False), ([2], False)]
    # merge_freq == save_freq: every full shard is a merge of one, trimmed to the density (2 of 6 entries:
    # shard 0's [1, 2] keeps 2 of its 2 non-zero entries; at density 1/6 only the larger one)
    one = WISEWrapper(base, 2, 3, k=2, save_freq=1, merge_shards=1, density=1 / 6)
    one.update_rows(_table_rows(0, [0, 5], [1.0, 2.0], 1.5), none, {})
    assert one.memory_groups() == [([0], True)]
    assert torch.equal(one.memories(torch.device("cpu"))[0][0], torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))


def test_pack_bits_round_trip_and_seeded_masks():
    m = torch.rand(1003) < 0.3
    assert torch.equal(unpack_bits(pack_bits(m), 1003), m)
    a, b = shard_mask(1000, 200, 7), shard_mask(1000, 200, 7)
    assert torch.equal(a, b) and int(a.sum()) == 200 and not torch.equal(a, shard_mask(1000, 200, 8))


# ------------------------------------------------------------------ editing the tiny trained model
def test_edit_makes_target_the_prediction(lm):
    fact = FACTS[0]
    lp0 = _lp(lm, fact)
    with get_editor("wise").apply(lm, fact, **HP) as edit:
        assert _lp(edit.lm, fact) > lp0 + 3.0
        first = lm.encode_pair(fact.prompt, fact.target_new)[1][0]
        assert int(edit.lm.next_token_logprobs([fact.prompt])[0].argmax()) == first
        info = edit.info
        assert info["edit_act_min"] > info["threshold"] > 0 and info["margins"][1] > info["margins"][0]


def test_unrouted_tokens_get_the_base_output_bit_for_bit(lm):
    base_logits = lm.next_token_logprobs(UNRELATED)
    edit = get_editor("wise").apply(lm, FACTS[0], **HP)
    wrapper = lm.module(_path(lm))
    assert isinstance(wrapper, WISEWrapper)
    ids, mask = lm.pad_right([lm.encode_prompt(p) for p in UNRELATED + [FACTS[0].prompt]])
    got_in, got_out, got_base = [], [], []
    capture(lm.model, lambda: lm.backbone_forward(ids, mask), inputs={_path(lm): got_in.append},
            outputs={_path(lm): got_out.append, f"{_path(lm)}.base_layer": got_base.append})
    routed, _, _ = wrapper.route(got_in[0])
    assert routed[-1, len(lm.encode_prompt(FACTS[0].prompt)) - 1]  # the edit's own last prompt token routes
    quiet = ~routed
    assert quiet.any()
    assert torch.equal(got_out[0][quiet], got_base[0][quiet])  # exactly the base layer's output there
    assert not torch.equal(got_out[0][routed], got_base[0][routed])
    # prompts none of whose tokens route give bit-identical next-token distributions
    lengths = mask.sum(1)
    clean = [i for i in range(len(UNRELATED)) if not routed[i, : int(lengths[i])].any()]
    assert clean, "no unrelated prompt stayed below the threshold"
    after = edit.lm.next_token_logprobs(UNRELATED)
    for i in clean:
        assert torch.equal(after[i], base_logits[i])
    edit.restore()


def test_sequential_edits_are_retained_and_restore_lifo_bit_exact(lm):
    editor = get_editor("wise")
    before = [_lp(lm, f) for f in FACTS]
    states, outs, edits = [_snapshot(lm)], [lm.next_token_logprobs(UNRELATED)], []
    for fact in FACTS:
        edits.append(editor.apply(lm, fact, on=edits[-1] if edits else None, **HP))
        states.append(_snapshot(lm))
        outs.append(edits[-1].lm.next_token_logprobs(UNRELATED))
    wrapper = lm.module(_path(lm))
    assert isinstance(wrapper, WISEWrapper) and wrapper.n_rows == len(FACTS)  # one wrapper, one row per edit
    # the first edit installs the wrapper; later ones only add their table rows
    assert [p.kind for p in edits[0].patches] == ["module_swap", "table_update"]
    assert all([p.kind for p in e.patches] == ["table_update"] for e in edits[1:])
    after = [_lp(edits[-1].lm, f) for f in FACTS]
    retained = sum(a > b + 2.0 for a, b in zip(after, before))
    assert retained >= 4, (before, after)
    for i in range(len(FACTS) - 1, -1, -1):
        edits[i].restore()
        assert _same(states[i], _snapshot(lm))
        system = edits[i - 1].lm if i else lm
        assert torch.equal(system.next_token_logprobs(UNRELATED), outs[i])
    assert lm.active_edits == [] and not isinstance(lm.module(_path(lm)), WISEWrapper)


def test_edit_stores_only_masked_entries(lm):
    edit = get_editor("wise").apply(lm, FACTS[0], **HP)
    update = edit.patches[-1]
    d_out, d_in = lm.arch.as_matrix(lm.base_module(_path(lm)).weight).shape
    k = round(0.2 * d_out * d_in)
    assert tuple(update.append["values"].shape) == (1, k)
    assert tuple(update.append["mask"].shape) == (1, (d_out * d_in + 7) // 8)
    wrapper = lm.module(_path(lm))
    delta = wrapper.dense_delta(0)
    assert int((delta != 0).sum()) <= k and float(delta.abs().max()) <= 1.0  # masked, clipped to ±c
    edit.restore()


def test_save_and_load_a_sequence(lm, tmp_path):
    editor = get_editor("wise")
    edits = []
    for fact in FACTS[:3]:
        edits.append(editor.apply(lm, fact, on=edits[-1] if edits else None, **HP))
    want = edits[-1].lm.next_token_logprobs(UNRELATED + [f.prompt for f in FACTS[:3]])
    for i, e in enumerate(edits):
        e.save(tmp_path / f"e{i}")
    restore_all(lm)
    before = _snapshot(lm)
    loaded = [Edit.load(tmp_path / f"e{i}", lm) for i in range(3)]
    got = loaded[-1].lm.next_token_logprobs(UNRELATED + [f.prompt for f in FACTS[:3]])
    assert torch.equal(got, want)
    for e in reversed(loaded):
        e.restore()
    assert _same(before, _snapshot(lm))


def test_shards_roll_over_every_save_freq_edits(lm):
    editor = get_editor("wise")
    hp = {**HP, "save_freq": 2}
    edits = []
    for fact in FACTS[:3]:
        edits.append(editor.apply(lm, fact, on=edits[-1] if edits else None, **hp))
    wrapper = lm.module(_path(lm))
    assert wrapper.shard.tolist() == [0, 0, 1]
    deltas, eps = wrapper.memories(torch.device("cpu"))
    assert deltas.shape[0] == 2 and eps.shape == (2,)
    masks = [wrapper.shard_state(r)[0] for r in range(3)]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])  # a new mask per shard
    assert float(wrapper.values[2].abs().sum()) > 0  # the new shard was trained from D = 0
    # without retrieval a third shard would need merging: refused, model unchanged
    state = _snapshot(lm)
    edits.append(editor.apply(lm, FACTS[3], on=edits[-1], **hp))
    with pytest.raises(HparamsError, match="retrieve=False"):
        editor.apply(lm, FACTS[4], on=edits[-1], **{**hp, "retrieve": False})
    assert lm.active_edits == edits and wrapper.n_rows == 4
    edits[-1].restore()
    assert _same(state, _snapshot(lm)) and wrapper.n_rows == 3
    restore_all(lm)


def test_merged_shards_keep_their_edits_and_restore_exactly(lm, tmp_path):
    """save_freq 1, merge_freq 2: every two edits' shards become one TIES-merged memory. The merged
    memory still gives both edits, restoring an edit un-merges bit-exactly, a saved sequence loads
    back to the same outputs, and the merge settings cannot change within a sequence."""
    editor = get_editor("wise")
    hp = {**HP, "save_freq": 1, "merge_freq": 2, "merge_density": 1.0}
    before = [_lp(lm, f) for f in FACTS[:3]]
    states, outs, edits = [_snapshot(lm)], [lm.next_token_logprobs(UNRELATED)], []
    for fact in FACTS[:3]:
        edits.append(editor.apply(lm, fact, on=edits[-1] if edits else None, **hp))
        states.append(_snapshot(lm))
        outs.append(edits[-1].lm.next_token_logprobs(UNRELATED + [f.prompt for f in FACTS[:3]]))
    wrapper = lm.module(_path(lm))
    assert wrapper.shard.tolist() == [0, 1, 2] and wrapper.memory_groups() == [([0, 1], True), ([2], False)]
    after = [_lp(edits[-1].lm, f) for f in FACTS[:3]]
    assert all(a > b + 2.0 for a, b in zip(after, before)), (before, after)  # merged edits still answer
    for change in ({"merge_freq": 4}, {"merge_density": 0.5}, {"save_freq": 2}):
        with pytest.raises(HparamsError, match="keep them fixed"):
            editor.apply(lm, FACTS[3], on=edits[-1], **{**hp, **change})
    assert lm.active_edits == edits and _same(states[-1], _snapshot(lm))
    for i, e in enumerate(edits):
        e.save(tmp_path / f"e{i}")
    probe = UNRELATED + [f.prompt for f in FACTS[:3]]
    edits[-1].restore()
    assert wrapper.memory_groups() == [([0, 1], True)]
    assert torch.equal(edits[-2].lm.next_token_logprobs(probe), outs[2])  # the routing memories follow the rows
    edits[-2].restore()
    assert wrapper.memory_groups() == [([0], False)] and _same(states[1], _snapshot(lm))
    assert torch.equal(edits[0].lm.next_token_logprobs(probe), outs[1])
    restore_all(lm)
    loaded = [Edit.load(tmp_path / f"e{i}", lm) for i in range(3)]
    assert torch.equal(loaded[-1].lm.next_token_logprobs(UNRELATED + [f.prompt for f in FACTS[:3]]), outs[-1])
    restore_all(lm)
    assert _same(states[0], _snapshot(lm))


def test_shard_rehearsal_keeps_every_edit_of_a_shard_and_measures_its_threshold_exactly(lm):
    """With shard_rehearsal each edit of a shard is trained with the shard's earlier edits (their
    requests come from the active edits below): all five edits of one shard hold (without it, on this
    model, the third is overwritten: +0.1 nats), and act_min is the smallest Δ over every edit's target
    positions under the final memory, recomputed here by hand."""
    editor = get_editor("wise")
    before = [_lp(lm, f) for f in FACTS]
    edits = []
    for fact in FACTS:
        edits.append(editor.apply(lm, fact, on=edits[-1] if edits else None, **HP, shard_rehearsal=True))
    assert [e.info["rehearsed"] for e in edits] == [0, 1, 2, 3, 4]
    after = [_lp(edits[-1].lm, f) for f in FACTS]
    assert all(a > b + 2.0 for a, b in zip(after, before)), (before, after)
    wrapper = lm.module(_path(lm))
    assert wrapper.shard.tolist() == [0] * 5
    delta = wrapper.dense_delta(4)
    acts = []
    for fact in FACTS:
        prompt, target = lm.encode_pair(fact.prompt, fact.target_new)
        ids = torch.tensor([prompt + target[:-1]])
        got = []
        capture(lm.model, lambda: lm.backbone_forward(ids, torch.ones_like(ids)), inputs={_path(lm): got.append})
        with torch.no_grad():
            acts.append((got[0][0, len(prompt) - 1:].float() @ delta.T).norm(dim=-1).min())
    assert float(wrapper.act_min[4]) == pytest.approx(float(torch.stack(acts).min()), rel=1e-4)
    assert float(wrapper.threshold[4]) == pytest.approx(0.88 * float(wrapper.act_min[4]), rel=1e-6)
    restore_all(lm)


def test_replay_routes_each_edit_to_its_own_memory(lm):
    """replay (one edit per shard here): each new shard is trained quiet at the older edits' answer
    positions and to beat the older memories at its own, so every edit's last prompt token routes to
    its own memory. Facts whose last-token inputs are far apart on this model (cosine < 0.2); without
    replay the third one's prompt routes to the second memory."""
    facts = [FACTS[0], FACTS[3], FACTS[1]]
    before = [_lp(lm, f) for f in facts]

    def routed_to(wrapper):
        out = []
        for fact in facts:
            ids = torch.tensor([lm.encode_prompt(fact.prompt)])
            got = []
            capture(lm.model, lambda: lm.backbone_forward(ids, torch.ones_like(ids)), inputs={_path(lm): got.append})
            with torch.no_grad():
                fire, best, _ = wrapper.route(got[0][0, -1:])
            out.append(int(best[0]) if bool(fire[0]) else None)
        return out

    for replay in (False, True):
        edits = []
        for fact in facts:
            edits.append(get_editor("wise").apply(lm, fact, on=edits[-1] if edits else None,
                                                  **HP, save_freq=1, replay=replay))
        wrapper = lm.module(_path(lm))
        if not replay:  # the case replay is for: a later memory outshouts the right one
            assert routed_to(wrapper) != [0, 1, 2]
            restore_all(lm)
    assert [e.info["replayed"] for e in edits] == [0, 1, 2]
    assert routed_to(wrapper) == [0, 1, 2]
    after = [_lp(edits[-1].lm, f) for f in facts]
    assert all(a > b + 2.0 for a, b in zip(after, before)), (before, after)
    # the answer-position inputs replay caches on the wrapper are what a fresh pass computes
    from editlab.methods.adapters.wise import WISEEditor
    from editlab.methods.ft import encode_batch
    assert set(wrapper._answer_inputs[1]) == {f.prompt for f in facts[:2]}
    fresh = WISEEditor._edit_inputs(lm, _path(lm), encode_batch(lm, facts, "target_new"), first=True)
    assert torch.allclose(WISEEditor._answer_inputs(lm, _path(lm), wrapper, facts), fresh, atol=1e-5)  # batching only
    restore_all(lm)


def test_replay_sequence_continues_bit_exactly_after_save_and_load(lm, tmp_path):
    """The replay cache is derived, not saved: a loaded sequence fills it at once, and the next edit
    must still train on the same bits as in the process that made the sequence."""
    editor = get_editor("wise")
    hp = {**HP, "n_iter": 10, "save_freq": 1, "replay": True}
    edits = []
    for fact in FACTS[:3]:
        edits.append(editor.apply(lm, fact, on=edits[-1] if edits else None, **hp))
    live = lm.module(_path(lm)).values[-1].clone()
    for i, e in enumerate(edits[:2]):
        e.save(tmp_path / f"e{i}")
    restore_all(lm)
    loaded = [Edit.load(tmp_path / f"e{i}", lm) for i in range(2)]
    again = editor.apply(lm, FACTS[2], on=loaded[-1], **hp)
    assert again.info["replayed"] == 2 and torch.equal(lm.module(_path(lm)).values[-1], live)
    restore_all(lm)


def test_replay_reads_only_its_own_memory_when_memories_nest(lm):
    """A second WISE memory at the same module (applied without on=) wraps the first; extending it with
    replay replays its own edits, not the inner memory's."""
    editor = get_editor("wise")
    hp = {**HP, "n_iter": 5, "save_freq": 1, "replay": True}
    inner = editor.apply(lm, FACTS[0], **hp)
    outer = [editor.apply(lm, FACTS[1], **hp)]
    outer.append(editor.apply(lm, FACTS[3], on=outer[0], **hp))
    assert outer[1].info["replayed"] == 1 and lm.module(_path(lm)).n_rows == 2
    assert inner.active
    restore_all(lm)


@pytest.mark.parametrize("bad", [
    {"layer": 4}, {"act_margin": [0.1, -0.2, 0.1]}, {"act_margin": [0.1, 0.2]}, {"mask_ratio": 0.0},
    {"mask_ratio": 1.5}, {"act_ratio": 0.0}, {"norm_constraint": -1.0}, {"merge_freq": 1001}, {"n_iter": 0},
    {"margin_scale": "log"}, {"save_freq": 0}, {"merge_freq": -500}, {"merge_freq": 1000, "retrieve": False},
    {"merge_density": 0.0}, {"merge_density": 1.5}, {"merge_freq": 10, "save_freq": 5, "replay": True},
])
def test_bad_hparams_raise_and_change_nothing(lm, bad):
    before = _snapshot(lm)
    modules = dict(lm.model.named_modules())
    with pytest.raises(HparamsError):
        get_editor("wise").apply(lm, FACTS[0], **{**HP, **bad})
    assert _same(before, _snapshot(lm)) and dict(lm.model.named_modules()) == modules and lm.active_edits == []


def test_mask_ratio_must_stay_fixed_within_a_sequence(lm):
    first = get_editor("wise").apply(lm, FACTS[0], **HP)
    state = _snapshot(lm)
    with pytest.raises(HparamsError, match="mask_ratio"):
        get_editor("wise").apply(lm, FACTS[1], on=first, **{**HP, "mask_ratio": 0.5})
    assert _same(state, _snapshot(lm)) and lm.active_edits == [first]
    first.restore()


def test_stacks_over_other_edits_of_the_same_module(lm):
    """Over a weight edit of the same projection and over another WISE memory (no on=): the new wrapper
    wraps what is there; restoring in LIFO order is bit-exact."""
    before = _snapshot(lm)
    modules = dict(lm.model.named_modules())
    ft = get_editor("ft-m").apply(lm, FACTS[2], layer=2, steps=20, lr=1e-2)
    one = get_editor("wise").apply(lm, FACTS[0], **HP)
    two = get_editor("wise").apply(lm, FACTS[1], **HP)  # not on=: a second wrapper around the first
    outer = lm.module(_path(lm))
    assert isinstance(outer, WISEWrapper) and isinstance(outer.base_layer, WISEWrapper)
    assert _lp(two.lm, FACTS[0]) > -3 and _lp(two.lm, FACTS[1]) > -3
    for e in (two, one, ft):
        e.restore()
    assert _same(before, _snapshot(lm)) and dict(lm.model.named_modules()) == modules


def test_context_templates_train_the_edit_under_sampled_prefixes(lm):
    from editlab.methods.adapters.wise import WISEHparams, templated

    hp = WISEHparams.for_model(lm, **HP, context_templates=[[3, 2]])
    reqs = templated(lm, [FACTS[0]], hp)
    assert len(reqs) == 3 and reqs[0] == FACTS[0]
    assert all(r.prompt.endswith(". " + FACTS[0].prompt) and r.target_new == "football" for r in reqs[1:])
    assert [r.prompt for r in templated(lm, [FACTS[0]], hp)] == [r.prompt for r in reqs]  # seeded
    lp0, lp_prefixed = _lp(lm, FACTS[0]), _lp(lm, reqs[1])
    with get_editor("wise").apply(lm, FACTS[0], hp) as edit:
        assert _lp(edit.lm, FACTS[0]) > lp0 + 3.0
        assert _lp(edit.lm, reqs[1]) > lp_prefixed


@pytest.mark.slow
def test_real_model_edit_routes_only_its_own_tokens(smollm2):
    lm = smollm2
    fact = EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")
    unrelated = ["The capital of Japan is", "Water boils at a temperature of", "The author of Hamlet is"]
    base = lm.next_token_logprobs(unrelated)
    with get_editor("wise").apply(lm, fact) as edit:
        hp = edit.hparams  # the tuned preset
        assert hp["save_freq"] == 1 and hp["replay"] and hp["act_ratio"] == 0.95
        assert edit.info["path"] == lm.arch.mlp_out_path(25)
        first = lm.encode_pair(fact.prompt, fact.target_new)[1][0]
        assert int(edit.lm.next_token_logprobs([fact.prompt])[0].argmax()) == first
        assert edit.info["irr_act_max"] < edit.info["threshold"] < edit.info["edit_act_min"]
        after = edit.lm.next_token_logprobs(unrelated)
        assert sum(torch.equal(a, b) for a, b in zip(after, base)) >= 2  # untouched where nothing routes


def test_extending_at_another_layer_is_refused_and_changes_nothing(lm):
    """on= names the edit to extend: a WISE memory at another layer is not one (GRACE, MELO, T-Patcher
    and CaliNET refuse the same), instead of silently opening a second memory."""
    from editlab.errors import EditStackError

    first = get_editor("wise").apply(lm, FACTS[0], **HP)
    state = _snapshot(lm)
    modules = dict(lm.model.named_modules())
    with pytest.raises(EditStackError, match="no WISE memory"):
        get_editor("wise").apply(lm, FACTS[1], on=first, **{**HP, "layer": 1})
    assert _same(state, _snapshot(lm)) and dict(lm.model.named_modules()) == modules and lm.active_edits == [first]
    first.restore()


def _zsre(i):
    return {"subject": f"Company {i}", "src": f"What is the product made by Company {i}?", "alt": "uniforms",
            "answers": ["shoes"], "rephrase": f"What does Company {i} make?",
            "loc": f"nq question: who wrote play number {i}", "loc_ans": f"Author {i}"}


def test_irr_data_draws_x_irr_from_a_disjoint_pool(lm, tmp_path):
    # the reference's protocol: x_irr from a training file, never the probes locality is scored on
    import json

    from editlab.data import load_requests
    from editlab.methods.adapters import wise

    pool_file = tmp_path / "train.json"
    pool_file.write_text(json.dumps([_zsre(i) for i in range(40)]))
    (req,) = load_requests(pool_file, limit=1)
    own = wise.irrelevant_texts([req])
    assert own == ["who wrote play number 0 Author 0"]  # default: the request's own probes
    hp = get_editor("wise").hparams(lm, irr_data=str(pool_file), irr_texts=5)
    drawn = wise.irrelevant_texts([req], hp)
    assert len(drawn) == 5 and not set(drawn) & set(own)
    assert set(drawn) <= set(wise.probe_pool(str(pool_file)))
    assert drawn == wise.irrelevant_texts([req], hp)  # the same edit always draws the same texts
    seen = []
    real = wise.token_inputs
    wise.token_inputs = lambda lm_, path, texts, *a, **k: seen.append(list(texts)) or real(lm_, path, texts, *a, **k)
    try:
        edit = get_editor("wise").apply(lm, req, irr_data=str(pool_file), irr_texts=5)
    finally:
        wise.token_inputs = real
    assert drawn in seen and own not in seen  # the edit trained against the drawn texts
    edit.restore()
    empty = tmp_path / "none.json"
    empty.write_text(json.dumps([{k: v for k, v in _zsre(0).items() if k not in ("loc", "loc_ans")}]))
    before = _snapshot(lm)
    with pytest.raises(HparamsError, match="has no neighbourhood or locality probes"):
        get_editor("wise").apply(lm, req, irr_data=str(empty))
    with pytest.raises(HparamsError, match=r"irr_data: data file not found: .*missing\.json"):
        get_editor("wise").hparams(lm, irr_data=str(tmp_path / "missing.json"))  # before any model work
    with pytest.warns(UserWarning, match="'counterfact', an evaluation dataset"):
        wise.WISEHparams.from_dict({"irr_data": "counterfact"})._check_dataset("irr_data", "counterfact", "x_irr")
    assert _same(before, _snapshot(lm)) and not lm.active_edits
