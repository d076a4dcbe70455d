import pytest
import torch
import torch.nn.functional as F

from editlab.errors import HparamsError
from editlab.methods import get_editor
from editlab.methods.ft import OBJECTIVES, FTHparams, FTMHparams, objective_loss
from editlab.models import load_lm
from editlab.requests import EditRequest

PARIS = EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")
JORDAN = EditRequest.create("Michael Jordan plays", "Michael Jordan", "football", "basketball")


@pytest.fixture(scope="module")
def tiny():
    return load_lm("tiny-llama")


def _weight(lm, layer=1):
    return lm.model.get_parameter(f"{lm.arch.mlp_out_path(layer)}.weight")


def _grad(loss_fn, param):
    param.requires_grad_(True)
    try:
        return torch.autograd.grad(loss_fn(), param)[0]
    finally:
        param.requires_grad_(False)


def test_prompt_last_scores_every_target_token_at_the_last_prompt_position(tiny):
    # FT-L as in ROME/EasyEdit: all target tokens against the one distribution after the prompt
    t_ids = tiny.encode_pair(JORDAN.prompt, JORDAN.target_new)[1]
    assert len(t_ids) > 1
    row = tiny.next_token_logprobs([JORDAN.prompt])[0]
    with torch.no_grad():
        loss = objective_loss(tiny, [JORDAN], "prompt_last")
    assert float(loss) == pytest.approx(float(-row[t_ids].mean()), rel=1e-5)
    # ... which is not the teacher-forced loss of FT-M
    with torch.no_grad():
        assert float(objective_loss(tiny, [JORDAN], "target_new")) != pytest.approx(float(loss), rel=1e-3)


def test_ft_m_loss_ignores_the_prompt_tokens(tiny):
    p_ids, t_ids = tiny.encode_pair(JORDAN.prompt, JORDAN.target_new)
    ids = torch.tensor([p_ids + t_ids])
    labels = ids.clone()
    labels[0, : len(p_ids)] = -100  # prompt positions are no targets

    def masked_lm_loss(lab):
        logits = tiny.model(input_ids=ids).logits.float()
        return F.cross_entropy(logits[0, :-1], lab[0, 1:], ignore_index=-100)

    w = _weight(tiny)
    ours = _grad(lambda: objective_loss(tiny, [JORDAN], "target_new"), w)
    assert torch.allclose(ours, _grad(lambda: masked_lm_loss(labels), w), atol=1e-6, rtol=1e-4)
    # scoring the prompt's own tokens too would change the gradient
    assert not torch.allclose(ours, _grad(lambda: masked_lm_loss(ids), w), atol=1e-6, rtol=1e-4)
    # and the value is the mean target-token NLL the metrics see
    with torch.no_grad():
        value = float(objective_loss(tiny, [JORDAN], "target_new"))
    assert value == pytest.approx(float(-tiny.logprobs([JORDAN.prompt], [JORDAN.target_new])[0].mean()), rel=1e-5)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_batch_loss_is_the_mean_of_the_requests_losses(tiny, objective):
    # different prompt and target lengths: right padding must not leak into either request
    with torch.no_grad():
        both = float(objective_loss(tiny, [PARIS, JORDAN], objective))
        each = [float(objective_loss(tiny, [r], objective)) for r in (PARIS, JORDAN)]
    assert both == pytest.approx(sum(each) / 2, rel=1e-5)


def test_objective_is_a_validated_hyperparameter(tiny):
    hp = FTHparams.for_model(tiny)
    assert (hp.objective, hp.steps) == ("prompt_last", 25) and hp.norm_constraint > 0
    hp = FTMHparams.for_model(tiny)
    assert (hp.objective, hp.norm_constraint, hp.steps) == ("target_new", 0.0, 25)
    with pytest.raises(HparamsError, match="objective"):
        FTHparams.for_model(tiny, objective="all_tokens")


def test_ft_with_target_new_objective_is_ft_m(tiny):
    kw = dict(layer=1, steps=3, lr=1e-2, norm_constraint=0.0)
    a = get_editor("ft").apply(tiny, [PARIS, JORDAN], objective="target_new", **kw)
    da = a.delta
    a.restore()
    b = get_editor("ft-m").apply(tiny, [PARIS, JORDAN], **kw)
    db = b.delta
    b.restore()
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
    c = get_editor("ft").apply(tiny, [PARIS, JORDAN], **kw)  # prompt_last
    dc = c.delta
    c.restore()
    assert not all(torch.equal(da[k], dc[k]) for k in da)


def test_ft_l_edits_a_known_fact_within_the_linf_ball():
    lm = load_lm("tiny-trained-llama")
    assert lm.generate([PARIS.prompt], 3)[0].startswith(" Paris")
    radius = 5e-3
    edit = get_editor("ft").apply(lm, PARIS, layer=0, lr=radius, norm_constraint=radius)
    try:
        assert edit.hparams["objective"] == "prompt_last"
        assert lm.generate([PARIS.prompt], 3)[0].startswith(" Rome")
        (delta,) = edit.delta.values()
        assert float(delta.abs().max()) <= radius * (1 + 1e-5)
        assert float(delta.abs().max()) >= radius * 0.99  # the constraint is active, not vacuous
    finally:
        edit.restore()
    assert lm.generate([PARIS.prompt], 3)[0].startswith(" Paris")


def test_update_bias_trains_the_projection_bias_inside_the_ball():
    lm = load_lm("tiny-gpt2")  # GPT-2's c_proj has a bias, as in the ROME/EasyEdit FT presets
    path = lm.arch.mlp_out_path(1)
    edit = get_editor("ft").apply(lm, PARIS, layer=1, steps=5, lr=1e-2, norm_constraint=1e-3, update_bias=True)
    try:
        assert sorted(edit.delta) == [f"{path}.bias", f"{path}.weight"]
        for d in edit.delta.values():
            assert 0 < float(d.abs().max()) <= 1e-3 + 1e-7
    finally:
        edit.restore()
