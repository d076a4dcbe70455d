"""EMMET and AlphaEdit: the closed-form solves checked against their defining equations on small
random cases, and the editors' behaviour (sequential key protection, saved state) on a tiny model."""

from __future__ import annotations

import pytest
import torch

from editlab.errors import HparamsError
from editlab.methods import Edit, SolverState, get_editor
from editlab.methods.locate.alphaedit import STATE, AlphaEditHparams, alphaedit_update, null_space_projector
from editlab.methods.locate.emmet import EMMETHparams, emmet_update
from editlab.methods.locate.memit import memit_update
from editlab.methods.locate.rome import rank_one_update
from editlab.models import load_lm
from editlab.stats import second_moments
from editlab.requests import EditRequest

torch.manual_seed(0)
REQ = EditRequest.create("The Eiffel Tower is located in", "Eiffel Tower", "Rome")
REQ2 = EditRequest.create("Marie Curie was born in", "Marie Curie", "Tokyo")


def spd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * d, d, generator=g, dtype=torch.float64)
    return x.T @ x / (4 * d)


def rand(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------ EMMET
def test_emmet_maps_every_edited_key_exactly_to_its_value():
    cov, k, r = spd(12), rand(3, 12), rand(3, 5, seed=2)
    upd, info = emmet_update(k, r, cov, mu=7.0, lam=0.0)
    assert torch.allclose(k @ upd.T, r, atol=1e-9)  # ΔW k_i = r_i: the equality constraints hold
    assert not info["pseudo_inverse"]


def test_emmet_is_the_least_preservation_change_among_exact_solutions():
    # any other ΔW' with ΔW' Kᵀ = Rᵀ changes the preserved keys more: tr(ΔW C ΔWᵀ) is minimal
    cov, k, r = spd(10), rand(2, 10), rand(2, 4, seed=3)
    upd, _ = emmet_update(k, r, cov, mu=1.0, lam=0.0)
    null = torch.linalg.svd(k).Vh[2:]  # directions orthogonal to both keys
    other = upd + rand(4, 8, seed=4) @ null
    assert torch.allclose(k @ other.T, r, atol=1e-9)
    cost = lambda d: float(torch.trace(d @ cov @ d.T))  # noqa: E731
    assert cost(upd) < cost(other)


def test_single_emmet_edit_is_rome_and_mu_cancels():
    cov, k, r = spd(9), rand(1, 9), rand(1, 6, seed=5)
    w = rand(6, 9, seed=6)
    rome = rank_one_update(w, k[0], r[0], cov)
    for mu in (1.0, 1e4):
        upd, info = emmet_update(k, r, cov, mu=mu, lam=0.1)  # λ_e is not used for one edit
        assert torch.allclose(upd, rome, atol=1e-9) and info["lambda"] == 0.0


def test_emmet_lambda_absolute_and_relative():
    cov, k, r = spd(8), rand(3, 8), rand(3, 2, seed=7)
    upd_abs, absolute = emmet_update(k, r, cov, mu=2.0, lam=0.5)
    upd_rel, relative = emmet_update(k, r, cov, mu=2.0, lam=0.5, lam_mode="relative")
    cinv = torch.linalg.inv(2.0 * cov)
    d = k @ cinv @ k.T
    lam_rel = 0.5 * float(d.diagonal().median())
    assert absolute["lambda"] == 0.5 and relative["lambda"] == pytest.approx(lam_rel)
    for upd, lam in ((upd_abs, 0.5), (upd_rel, lam_rel)):  # R (D + λI)⁻¹ K C⁻¹, computed independently
        want = r.T @ torch.linalg.inv(d + lam * torch.eye(3, dtype=torch.float64)) @ k @ cinv
        assert torch.allclose(upd, want, atol=1e-9)


def test_emmet_duplicate_keys_fall_back_to_pseudo_inverse():
    cov, k = spd(6), rand(1, 6)
    r = rand(2, 3, seed=8)
    single, _ = emmet_update(k, r[:1], cov, mu=1.0, lam=0.0)
    for other in (k, k + 1e-13 * rand(1, 6, seed=9)):  # exact and near duplicates
        upd, info = emmet_update(torch.cat([k, other]), torch.cat([r[:1], r[:1]]), cov, mu=1.0, lam=0.0)
        assert info["pseudo_inverse"] and torch.isfinite(upd).all()
        assert torch.allclose(upd, single, atol=1e-6)  # the same fact twice is that fact once


def test_emmet_one_layer_edit_fits_its_targets_exactly(corpus_file):
    lm = load_lm("tiny-llama")
    hp = EMMETHparams.for_model(lm, layers=[1], context_templates=[], v_steps=5, emmet_lambda=0.0,
                                clamp_norm_factor=4.0, corpus=str(corpus_file), mom2_n_tokens=300)
    with get_editor("emmet").apply(lm, [REQ, REQ2], hp) as edit:
        assert edit.info["target_error"] < 1e-3


def test_emmet_paper_presets_hold_reference_values():
    p = EMMETHparams.PRESETS
    assert p["gpt2-xl"]["layers"] == [17] and p["gpt2-xl"]["mom2_update_weight"] == 1000.0
    assert p["gpt-j-6b"]["layers"] == [5] and p["gpt-j-6b"]["v_steps"] == 25
    assert p["gpt-j-6b"]["mom2_update_weight"] == 10000.0  # the authors' corrected value (dabbb96)
    assert p["llama-2-7b"]["mom2_update_weight"] == 1.0 and p["llama-2-7b"]["v_weight_decay"] == 1e-3
    assert all(v.get("emmet_lambda") == 0.1 for v in p.values())
    assert all(p[m]["emmet_lambda_mode"] == "absolute" for m in ("gpt2-xl", "gpt-j-6b", "llama-2-7b"))
    lm = load_lm("tiny-llama")
    with pytest.raises(HparamsError, match="emmet_lambda_mode"):
        EMMETHparams.for_model(lm, emmet_lambda_mode="sometimes")


# ---------------------------------------------------------------------------------------- AlphaEdit
def test_projector_threshold_and_energy():
    cov = spd(16)
    vals = torch.linalg.eigvalsh(cov)
    tau = float(vals[5])
    p = null_space_projector(cov, "threshold", tau + 1e-12, 0.0)
    assert torch.allclose(p @ p, p, atol=1e-10) and torch.allclose(p, p.T)
    assert round(float(torch.trace(p))) == 6  # eigenvalues strictly below tau + ε: indices 0..5
    p = null_space_projector(cov, "energy", 0.0, 0.95)
    dim = round(float(torch.trace(p)))
    assert float(vals[:dim].sum()) <= 0.05 * float(vals.sum()) < float(vals[: dim + 1].sum())
    assert float(torch.trace(p @ cov)) <= 0.05 * float(torch.trace(cov)) + 1e-9  # the energy it leaves open


def test_alphaedit_update_never_moves_protected_keys():
    cov, k, r = spd(14), rand(2, 14), rand(2, 5, seed=9)
    p = null_space_projector(cov, "energy", 0.0, 0.8)
    upd, _ = alphaedit_update(k, r, p, None, alpha=1e-3)
    protected = (torch.eye(14, dtype=torch.float64) - p) @ rand(14, 7, seed=10)  # P k0 = 0
    assert float((upd @ protected).abs().max()) < 1e-9 * float(upd.abs().max())


def test_alphaedit_without_projection_is_ridge_least_squares():
    k, r = rand(3, 10), rand(3, 4, seed=11)
    eye = torch.eye(10, dtype=torch.float64)
    upd, a = alphaedit_update(k, r, eye, None, alpha=1e-8)
    assert torch.allclose(k @ upd.T, r, atol=1e-6) and a == 1e-8
    _, rel = alphaedit_update(k, r, eye, None, alpha=0.5, alpha_mode="relative")
    assert rel == pytest.approx(0.5 * float((k * k).sum()) / 3)


def test_alphaedit_keeps_earlier_edits_keys_still():
    cov, k, r = spd(12), rand(2, 12), rand(2, 4, seed=12)
    eye = torch.eye(12, dtype=torch.float64)
    earlier = rand(3, 12, seed=13)
    free, _ = alphaedit_update(k, r, eye, None, alpha=1e-2)
    kept, _ = alphaedit_update(k, r, eye, 100 * earlier.T @ earlier, alpha=1e-2)
    assert (kept @ earlier.T).norm() < 0.1 * (free @ earlier.T).norm()


def test_alphaedit_update_lies_in_the_null_space_of_generic_keys(corpus_file):
    """The issue's property ‖ΔW k‖ ≈ 0 for generic-text keys, in expectation over keys distributed as
    the statistics: E‖ΔW k‖² = tr(ΔW C ΔWᵀ) ≤ λ_max(null space)·‖ΔW‖², far below a direction-blind update's
    ‖ΔW‖²·tr(C)/d. (On SmolLM2 with WikiText keys: test_real_model.py.)"""
    lm = load_lm("tiny-trained-llama")
    hp = {"layers": [1], "context_templates": [[4, 2]], "v_steps": 25, "v_lr": 0.5, "clamp_norm_factor": 10.0,
          "null_space": "energy", "null_space_energy": 0.999, "l2": 0.1, "l2_mode": "relative",
          "corpus": str(corpus_file), "mom2_n_tokens": 300}
    name = lm.param_name(lm.arch.mlp_out_path(1))
    cov = second_moments(lm, [1], str(corpus_file), 300)[1].double()
    with get_editor("alphaedit").apply(lm, [REQ], **hp) as edit:
        patch = next(p for p in edit.patches if getattr(p, "name", None) == name)
        d = lm.arch.as_matrix(patch.dense(lm.model.get_parameter(name))).double()
    assert d.norm() > 0
    p = null_space_projector(cov, "energy", 0.0, 0.999)
    bound = float(torch.linalg.eigvalsh(p @ cov @ p)[-1])
    moved = float(torch.trace(d @ cov @ d.T) / d.norm() ** 2)
    assert moved <= bound * (1 + 1e-4) + 1e-12
    assert moved < 0.01 * float(torch.trace(cov)) / cov.shape[0]


def _delta(lm, edit, layer):
    name = lm.param_name(lm.arch.mlp_out_path(layer))
    patch = next(p for p in edit.patches if getattr(p, "name", None) == name and not isinstance(p, SolverState))
    return lm.arch.as_matrix(patch.dense(lm.model.get_parameter(name))).double()


def test_sequential_alphaedit_carries_earlier_keys_and_saves_them(corpus_file, tmp_path):
    lm = load_lm("tiny-trained-llama")
    hp = {"layers": [1, 2], "context_templates": [[4, 2]], "v_steps": 10, "null_space": "energy",
          "null_space_energy": 0.9, "l2": 0.1, "l2_mode": "relative", "corpus": str(corpus_file), "mom2_n_tokens": 300}
    editor = get_editor("alphaedit")
    pablo = EditRequest.create("Pablo Picasso was born in", "Pablo Picasso", "Oslo")
    first = editor.apply(lm, REQ, **hp)
    state = [p for p in first.patches if isinstance(p, SolverState)]
    assert len(state) == 1 and state[0].name == STATE and set(state[0].tensors) == {"layer.1", "layer.2"}
    k1 = state[0].tensors["layer.1"].double()
    assert k1.shape == (1, lm.arch.as_matrix(lm.model.get_parameter(lm.param_name(lm.arch.mlp_out_path(1)))).shape[1])
    alone = editor.apply(lm, REQ2, **hp)  # stacked without on=: a new chain, REQ's keys not protected
    free = float((_delta(lm, alone, 1) @ k1.T).norm())
    assert alone.info["earlier_edits_protected"] == 0 and alone.info["extends"] is None
    alone.restore()
    second = editor.apply(lm, REQ2, on=first, **hp)
    kept = float((_delta(lm, second, 1) @ k1.T).norm())
    assert second.info["earlier_edits_protected"] == 1 and second.info["extends"] == first.id
    assert kept < 0.5 * free, (kept, free)  # the earlier edit's key moves much less with on=
    third = editor.apply(lm, pablo, on=second, **hp)
    assert third.info["earlier_edits_protected"] == 2
    third.restore()
    second.save(tmp_path / "e2")
    second.restore()
    loaded = Edit.load(tmp_path / "e2", lm)
    got = next(p for p in loaded.patches if isinstance(p, SolverState))
    want = next(p for p in second.patches if isinstance(p, SolverState))
    assert all(torch.equal(got.tensors[k], want.tensors[k]) for k in want.tensors)
    again = editor.apply(lm, pablo, on=loaded, **hp)
    assert again.info["earlier_edits_protected"] == 2  # the loaded edit still extends `first`
    again.restore()
    loaded.restore()
    first.restore()


def test_alphaedit_refuses_settings_that_cannot_edit(corpus_file):
    lm = load_lm("tiny-trained-llama")
    base = {"layers": [1], "context_templates": [], "v_steps": 2, "corpus": str(corpus_file), "mom2_n_tokens": 300}
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with pytest.raises(HparamsError, match="l2"):
        get_editor("alphaedit").apply(lm, REQ, **base, l2=0.0)  # α = 0: a rank-deficient solve
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items()) and not lm.active_edits
    # a full-rank second moment whose eigenvalues all exceed the threshold: no null space to write into
    from editlab.methods.locate.alphaedit import projector

    hp = AlphaEditHparams.for_model(lm, null_space="threshold", nullspace_threshold=1e-6, **base)
    cov = spd(lm.arch.as_matrix(lm.model.get_parameter(lm.param_name(lm.arch.mlp_out_path(1)))).shape[1])
    with pytest.raises(HparamsError, match="no null space"):
        projector(lm, 1, cov, hp)


def test_alphaedit_paper_presets_and_bad_modes():
    p = AlphaEditHparams.PRESETS
    assert p["llama-3-8b"]["v_lr"] == 0.1 and p["gpt-j-6b"]["layers"] == [3, 4, 5, 6, 7, 8]
    assert all(p[m]["nullspace_threshold"] == 2e-2 and p[m]["l2"] == 10.0 for m in ("gpt2-xl", "gpt-j-6b", "llama-3-8b"))
    lm = load_lm("tiny-llama")
    for bad in ({"null_space": "spectral"}, {"l2_mode": "scaled"}, {"null_space_energy": 1.0}, {"l2": -1}):
        with pytest.raises(HparamsError):
            AlphaEditHparams.for_model(lm, **bad)


def test_memit_update_unchanged_by_the_refactor():
    # MEMIT's solve is the regularised least squares it always was
    cov, k, r = spd(8), rand(2, 8), rand(2, 3, seed=14)
    upd = memit_update(k, r, cov, 5.0)
    assert torch.allclose(upd, r.T @ k @ torch.linalg.inv(5.0 * cov + k.T @ k), atol=1e-10)



# --------------------------------------------------------------------------------------------- PMET
def test_joint_value_optimisation_over_two_paths(corpus_file):
    from editlab.methods.locate.pmet import mlp_module_path
    from editlab.methods.locate.shared import ValueOptConfig, optimize_values

    lm = load_lm("tiny-llama")
    cfg = ValueOptConfig(steps=4, lr=0.5, kl_factor=0.0625, weight_decay=0.5, clamp_norm_factor=0.5, stop_loss=0.0)
    attn, mlp = f"{lm.arch.block_path(1)}.{lm.arch.attn_out}", mlp_module_path(lm, 1)
    one, init_one, _ = optimize_values(lm, [REQ, REQ2], ["{}"], mlp, cfg)
    listed, init_listed, _ = optimize_values(lm, [REQ, REQ2], ["{}"], [mlp], cfg)
    assert torch.equal(one, listed[:, 0]) and torch.equal(init_one, init_listed[:, 0])
    both, init, info = optimize_values(lm, [REQ, REQ2], ["{}"], [attn, mlp], cfg)
    assert both.shape == (2, 2, one.shape[-1]) and init.shape == both.shape
    assert (both.norm(dim=-1) > 0).all()
    # each path's δ is clamped against its own unedited output
    assert (both.norm(dim=-1) <= 0.5 * init.norm(dim=-1) * (1 + 1e-5)).all()


def test_pmet_nll_drop_stops_once_target_is_argmax_and_kl_small():
    from editlab.methods.locate.shared import ValueOptConfig, optimize_values

    lm = load_lm("tiny-llama")
    # a target the model already predicts: the all-argmax condition holds from the first step
    greedy = lm.generate([REQ.prompt], 1)[0]
    req = EditRequest.create(REQ.prompt, REQ.subject, greedy.strip() if greedy.startswith(" ") else greedy)
    if lm.encode_pair(req.prompt, req.target_new)[1] != lm.tokenizer(greedy, add_special_tokens=False)["input_ids"]:
        pytest.skip("the greedy token does not round-trip as a target on this tokenizer")
    base = dict(steps=10, lr=0.5, kl_factor=0.0, weight_decay=0.0, clamp_norm_factor=100.0, stop_loss=0.0)
    path = lm.arch.block_path(2)
    _, _, plain = optimize_values(lm, [req], ["{}"], path, ValueOptConfig(**base))
    _, _, drop = optimize_values(lm, [req], ["{}"], path, ValueOptConfig(**base, nll_drop=True))
    assert plain["steps"][0] == 10  # stop_loss 0 never triggers
    assert drop["steps"][0] == 1  # all-argmax and (KL weight 0) KL ≤ 0.01 at the first step


def test_pmet_one_layer_moves_mlp_output_onto_its_target(corpus_file):
    from editlab.methods.locate.pmet import PMETHparams, mlp_module_path
    from editlab.methods.locate.shared import capture_at_subject, optimize_values

    lm = load_lm("tiny-llama")
    hp = PMETHparams.for_model(lm, layers=[1], context_templates=[], v_steps=5, mom2_update_weight=1e-6,
                               clamp_norm_factor=4.0, corpus=str(corpus_file), mom2_n_tokens=300)
    attn, mlp = f"{lm.arch.block_path(1)}.{lm.arch.attn_out}", mlp_module_path(lm, 1)
    delta, init, _ = optimize_values(lm, [REQ, REQ2], ["{}"], [attn, mlp], hp.value_config())
    with get_editor("pmet").apply(lm, [REQ, REQ2], hp) as edit:
        out = capture_at_subject(lm, [REQ, REQ2], ["{}"], {mlp: "out"})[mlp][:, 0]
        assert edit.info["target_error"] < 1e-3
    assert torch.allclose(out, init[:, 1] + delta[:, 1], atol=1e-3)
    assert set(p.name for p in edit.patches) == {lm.param_name(lm.arch.mlp_out_path(1))}  # MLP weights only


def test_sqrt_spreading_divides_by_root_of_layers_left(corpus_file, monkeypatch):
    import editlab.methods.locate.pmet as pmet

    lm = load_lm("tiny-llama")
    seen: list[torch.Tensor] = []
    real = pmet.memit_update

    def spy(keys, resid, cov, weight):
        seen.append(resid.clone())
        return real(keys, resid, cov, weight) * 0  # write nothing, so both layers see the same residual
    monkeypatch.setattr(pmet, "memit_update", spy)
    get_editor("pmet").apply(lm, REQ, layers=[1, 2], context_templates=[], v_steps=3, corpus=str(corpus_file),
                             mom2_n_tokens=300).restore()
    assert torch.allclose(seen[0] * 2 ** 0.5, seen[1], atol=1e-9)
