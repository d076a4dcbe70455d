import pytest
import torch

from editlab.errors import EditMismatchError, EditRequestError, HparamsError, UnknownMethodError
from editlab.methods import Edit, get_editor
from editlab.models import load_lm
from editlab.methods.locate.memit import memit_update
from editlab.methods.locate.rome import rank_one_update
from editlab.requests import EditRequest

REQ = EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")
REQS = [
    REQ,
    EditRequest.create("Michael Jordan plays", "Michael Jordan", "football"),
    EditRequest.create("Toyota was founded in", "Toyota", "Germany"),
]


def fast(method, corpus_file, **kw):
    base = {"corpus": str(corpus_file), "mom2_n_tokens": 300}
    if method == "rome":
        base.update(layer=1, context_templates=[[4, 2]], v_steps=25, stop_loss=0.05)
    elif method == "memit":
        base.update(layers=[1, 2], context_templates=[[4, 2]], v_steps=25, stop_loss=0.05, mom2_update_weight=10.0, clamp_norm_factor=10.0)
    else:
        base = {"layer": 1, "steps": 40, "lr": 1e-2}
    base.update(kw)
    return base


def state(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def target_prob(lm, req):
    return float(lm.score([req.prompt], [req.target_new])[0].logprobs.sum().exp())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2 stores weights transposed (Conv1D)
@pytest.mark.parametrize("method", ["rome", "memit", "ft", "ft-m"])
def test_edit_touches_only_its_layers_and_restores_bit_exact(arch, method, corpus_file):
    lm = load_lm(f"tiny-{arch}")
    before = state(lm)
    kw = fast(method, corpus_file)
    edit = get_editor(method).apply(lm, REQS if method != "rome" else REQ, **kw)
    changed = sorted(k for k in before if not torch.equal(before[k], lm.model.state_dict()[k]))
    layers = kw.get("layers", [kw.get("layer")])
    assert changed == sorted(f"{lm.arch.mlp_out_path(l)}.weight" for l in layers)
    assert sorted(edit.delta) == changed
    if method == "rome":
        (delta,) = edit.delta.values()
        assert torch.linalg.matrix_rank(delta.double(), rtol=1e-6) == 1
    edit.restore()
    assert_same(before, state(lm))
    edit.restore()  # idempotent
    assert_same(before, state(lm))


def test_rank_one_update_inserts_key_value_and_spares_orthogonal_keys():
    torch.manual_seed(0)
    w = torch.randn(4, 6, dtype=torch.float64)
    a = torch.randn(50, 6, dtype=torch.float64)
    cov = a.T @ a / 50
    k = torch.randn(6, dtype=torch.float64)
    delta = torch.randn(4, dtype=torch.float64)
    upd = rank_one_update(w, k, delta, cov)
    assert torch.allclose((w + upd) @ k, w @ k + delta)
    # a key with (C^-1 k*)·k2 = 0 is untouched
    u = torch.linalg.solve(cov, k)
    k2 = torch.randn(6, dtype=torch.float64)
    k2 = k2 - (u @ k2) / (u @ u) * u
    assert torch.allclose((w + upd) @ k2, w @ k2)


def test_memit_update_fits_keys_exactly_without_regularization():
    torch.manual_seed(0)
    keys = torch.randn(3, 8, dtype=torch.float64)
    resid = torch.randn(3, 5, dtype=torch.float64)
    cov = torch.eye(8, dtype=torch.float64)
    upd = memit_update(keys, resid, cov, 1e-9)
    assert torch.allclose(upd @ keys.T, resid.T, atol=1e-5)
    # regularization shrinks the update
    assert memit_update(keys, resid, cov, 10.0).norm() < upd.norm()


def test_ft_m_changes_a_known_fact():
    lm = load_lm("tiny-trained-llama")
    req = EditRequest.create("Michael Jordan plays", "Michael Jordan", "football", "basketball")
    assert lm.generate([req.prompt], 2)[0].startswith(" bas")
    before = state(lm)
    edit = get_editor("ft-m").apply(lm, req, layer=0, steps=40, lr=1e-2)
    assert lm.generate([req.prompt], 2)[0].startswith(" fo")
    assert target_prob(lm, req) > 0.5
    edit.restore()
    assert_same(before, state(lm))


def test_ft_l_respects_norm_constraint(corpus_file):
    lm = load_lm("tiny-llama")
    edit = get_editor("ft").apply(lm, REQ, layer=1, steps=5, lr=1e-2, norm_constraint=1e-3)
    (name, delta), = edit.delta.items()
    assert 0 < float(delta.abs().max()) <= 1e-3 + 1e-7
    edit.restore()


def test_context_manager_restores(corpus_file):
    lm = load_lm("tiny-llama")
    before = state(lm)
    with get_editor("rome").apply(lm, REQ, **fast("rome", corpus_file)) as edit:
        assert edit.lm is lm and lm.active_edits == [edit]
        assert any(not torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert_same(before, state(lm))
    assert lm.active_edits == []


def test_restore_then_reapply_puts_the_newest_edit_back_bit_exact(corpus_file):
    from editlab.errors import EditStackError

    lm = load_lm("tiny-llama")
    original = state(lm)
    first = get_editor("rome").apply(lm, REQ, **fast("rome", corpus_file))
    second = get_editor("ft-m").apply(lm, REQS[1], **fast("ft-m", corpus_file))
    both = state(lm)
    second.restore()
    below = state(lm)
    assert second.reapply() is second and lm.active_edits == [first, second]
    assert_same(both, state(lm))
    with pytest.raises(EditStackError, match="already applied"):
        second.reapply()
    second.restore()
    assert_same(below, state(lm))
    first.restore()
    with pytest.raises(EditStackError, match="edits below it changed"):
        second.reapply()  # it sat on `first`, which is gone
    assert_same(original, state(lm))
    assert lm.active_edits == []


def test_save_and_load_roundtrip(tmp_path, corpus_file):
    lm = load_lm("tiny-llama")
    edit = get_editor("rome").apply(lm, REQ, **fast("rome", corpus_file))
    edited = state(lm)
    edit.save(tmp_path / "e")
    # loading onto an already-edited model is refused
    with pytest.raises(EditMismatchError, match="carries"):
        Edit.load(tmp_path / "e", lm)
    edit.restore()
    loaded = Edit.load(tmp_path / "e", lm)
    assert loaded.method == "rome" and loaded.requests == [REQ]
    after = state(lm)
    for k in edited:
        assert torch.allclose(edited[k], after[k], atol=1e-6)
    loaded.restore()
    other = load_lm("tiny-llama", seed=1)
    with pytest.raises(EditMismatchError, match="fingerprint"):
        Edit.load(tmp_path / "e", other)


def test_failure_mid_apply_leaves_model_unchanged(monkeypatch, corpus_file):
    lm = load_lm("tiny-llama")
    before = state(lm)
    import editlab.methods.locate.spread as memit  # the layer-spreading loop MEMIT runs

    calls = {"n": 0}
    real = memit.capture_at_subject

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # after the first layer's update was written into the model
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(memit, "capture_at_subject", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        get_editor("memit").apply(lm, REQS, **fast("memit", corpus_file))
    assert calls["n"] == 2
    assert_same(before, state(lm))


def test_bad_hparams_and_methods_are_rejected(corpus_file):
    lm = load_lm("tiny-llama")
    before = state(lm)
    with pytest.raises(HparamsError, match="unknown hyper-parameter.*bogus"):
        get_editor("rome").apply(lm, REQ, bogus=1)
    with pytest.raises(HparamsError, match="layer=99 is out of range"):
        get_editor("rome").apply(lm, REQ, layer=99)
    with pytest.raises(HparamsError, match="layers"):
        get_editor("memit").apply(lm, REQ, layers=[2, 1])
    with pytest.raises(HparamsError, match="v_lr"):
        get_editor("rome").apply(lm, REQ, v_lr=-1)
    with pytest.raises(HparamsError, match="cannot use 'abc'"):
        get_editor("rome").apply(lm, REQ, layer="abc")
    with pytest.raises(UnknownMethodError, match="available: .*rome"):
        get_editor("nope")
    with pytest.raises(EditRequestError, match="one request at a time"):
        get_editor("rome").apply(lm, REQS)
    with pytest.raises(EditRequestError, match="no edit requests"):
        get_editor("memit").apply(lm, [])
    assert_same(before, state(lm))


def test_string_overrides_are_coerced():
    lm = load_lm("tiny-llama")
    hp = get_editor("memit").hparams(lm, layers="1,2", v_lr="0.1")
    assert hp.layers == [1, 2] and hp.v_lr == 0.1
    hp = get_editor("rome").hparams(lm, layer="2", mom2_adjustment="false")
    assert hp.layer == 2 and hp.mom2_adjustment is False


def test_named_presets_can_be_chosen_explicitly():
    lm = load_lm("tiny-llama")
    hp = get_editor("rome").hparams_cls.for_model(lm, preset="gpt2-xl", layer=2)
    assert hp.context_templates == [[5, 10], [10, 10]] and hp.layer == 2 and hp.v_steps == 20
    with pytest.raises(HparamsError, match="unknown preset"):
        get_editor("rome").hparams_cls.for_model(lm, preset="nope")
