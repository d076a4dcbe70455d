"""ROME / MEMIT as their papers and reference code define them (issue 8, section 1): value-optimisation
loss terms, bare-prompt v_init, KL position and direction, total-loss early stop, key modes and their
exactness, template groups and key weighting, presets, and architectures the algebra does not fit."""

import math

import pytest
import torch

from editlab.errors import HparamsError, UnsupportedArchitectureError
from editlab.hooks import hooks, output_tensor, replace_output
from editlab.methods import get_editor
from editlab.methods.locate.memit import MEMITHparams
from editlab.methods.locate.rome import ROMEHparams, rome_solve
from editlab.methods.locate.shared import (
    ValueOptConfig,
    capture_at_subject,
    context_templates,
    group_mean,
    kl_rows,
    kl_term,
    optimize_values,
    parse_template_groups,
    weight_decay_term,
)
from editlab.models import load_lm
from editlab.requests import EditRequest

REQ = EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")
REQ2 = EditRequest.create("Toyota was founded in", "Toyota", "Germany")


def stats_kw(corpus_file):
    return {"corpus": str(corpus_file), "mom2_n_tokens": 300}


def cfg(**kw):
    base = dict(steps=6, lr=0.5, kl_factor=0.5, weight_decay=0.5, clamp_norm_factor=4.0, stop_loss=0.0)
    base.update(kw)
    return ValueOptConfig(**base)


def test_weight_decay_is_norm_over_squared_init_norm():
    delta = torch.tensor([[3.0, 4.0]])
    v_init = torch.tensor([[0.0, 2.0]])
    # 0.5 · 5 / 2² (the old (‖δ‖/‖v‖)² form gave 0.5 · 6.25)
    assert weight_decay_term(delta, v_init, 0.5).item() == pytest.approx(0.625)


def test_kl_is_current_distribution_first():
    cur = torch.log(torch.tensor([[0.5, 0.5]]))
    init = torch.log(torch.tensor([[0.9, 0.1]]))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(P_δ ‖ P_0) = 0.511; reverse is 0.368
    assert kl_term(cur, init).item() == pytest.approx(expected, abs=1e-6)


def test_reported_loss_uses_reference_weight_decay():
    lm = load_lm("tiny-llama")
    path = lm.arch.mlp_out_path(1)
    delta, v_init, info = optimize_values(lm, [REQ, REQ2], ["{}", "A b c. {}"], path, cfg(steps=4))
    for r in range(2):
        wd = 0.5 * delta[r].norm() / v_init[r].norm() ** 2
        parts = info["final_nll"][r] + 0.5 * info["final_kl"][r] + float(wd)
        assert info["final_loss"][r] == pytest.approx(parts, rel=1e-4)
        assert float(wd) > 0


def test_kl_is_taken_at_subject_last_token_of_kl_prompt():
    lm = load_lm("tiny-llama")
    path = lm.arch.mlp_out_path(1)
    (ids, pos), = kl_rows(lm, [REQ], "{} is a")
    assert pos == lm.subject_last_index("Eiffel Tower is a", "Eiffel Tower") and pos < len(ids) - 1
    delta, _, info = optimize_values(lm, [REQ], ["{}"], path, cfg(steps=3, kl_factor=1.0))

    def logp_at_subject(d):
        def add(_m, _i, out):
            h = output_tensor(out).clone()
            h[0, pos] += d.to(h.dtype)
            return replace_output(out, h)

        x = torch.tensor([ids])
        with torch.no_grad(), hooks(lm.model, forward={path: add}):
            hid = lm.hidden_states(x, torch.ones_like(x))
        return torch.log_softmax(lm.head(hid[0, pos]).float(), -1)

    with torch.no_grad():
        expected = kl_term(logp_at_subject(delta[0]), logp_at_subject(torch.zeros_like(delta[0])))
    assert info["final_kl"][0] == pytest.approx(float(expected), rel=1e-3, abs=1e-6)
    assert info["final_kl"][0] > 0


def test_early_stop_on_total_loss():
    lm = load_lm("tiny-llama")
    path = lm.arch.mlp_out_path(1)
    _, _, free = optimize_values(lm, [REQ], ["{}"], path, cfg(steps=8, kl_factor=2.0, weight_decay=5.0))
    totals = [h[0] for h in free["loss_history"]]
    assert len(totals) == 8
    stop = sorted(totals)[3]  # some step's total is below it, not the first
    _, _, info = optimize_values(lm, [REQ], ["{}"], path, cfg(steps=8, kl_factor=2.0, weight_decay=5.0, stop_loss=stop))
    first = next(i for i, t in enumerate(totals) if t < stop)
    assert info["steps"] == [first + 1]
    assert info["final_loss"][0] < stop


def test_v_init_is_bare_prompt_value_and_clamp_uses_it():
    lm = load_lm("tiny-llama")
    path = lm.arch.mlp_out_path(1)
    templates = ["{}", "One two three. {}", "Four five. {}"]
    bare = capture_at_subject(lm, [REQ, REQ2], ["{}"], {path: "out"})[path][:, 0]
    delta, v_init, _ = optimize_values(lm, [REQ, REQ2], templates, path, cfg(steps=5, lr=2.0, clamp_norm_factor=0.05))
    # neither the prefixed templates nor the KL prompts enter v_init
    assert torch.allclose(v_init, bare, atol=1e-5)
    norms = delta.norm(dim=-1)
    assert torch.all(norms <= 0.05 * bare.norm(dim=-1) * (1 + 1e-5))
    assert torch.all(norms > 0.04 * bare.norm(dim=-1))  # lr 2: the clamp is what binds


@pytest.mark.parametrize("mode", ["r-rome", "original", "consistent"])
def test_rome_key_mode_exactness(mode):
    lm = load_lm("tiny-llama")
    # statistics from 2,000 Wikipedia tokens: the test corpus repeats four sentences, about 60 distinct
    # contexts for 128 MLP keys, so its C is singular and C⁻¹k (the "original" mode) is not defined
    hp = ROMEHparams.for_model(lm, layer=1, key_mode=mode, context_templates=[[4, 3]], v_steps=5, corpus="wikipedia",
                               mom2_n_tokens=2000)
    solve = rome_solve(lm, REQ, hp)
    path = lm.arch.mlp_out_path(1)
    templates = [t for g in context_templates(lm, [(4, 3)], 0) for t in g]
    before = capture_at_subject(lm, [REQ], templates, {path: "out"})[path][0]
    with get_editor("rome").apply(lm, REQ, hp):
        after = capture_at_subject(lm, [REQ], templates, {path: "out"})[path][0]
    w = lm.arch.as_matrix(lm.module(path).weight.detach()).double()
    k, k_star, d, upd = solve.key_bare.double(), solve.key_star.double(), solve.delta.double(), solve.update
    v_star = solve.v_init + solve.delta
    with get_editor("rome").apply(lm, REQ, hp):
        after = capture_at_subject(lm, [REQ], templates, {path: "out"})[path][0]
    tol = 0.05 * float(solve.delta.norm())  # float32 weights: ΔW is applied in the model's dtype
    if mode == "original":  # Ŵk = v*
        assert torch.allclose((w + upd) @ k, w @ k + d, rtol=1e-6, atol=1e-8)
        assert (after[0] - v_star).norm() < tol
        assert (after.mean(0) - v_star).norm() > 2 * tol
    elif mode == "r-rome":  # Ŵk* = v* = W k + δ
        assert torch.allclose((w + upd) @ k_star, w @ k + d, rtol=1e-6, atol=1e-8)
        assert (after.mean(0) - v_star).norm() < tol
        assert (after[0] - v_star).norm() > 2 * tol
    else:  # Ŵk* = W k* + δ
        assert torch.allclose((w + upd) @ k_star, w @ k_star + d, rtol=1e-6, atol=1e-8)
        assert (after.mean(0) - (before.mean(0) + solve.delta)).norm() < tol


def test_rome_default_and_alias_are_r_rome():
    lm = load_lm("tiny-llama")
    assert get_editor("rome").hparams(lm).key_mode == "r-rome"
    assert get_editor("r-rome").hparams(lm).key_mode == "r-rome"
    with pytest.raises(HparamsError, match="key_mode"):
        get_editor("rome").hparams(lm, key_mode="nope")


def test_template_groups_as_the_papers():
    lm = load_lm("tiny-llama")
    rome = ROMEHparams.for_model(lm)
    memit = MEMITHparams.for_model(lm)
    assert [len(g) for g in context_templates(lm, parse_template_groups(rome.context_templates))] == [1, 10, 10]
    assert [len(g) for g in context_templates(lm, parse_template_groups(memit.context_templates))] == [1, 5]
    # CLI strings "length:count"
    assert get_editor("rome").hparams(lm, context_templates="5:10,10:10").context_templates == ["5:10", "10:10"]
    assert parse_template_groups(["5:10", "10:10"]) == [(5, 10), (10, 10)]
    with pytest.raises(HparamsError):
        get_editor("rome").hparams(lm, context_templates="5-10")


def test_memit_key_weights_bare_prompt_as_its_own_group():
    x = torch.zeros(1, 6, 2)
    x[0, 1:] = 1.0  # bare prompt 0, five prefixed keys 1
    assert torch.allclose(group_mean(x, [1, 5]), torch.full((1, 2), 0.5))  # flat mean would be 5/6


def test_memit_one_layer_solve_moves_bare_hidden_state_onto_z(corpus_file):
    lm = load_lm("tiny-llama")
    hp = MEMITHparams.for_model(lm, layers=[1], context_templates=[], v_steps=5, mom2_update_weight=1e-6,
                                clamp_norm_factor=4.0, **stats_kw(corpus_file))
    last = lm.arch.block_path(1)
    cfgv = ValueOptConfig(hp.v_steps, hp.v_lr, hp.kl_factor, hp.v_weight_decay, hp.clamp_norm_factor, hp.stop_loss)
    delta, h_init, _ = optimize_values(lm, [REQ, REQ2], ["{}"], last, cfgv)
    with get_editor("memit").apply(lm, [REQ, REQ2], hp):
        h = capture_at_subject(lm, [REQ, REQ2], ["{}"], {last: "out"})[last][:, 0]
    assert torch.allclose(h, h_init + delta, atol=1e-3)
    assert delta.norm() > 0


def test_paper_presets_hold_reference_values():
    r, m = ROMEHparams.PRESETS, MEMITHparams.PRESETS
    assert {"gpt2-xl", "gpt-j-6b", "llama-3-8b", "smollm2-135m"} <= set(r) & set(m)
    for name in ("gpt2-xl", "gpt-j-6b"):  # kmeng01/rome hparams/ROME/*.json
        assert {k: r[name][k] for k in ("v_steps", "v_lr", "v_weight_decay", "kl_factor", "clamp_norm_factor")} == \
            {"v_steps": 20, "v_lr": 0.5, "v_weight_decay": 0.5, "kl_factor": 0.0625, "clamp_norm_factor": 4.0}
    assert r["gpt2-xl"]["layer"] == 17 and r["gpt-j-6b"]["layer"] == 5
    # kmeng01/memit hparams/MEMIT/*.json
    assert m["gpt-j-6b"]["v_steps"] == 25 and m["gpt-j-6b"]["layers"] == [3, 4, 5, 6, 7, 8]
    assert m["gpt-j-6b"]["mom2_update_weight"] == 15000 and m["gpt2-xl"]["mom2_update_weight"] == 20000
    assert m["gpt2-xl"]["v_steps"] == 20 and m["gpt2-xl"]["layers"] == [13, 14, 15, 16, 17]
    assert all(m[n]["clamp_norm_factor"] == 0.75 for n in ("gpt2-xl", "gpt-j-6b", "llama-3-8b"))


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_post_mlp_norm_architecture_is_refused(method, corpus_file):
    lm = load_lm("tiny-gemma3")
    assert lm.arch.mlp_post_norm
    lm.module(f"{lm.arch.block_path(0)}.{lm.arch.mlp_post_norm}")  # the spec names a real module
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    kw = {"layer": 1} if method == "rome" else {"layers": [1]}
    with pytest.raises(UnsupportedArchitectureError, match="post_feedforward_layernorm"):
        get_editor(method).apply(lm, REQ if method == "rome" else [REQ], **kw, **stats_kw(corpus_file))
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def _four_requests(lm):
    """Three counterfactual requests and one whose target is the model's argmax at the bare prompt."""
    prompt = "Danielle Darrieux speaks"
    greedy = lm.tokenizer.decode([int(lm.next_token_logprobs([prompt])[0].argmax())])
    known = EditRequest.create(prompt, "Danielle Darrieux", greedy.strip() or "x")
    return [REQ, REQ2, EditRequest.create("Toyota is a", "Toyota", "bakery"), known]


@pytest.mark.parametrize("extra", [{}, {"nll_drop": True}, {"prefix_cache": False}, {"paths": 2}])
def test_value_optimisation_does_not_depend_on_chunking_or_cache_budget(extra):
    """Gradients are accumulated over chunks of requests: one request per chunk, two per chunk, a chunk
    smaller than one request's rows, and prefix caches rebuilt at every step (no cache budget) all give
    the deltas, losses and step counts of the whole batch at once, with requests stopping early."""
    lm = load_lm("tiny-llama")
    extra = dict(extra)
    paths = lm.arch.mlp_out_path(1)
    if extra.pop("paths", 1) == 2:  # PMET: attention and MLP outputs optimised jointly
        from editlab.methods.locate.pmet import mlp_module_path

        paths = [f"{lm.arch.block_path(1)}.{lm.arch.attn_out}", mlp_module_path(lm, 1)]
    reqs = _four_requests(lm)
    templates = ["{}", "One two three. {}", "Four five. {}"]
    kw = dict(steps=8, lr=0.5, kl_factor=0.0625, weight_decay=0.0, clamp_norm_factor=10.0, **extra)
    _, _, info0 = optimize_values(lm, reqs, templates, paths, cfg(**kw))
    hist = info0["loss_history"]

    def steps_for(t):  # steps each request would run with stop_loss t (losses are independent per request)
        return [next((s + 1 for s, h in enumerate(hist) if h[r] < t), len(hist)) for r in range(len(reqs))]

    # a threshold at which one request stops part-way, another runs all 8 steps
    kw["stop_loss"] = next(v + 1e-6 for h in hist[1:] for v in sorted(h)
                           if any(1 < n < 8 for n in steps_for(v + 1e-6)) and 8 in steps_for(v + 1e-6))
    whole, init_w, info_w = optimize_values(lm, reqs, templates, paths, cfg(**kw))
    assert info_w["chunks"] == 1
    assert any(1 < n < 8 for n in info_w["steps"]) and 8 in info_w["steps"]  # the cases this test is about
    for rows, budget in ((4, 1024), (8, 1024), (1, 1024), (8, 0)):
        part, init_p, info_p = optimize_values(lm, reqs, templates, paths, cfg(chunk_rows=rows, cache_mb=budget, **kw))
        assert info_p["chunks"] == (2 if rows == 8 else 4)
        assert info_p["steps"] == info_w["steps"]
        assert torch.allclose(init_p, init_w, atol=1e-6)
        assert torch.allclose(part, whole, atol=1e-4, rtol=1e-4)
        assert info_p["final_loss"] == pytest.approx(info_w["final_loss"], rel=1e-4, abs=1e-6)
    assert whole.norm() > 0


def test_chunk_rows_must_be_positive():
    with pytest.raises(HparamsError):
        optimize_values(load_lm("tiny-llama"), [REQ], ["{}"], "model.layers.1.mlp.down_proj", cfg(chunk_rows=0))
    with pytest.raises(HparamsError):
        get_editor("rome").hparams(load_lm("tiny-llama"), v_chunk_rows=0)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_replaying_blocks_below_the_edit_layer_changes_no_delta(model):
    """Blocks below the edited layer see the same inputs at every step, so after the first step they are
    replayed rather than recomputed: the deltas, initial values and losses equal those of full passes,
    and block 0 runs once per request chunk instead of once per step."""
    lm = load_lm(model)
    reqs = _four_requests(lm)
    templates = ["{}", "One two three. {}"]
    kw = dict(steps=6, lr=0.5, kl_factor=0.0625, weight_decay=0.5, clamp_norm_factor=4.0)
    calls = []
    with hooks(lm.model, forward={lm.arch.block_path(0): lambda *_: calls.append(1)}):
        full, init_f, info_f = optimize_values(lm, reqs, templates, lm.arch.mlp_out_path(2), cfg(layer_replay=False, **kw))
        n_full = len(calls)
        calls.clear()
        fast, init_r, info_r = optimize_values(lm, reqs, templates, lm.arch.mlp_out_path(2), cfg(**kw))
    assert info_r["steps"] == info_f["steps"] == [6] * 4
    # one prefix pass, then every step runs block 0 (full) or only step 0 does (replayed; the once-per-LM
    # check replays too)
    assert n_full == 1 + 6 and len(calls) == 1 + 1
    assert torch.allclose(init_r, init_f, atol=1e-6)
    assert torch.allclose(fast, full, atol=1e-5, rtol=1e-5) and full.norm() > 0
    assert info_r["final_loss"] == pytest.approx(info_f["final_loss"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("case", ["pmet-paths", "block-path-chunks", "no-cache-budget"])
def test_replay_equals_full_passes_with_early_stops_chunks_and_paths(case):
    """Requests stopping part-way (replayed rows are a subset of the recorded ones), several chunks,
    PMET's two paths, MEMIT's whole-block path and runners rebuilt at every step (no replay there)."""
    lm = load_lm("tiny-llama")
    reqs = _four_requests(lm)
    templates = ["{}", "One two three. {}"]
    if case == "pmet-paths":
        from editlab.methods.locate.pmet import mlp_module_path

        paths = [f"{lm.arch.block_path(2)}.{lm.arch.attn_out}", mlp_module_path(lm, 2)]
    else:
        paths = lm.arch.block_path(2)
    kw = dict(steps=8, lr=0.5, kl_factor=0.0625, weight_decay=0.0, clamp_norm_factor=10.0,
              chunk_rows={"pmet-paths": 64, "block-path-chunks": 3, "no-cache-budget": 64}[case],
              cache_mb=0 if case == "no-cache-budget" else 256)
    hist = optimize_values(lm, reqs, templates, paths, cfg(**kw))[2]["loss_history"]
    # a threshold at which some request stops part-way and another runs every step
    kw["stop_loss"] = next(v + 1e-6 for h in hist[1:] for v in sorted(h) if v > 0
                           and any(h2[r] < v + 1e-6 for h2 in hist[1:-1] for r in range(4))
                           and any(all(h2[r] >= v + 1e-6 for h2 in hist) for r in range(4)))
    full, init_f, info_f = optimize_values(lm, reqs, templates, paths, cfg(layer_replay=False, **kw))
    fast, init_r, info_r = optimize_values(lm, reqs, templates, paths, cfg(**kw))
    if case != "no-cache-budget":  # runners rebuilt at every step never replay
        assert lm.cache["locate.suffix_replay_exact"] is True  # replay was checked and used on this model
    assert any(n < 8 for n in info_f["steps"]) and 8 in info_f["steps"]
    assert info_r["steps"] == info_f["steps"]
    assert torch.allclose(init_r, init_f, atol=1e-6)
    assert torch.allclose(fast, full, atol=1e-5, rtol=1e-5) and full.norm() > 0
    assert info_r["final_loss"] == pytest.approx(info_f["final_loss"], rel=1e-5, abs=1e-7)
