"""Meta-learned editors (MEND, MALMEN, KE) and their one trainer, on the toy model: the gradient factors
are the true gradient, the edited forward equals running the changed weights, MALMEN's solve is the
ridge regression it claims, a killed training run resumes to the very same editor, and checkpoints
for another model, damaged ones and unusable training data are refused with editlab's errors.
(The contract tests in test_contract.py cover edit / restore / save / load / batch / sequential.)"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from editlab.cli import app
from editlab.data import load_requests
from editlab.errors import CheckpointError, DataFormatError, EditRequestError, HparamsError
from editlab.methods import get_editor
from editlab.methods.catalogue import METHODS
from editlab.methods.meta.factors import added_outputs, capture, capture_factors, encode_pairs
from editlab.methods.meta.nets import RunningNorm
from editlab.models import load_lm
from editlab.requests import EditRequest
from editlab.train.meta import examples_from_requests

FACT = EditRequest.create("Michael Jordan plays", "Michael Jordan", "football", "basketball")


@pytest.fixture
def lm():
    return load_lm("tiny-trained-llama")


def _hp(name: str, **kw):
    return {**METHODS.entry(name).meta["tiny_hparams"], **kw}


def test_captured_factors_are_the_weight_gradient(lm):
    path = lm.arch.mlp_out_path(2)
    scored = encode_pairs(lm, [(FACT.prompt, FACT.target_new), ("Toyota was founded in", " Japan")])
    facts, _ = capture_factors(lm, [path], scored, n_edit_rows=1)
    w = lm.module(path).weight
    w.requires_grad_(True)
    try:
        hidden = lm.hidden_states(scored.ids, scored.mask)
        edit = scored.subset(0, 1)
        logp = torch.log_softmax(lm.head(hidden[edit.rows, edit.cols]).float(), -1)
        loss = -logp.gather(1, edit.targets[:, None]).mean()
        (grad,) = torch.autograd.grad(loss, [w])
    finally:
        w.requires_grad_(False)
    f = facts[path]
    assert set(f.rows.tolist()) == {0}  # the riding text contributes no factors
    assert torch.allclose(f.delta.T @ f.u, grad, atol=1e-6)


def test_factors_and_states_do_not_depend_on_how_rows_are_batched(lm, monkeypatch):
    """capture runs edit rows and riding rows as length-sorted sub-batches: every edit row's factors
    are still its own weight gradient, and the final states and the kept block inputs are those of one
    plain forward over the whole batch (at every real token)."""
    path = lm.arch.mlp_in_path(2)
    edits = [(FACT.prompt, FACT.target_new), ("The capital city of the country France is", " Paris"),
             ("Toyota", " Japan")]
    riding = [("Water boils at a temperature of one hundred degrees in", " Celsius"), ("Cats", " meow")]
    scored = encode_pairs(lm, edits + riding)
    # sub-batches out of row order and of mixed widths: [[2], [0, 1]] for the edits, [[1], [0]] for the rest
    monkeypatch.setattr(lm, "length_batches", lambda lengths, *a, **k: iter([[len(lengths) - 1], list(range(len(lengths) - 1))]))
    got = capture(lm, [path], scored, n_edit_rows=len(edits), keep_input_of=1)
    monkeypatch.undo()
    kept: list[torch.Tensor] = []
    hook = lm.module(lm.arch.block_path(1)).register_forward_pre_hook(lambda m, a: kept.append(a[0]))
    try:
        full = lm.hidden_states(scored.ids, scored.mask)
    finally:
        hook.remove()
    real = scored.mask.bool()
    assert torch.allclose(got.hidden[real], full[real], atol=1e-5)
    assert torch.allclose(got.block_input[real], kept[0][real], atol=1e-5)
    f = got.factors[path]
    assert set(f.rows.tolist()) == {0, 1, 2}
    w = lm.module(path).weight
    for row, pair in enumerate(edits):
        one = encode_pairs(lm, [pair])
        w.requires_grad_(True)
        try:
            hidden = lm.hidden_states(one.ids, one.mask)
            logp = torch.log_softmax(lm.head(hidden[one.rows, one.cols]).float(), -1)
            (grad,) = torch.autograd.grad(-logp.gather(1, one.targets[:, None]).mean(), [w])
        finally:
            w.requires_grad_(False)
        mine = f.rows == row
        assert torch.allclose(f.delta[mine].T @ f.u[mine], grad, atol=1e-5)


def test_starting_at_a_block_skips_the_blocks_below_and_gives_the_full_forward(tiny_lm):
    """The edited pass of meta-training runs from the lowest edited block on kept inputs: same states as
    the whole forward, the blocks below are not run, and they run again afterwards."""
    lm = tiny_lm
    layer = lm.n_layers - 1
    ids, mask = lm.pad_right([lm.encode_prompt("The Eiffel Tower is located in"), lm.encode_prompt("Paris")])
    kept: list[torch.Tensor] = []
    calls: list[int] = []
    keep = lm.module(lm.arch.block_path(layer)).register_forward_pre_hook(
        lambda m, a, k: kept.append(a[0] if a else k["hidden_states"]), with_kwargs=True)
    count = lm.module(lm.arch.mlp_out_path(0)).register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        with torch.no_grad():
            full = lm.hidden_states(ids, mask)
            assert len(calls) == 1
            with lm.starting_at_block(layer, kept[0]):
                short = lm.hidden_states(ids, mask)
            assert len(calls) == 1  # block 0 was skipped
            with pytest.raises(ValueError, match="do not fit"):
                with lm.starting_at_block(layer, kept[0][:1]):
                    lm.hidden_states(ids, mask)
            again = lm.hidden_states(ids, mask)
    finally:
        keep.remove()
        count.remove()
    assert len(calls) == 2 and "forward" not in lm.module(lm.arch.block_path(0)).__dict__
    real = mask.bool()
    assert torch.allclose(short[real], full[real], atol=1e-5) and torch.equal(again, full)


@pytest.mark.parametrize("name", ["mend", "malmen", "ke"])
def test_training_losses_and_gradients_equal_the_full_edited_forward(lm, monkeypatch, name):
    """The edited pass of `losses` starts at the lowest edited block on states kept from the unedited
    pass; running all blocks instead gives the same losses and editor gradients (duplicate texts and
    texts of different lengths included)."""
    import copy

    hp = get_editor(name).hparams(lm, **_hp(name, layers=[lm.n_layers - 2, lm.n_layers - 1]))
    torch.manual_seed(0)
    net = get_editor(name).build_net(lm, hp)
    ex = examples_from_requests(load_requests("builtin", limit=4))
    ex = ex + ex[:1]
    assert any(len(e.equiv) > 1 for e in ex) and all(e.loc for e in ex)
    starts = []
    real = lm.starting_at_block

    def counted(layer, states):
        starts.append(layer)
        return real(layer, states)

    def run(net):
        out = net.losses(lm, ex, hp, training=True)
        out["loss"].backward()
        return out, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    monkeypatch.setattr(lm, "starting_at_block", counted)
    fast, fast_grads = run(copy.deepcopy(net))
    assert starts == [lm.n_layers - 2]
    monkeypatch.setattr(lm, "starting_at_block", lambda layer, states: contextlib.nullcontext())
    full, full_grads = run(copy.deepcopy(net))
    for k in ("loss", "edit_nll", "loc_kl", "edit_acc", "loc_acc"):
        assert torch.allclose(fast[k], full[k], rtol=1e-4, atol=1e-6), k
    assert fast_grads.keys() == full_grads.keys() and fast_grads
    for n in fast_grads:
        assert torch.allclose(fast_grads[n], full_grads[n], rtol=1e-3, atol=1e-6), n


def test_added_outputs_equal_running_the_changed_weights(lm):
    path = lm.arch.mlp_out_path(1)
    w = lm.module(path).weight
    delta = torch.randn_like(w) * 0.05
    ids, mask = lm.pad_right([lm.encode_prompt("The Eiffel Tower is located in")])
    with added_outputs(lm, {path: lambda x: x.float() @ delta.T}):
        hooked = lm.hidden_states(ids, mask)
    orig = w.detach().clone()
    with torch.no_grad():
        w.add_(delta)
    try:
        direct = lm.hidden_states(ids, mask)
    finally:
        with torch.no_grad():
            w.copy_(orig)
    assert torch.allclose(hooked, direct, atol=1e-5)


@pytest.mark.parametrize("block", ["paper", "residual"])
def test_untrained_mend_makes_a_plain_gradient_step(lm, block):
    """With the identity network and no statistics yet, MEND's delta is -alpha * grad W."""
    from editlab.methods.meta.mend import MENDNet

    hp = get_editor("mend").hparams(lm, **_hp("mend", block=block))
    net = MENDNet(lm, hp)
    for k, f in net.nets.items():  # the requested layout reaches every shared net (b: D-dim for paper)
        assert f.block == block and f.b[0].shape[0] == (f.d_in + f.d_out if block == "paper" else min(hp.rank, f.d_in + f.d_out))
    ex = examples_from_requests([FACT, FACT])[:1]
    facts, _, _ = net.factors(lm, ex, hp)
    deltas = net.deltas(lm, ex, facts, rows=list(range(len(ex))), training=False)
    for p in net.paths:
        left, right = deltas[p]
        grad = facts[p].delta.T @ facts[p].u
        assert torch.allclose(left @ right, -hp.edit_lr * grad, atol=1e-9)


def test_paper_block_is_the_papers_formula_and_trains_from_zero_u():
    """block="paper": z + clamp(s (U V z + b) + o, 0) per block, V ~ N(0, 1); at U = 0 the clamp still
    passes gradient to U (a relu would not: its gradient at 0 is 0)."""
    from editlab.methods.meta.nets import FactorNet

    torch.manual_seed(0)
    net = FactorNet(3, 2, rank=4, n_blocks=2, n_modes=2, block="paper")
    assert net.V[0].shape == (4, 5) and net.b[0].shape == (5,) and 0.5 < float(net.V[0].detach().std()) < 2
    u, d = torch.randn(6, 3), torch.randn(6, 2)
    gu, gd = net(u, d, mode=1)
    assert torch.equal(gu, u) and torch.equal(gd, d)  # identity at initialisation
    (gu.sum() + gd.sum()).backward()
    assert all(float(U.grad.abs().sum()) > 0 for U in net.U)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    z = torch.cat([u, d], -1)
    for j in range(2):
        pre = net.scale[j][1] * (z @ net.V[j].T @ net.U[j].T + net.b[j]) + net.shift[j][1]
        z = z + torch.where(pre > 0, pre, torch.zeros_like(pre))
    gu, gd = net(u, d, mode=1)
    assert torch.allclose(torch.cat([gu, gd], -1), z, atol=1e-5)


def test_block_field_keeps_earlier_checkpoints_and_run_ids(lm):
    """`block` came after MEND checkpoints and runs were stored; their keys have no `block` and stand for
    "residual" (ABSENT_MEANS). A residual editor is keyed as before (no `block` in its checkpoint key or
    run id), a key without `block` never serves block="paper", and a newer paper checkpoint never serves a
    residual edit."""
    from editlab.runner.runner import RunConfig, plan_run, run_id_for

    ed = get_editor("mend")
    res = ed.fit(lm, load_requests("builtin"), _hp("mend", block="residual"), progress=False)
    assert "block" not in json.loads((res.path / "checkpoint.json").read_text())["key"]["hparams"]
    with pytest.raises(CheckpointError, match="editlab train mend"):
        ed.apply(lm, FACT, **_hp("mend", block="paper"))
    paper = ed.fit(lm, load_requests("builtin"), _hp("mend", block="paper"), progress=False)
    assert json.loads((paper.path / "checkpoint.json").read_text())["key"]["hparams"]["block"] == "paper"
    for block, ck in (("residual", res), ("paper", paper)):
        edit = ed.apply(lm, FACT, **_hp("mend", block=block))
        assert edit.checkpoint_sha256 == ck.sha256
        edit.restore()
    assert ed.fit(lm, load_requests("builtin"), _hp("mend", block="residual"), progress=False).path == res.path
    with pytest.raises(HparamsError, match="block"):
        ed.hparams(lm, block="reference")
    cfg = RunConfig(method="mend", hparams=_hp("mend", block="residual"))
    stored = {k: v for k, v in ed.hparams(lm, **cfg.hparams).to_dict().items() if k != "block"}  # as hashed before
    assert plan_run(lm, cfg, [FACT]).run_id == run_id_for(lm, cfg, [FACT], stored)
    cfg_paper = RunConfig(method="mend", hparams=_hp("mend", block="paper"))
    assert plan_run(lm, cfg_paper, [FACT]).run_id != plan_run(lm, cfg, [FACT]).run_id


def test_running_norm_matches_batch_statistics():
    x = torch.randn(50, 7, dtype=torch.float64) * 3 + 1
    norm = RunningNorm(7)
    for chunk in x.split(13):
        norm.update(chunk)
    z = norm(x)
    assert torch.allclose(z.mean(0), torch.zeros(7, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(z.std(0), torch.ones(7, dtype=torch.float64), atol=1e-6)


def test_malmen_delta_is_the_ridge_regression_of_value_changes(lm):
    from editlab.methods.meta.malmen import MALMENNet
    from editlab.methods.meta.nets import safe_name

    hp = get_editor("malmen").hparams(lm, **_hp("malmen"))
    net = MALMENNet(lm, hp)
    reqs = load_requests("builtin", limit=3)
    ex = examples_from_requests(reqs)
    facts, _, _ = net.factors(lm, ex, hp)
    deltas = net.deltas(lm, ex, facts, rows=list(range(len(ex))), training=False)
    for i, p in enumerate(net.paths):
        f = facts[p]
        d_in = net.shapes[p][1]
        z = net.norms[safe_name(p)](torch.cat([f.u, f.delta], -1))
        u_t, d_t = net.nets[net.group[p]](z[:, :d_in], z[:, d_in:], net.mode[p])
        dv = (-net.alpha[i] * (f.u * u_t).sum(-1, keepdim=True) * d_t).double()
        U = f.u.double()
        lam = float(net.log_lambda[i].detach().exp())
        S = torch.linalg.solve(U.T @ U + lam * torch.eye(d_in, dtype=torch.float64), U.T @ dv)  # card's form
        left, right = deltas[p]
        assert torch.allclose((left @ right).double(), S.T, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ema", [0.0, 0.8])
def test_killed_training_resumes_to_the_same_editor(lm, monkeypatch, ema):
    from editlab.methods.meta.mend import MENDNet

    reqs = load_requests("builtin", limit=12)
    hp = _hp("mend", steps=6, val_every=2, val_records=3, patience=0, ema=ema)
    straight = get_editor("mend").fit(lm, reqs, hp, progress=False, force=True)
    ref = straight.tensors()
    shutil.rmtree(straight.path)  # so that the next runs train (and the last one resumes)

    calls = {"n": 0}
    real = MENDNet.losses

    def dying(self, *a, **kw):
        calls["n"] += bool(kw.get("training"))
        if calls["n"] == 4:  # in step 4 (one micro-batch per step): after the state saved at step 2
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(MENDNet, "losses", dying)
    with pytest.raises(KeyboardInterrupt):
        get_editor("mend").fit(lm, reqs, hp, progress=False, force=True)
    monkeypatch.setattr(MENDNet, "losses", real)
    resumed = get_editor("mend").fit(lm, reqs, hp, progress=False)
    assert resumed.meta["resumed"] and resumed.meta["steps"] == 6
    got = resumed.tensors()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_averaged_editor_is_the_moving_average_of_the_live_one(lm):
    """ema=0.8 over two steps: 0.64 * initial + 0.16 * after step 1 + 0.2 * after step 2, per parameter
    (the live trajectory is the same with or without averaging); buffers are the live ones."""
    from editlab.methods.meta.mend import MENDNet

    reqs = load_requests("builtin", limit=12)
    editor = get_editor("mend")
    base = _hp("mend", val_records=0, patience=0)
    live = {n: editor.fit(lm, reqs, {**base, "steps": n, "val_every": n}, progress=False, force=True).tensors()
            for n in (1, 2)}
    init = MENDNet(lm, editor.hparams(lm, **base)).state_dict()
    avg = editor.fit(lm, reqs, {**base, "steps": 2, "val_every": 2, "ema": 0.8}, progress=False, force=True).tensors()
    params = {n for n, _ in MENDNet(lm, editor.hparams(lm, **base)).named_parameters()}
    assert avg.keys() == live[2].keys() and params
    for k in avg:
        want = 0.64 * init[k] + 0.16 * live[1][k] + 0.2 * live[2][k] if k in params else live[2][k]
        assert torch.allclose(avg[k], want, atol=1e-6), k
    assert any(not torch.equal(avg[k], live[2][k]) for k in params)
    with pytest.raises(HparamsError, match="ema"):
        editor.hparams(lm, **{**base, "ema": 1.0})


def test_validation_scores_the_average_and_training_goes_on_from_the_live_editor(lm, tmp_path):
    """With ema, each validation scores the averaged editor and the editor kept as best is that average;
    the live editor is put back after validating, so its trajectory is the one of a run without ema."""
    from editlab.methods.meta.mend import MENDNet
    from editlab.train.meta import _load_state, evaluate, split_examples

    reqs = load_requests("builtin", limit=12)
    editor = get_editor("mend")
    base = _hp("mend", val_every=1, val_records=3, patience=0)
    live, hist, best = {}, {}, {}
    for ema in (0.0, 0.8):
        for steps in (1, 2):
            hp = editor.hparams(lm, **{**base, "steps": steps, "ema": ema})
            state, meta = editor.train(lm, reqs, hp, progress=False, workdir=tmp_path / f"{ema}-{steps}")
            live[ema, steps] = _load_state(tmp_path / f"{ema}-{steps}")["net"]
            hist[ema, steps], best[ema, steps] = meta["history"], state
    for steps in (1, 2):  # validating the average left the live editor as it was
        assert all(torch.equal(live[0.8, steps][k], live[0.0, steps][k]) for k in live[0.0, steps])
    assert [h["train_loss"] for h in hist[0.8, 2]] == [h["train_loss"] for h in hist[0.0, 2]]

    hp = editor.hparams(lm, **{**base, "steps": 2, "ema": 0.8})
    init = MENDNet(lm, hp).state_dict()
    params = {n for n, _ in MENDNet(lm, hp).named_parameters()}
    one, two = live[0.0, 1], live[0.0, 2]
    averages = {1: {k: 0.8 * init[k] + 0.2 * one[k] if k in params else one[k] for k in init},
                2: {k: 0.64 * init[k] + 0.16 * one[k] + 0.2 * two[k] if k in params else two[k] for k in init}}
    val = split_examples(examples_from_requests(reqs), 3)[1]
    for entry in hist[0.8, 2]:  # the validation loss written is the average's
        net = MENDNet(lm, hp)
        net.load_state_dict(averages[entry["step"]])
        assert evaluate(net.eval(), lm, val, hp)["loss"] == pytest.approx(entry["val_loss"], abs=2e-5)
    assert hist[0.8, 2][0]["val_loss"] != hist[0.0, 2][0]["val_loss"]
    kept = min(hist[0.8, 2], key=lambda h: h["val_loss"])["step"]
    assert all(torch.allclose(best[0.8, 2][k], averages[kept][k], atol=1e-6) for k in init)


def test_checkpoint_of_another_model_or_hparams_is_not_used(lm):
    ed = get_editor("mend")
    ed.fit(lm, load_requests("builtin"), _hp("mend"), progress=False)
    other = load_lm("tiny-llama")  # another base: its fingerprint finds nothing
    with pytest.raises(CheckpointError, match="editlab train mend --model tiny-llama"):
        ed.apply(other, FACT, **_hp("mend"))
    with pytest.raises(CheckpointError, match="--set rank=16"):  # another network: another key
        ed.apply(lm, FACT, **_hp("mend", rank=16))
    edit = ed.apply(lm, FACT, **_hp("mend", steps=7))  # a training-only field: the same editor serves
    edit.restore()


@pytest.mark.parametrize("mode", ["single", "sequential"])
def test_a_run_without_the_trained_editor_stops_before_any_work(lm, tmp_path, mode):
    """No MEND network for this model (the test's cache is empty): the run stops with the training command
    before the unedited pass, and writes nothing, instead of failing record after record."""
    from editlab.runner import RunConfig, Store, run

    store = Store(tmp_path / "r.db")
    fp = lm.fingerprint()
    cfg = RunConfig("mend", mode=mode, hparams=_hp("mend"), checkpoints=[1, 2] if mode == "sequential" else [])
    with pytest.raises(CheckpointError, match="editlab train mend --model tiny-trained-llama"):
        run(lm, load_requests("builtin", limit=2), cfg, store)
    assert store.runs() == [] and not store.load_pre_edit(lm.base_fingerprint)
    assert lm.fingerprint() == fp and not lm.active_edits
    assert not (Path(os.environ["EDITLAB_HOME"]) / "checkpoints").exists()  # looking for it created nothing


@pytest.mark.parametrize("mode", ["single", "sequential"])
def test_a_finished_run_resumes_without_its_editor_and_an_unfinished_one_does_not(lm, tmp_path, mode):
    """Resuming a run whose rows are all written only reports it done, even after its network was
    deleted from the cache; a run with rows left still stops with the training command."""
    from editlab.paths import cache_dir
    from editlab.runner import RunConfig, Store, run

    get_editor("mend").fit(lm, load_requests("builtin"), _hp("mend"), progress=False)
    store = Store(tmp_path / "r.db")
    cfg = RunConfig("mend", mode=mode, hparams=_hp("mend"), checkpoints=[1, 2] if mode == "sequential" else [])
    run_id = run(lm, load_requests("builtin", limit=2), cfg, store)
    rows = sorted((r.row_key, json.dumps(r.metrics)) for r in store.rows(run_id))
    shutil.rmtree(cache_dir("checkpoints", "mend"))
    assert run(lm, load_requests("builtin", limit=2), cfg, store) == run_id
    assert sorted((r.row_key, json.dumps(r.metrics)) for r in store.rows(run_id)) == rows
    last = max(key for key, _ in rows)  # "ckpt:2", or request 1's row: one row left to do
    store.db.execute("DELETE FROM rows WHERE run_id=? AND row_key=?", (run_id, last))
    with pytest.raises(CheckpointError, match="editlab train mend"):
        run(lm, load_requests("builtin", limit=2), cfg, store)
    assert sorted((r.row_key, json.dumps(r.metrics)) for r in store.rows(run_id)) == [x for x in rows if x[0] != last]
    if mode == "single":  # a shard whose rows are all written needs no network either
        assert run(lm, load_requests("builtin", limit=2), cfg, store, shard=[0]) == run_id


def test_a_suite_without_the_trained_editor_stops_before_any_unit(lm, tmp_path, data_root):
    from editlab.runner import Store
    from editlab.suites.runner import plan_suite, run_suite

    store = Store(tmp_path / "r.db")
    plan = plan_suite("counterfact", ["ft-m", "mend"], limit=1)
    with pytest.raises(CheckpointError, match="editlab train mend"):
        run_suite(lm, plan, store, hparams={"mend": _hp("mend")})
    assert store.runs() == []  # not even the unedited pass or the other method's first unit
    # with its network trained, the same suite runs
    get_editor("mend").fit(lm, load_requests("builtin"), _hp("mend"), progress=False)
    ids = run_suite(lm, plan, store, hparams={"mend": _hp("mend"), "ft-m": {"layer": 0, "steps": 5}})
    assert all(r.kind == "suite" for r in store.rows(ids["mend"])) and len(list(store.rows(ids["mend"]))) == len(plan.units)


def test_damaged_checkpoint_is_refused_and_changes_nothing(lm):
    ed = get_editor("mend")
    ck = ed.fit(lm, load_requests("builtin"), _hp("mend"), progress=False)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    (ck.path / "weights.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="checksum"):
        ed.apply(lm, FACT, **_hp("mend"))
    assert lm.active_edits == [] and all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())


def test_training_data_without_usable_records_is_refused(lm):
    lonely = EditRequest.create("The capital of France is", "France", "Rome")
    with pytest.raises(DataFormatError, match="no usable record"):
        examples_from_requests([lonely])
    with pytest.raises(DataFormatError):
        get_editor("mend").fit(lm, [lonely], _hp("mend"), progress=False)
    with pytest.raises(EditRequestError):
        get_editor("mend").fit(lm, [FACT, "Paris is in France"], _hp("mend"), progress=False)
    with pytest.raises(HparamsError):
        get_editor("mend").hparams(lm, matrices=["attn"])


def test_ke_lagrange_multiplier_rises_while_kl_exceeds_the_budget(lm):
    from editlab.methods.meta.ke import KENet

    hp = get_editor("ke").hparams(lm, **_hp("ke"))
    net = KENet(lm, hp)
    ex = examples_from_requests(load_requests("builtin", limit=4))[:2]
    out = net.losses(lm, ex, hp, training=True)
    assert float(net.kl_alpha) == pytest.approx(max(0.0, hp.lr_alpha * (float(out["loc_kl"]) - hp.margin_kl)))
    out["loss"].backward()  # the multiplier update must not break the graph
    net.after_validation({"edit_acc": 0.95})
    assert float(net.margin) == pytest.approx(hp.margin_kl * 0.8)


def test_cli_train_then_reuse_and_one_line_errors(tmp_path):
    runner = CliRunner()
    sets = [x for k, v in _hp("mend").items() for x in ("--set", f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}")]
    r = runner.invoke(app, ["eval", "--method", "mend", "--model", "tiny-trained-llama", "--db", str(tmp_path / "r.db"), *sets])
    assert r.exit_code == 2 and "editlab train mend" in r.output and "Traceback" not in r.output
    base = ["train", "mend", "--model", "tiny-trained-llama", "--data", "builtin", *sets, "--json"]
    r = runner.invoke(app, base)
    assert r.exit_code == 0, r.output
    first = json.loads(r.output.strip().splitlines()[-1])
    assert first["steps"] == _hp("mend")["steps"] and first["train_records"] == 62
    r = runner.invoke(app, base)  # cached: the same checkpoint, not trained again
    assert json.loads(r.output.strip().splitlines()[-1])["sha256"] == first["sha256"]
    r = runner.invoke(app, ["eval", "--method", "mend", "--model", "tiny-trained-llama", "--limit", "2",
                            "--db", str(tmp_path / "r.db"), *sets])
    assert r.exit_code == 0, r.output
    for bad in (["train", "rome"], ["train", "mend", "--data", str(tmp_path / "none.json")], ["train", "mend", "--steps", "0"]):
        r = runner.invoke(app, bad)
        assert r.exit_code == 2 and r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1, r.output


def test_train_summary_reports_the_kept_editors_validation_not_the_last():
    """The trainer keeps the state with the best validation loss; the summary's validation figures are that
    state's (a 3,200-step SmolLM2 run kept step 2,900 while its last validation scored higher edit accuracy)."""
    from editlab.cli.train import kept_validation

    history = [{"step": 100, "val_loss": 0.3, "val_edit_acc": 0.5}, {"step": 200, "val_loss": 0.1, "val_edit_acc": 0.8},
               {"step": 300, "val_loss": 0.2, "val_edit_acc": 0.9}]
    assert kept_validation({"best_val_loss": 0.1, "history": history}) == history[1]
    assert kept_validation({"best_val_loss": None, "history": history}) == history[2]  # no validation kept a state
    assert kept_validation({}) == {}


@pytest.mark.parametrize("method", ["mend", "ke"])
def test_batch_edit_is_the_sum_of_single_edits(lm, method):
    """MEND and KE make one independent delta per request; a batch sums them (KE conditions each alone)."""
    ed = get_editor(method)
    ed.fit(lm, load_requests("builtin"), _hp(method), progress=False)
    other = EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")

    def deltas(reqs):
        edit = ed.apply(lm, reqs, **_hp(method))
        out = {p.name: p.dense(lm.model.get_parameter(p.name)) for p in edit.patches}
        edit.restore()
        return out

    one, two, both = deltas(FACT), deltas(other), deltas([FACT, other])
    assert all(torch.allclose(both[k], one[k] + two[k], atol=1e-6) for k in both)


def test_training_leaves_the_lm_without_gradients(lm):
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    get_editor("mend").fit(lm, load_requests("builtin", limit=8), _hp("mend", steps=3), progress=False)
    assert all(p.grad is None for p in lm.model.parameters())
    assert {n: p.requires_grad for n, p in lm.model.named_parameters()} == flags


def test_an_edit_on_top_of_another_warns_that_the_editor_never_saw_an_edited_model(lm):
    from editlab.methods.meta.common import StaleEditorWarning

    ed = get_editor("mend")
    ed.fit(lm, load_requests("builtin", limit=8), _hp("mend", steps=3), progress=False)
    other = EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ed.apply(lm, FACT, **_hp("mend", steps=3))
        assert not [w for w in caught if issubclass(w.category, StaleEditorWarning)]
        second = ed.apply(lm, other, **_hp("mend", steps=3))
    stale = [w for w in caught if issubclass(w.category, StaleEditorWarning)]
    assert len(stale) == 1 and "already carries edits" in str(stale[0].message)
    assert lm.active_edits[-1] is second  # a warning, not a refusal: the stacked edit is made
    second.restore()
    first.restore()
