"""Probes measured at the checkpoints of a sequential run (perplexity, nkl, norm): each value against
a hand computation on a tiny model, the checkpoint-0 row of the unedited model, resume, and bad input
(unknown probe, missing data, checkpoints out of order), all refused before anything runs."""

import json
import math

import pytest
import torch

from editlab.data import load_requests
from editlab.errors import EditlabError
from editlab.methods import get_editor
from editlab.models import load_lm
from editlab.probes import PROBES, ProbeError, get_probes, parse_probes
from editlab.probes.perplexity import windows_of
from editlab.runner import RunConfig, Store, run
from editlab.runner.config import check_checkpoints

FT = {"layer": 0, "steps": 10, "lr": 0.01}
WIKI = ("The tower is in the city of Paris . It was built in 1889 for the fair . "
        "Many people visit the tower every year and climb its stairs . ") * 30


@pytest.fixture(scope="module")
def lm():
    return load_lm("tiny-trained-llama")


@pytest.fixture
def root(tmp_path):
    (tmp_path / "wikitext").mkdir()
    (tmp_path / "wikitext" / "wikitext-2-raw-test.txt").write_text(WIKI)
    (tmp_path / "counterfact").mkdir()
    recs = [{"locality_prompt": f"The capital of country number {i} is"} for i in range(100)]
    recs.insert(5, {"locality_prompt": "The capital of country number 3 is"})  # a duplicate: counted once
    (tmp_path / "counterfact" / "counterfact-val.json").write_text(json.dumps(recs))
    return tmp_path


def _ft_edit(lm):
    req = load_requests("builtin", limit=1)[0]
    ed = get_editor("ft-m")
    return ed.apply(lm, req, ed.hparams(lm, **FT))


def test_windows_are_consecutive_and_capped():
    ids = list(range(1030))
    w = windows_of(ids, 1030, 512)
    assert [len(x) for x in w] == [512, 512, 6] and w[1][0] == 512
    assert [len(x) for x in windows_of(ids, 1025, 512)] == [512, 512]  # a 1-token tail scores nothing
    assert windows_of(ids, 100, 512) == [ids[:100]]


def test_perplexity_matches_a_hand_computation_and_flags_collapse(lm, root):
    (p,) = get_probes(["perplexity"], "quick", root)
    with pytest.warns(UserWarning, match=r"wikitext-2-raw-test.txt has \d+ tokens, fewer than the quick budget of 8192"):
        p.prepare(lm)
    win = p.windows["ppl_wikitext"]
    assert all(len(x) <= 256 for x in win)  # the tiny model's context
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in win:
            logits = lm.model(torch.tensor([list(lm.prefix_ids) + w])).logits[0].float()
            k = len(lm.prefix_ids)
            lp = torch.log_softmax(logits[k : k + len(w) - 1], -1)
            nll -= float(lp.gather(1, torch.tensor(w[1:])[:, None]).sum())
            n += len(w) - 1
    assert p.base["ppl_wikitext"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert p.measure(lm, lm) == {**p.base, "collapsed": 0.0}
    with _ft_edit(lm) as edit:
        after = p.measure(edit.lm, lm)
    assert after["ppl_wikitext"] != p.base["ppl_wikitext"]
    p.base = {**p.base, "ppl_wikitext": after["ppl_wikitext"] / 2.5}  # as if the edit had more than doubled it
    with _ft_edit(lm) as edit:
        assert p.measure(edit.lm, lm)["collapsed"] == 1.0


@pytest.mark.parametrize("text", ["", "\n"])
def test_perplexity_of_a_text_with_nothing_to_score_is_refused(lm, root, text):
    # no window would report PPL 1.0, a perfect model that can never be flagged as collapsed
    (root / "wikitext" / "wikitext-2-raw-test.txt").write_text(text)
    (p,) = get_probes(["perplexity"], "quick", root)
    with pytest.raises(ProbeError, match=r"wikitext-2-raw-test.txt has [01] token\(s\); ppl_wikitext needs text"):
        p.prepare(lm)
    assert not hasattr(p, "base")


def test_nkl_is_zero_unedited_and_the_kl_of_the_edit_after(lm, root):
    (p,) = get_probes(["nkl"], data_root=root)
    p.prepare(lm)
    assert len(p.prompts) == 100 and len(set(p.prompts)) == 100
    assert p.measure(lm, lm) == {"nkl_fixed": 0.0, "nkl_fixed_top1": 1.0}
    base = lm.next_token_logprobs(p.prompts)
    with _ft_edit(lm) as edit:
        got = p.measure(edit.lm, lm)
        cur = edit.lm.next_token_logprobs(p.prompts)
    kl = sum(float((cur[i].exp() * (cur[i] - base[i])).sum()) for i in range(100)) / 100
    assert got["nkl_fixed"] == pytest.approx(kl, rel=1e-4, abs=1e-7) and got["nkl_fixed"] > 0


def test_nkl_needs_100_distinct_prompts(lm, tmp_path):
    (tmp_path / "counterfact").mkdir()
    (tmp_path / "counterfact" / "counterfact-val.json").write_text(json.dumps([{"locality_prompt": "A is"}] * 150))
    with pytest.raises(ProbeError, match="1 distinct locality prompts; it needs 100"):
        get_probes(["nkl"], data_root=tmp_path)  # read when checked, before any model is needed


def test_norm_growth_is_the_relative_frobenius_change(lm):
    (p,) = get_probes(["norm"])
    assert p.measure(lm, lm)["matrices_changed"] == 0.0
    w0 = {n: t.detach().clone() for n, t in lm.model.named_parameters()}
    with _ft_edit(lm) as edit:
        got = p.measure(edit.lm, lm)
        changed = [(n, t) for n, t in lm.model.named_parameters() if not torch.equal(t, w0[n])]
        growth = [float((t.detach() - w0[n]).norm() / w0[n].norm()) for n, t in changed]
    assert got["matrices_changed"] == len(changed) >= 1
    assert got["norm_growth_max"] == pytest.approx(max(growth), rel=1e-5)
    assert got["norm_growth_mean"] == pytest.approx(sum(growth) / len(growth), rel=1e-5)
    assert p.measure(lm, lm)["matrices_changed"] == 0.0  # restored


def test_sequential_run_with_probes_and_checkpoint_zero(lm, root, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITLAB_DATA", str(root))
    reqs = load_requests("builtin", limit=3)
    store = Store(tmp_path / "r.db")
    before = lm.current_fingerprint()
    cfg = RunConfig("ft-m", mode="sequential", checkpoints=[0, 1, 3], hparams=FT, probes=["nkl", "norm", "perplexity"])
    rid = run(lm, reqs, cfg, store)
    pts = {r.n_edits: r.metrics for r in store.rows(rid)}
    assert sorted(pts) == [0, 1, 3]
    assert pts[0]["nkl_fixed"] == 0.0 and pts[0]["matrices_changed"] == 0.0 and "retention_rewrite_acc" not in pts[0]
    assert pts[3]["nkl_fixed"] > 0 and pts[3]["matrices_changed"] >= 1 and "retention_rewrite_acc" in pts[3]
    assert pts[3]["ppl_wikitext"] != pts[0]["ppl_wikitext"] and pts[0]["collapsed"] == 0.0
    assert store.runs_config(rid)["probe_info"]["perplexity"]["budget"] == "quick"
    assert lm.current_fingerprint() == before and not lm.active_edits
    run(lm, reqs, cfg, store, resume=True)  # done: nothing added
    assert len(list(store.rows(rid))) == 3
    # probes are part of the run's identity: another probe set is another run
    other = run(lm, reqs, RunConfig("ft-m", mode="sequential", checkpoints=[0], hparams=FT, probes=["norm"]), store)
    assert other != rid and [r.n_edits for r in store.rows(other)] == [0]
    assert not lm.active_edits


def test_bad_probe_input_is_refused_by_name(root, tmp_path):
    assert set(PROBES.names()) == {"perplexity", "downstream", "nkl", "norm"}
    with pytest.raises(ProbeError, match="unknown probe 'ppl'"):
        parse_probes("ppl")
    with pytest.raises(ProbeError, match="named twice"):
        parse_probes("nkl,norm,nkl")
    with pytest.raises(ProbeError, match="unknown probe budget"):
        get_probes(["nkl"], "medium", root)
    with pytest.raises(ProbeError, match="needs counterfact/counterfact-val.json"):
        get_probes(["nkl"], "quick", tmp_path / "nothing")
    for bad, msg in (([3, 1], "must increase"), ([1, 1, 2], "given twice"), ([-1, 2], "0 or more"), ([0, 9], "outside 0..3")):
        with pytest.raises(EditlabError, match=msg):
            check_checkpoints(bad, 3)
    with pytest.raises(EditlabError, match="sequential"):
        RunConfig("ft-m", mode="single", probes=["nkl"]).validate(3)


def test_cli_sequential_run_with_checkpoint_zero_and_probes(root, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from editlab.cli import app

    monkeypatch.setenv("EDITLAB_DATA", str(root))
    db = tmp_path / "r.db"
    args = ["eval", "--model", "tiny-trained-llama", "--method", "ft-m", "--data", "builtin", "--limit", "2", "--mode",
            "sequential", "--checkpoints", "0,2", "--probes", "norm,nkl", "--set", "layer=0", "--set", "steps=3",
            "--db", str(db)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    store = Store.open_readonly(db)
    (run_,) = store.runs()
    assert sorted(r.n_edits for r in store.rows(run_["run_id"])) == [0, 2]
    store.close()
    # the same probes named in another order are the same run: --resume finds it, adds nothing
    args[args.index("norm,nkl")] = "nkl,norm"
    res = CliRunner().invoke(app, args + ["--resume"])
    assert res.exit_code == 0, res.output
    store = Store.open_readonly(db)
    assert len(store.runs()) == 1 and store.count_rows(run_["run_id"]) == 2
    store.close()


def test_default_checkpoints_start_at_zero_with_probes():
    cfg = RunConfig("ft-m", mode="sequential", probes=["norm"])
    cfg.validate(12)
    assert cfg.checkpoints == [0, 1, 10, 12]
    plain = RunConfig("ft-m", mode="sequential")
    plain.validate(12)
    assert plain.checkpoints == [1, 10, 12]


def test_reports_plot_each_probes_headline_metrics_from_the_registry():
    """The run report and the pitfalls report read the curves to draw from the probes themselves: every
    headline metric is one a probe returns and the metric registry knows, and a sequential run's
    downstream points are drawn (with their chance level), not only the few a report once listed."""
    from editlab.probes import PROBES, chance_metric, headline_metrics
    from editlab.report.html import _seq_plots
    from editlab.suites.metrics import METRICS

    heads = headline_metrics()
    assert {"ppl_wikitext", "ppl_corpus", "sst2", "rte", "boolq", "nq", "gsm8k_extract", "nkl_fixed"} <= set(heads)
    for name in PROBES.names():
        probe = PROBES.get(name)
        assert set(probe.headline) <= set(probe.metrics) and all(m in METRICS for m in probe.headline)
    assert chance_metric("sst2") == "sst2_chance" and chance_metric("nq") is None
    points = [(n, {"retention_rewrite_acc": 1 - n / 20, "sst2": 0.6 - n / 100, "sst2_chance": 0.51, "rte": 0.5,
                   "ppl_corpus": 30.0 + n}) for n in (0, 5, 10)]
    drawn = [k for k, png in _seq_plots([{"run": {"method": "rome", "run_id": "r", "mode": "sequential"}, "points": points}])]
    assert drawn == ["retention_rewrite_acc", "ppl_corpus", "sst2", "rte"]
