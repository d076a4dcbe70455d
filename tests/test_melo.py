"""MELO: the wrapper's per-token routing and LoRA computed by hand, the vector-database rules (add / join /
split with dropped points), exact locality outside every cluster, batches trained block by block,
sequential edits sharing one wrapper (retained, restored LIFO bit for bit, saved and loaded edit by
edit), stacking over another adapter, and bad input refused with the model unchanged."""

from __future__ import annotations

import pytest
import torch

from editlab.errors import EditMismatchError, EditStackError, HparamsError
from editlab.methods import Edit, TableUpdate, get_editor, restore_all
from editlab.methods.adapters.grace import label_id
from editlab.methods.adapters.melo import MELOHparams, MeloLoRA, _Database
from editlab.models import load_lm
from editlab.requests import EditRequest

FACTS = [
    EditRequest.create("Michael Jordan plays", "Michael Jordan", "football", "basketball"),
    EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris"),
    EditRequest.create("Toyota was founded in", "Toyota", "California", "Japan"),
    EditRequest.create("Albert Einstein was born in", "Albert Einstein", "Warsaw", "Ulm"),
    EditRequest.create("The capital of Japan is", "Japan", "Rome", "Tokyo"),
]
UNRELATED = ["Python is a programming language.", "London is the capital of", "Marie Curie was born in"]
HP = {"layers": [2], "steps": 30, "lr": 1e-2, "lora_scale": 4.0}
# keys at the target positions too: multi-token targets ("Warsaw" is three tokens here) need the block
# to fire where the model has already produced the first target tokens
HP_T = {**HP, "key_tokens": "target"}
NONE = torch.zeros(0, dtype=torch.long)


@pytest.fixture
def lm():
    return load_lm("tiny-trained-llama")


def _snapshot(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _argmax(system, req) -> bool:
    s = system.score([req.prompt], [req.target_new])[0]
    return s.argmax_ids == s.target_ids


def _lp(system, req) -> float:
    return float(system.score([req.prompt], [req.target_new])[0].logprobs.sum())


def _wrapper(lm, layer=2) -> MeloLoRA:
    w = lm.model.get_submodule(lm.arch.mlp_in_path(layer))
    assert isinstance(w, MeloLoRA)
    return w


def _fill(w: MeloLoRA, **rows) -> None:
    for group, names in MeloLoRA.GROUPS.items():
        w.update_rows({n: rows[n] for n in names}, NONE, {})


# ------------------------------------------------------------------ the wrapper by hand
def test_routing_and_lora_by_hand():
    torch.manual_seed(0)
    base = torch.nn.Linear(3, 2)
    w = MeloLoRA(base, 3, 2, block_rank=1, scale=2.0)
    A = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])  # block 0, block 1 (rank 1 each)
    B = torch.tensor([[1.0, -1.0], [10.0, 20.0]])
    _fill(w, centres=torch.tensor([[1.0, 0, 0], [0, 5.0, 0], [0, 0, 8.0]]), radii=torch.tensor([0.5, 1.0, 1.0]),
          labels=torch.tensor([1, 2, 3]),
          # cluster 1 holds two points (blocks 0 and 1); cluster 2's only point routes to no block
          points=torch.tensor([[1.0, 0, 0], [0, 4.5, 0], [0, 5.5, 0], [0, 0, 8.0]]),
          point_cluster=torch.tensor([0, 1, 1, 2]), point_block=torch.tensor([0, 0, 1, -1]),
          lora_A=A, lora_B=B)
    x = torch.tensor([[[1.2, 0, 0], [0, 4.6, 0], [0, 5.8, 0], [0, 0, 8.3], [1.6, 0, 0], [3.0, 3.0, 3.0]]])
    out, plain = w(x), base(x)
    with torch.no_grad():
        # token 0: cluster 0 -> block 0; token 1: cluster 1, nearest point 4.5 -> block 0; token 2: -> block 1
        want0 = plain[0, 0] + 2.0 * (A[0] @ x[0, 0]) * B[0]
        want1 = plain[0, 1] + 2.0 * (A[0] @ x[0, 1]) * B[0]
        want2 = plain[0, 2] + 2.0 * (A[1] @ x[0, 2]) * B[1]
    assert torch.allclose(out[0, 0], want0) and torch.allclose(out[0, 1], want1) and torch.allclose(out[0, 2], want2)
    # token 3: in cluster 2 whose point routes to no block; 4: 0.6 > radius 0.5; 5: far from all: untouched
    for t in (3, 4, 5):
        assert torch.equal(out[0, t], plain[0, t])
    far = torch.tensor([[[0.0, 0, 30], [9.0, 9, 9]]])
    assert torch.equal(w(far), base(far))
    # a dropped point (cluster -1) is never chosen: cluster 1 then routes 4.6 to block 1 (point 5.5)
    w.update_rows({n: getattr(w, n)[:0] for n in MeloLoRA.GROUPS["points"]}, torch.tensor([1]),
                  {"point_cluster": torch.tensor([-1])})
    tok, blk = w.route(x[0])
    assert tok.tolist() == [0, 1, 2] and blk.tolist() == [0, 1, 1]


def test_table_groups_grow_independently_and_undo_exactly():
    w = MeloLoRA(torch.nn.Linear(3, 2), 3, 2, block_rank=2, scale=1.0)
    u = TableUpdate("x", {"lora_A": torch.ones(2, 3), "lora_B": torch.ones(2, 2)})
    u.check_wrapper(w)
    undo = w.update_rows(u.append, u.index, u.changed)
    assert w.n_blocks == 1 and w.n_rows == 0
    w.undo_rows(u.index, undo)
    assert w.lora_A.shape == (0, 3)
    with pytest.raises(EditMismatchError, match="whole blocks"):
        w.check_rows({"lora_A": torch.ones(3, 3), "lora_B": torch.ones(3, 2)}, NONE, {})
    with pytest.raises(EditMismatchError, match="one table group"):
        w.check_rows({"lora_A": torch.ones(2, 3), "lora_B": torch.ones(2, 2), "radii": torch.ones(1)}, NONE, {})
    with pytest.raises(EditMismatchError, match="changes row"):
        w.check_rows({n: getattr(w, n)[:0] for n in MeloLoRA.GROUPS["clusters"]}, torch.tensor([0]),
                     {"radii": torch.ones(1)})


# ------------------------------------------------------------------ the database rules
def test_database_add_join_split():
    w = MeloLoRA(torch.nn.Linear(2, 2), 2, 2, block_rank=1, scale=1.0)
    db = _Database(w, init_radius=1.0, unit="absolute")
    db.place(torch.tensor([0.0, 0.0]), label=7, block=0)
    assert db.actions == ["add"] and db.t["radii"].tolist() == [1.0]
    db.place(torch.tensor([10.0, 0.0]), label=7, block=0)  # 10 > 1 + 1: a cluster of its own
    assert db.actions[-1] == "add" and db.t["centres"].shape[0] == 2
    db.place(torch.tensor([0.0, 1.5]), label=7, block=1)  # within 1 + 1, same label: joins cluster 0
    assert db.actions[-1] == "join"
    assert torch.allclose(db.t["centres"][0], torch.tensor([0.0, 0.75]))
    assert db.t["radii"][0].item() == pytest.approx(1.0)  # max(0.75, init 1.0)
    assert db.t["point_cluster"].tolist() == [0, 1, 0] and db.t["point_block"].tolist() == [0, 0, 1]
    db.place(torch.tensor([0.0, -1.0]), label=9, block=2)  # other label at 1.75 from centre 0: split
    assert db.actions[-1] == "split"
    assert db.t["radii"][0].item() == pytest.approx(0.875) and db.t["radii"][2].item() == pytest.approx(0.875)
    # both points of cluster 0 lie 0.75 from its centre: kept
    assert db.t["point_cluster"].tolist() == [0, 1, 0, 2]
    # other label 0.5 from cluster 0's centre: radius 0.25, both its points (0.75 away) are dropped
    db.place(torch.tensor([0.5, 0.75]), label=8, block=3)
    assert db.t["radii"][0].item() == pytest.approx(0.25)
    assert db.t["point_cluster"].tolist()[:3] == [-1, 1, -1]
    assert db.t["point_cluster"][-1].item() == 0 and db.t["point_block"][-1].item() == -1  # the centre, no block
    assert torch.equal(db.t["points"][-1], db.t["centres"][0])
    # the updates: new rows appended, changed earlier rows listed (none existed before here)
    clusters, points = db.updates("p")
    assert clusters.index.numel() == 0 and clusters.append["centres"].shape[0] == 4
    assert points.append["points"].shape[0] == 6


def test_database_diff_lists_changed_rows_only():
    w = MeloLoRA(torch.nn.Linear(2, 2), 2, 2, block_rank=1, scale=1.0)
    _fill(w, centres=torch.tensor([[0.0, 0.0], [5.0, 5.0]]), radii=torch.tensor([1.0, 1.0]), labels=torch.tensor([1, 2]),
          points=torch.tensor([[0.0, 0.0], [5.0, 5.0]]), point_cluster=torch.tensor([0, 1]),
          point_block=torch.tensor([0, 0]), lora_A=torch.ones(1, 2), lora_B=torch.ones(1, 2))
    db = _Database(w, init_radius=0.5, unit="key_norm")
    db.place(torch.tensor([0.0, 0.5]), label=3, block=1)  # init = 0.25; 0.5 <= 1 + 0.25, other label: split
    clusters, points = db.updates("p")
    assert clusters.index.tolist() == [0] and clusters.changed["radii"].tolist() == [0.25]
    assert clusters.append["radii"].tolist() == [0.25]
    assert points.index.numel() == 0  # the point at the centre stays


# ------------------------------------------------------------------ editing the tiny model
def test_edit_sets_target_and_leaves_unrelated_prompts_bit_identical(lm):
    before = lm.next_token_logprobs(UNRELATED)
    req = FACTS[0]
    assert not _argmax(lm, req)
    with get_editor("melo").apply(lm, req, **HP) as edit:
        assert _argmax(edit.lm, req)
        w = _wrapper(lm)
        assert w.n_rows == 1 and w.n_blocks == 1 and edit.info["actions"] == [["add"]]
        # the unrelated prompts route nowhere, so their logits are the base model's, bit for bit
        from editlab.methods.adapters.queries import token_inputs

        assert w.route(token_inputs(lm, lm.arch.mlp_in_path(2), UNRELATED, 10_000, skip_prefix=False))[0].numel() == 0
        assert torch.equal(edit.lm.next_token_logprobs(UNRELATED), before)
        # scoring, next-token and cached generation agree at the edited prompt (per-token routing)
        first = lm.encode_pair(req.prompt, req.target_new)[1][0]
        assert int(edit.lm.next_token_logprobs([req.prompt])[0].argmax()) == first
        assert lm.generate_ids([req.prompt], max_new_tokens=1)[0][0] == first


def test_key_norm_radius_scales_with_the_key(lm):
    req = FACTS[0]
    with get_editor("melo").apply(lm, req, **{**HP, "init_radius": 0.2}) as edit:
        w = _wrapper(lm)
        key = w.centres[0]
        assert float(w.radii[0]) == pytest.approx(0.2 * float(key.norm()), rel=1e-6)
        assert edit.hparams["radius_unit"] == "key_norm"
    with get_editor("melo").apply(lm, req, **{**HP, "init_radius": 0.2, "radius_unit": "absolute"}):
        assert float(_wrapper(lm).radii[0]) == pytest.approx(0.2)


def test_target_keys_file_one_point_per_target_position(lm):
    req = FACTS[3]
    m = len(lm.encode_pair(req.prompt, req.target_new)[1])
    assert m == 3
    with get_editor("melo").apply(lm, req, **HP):
        assert _wrapper(lm).points.shape[0] == 1
    with get_editor("melo").apply(lm, req, **HP_T) as edit:
        w = _wrapper(lm)
        assert w.points.shape[0] == m and set(w.point_block.tolist()) == {0}
        assert _argmax(edit.lm, req)
        assert lm.generate_ids([req.prompt], max_new_tokens=m)[0] == lm.encode_pair(req.prompt, req.target_new)[1]


def test_batch_trains_one_block_per_group(lm):
    reqs = FACTS[:3]
    lps = [_lp(lm, r) for r in reqs]
    with get_editor("melo").apply(lm, reqs, **{**HP, "edits_per_block": 2}) as edit:
        w = _wrapper(lm)
        assert w.n_blocks == 2 and w.n_rows == 3
        assert w.point_block.tolist() == [0, 0, 1]  # requests 1-2 share block 0, request 3 has block 1
        assert len(edit.info["loss"]) == 2
        assert all(_lp(edit.lm, r) > lp + 1.0 for r, lp in zip(reqs, lps))
    with get_editor("melo").apply(lm, reqs, **{**HP, "edits_per_block": 0}):
        assert _wrapper(lm).n_blocks == 1


def test_same_label_joins_the_cluster_and_keeps_both_blocks(lm):
    a = EditRequest.create("Michael Jordan plays", "Michael Jordan", "football")
    b = EditRequest.create("Michael Jordan plays the sport of", "Michael Jordan", "football")
    # a radius wide enough that the second prompt falls near the first cluster
    hp = {**HP, "init_radius": 2.0}
    first = get_editor("melo").apply(lm, a, **hp)
    second = get_editor("melo").apply(lm, b, on=first, **hp)
    w = _wrapper(lm)
    assert second.info["actions"] == [["join"]] and w.n_rows == 1 and w.n_blocks == 2
    assert w.point_block.tolist() == [0, 1] and w.labels.tolist() == [label_id(lm.encode_pair(a.prompt, a.target_new)[1])]
    assert _argmax(second.lm, a) and _argmax(second.lm, b)
    restore_all(lm)


def test_sequential_edits_retained_and_restored_lifo_bit_exact(lm):
    editor = get_editor("melo")
    before = _snapshot(lm)
    probes = [r.prompt for r in FACTS] + UNRELATED
    states, outs, edits = [_snapshot(lm)], [lm.next_token_logprobs(probes)], []
    for r in FACTS:
        edits.append(editor.apply(lm, r, on=edits[-1] if edits else None, **HP_T))
        states.append(_snapshot(lm))
        outs.append(lm.next_token_logprobs(probes))
    w = _wrapper(lm)
    assert w.n_blocks == 5 and w.n_rows >= 5  # one shared wrapper, one block per edit
    assert all(_argmax(edits[-1].lm, r) for r in FACTS)
    for i in range(len(edits) - 1, -1, -1):
        edits[i].restore()
        assert _same(states[i], _snapshot(lm))
        assert torch.equal(lm.next_token_logprobs(probes), outs[i])
    assert _same(before, _snapshot(lm))
    assert lm.model.get_submodule(lm.arch.mlp_in_path(2)).__class__ is not MeloLoRA


def test_sequence_saves_and_loads_edit_by_edit(lm, tmp_path):
    editor = get_editor("melo")
    edits = []
    for r in FACTS[:3]:
        edits.append(editor.apply(lm, r, on=edits[-1] if edits else None, **HP))
    probes = [r.prompt for r in FACTS] + UNRELATED
    want = lm.next_token_logprobs(probes)
    for i, e in enumerate(edits):
        e.save(tmp_path / f"e{i}")
    restore_all(lm)
    before = _snapshot(lm)
    # a later edit cannot be loaded without the ones it extends
    with pytest.raises(EditMismatchError):
        Edit.load(tmp_path / "e1", lm)
    assert _same(before, _snapshot(lm)) and lm.active_edits == []
    loaded = [Edit.load(tmp_path / f"e{i}", lm) for i in range(3)]
    assert torch.allclose(lm.next_token_logprobs(probes), want, atol=1e-6)
    assert _wrapper(lm).n_blocks == 3
    for e in reversed(loaded):
        e.restore()
    assert _same(before, _snapshot(lm))


def test_stacks_over_another_adapter(lm):
    before = _snapshot(lm)
    out0 = lm.next_token_logprobs(UNRELATED)
    grace = get_editor("grace").apply(lm, FACTS[1], layer=2, module="mlp_in", steps=40, lr=1.0)
    melo = get_editor("melo").apply(lm, FACTS[0], **HP)
    w = _wrapper(lm)
    assert type(w.base_layer).__name__ == "GraceCodebook"
    assert _argmax(melo.lm, FACTS[0]) and _argmax(melo.lm, FACTS[1])
    melo.restore()
    grace.restore()
    assert _same(before, _snapshot(lm)) and torch.equal(lm.next_token_logprobs(UNRELATED), out0)


def test_bad_input_raises_and_changes_nothing(lm):
    editor = get_editor("melo")
    before = _snapshot(lm)
    for bad in ({"init_radius": -0.5}, {"init_radius": 0.0}, {"layers": [4]}, {"layers": []}, {"layers": [2, 1]},
                {"module": "attn"}, {"radius_unit": "cm"}, {"block_rank": 0}, {"lora_scale": -1.0},
                {"lr_gamma": 0.0}, {"lr_step": 0}, {"edits_per_block": -1}, {"steps": 0}):
        with pytest.raises(HparamsError):
            editor.apply(lm, FACTS[0], **{**HP, **bad})
    assert _same(before, _snapshot(lm)) and lm.active_edits == []
    first = editor.apply(lm, FACTS[0], **HP)
    mid = _snapshot(lm)
    with pytest.raises(HparamsError, match="block_rank"):
        editor.apply(lm, FACTS[1], on=first, **{**HP, "block_rank": 2})
    with pytest.raises(EditStackError, match="no MELO wrapper"):
        editor.apply(lm, FACTS[1], on=first, **{**HP, "layers": [1]})
    assert _same(mid, _snapshot(lm)) and lm.active_edits == [first]
    first.restore()
    assert _same(before, _snapshot(lm))


def test_presets_and_defaults(lm):
    hp = MELOHparams.for_model(lm)
    assert hp.layers == [lm.n_layers - 5 if lm.n_layers > 5 else 0]
    paper = MELOHparams.for_model(lm, preset="paper")
    assert paper.radius_unit == "absolute" and paper.block_rank == 2 and paper.init_radius == 0.5


@pytest.mark.parametrize("layers", [[2], [1, 2]])
def test_training_loss_from_the_kv_cache_equals_the_whole_sequence(lm, monkeypatch, layers):
    """Training runs each step from the first position a new block can reach (a KV cache before it):
    the loss must equal FT's teacher-forced loss over the whole sequence, step by step."""
    from editlab.methods.adapters import melo
    from editlab.methods.ft import batch_loss, encode_batch

    diffs, original = [], melo._SuffixLoss.__call__

    def both(self):
        fast = original(self)
        with torch.no_grad():
            full = batch_loss(self.lm, encode_batch(self.lm, reqs, "target_new"))
        diffs.append(abs(float(fast.detach()) - float(full)))
        return fast

    monkeypatch.setattr(melo._SuffixLoss, "__call__", both)
    reqs = FACTS[:2]
    hp = {**HP_T, "layers": layers, "edits_per_block": 0, "steps": 10, "stop_loss": 0.0}
    with get_editor("melo").apply(lm, reqs, **hp) as edit:
        assert all(_lp(edit.lm, r) > -1.0 for r in reqs) or edit.info["loss"][0] < 0.5
    assert len(diffs) == 10 and max(diffs) < 1e-4


def test_bfloat16_model_edits_and_keeps_unrelated_logits():
    lm = load_lm("tiny-trained-llama", dtype="bfloat16")
    before = lm.next_token_logprobs(UNRELATED)
    lp0 = _lp(lm, FACTS[0])
    with get_editor("melo").apply(lm, FACTS[0], **HP) as edit:
        assert _wrapper(lm).lora_A.dtype == torch.float32  # tables stay float32 beside a bf16 layer
        assert _lp(edit.lm, FACTS[0]) > lp0 + 1.0
        assert torch.equal(edit.lm.next_token_logprobs(UNRELATED), before)


def test_route_screen_agrees_with_direct_distances():
    """The fast screen never drops a token that the exact rule would route, even at the radius edge."""
    torch.manual_seed(1)
    w = MeloLoRA(torch.nn.Linear(16, 4), 16, 4, block_rank=1, scale=1.0)
    centres = torch.randn(30, 16) * 5
    radii = torch.rand(30) * 3 + 0.5
    _fill(w, centres=centres, radii=radii, labels=torch.arange(30), points=centres.clone(),
          point_cluster=torch.arange(30), point_block=torch.arange(30), lora_A=torch.ones(30, 16),
          lora_B=torch.ones(30, 4))
    # tokens spread around, and tokens placed exactly on (and a hair inside / outside) a radius
    direction = torch.nn.functional.normalize(torch.randn(30, 16), dim=1)
    edge = torch.cat([centres + direction * radii[:, None] * f for f in (0.999999, 1.0, 1.000001)])
    h = torch.cat([torch.randn(500, 16) * 5, edge])
    d = torch.cdist(h, centres, compute_mode="donot_use_mm_for_euclid_dist")
    dmin, c = d.min(dim=1)
    want = (dmin <= radii[c]).nonzero()[:, 0]
    tok, blk = w.route(h)
    assert torch.equal(tok, want) and torch.equal(blk, c[want])


def test_same_prompt_with_another_answer_is_refused_and_changes_nothing():
    from editlab.errors import EditRequestError

    lm = load_lm("tiny-trained-llama")
    ed = get_editor("melo")
    hp = {"layers": [2], "steps": 30, "lr": 1e-2, "lora_scale": 4.0}
    first = ed.apply(lm, EditRequest.create("Michael Jordan plays", "Michael Jordan", "Rome", "basketball"), **hp)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with pytest.raises(EditRequestError, match="already edited"):
        ed.apply(lm, EditRequest.create("Michael Jordan plays", "Michael Jordan", "Paris", "basketball"), on=first, **hp)
    after = lm.model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert lm.active_edits == [first]
    first.restore()
