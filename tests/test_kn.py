"""KN (knowledge neurons): integrated gradients against a hand-written Riemann sum, the threshold and
sharing filter on constructed attributions, an edit that changes only the selected columns by the
paper's formula, hyper-parameter errors, and one edit of the real SmolLM2."""

from __future__ import annotations

import pytest
import torch

from editlab.errors import EditlabError, HparamsError
from editlab.methods import get_editor
from editlab.methods.locate import kn
from editlab.methods.locate.kn import KNHparams, coarse_sets, integrated_gradients, neuron_deltas, select_neurons
from editlab.models import load_lm
from editlab.requests import EditRequest

EIFFEL = EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris",
                            paraphrases=[("Where is the Eiffel Tower? It is in the city of", "Rome")])
JORDAN = EditRequest.create("Michael Jordan plays", "Michael Jordan", "football", "basketball")


def _snapshot(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _reference_ig(lm, ids: list[int], target: int, layer: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attr by the definition, one full forward pass per step, no batching or caching: the last
    position's MLP intermediate activation a is replaced by (k/M)·a, k = 1..M."""
    path = lm.arch.mlp_out_path(layer)
    module = lm.model.get_submodule(path)
    x = torch.tensor([ids])
    seen: dict[str, torch.Tensor] = {}

    def grab(_m, args):
        seen["a"] = args[0][0, -1].detach().clone()

    h = module.register_forward_pre_hook(grab)
    with torch.no_grad():
        lm.model(input_ids=x)
    h.remove()
    a = seen["a"]
    total = torch.zeros_like(a)
    for k in range(1, steps + 1):
        leaf = (a * k / steps).requires_grad_(True)

        def put(_m, args, leaf=leaf):
            new = args[0].clone()
            new[0, -1] = leaf
            return (new, *args[1:])

        h = module.register_forward_pre_hook(put)
        try:
            with torch.enable_grad():
                p = torch.softmax(lm.model(input_ids=x).logits[0, -1].float(), -1)[target]
                (g,) = torch.autograd.grad(p, [leaf])
        finally:
            h.remove()
        total += g
    return a * total / steps, a


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_integrated_gradients_match_the_riemann_sum_by_definition(arch):
    lm = load_lm(f"tiny-{arch}")
    prompts = [EIFFEL.prompt, "Michael Jordan plays", "Toyota was founded in"]  # three lengths: padded cache
    ids = [lm.encode_prompt(p) for p in prompts]
    targets = [lm.encode_pair(p, t)[1][0] for p, t in zip(prompts, ["Paris", "basketball", "Japan"])]
    layers = [1, 3]
    # 7 rows per batch: chunks cut across layers and prompts
    got = integrated_gradients(lm, ids, targets, layers, steps=20, batch_size=7)
    width = lm.arch.as_matrix(lm.model.get_submodule(lm.arch.mlp_out_path(1)).weight).shape[1]
    assert got.attr.shape == (3, 2, width)
    for j in range(3):
        for li, layer in enumerate(layers):
            want, a = _reference_ig(lm, ids[j], targets[j], layer, 20)
            assert torch.allclose(got.act[j, li], a, atol=1e-6)
            assert torch.allclose(got.attr[j, li], want, rtol=1e-4, atol=1e-9 + 1e-4 * float(want.abs().max()))
    want_p = lm.next_token_logprobs(prompts).exp()
    assert torch.allclose(got.prob, want_p[torch.arange(3), torch.tensor(targets)], atol=1e-6)


def test_attributions_of_a_layer_add_up_to_the_probability_change():
    """Completeness: Σ_i Attr_i ≈ P(a) − P(a = 0) for the layer scaled, up to the Riemann error."""
    lm = load_lm("tiny-trained-llama")
    ids = lm.encode_prompt(EIFFEL.prompt)
    target = lm.encode_pair(EIFFEL.prompt, "Paris")[1][0]
    layer = 0  # where zeroing the unit vector moves P the most (0.99 -> 0.13) on this model
    got = integrated_gradients(lm, [ids], [target], [layer], steps=200, batch_size=100)
    module = lm.model.get_submodule(lm.arch.mlp_out_path(layer))

    def zero_last(_m, args):
        new = args[0].clone()
        new[:, -1] = 0
        return (new, *args[1:])

    h = module.register_forward_pre_hook(zero_last)
    with torch.no_grad():
        p0 = float(torch.softmax(lm.model(input_ids=torch.tensor([ids])).logits[0, -1], -1)[target])
    h.remove()
    change = float(got.prob[0]) - p0
    assert abs(change) > 0.5  # the layer matters, so the check is not vacuous
    assert float(got.attr[0, 0].sum()) == pytest.approx(change, rel=0.01)


def _constructed_attr() -> torch.Tensor:
    """3 prompts x 2 layers x 6 units. Per prompt max 1.0, t = 0.2: unit (0,1) is above the threshold in
    all prompts, (1,2) in prompts 0 and 1, (0,4) in prompt 2 only, (1,5) nowhere (0.15 everywhere)."""
    a = torch.full((3, 2, 6), 0.01)
    a[:, 0, 1] = torch.tensor([1.0, 0.9, 0.5])
    a[0, 1, 2], a[1, 1, 2], a[2, 1, 2] = 0.8, 1.0, 0.1
    a[0, 0, 4], a[1, 0, 4], a[2, 0, 4] = 0.05, 0.1, 1.0
    a[:, 1, 5] = 0.15
    a[0, 0, 0] = -2.0  # negative attributions never count, whatever their size
    return a


def test_coarse_sets_use_the_per_prompt_adaptive_threshold():
    sets = coarse_sets(_constructed_attr(), 0.2)
    assert sets == [{(0, 1), (1, 2)}, {(0, 1), (1, 2)}, {(0, 1), (0, 4)}]
    negative = -torch.rand(1, 2, 6) - 0.1
    assert coarse_sets(negative, 0.2) == [set()]


def test_sharing_filter_keeps_units_shared_by_enough_prompts():
    a = _constructed_attr()
    layers = [5, 9]
    fixed = select_neurons(a, layers, 0.2, 0.7, share_step=0.0, min_neurons=2, max_neurons=5)
    assert fixed.neurons == [(5, 1)] and fixed.share_ratio == 0.7  # p fixed: only the unit in 3 of 3
    two = select_neurons(a, layers, 0.2, 0.6, share_step=0.0, min_neurons=1, max_neurons=5)
    assert two.neurons == [(5, 1), (9, 2)]  # most attributed first
    # the paper's adjustment: p goes down by 0.05 until two units pass (2 of 3 prompts needs p <= 2/3)
    adjusted = select_neurons(a, layers, 0.2, 0.7, share_step=0.05, min_neurons=2, max_neurons=5)
    assert adjusted.neurons == [(5, 1), (9, 2)] and adjusted.share_ratio == pytest.approx(0.65)
    # ... and up while too many pass; where the next step leaves too few, the best ones are kept
    capped = select_neurons(a, layers, 0.2, 0.0, share_step=0.05, min_neurons=1, max_neurons=1)
    assert capped.neurons == [(5, 1)]
    trunc = select_neurons(a, layers, 0.2, 0.0, share_step=0.05, min_neurons=2, max_neurons=2)
    assert trunc.neurons == [(5, 1), (9, 2)] and trunc.share_ratio == pytest.approx(0.35)
    assert trunc.scores == pytest.approx([float(a[:, 0, 1].mean()), float(a[:, 1, 2].mean())])
    assert trunc.coarse_sizes == [2, 2, 2]
    # "more than p": at p = 2/3 exactly, a unit in 2 of 3 prompts is not shared by more than 2/3
    assert kn._shared([{(5, 1), (9, 2)}, {(5, 1), (9, 2)}, {(5, 1)}], 2 / 3) == {(5, 1)}
    assert kn._shared([{(5, 1)}, {(9, 2)}], 0.5) == set()  # 1 of 2 is not more than half


def test_neuron_deltas_follow_the_formula_in_each_layout():
    for arch in ("llama", "gpt2"):  # gpt2's Conv1D stores (in, out): the unit is a row there
        lm = load_lm(f"tiny-{arch}")
        e_old, e_new = torch.randn(64), torch.randn(64)
        deltas = neuron_deltas(lm, [(1, 3), (1, 7), (2, 0)], [1.0, -1.0, 1.0], e_old, e_new, 1.0, 8.0)
        assert set(deltas) == {lm.param_name(lm.arch.mlp_out_path(l)) for l in (1, 2)}
        name = lm.param_name(lm.arch.mlp_out_path(1))
        d = lm.arch.as_matrix(deltas[name])
        w = lm.arch.as_matrix(lm.model.get_parameter(name).detach())
        for idx, s in ((3, 1.0), (7, -1.0)):
            norm = w[:, idx].norm()
            want = s * (-norm / e_old.norm() * e_old + 8.0 * norm / e_new.norm() * e_new)
            assert torch.allclose(d[:, idx], want, atol=1e-6)
        others = [i for i in range(d.shape[1]) if i not in (3, 7)]
        assert torch.count_nonzero(d[:, others]) == 0


def test_edit_changes_only_the_selected_columns_and_raises_the_new_target():
    lm = load_lm("tiny-trained-llama")
    before = _snapshot(lm)
    lp0 = float(lm.score([EIFFEL.prompt], [EIFFEL.target_new])[0].logprobs.sum())
    edit = get_editor("kn").apply(lm, EIFFEL, layers=[0, 1, 2, 3])
    info = edit.info
    assert info["prompts"] == 2 and 1 <= len(info["neurons"]) <= 5
    chosen: dict[int, set[int]] = {}
    for layer, idx in info["neurons"]:
        chosen.setdefault(layer, set()).add(idx)
    after = _snapshot(lm)
    for name, t in before.items():
        layer = next((l for l in chosen if name == lm.param_name(lm.arch.mlp_out_path(l))), None)
        if layer is None:
            assert torch.equal(after[name], t), name
            continue
        changed = {i for i in range(t.shape[1]) if not torch.equal(after[name][:, i], t[:, i])}
        assert changed == chosen[layer]
    # the new answer's embedding direction was added where the unit fires: its probability rises
    lp1 = float(lm.score([EIFFEL.prompt], [EIFFEL.target_new])[0].logprobs.sum())
    assert lp1 > lp0 + 0.5, (lp0, lp1)
    assert info["signs"] == [-1.0 if a < 0 else 1.0 for a in info["activation"]]
    edit.restore()
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(lm).items())


def test_sign_aware_update_moves_every_units_output_toward_the_new_answer():
    """A unit adds a_i·w_i to the residual. Sign-aware, every kept unit's change a_i·Δw_i points along
    λ2 u_new − λ1 u_old; unsigned (the paper's update), the negative units' changes point against it.
    On the toy model the sign-aware edit raises p(new) more than the unsigned one."""
    lm = load_lm("tiny-trained-llama")
    ed = get_editor("kn")
    hp = dict(layers=[0, 1, 2, 3], min_neurons=1, max_neurons=5)
    emb = lm.model.get_submodule(lm.arch.lm_head).weight.detach()
    lp0 = float(lm.score([JORDAN.prompt], [JORDAN.target_new])[0].logprobs[0])
    result = {}
    for signed in (True, False):
        with ed.apply(lm, JORDAN, **hp, sign_aware=signed) as e:
            result[signed] = float(lm.score([JORDAN.prompt], [JORDAN.target_new])[0].logprobs[0])
            u_old = emb[e.info["old_token"]] / emb[e.info["old_token"]].norm()
            u_new = emb[e.info["new_token"]] / emb[e.info["new_token"]].norm()
            direction = 8.0 * u_new - 1.0 * u_old
            for (layer, idx), a in zip(e.info["neurons"], e.info["activation"]):
                d = lm.arch.as_matrix(e.delta[lm.param_name(lm.arch.mlp_out_path(layer))].float())[:, idx]
                dot = float((a * d) @ direction)
                assert dot > 0 if (signed or a > 0) else dot < 0, (signed, layer, idx, a, dot)
            assert any(a < 0 for a in e.info["activation"])  # the case the option exists for
    assert result[True] > lp0 + 0.5 and result[True] > result[False] + 0.5, (lp0, result)


def test_prompts_and_old_answer_follow_the_request():
    lm = load_lm("tiny-trained-llama")
    ed = get_editor("kn")
    with ed.apply(lm, EIFFEL, use_paraphrases=False) as e:
        assert e.info["prompts"] == 1
    assert e.info["old_token"] == lm.encode_pair(EIFFEL.prompt, "Paris")[1][0]
    no_true = EditRequest.create(EIFFEL.prompt, EIFFEL.subject, "Rome")
    greedy = int(lm.next_token_logprobs([EIFFEL.prompt])[0].argmax())
    with ed.apply(lm, no_true) as e:
        assert e.info["old_token"] == greedy  # the model's own answer stands in for target_true


def test_presets():
    lm = load_lm("tiny-llama")
    paper = KNHparams.for_model(lm, preset="paper")
    assert (paper.ig_steps, paper.adaptive_threshold, paper.share_ratio, paper.lambda_erase,
            paper.lambda_enhance, paper.sign_aware) == (20, 0.2, 0.7, 1.0, 8.0, False)
    assert paper.layers == [0, 1, 2, 3]  # every layer, as the paper
    assert KNHparams.preset_name(lm) is None
    with pytest.raises(HparamsError, match="preset"):
        KNHparams.for_model(lm, preset="bert-base")


@pytest.mark.parametrize("bad, match", [
    ({"ig_steps": 5}, "ig_steps"),
    ({"ig_steps": 1}, "ig_steps"),
    ({"layers": [0, 9]}, "layers"),
    ({"layers": [2, 1]}, "increasing"),
    ({"layers": []}, "layers"),
    ({"adaptive_threshold": 1.0}, "adaptive_threshold"),
    ({"share_ratio": 1.5}, "share_ratio"),
    ({"min_neurons": 4, "max_neurons": 2}, "min_neurons"),
    ({"lambda_erase": 0.0, "lambda_enhance": 0.0}, "change nothing"),
    ({"lambda_enhance": -1.0}, "lambda_enhance"),
    ({"batch_size": 0}, "batch_size"),
    ({"sign_aware": "maybe"}, "sign_aware"),
])
def test_bad_hparams_raise_and_change_nothing(bad, match):
    lm = load_lm("tiny-llama")
    before = _snapshot(lm)
    with pytest.raises(HparamsError, match=match):
        get_editor("kn").apply(lm, EIFFEL, **bad)
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(lm).items()) and lm.active_edits == []


def test_no_positive_attribution_is_a_clear_error(monkeypatch):
    lm = load_lm("tiny-llama")
    before = _snapshot(lm)
    real = kn.integrated_gradients

    def negated(*args, **kw):
        got = real(*args, **kw)
        got.attr = -got.attr.abs() - 1e-3
        return got

    monkeypatch.setattr(kn, "integrated_gradients", negated)
    with pytest.raises(EditlabError, match="no knowledge neuron"):
        get_editor("kn").apply(lm, EIFFEL)
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(lm).items()) and lm.active_edits == []


@pytest.mark.slow
def test_smollm2_edit_raises_the_new_target(smollm2):
    lm = smollm2
    req = EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris",
                             paraphrases=[("The Eiffel Tower can be found in the city of", "Rome")])
    lp0 = float(lm.score([req.prompt], [req.target_new])[0].logprobs.sum())
    with get_editor("kn").apply(lm, req) as edit:
        lp1 = float(lm.score([req.prompt], [req.target_new])[0].logprobs.sum())
        neurons = edit.info["neurons"]
    assert 1 <= len(neurons) <= edit.hparams["max_neurons"]
    assert lp1 > lp0 + 1.0, (lp0, lp1)


def test_answers_sharing_their_first_tokens_are_edited_where_they_differ():
    """"New York" -> "New Delhi": the erase and enhance terms of the first token would cancel, so KN works
    at the first answer position where the answers differ: the prompt followed by " New", y* = " York"."""
    lm = load_lm("tiny-trained-llama")
    req = EditRequest.create("The Statue of Liberty is in", "Statue of Liberty", "New Delhi", "New York")
    _, new_ids = lm.encode_pair(req.prompt, req.target_new)
    _, old_ids = lm.encode_pair(req.prompt, req.target_true)
    k = next(j for j, (a, b) in enumerate(zip(old_ids, new_ids)) if a != b)
    assert k >= 1  # the case under test: the answers share their first token(s)
    old_score = lm.score([req.prompt], [req.target_true])[0]
    lp0 = float(lm.score([req.prompt], [req.target_new])[0].logprobs[k])
    before = _snapshot(lm)
    with get_editor("kn").apply(lm, req, layers=[0, 1, 2, 3]) as e:
        assert e.info["shared_answer_tokens"] == k
        assert (e.info["old_token"], e.info["new_token"]) == (old_ids[k], new_ids[k])
        # y* is the old answer's token after the shared ones: its unedited probability is the score's
        assert e.info["p_old"][0] == pytest.approx(float(old_score.logprobs[k].exp()), rel=1e-3)
        lp1 = float(lm.score([req.prompt], [req.target_new])[0].logprobs[k])
    assert lp1 > lp0 + 0.5, (lp0, lp1)
    assert all(torch.equal(v, before[k2]) for k2, v in _snapshot(lm).items())


def test_each_prompt_is_attributed_where_its_own_answers_part():
    """The answers' tokens can part at different positions after different prompts (a trailing space
    moves the boundary): every prompt is followed by exactly the tokens its old and new answers share,
    and y* is the old answer's token where they part. Without target_true the old answer is the model's
    greedy one along the new answer."""
    lm = load_lm("tiny-trained-llama")
    req = EditRequest.create("The Statue of Liberty is in", "Statue of Liberty", "New Delhi", "New York",
                             paraphrases=[("The Statue of Liberty stands in ", "New Delhi"),
                                          ("Where is the Statue of Liberty? In", "New Delhi")])
    prompts = [req.prompt] + [p for p, _ in req.paraphrases]
    seqs, ys, at = kn.attribution_inputs(lm, prompts, req)
    assert at is not None and len(seqs) == len(ys) == 3
    for n, (p, seq, y) in enumerate(zip(prompts, seqs, ys)):
        p_ids, new_ids = lm.encode_pair(p, req.target_new)
        old_ids = lm.encode_pair(p, req.target_true)[1]
        k = len(seq) - len(p_ids)
        assert seq[: len(p_ids)] == p_ids and seq[len(p_ids):] == new_ids[:k] == old_ids[:k]
        assert y == old_ids[k] != new_ids[k]
        if n == 0:
            assert (at.shared, at.old, at.new) == (k, old_ids[k], new_ids[k])
    no_true = EditRequest.create(req.prompt, req.subject, "New Delhi")
    seqs, ys, at = kn.attribution_inputs(lm, [req.prompt], no_true)
    greedy = lm.score([req.prompt], ["New Delhi"])[0].argmax_ids
    p_ids, new_ids = lm.encode_pair(req.prompt, "New Delhi")
    assert at is not None and seqs == [list(p_ids) + list(new_ids[: at.shared])]
    assert list(greedy[: at.shared]) == list(new_ids[: at.shared]) and ys == [greedy[at.shared]] != [new_ids[at.shared]]


@pytest.mark.parametrize("new", ["New", "New York City"])
def test_answers_where_one_begins_the_other_are_refused(new):
    """No answer position has a token of both answers that differ: "New" ends inside "New York", and
    "New York City" goes on where "New York" has ended."""
    from editlab.errors import EditRequestError

    lm = load_lm("tiny-llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    req = EditRequest.create("The Statue of Liberty is in", "Statue of Liberty", new, "New York")
    with pytest.raises(EditRequestError, match="differ"):
        get_editor("kn").apply(lm, req, layers=[0, 1], ig_steps=20)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items()) and not lm.active_edits
