"""Causal tracing: the algorithm on tiny models of every architecture, averaging by token class, the
heatmaps, `editlab trace`, bad input, and one SmolLM2 trace (slow)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from editlab.cli import app
from editlab.errors import DataFormatError, OutputPathError, UnsupportedArchitectureError
from editlab.methods import get_editor
from editlab.models import load_lm
from editlab.tracing import (
    CLASSES,
    CausalTracer,
    KindSpec,
    TraceResult,
    TracingError,
    UnknownFactError,
    average_traces,
    known_by_model,
    load_knowns,
    parse_kinds,
    subject_range,
    trace_known_facts,
    window_layers,
)
from editlab.tracing.knowns import KnownFact, token_classes

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tracer(lm, **kw):
    """A tracer with a fixed noise std (no corpus read) that traces whatever the tiny model predicts."""
    kw.setdefault("samples", 3)
    kw.setdefault("noise_std", 1.0)
    kw.setdefault("min_prob", 0.0)
    return CausalTracer(lm, **kw)


@pytest.fixture(scope="module")
def llama():
    return load_lm("tiny-llama")


# ------------------------------------------------------------------------------------------- options
def test_parse_kinds_defaults_follow_the_paper_and_accept_explicit_windows():
    assert parse_kinds("hidden,mlp,attn") == [KindSpec("hidden", 1), KindSpec("mlp", 10), KindSpec("attn", 10)]
    assert parse_kinds("mlp,attn", window=4) == [KindSpec("mlp", 4), KindSpec("attn", 4)]
    # a default window wider than a small model covers the whole model; an explicit one is kept (and refused later)
    assert parse_kinds("hidden,mlp", n_layers=4) == [KindSpec("hidden", 1), KindSpec("mlp", 4)]
    assert parse_kinds("mlp", window=12, n_layers=4) == [KindSpec("mlp", 12)]
    assert parse_kinds("hidden:5, mlp:1") == [KindSpec("hidden", 5), KindSpec("mlp", 1)]
    assert [k.label for k in parse_kinds("hidden,mlp:3")] == ["hidden", "mlp:3"]
    for bad in ("residual", "mlp:x", "mlp:0", "", "mlp,mlp"):
        with pytest.raises(TracingError):
            parse_kinds(bad)


def test_window_layers_is_centred_and_clipped():
    assert list(window_layers(5, 1, 30)) == [5]
    assert list(window_layers(10, 10, 30)) == list(range(5, 15))
    assert list(window_layers(1, 10, 30)) == list(range(0, 6))
    assert list(window_layers(28, 10, 30)) == list(range(23, 30))
    assert list(window_layers(3, 4, 30)) == [1, 2, 3, 4]


def test_subject_range_covers_exactly_the_subject_tokens(tiny_lm):
    a, b = subject_range(tiny_lm, PROMPT, SUBJECT)
    ids = tiny_lm.encode_prompt(PROMPT)
    assert b - 1 == tiny_lm.subject_last_index(PROMPT, SUBJECT)
    assert tiny_lm.tokenizer.decode(ids[a:b]).strip() == SUBJECT
    assert SUBJECT not in tiny_lm.tokenizer.decode(ids[a + 1:b])


# ------------------------------------------------------------------------------------------- the algorithm
def test_trace_shapes_and_bounds(llama):
    res = tracer(llama).trace(PROMPT, SUBJECT, kinds="hidden,mlp:2,attn:3")
    assert list(res) == ["hidden", "mlp:2", "attn:3"]
    n_tok = len(llama.encode_prompt(PROMPT))
    for label, tr in res.items():
        assert isinstance(tr, TraceResult)
        assert tr.scores.shape == (n_tok, llama.n_layers)
        assert len(tr.tokens) == n_tok and tr.samples == 3
        assert 0 <= tr.low <= 1 and 0 <= tr.high <= 1
        assert bool(((tr.scores >= 0) & (tr.scores <= 1)).all())
        assert tr.answer_id == int(llama.next_token_logprobs([PROMPT])[0].argmax())
        # tokens before the subject are the same in both runs: restoring them changes nothing
        a, _ = tr.subject_range
        assert torch.equal(tr.scores[:a], torch.full_like(tr.scores[:a], tr.low))
    t, layer, ie = res["hidden"].peak()
    assert ie == pytest.approx(float(res["hidden"].indirect_effect.max()))
    assert res["hidden"].indirect_effect[t, layer] == pytest.approx(ie)


def test_restoring_the_last_hidden_state_gives_the_clean_probability(tiny_lm):
    """The last block's output at the last token is all the head reads: restoring it is the clean run.
    Restoring every layer at once (a window as wide as the model) at the last token is too."""
    n = tiny_lm.n_layers
    res = tracer(tiny_lm).trace(PROMPT, SUBJECT, kinds=[KindSpec("hidden", 1), KindSpec("hidden", n)])
    one, every = res["hidden"], res[f"hidden:{n}"]
    assert list(window_layers(n // 2, n, n)) == list(range(n))
    assert one.scores[-1, -1].item() == pytest.approx(one.high, abs=1e-6)
    assert every.scores[-1, n // 2].item() == pytest.approx(one.high, abs=1e-6)
    assert one.low != pytest.approx(one.high, abs=1e-6)  # the noise did change the output


def test_zero_noise_gives_zero_effect(llama):
    res = tracer(llama, noise_scale=0.0).trace(PROMPT, SUBJECT, kinds="hidden,mlp:2,attn:2")
    for tr in res.values():
        assert tr.low == pytest.approx(tr.high, abs=1e-6)
        assert float(tr.indirect_effect.abs().max()) < 1e-5


def test_seeded_noise_is_deterministic(llama):
    a = tracer(llama, seed=3).trace(PROMPT, SUBJECT, kinds="hidden,mlp:2")
    b = tracer(llama, seed=3).trace(PROMPT, SUBJECT, kinds="hidden,mlp:2")
    c = tracer(llama, seed=4).trace(PROMPT, SUBJECT, kinds="hidden,mlp:2")
    for k in a:
        assert torch.equal(a[k].scores, b[k].scores) and a[k].low == b[k].low
    assert c["hidden"].low != a["hidden"].low


def test_batched_and_shortcut_runs_equal_one_by_one_full_runs(tiny_lm):
    """Restorations batched many to a pass, with the KV-cache and layer-replay shortcuts, give the
    numbers of full forward passes made one restoration at a time (every architecture)."""
    kinds = "hidden,mlp:3,attn:2"
    # subject inside the prompt, and subject at position 0 (no cached prefix at all for its first token)
    for prompt, subject in ((PROMPT, SUBJECT), ("Michael Jordan plays basketball", "Michael Jordan")):
        batched = tracer(tiny_lm, pass_tokens=4096).trace(prompt, subject, kinds=kinds)
        single = tracer(tiny_lm, pass_tokens=1, fast=False).trace(prompt, subject, kinds=kinds)
        for k in batched:
            assert torch.allclose(batched[k].scores, single[k].scores, atol=1e-6), (prompt, k)
            assert batched[k].low == pytest.approx(single[k].low, abs=1e-7)
    assert subject_range(tiny_lm, "Michael Jordan plays basketball", "Michael Jordan")[0] == len(tiny_lm.prefix_ids)
    assert tracer(tiny_lm).fast  # the shortcuts are in use for every supported architecture


def test_answer_option_scores_that_token_and_unknown_facts_are_refused(llama):
    t = tracer(llama)
    res = t.trace(PROMPT, SUBJECT, answer="Rome", kinds="hidden")["hidden"]
    _, ids = llama.encode_pair(PROMPT, "Rome")
    assert res.answer_id == ids[0] and res.answer == "Rome"
    with pytest.raises(UnknownFactError, match="does not know"):
        tracer(llama, min_prob=0.5).trace(PROMPT, SUBJECT, answer="Rome", kinds="hidden")


def test_bad_input_raises_named_errors(llama):
    t = tracer(llama)
    with pytest.raises(TracingError, match="does not occur"):
        t.trace(PROMPT, "Colosseum")
    assert t.trace(PROMPT, SUBJECT)["mlp:4"].window == llama.n_layers  # default kinds fit a 4-layer model
    with pytest.raises(TracingError, match="empty"):
        t.trace(PROMPT, " ")
    with pytest.raises(TracingError, match="past the model"):
        t.trace(PROMPT, SUBJECT, kinds="mlp", window=llama.n_layers + 1)
    with pytest.raises(TracingError):
        t.trace(PROMPT, SUBJECT, kinds="resid")
    with pytest.raises(TracingError):
        CausalTracer(llama, samples=0)
    with pytest.raises(TracingError):
        CausalTracer(llama, noise_scale=-1.0)


def test_a_model_whose_structure_does_not_match_its_archspec_is_refused():
    lm = load_lm("tiny-gpt2")
    lm.arch = dataclasses.replace(lm.arch, mlp_out="mlp.no_such_projection")
    with pytest.raises(UnsupportedArchitectureError, match="no_such_projection"):
        CausalTracer(lm)


def test_the_model_is_left_unchanged(llama):
    before = llama.fingerprint()
    layers = list(llama.module(llama.arch.layers))
    tracer(llama).trace(PROMPT, SUBJECT, kinds="hidden,mlp:2")
    assert llama.fingerprint() == before
    assert list(llama.module(llama.arch.layers)) == layers  # replayed blocks are put back
    for m in llama.model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_noise_level_is_measured_on_real_text(llama):
    from editlab.tracing import embedding_std

    std = embedding_std(llama)
    assert embedding_std(llama, n_tokens=500) != std  # another sample, another estimate
    emb = llama.module(llama.arch.embed).weight.detach()
    assert 0.2 * float(emb.std()) < std < 5 * float(emb.std())
    t = CausalTracer(llama, min_prob=0.0, samples=2)
    assert t.trace(PROMPT, SUBJECT, kinds="hidden")["hidden"].noise_std == pytest.approx(3 * std)


# ------------------------------------------------------------------------------------------- averaging
def test_token_classes_follow_the_paper():
    # tokens: 0 prefix, 1-3 subject, 4 first after, 5-6 further, 7 last
    assert token_classes((1, 4), 8) == [[1], [2], [3], [4], [5, 6], [7]]
    # one-token subject at the start: first = last subject token, no middle
    assert token_classes((0, 1), 4) == [[0], [], [0], [1], [2], [3]]
    # subject right before the last token: no subsequent tokens besides the last
    assert token_classes((0, 2), 3) == [[0], [], [1], [], [], [2]]


def _fake_trace(effect_rows: list[list[float]], subj: tuple[int, int], low: float = 0.1) -> TraceResult:
    scores = torch.tensor(effect_rows) + low
    return TraceResult(prompt="p", subject="s", answer="a", answer_id=0, kind="mlp", window=3,
                       tokens=[str(i) for i in range(len(effect_rows))], subject_range=subj, scores=scores,
                       low=low, high=0.9, samples=2, noise_std=1.0)


def test_average_traces_averages_indirect_effects_by_class():
    a = _fake_trace([[0, 0], [1, 0], [2, 0], [3, 0], [4, 0], [5, 0], [6, 0]], (0, 3))  # middle = 1, further = 4,5
    b = _fake_trace([[0, 1], [0, 3], [0, 5], [0, 7]], (1, 2), low=0.2)  # one-token subject at 1, no further
    avg = average_traces([a, b])
    assert avg.classes == CLASSES and avg.n_facts == 2
    assert avg.counts == [2, 1, 2, 2, 1, 2]
    expect = torch.tensor([[0, 1.5], [1, 0], [1, 1.5], [1.5, 2.5], [4.5, 0], [3, 3.5]])
    assert torch.allclose(avg.effect, expect)
    assert avg.low == pytest.approx(0.15) and avg.high == pytest.approx(0.9)
    assert avg.peak() == ("further tokens", 0, 4.5)
    assert avg.peak("last subject token") == ("last subject token", 1, 1.5)
    assert (avg.samples, avg.noise_std) == (2, 1.0) and avg.to_dict()["samples"] == 2
    c = _fake_trace([[0, 1], [0, 3]], (0, 1))
    c.samples = 10  # traces made with other noise do not average into one figure
    with pytest.raises(TracingError, match="different noise"):
        average_traces([a, c])


def test_known_facts_are_filtered_to_what_the_model_gets_right_and_averaged(tmp_path):
    lm = load_lm("tiny-trained-llama")
    prompts = [PROMPT, "The Colosseum is located in the city of", "Albert Einstein was born in"]
    subjects = ["Eiffel Tower", "Colosseum", "Albert Einstein"]
    greedy = [lm.tokenizer.decode([int(i)]) for i in lm.next_token_logprobs(prompts).argmax(-1)]
    records = [{"known_id": i, "prompt": p, "subject": s, "attribute": g.strip() or "x", "template": "", "prediction": ""}
               for i, (p, s, g) in enumerate(zip(prompts, subjects, greedy))]
    records[1]["attribute"] = "Zzzz qqq"  # a fact the model gets wrong
    path = tmp_path / "known.json"
    path.write_text(json.dumps(records))
    facts = load_knowns(path)
    assert [f.subject for f in facts] == subjects
    kept = known_by_model(lm, facts)
    assert records[1]["prompt"] not in [f.prompt for f in kept]
    for f in kept:
        _, ids = lm.encode_pair(f.prompt, f.answer)
        assert ids[0] == int(lm.next_token_logprobs([f.prompt])[0].argmax())
    calls = []
    avgs = trace_known_facts(tracer(lm), facts[:1] + facts[2:], kinds="hidden,mlp:2", progress=lambda i, n: calls.append((i, n)))
    assert set(avgs) == {"hidden", "mlp:2"} and calls[-1] == (2, 2)
    done = [d for d, _ in calls]
    assert done == sorted(done) and (1, 2) in calls and any(0 < d < 1 for d in done)
    singles = [tracer(lm).trace(f.prompt, f.subject, f.answer, kinds="mlp:2")["mlp:2"] for f in facts[:1] + facts[2:]]
    assert torch.allclose(avgs["mlp:2"].effect, average_traces(singles).effect, atol=1e-6)


def test_load_knowns_errors(tmp_path):
    with pytest.raises(DataFormatError, match="not found"):
        load_knowns(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "A is in", "subject": "B", "attribute": "C"}]))
    with pytest.raises(DataFormatError, match="does not occur"):
        load_knowns(bad)
    bad.write_text(json.dumps([{"prompt": "A is in", "attribute": "C"}]))
    with pytest.raises(DataFormatError, match="subject"):
        load_knowns(bad)


def test_shared_known_1000_loads(data_root):
    facts = load_knowns()
    assert len(facts) == 1209 and facts[0] == KnownFact("Vinson Massif is located in the continent of", "Vinson Massif",
                                                        "Antarctica", 0)


# ------------------------------------------------------------------------------------------- heatmaps
def test_heatmaps_are_png_files(llama, tmp_path):
    tr = tracer(llama).trace(PROMPT, SUBJECT, kinds="mlp:2")["mlp:2"]
    p = tr.save_png(tmp_path / "sub" / "mlp.png")
    assert p.read_bytes()[:8] == PNG_MAGIC
    avg = average_traces([tr, tr])
    assert avg.save_png(tmp_path / "avg.png").read_bytes()[:8] == PNG_MAGIC
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputPathError):
        tr.save_png(blocker / "x.png")


# ------------------------------------------------------------------------------------------- CLI
runner = CliRunner()


def test_cli_traces_one_prompt(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["trace", "--model", "tiny-llama", "--prompt", PROMPT, "--subject", SUBJECT,
                                 "--window", "2", "--samples", "2", "--min-prob", "0", "--out", str(out)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "MLP indirect effect peaks at token" in result.output
    assert "2 noise samples at 3x the embedding std is not ROME's protocol" in result.output.replace("\n", " ")
    for name in ("hidden.png", "mlp_w2.png", "attn_w2.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    data = json.loads((out / "trace.json").read_text())
    assert set(data) == {"hidden", "mlp:2", "attn:2"} and data["mlp:2"]["window"] == 2


def test_trace_heatmaps_go_into_the_html_report(tmp_path):
    from editlab.runner import Store

    out = tmp_path / "out"
    result = runner.invoke(app, ["trace", "--model", "tiny-llama", "--prompt", PROMPT, "--subject", SUBJECT,
                                 "--kinds", "hidden,mlp:2", "--samples", "2", "--min-prob", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    db = tmp_path / "r.db"
    Store(db).close()
    page_file = tmp_path / "rep.html"
    result = runner.invoke(app, ["report", str(db), "-o", str(page_file), "--traces", str(out)])
    assert result.exit_code == 0, result.output
    page = page_file.read_text()
    assert "Causal traces" in page and PROMPT in page
    assert page.count("<img alt='hidden'") == 1 and page.count("<img alt='mlp_w2'") == 1
    # what comes from the trace files is escaped
    avg = tmp_path / "avg"
    avg.mkdir()
    (avg / "average_mlp.png").write_bytes((out / "hidden.png").read_bytes())
    (avg / "average.json").write_text(json.dumps({"mlp": {"n_facts": "<script>alert(1)</script>"}}))
    result = runner.invoke(app, ["report", str(db), "-o", str(page_file), "--traces", str(avg)])
    assert result.exit_code == 0, result.output
    page = page_file.read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "data:image/png;base64,iVBOR" in page
    # a folder without trace output is refused before anything is written
    (tmp_path / "empty").mkdir()
    page_file.unlink()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        result = runner.invoke(app, ["report", str(db), "-o", str(page_file), "--traces", str(bad)])
        assert result.exit_code == 2 and "--traces" in result.output and "Traceback" not in result.output
        assert not page_file.exists()


def test_cli_averages_known_facts(tmp_path):
    lm = load_lm("tiny-trained-llama")
    greedy = lm.tokenizer.decode([int(lm.next_token_logprobs([PROMPT])[0].argmax())]).strip() or "x"
    path = tmp_path / "known.json"
    path.write_text(json.dumps([{"prompt": PROMPT, "subject": SUBJECT, "attribute": greedy}] * 2))
    out = tmp_path / "avg"
    result = runner.invoke(app, ["trace", "--model", "tiny-trained-llama", "--data", str(path), "--limit", "1",
                                 "--kinds", "mlp:2", "--samples", "2", "--min-prob", "0", "--out", str(out)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "right for 2 of 2 facts" in result.output
    assert (out / "average_mlp_w2.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "average.json").read_text())["mlp:2"]["n_facts"] == 1
    # the average is kept per model, and `layer=auto` edits where its MLP effect at the last subject token peaks
    avg = json.loads((out / "average.json").read_text())["mlp:2"]
    row = avg["effect"][avg["classes"].index("last subject token")]
    assert "layer=auto" in result.output
    assert get_editor("rome").hparams(lm, layer="auto").layer == max(range(len(row)), key=row.__getitem__)


def test_layer_auto_without_a_cached_trace_names_the_command_and_a_bad_cache_is_refused():
    from editlab.cli.common import check_hparams_early
    from editlab.tracing import NoTraceError, trace_cache_path

    lm = load_lm("tiny-llama")
    check_hparams_early("rome", {"layer": "auto"})  # accepted before the model loads
    with pytest.raises(NoTraceError, match="editlab trace --model tiny-llama --data knowns --kinds mlp"):
        get_editor("rome").hparams(lm, layer="auto")
    assert get_editor("rome").hparams(lm, layer=1).layer == 1  # a given layer needs no trace
    for bad in ("{not json", '{"format": 1, "averages": {"mlp": {"kind": "mlp"}}}', '{"format": 1, "averages": [1]}',
                '{"format": 1, "averages": {"mlp": "x"}}'):
        trace_cache_path(lm).write_text(bad)
        with pytest.raises(TracingError, match="delete it and trace again"):
            get_editor("rome").hparams(lm, layer="AUTO")


@pytest.mark.parametrize("args, needle", [
    (["--prompt", PROMPT], "--subject"),
    (["--prompt", PROMPT, "--subject", "Colosseum"], "does not occur"),
    (["--prompt", PROMPT, "--subject", SUBJECT, "--kinds", "resid"], "unknown trace kind"),
    (["--prompt", PROMPT, "--subject", SUBJECT, "--window", "9"], "past the model"),
    (["--prompt", PROMPT, "--subject", SUBJECT, "--kinds", "hidden:5"], "past the model"),
    (["--prompt", PROMPT, "--subject", SUBJECT, "--data", "knowns"], "cannot be combined"),
    (["--prompt", PROMPT, "--subject", SUBJECT, "--answer", "Rome", "--min-prob", "0.9", "--kinds", "hidden"], "does not know"),
])
def test_cli_bad_input_is_one_error_line(tmp_path, args, needle):
    result = runner.invoke(app, ["trace", "--model", "tiny-llama", "--samples", "2", "--out", str(tmp_path / "o"), *args],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and needle in result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
def test_smollm2_mlp_effect_peaks_at_the_last_subject_token_in_early_middle_layers(smollm2):
    """Method cards section 0: on SmolLM2 the MLP windows' effect at the last subject token peaks in the
    early-middle layers, and restoring MLPs there matters more than at the first subject token or at the
    last token. (Measured: ' Col|osse|um', peak +0.42 at layer 3; ' Col' at most +0.01; last token +0.14.)"""
    prompt = "The Colosseum is located in the city of"
    tr = CausalTracer(smollm2).trace(prompt, "Colosseum", "Rome", kinds="mlp")["mlp:10"]
    assert tr.high > 0.5 and tr.low < tr.high / 5
    ie = tr.indirect_effect
    first, end = tr.subject_range
    assert [t.strip() for t in tr.tokens[first:end]] == ["Col", "osse", "um"]
    last_subj = ie[end - 1]
    assert 2 <= int(last_subj.argmax()) <= 10, last_subj.tolist()
    assert float(last_subj.max()) > 0.2
    assert float(last_subj.max()) > 2 * float(ie[first].max())
    assert float(last_subj.max()) > float(ie[-1].max())
