"""The `counterfact`, `zsre` and `knowedit` suites: alias and group arithmetic against hand values, each
suite's whole protocol on a tiny model over three real records per split, record-field errors, and the
probes each protocol builds (subject replace, inverse relation, the other-attribution join)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from editlab.models import load_lm
from editlab.runner import Store
from editlab.data.io import read_records
from editlab.suites.base import Editing, RecordFieldError
from editlab.suites.knowedit import KnowEditSuite, aliases, mean_of_group_means
from editlab.suites.metrics import METRICS
from editlab.suites.portability import CounterFactSuite, ZsreSuite
from editlab.suites.runner import SuitePlan, run_suite, suite_summary
from editlab.suites.scoring import agreement, argmax_ids, harmonic_mean, token_accuracies

FT = {"layer": 0, "steps": 4, "lr": 0.01}


@pytest.fixture(scope="module")
def lm():
    return load_lm("tiny-llama")


def _copy(root: Path, tmp: Path, rel: str, edit=None, n: int = 3) -> None:
    """The first `n` records of a real data file into a temporary data folder, optionally changed."""
    recs = read_records(root / rel)[:n]  # JSON or JSON Lines; written back as a JSON array
    if edit:
        edit(recs)
    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp / rel).write_text(json.dumps(recs))


# ------------------------------------------------------------------ hand-computed values

def test_aliases_flatten_every_shape():
    assert aliases("Paris") == ["Paris"]
    assert aliases(["genus", "genus "]) == ["genus"]
    # wiki_recent: a list of answers, each a list of aliases, some empty
    assert aliases([[], ["Honorary Doctor"], ["Prussia", "Kingdom of Prussia"], ["Prussia"]]) == [
        "Honorary Doctor", "Prussia", "Kingdom of Prussia"]
    assert aliases("") == [] and aliases([[]]) == [] and aliases(None) == []


def test_record_value_is_mean_of_group_means():
    # spec 2.3: mean over the record's keys of each key's mean, not the mean over all probes (2/3)
    assert mean_of_group_means({"reasoning": [1.0, 0.0], "subject_aliasing": [1.0]}) == pytest.approx(0.75)
    assert mean_of_group_means({"reasoning": []}) is None and mean_of_group_means({}) is None


def test_metric_names_are_registered():
    for suite in (CounterFactSuite(), ZsreSuite(), KnowEditSuite()):
        bases = {m.rsplit(".", 1)[-1] for m in suite.metrics}
        assert [b for b in sorted(bases) if b not in METRICS] == []


# ------------------------------------------------------------------ whole protocol on a tiny model

def _run(lm, suite, units, tmp_path, method="ft", hparams=FT):
    """The runner's whole protocol; the model must come back bit-identical with no edit left."""
    store = Store(tmp_path / "suite.db")
    plan = SuitePlan(suite=suite, units=units, methods=[method], data={}, limit=None, on_bad="stop")
    fp = lm.fingerprint()
    ids = run_suite(lm, plan, store, hparams={method: hparams} if hparams else None)
    assert lm.fingerprint() == fp and not lm.active_edits
    rows = {m: {r.row_key: r.metrics for r in store.rows(rid)} for m, rid in ids.items()}
    return store, ids, rows


def _check_rows(suite, units, rows, expected, margins=("NM+",)):
    assert set(rows["ft"]) == set(rows["unedited"]) == {u.key for u in units}
    for u in units:
        post, pre = rows["ft"][u.key], rows["unedited"][u.key]
        want = expected(u)
        assert set(post) == {f"{u.split}.{m}" for m in want}, u.key
        assert set(pre) == {f"{u.split}.{m}" for m in want if m not in ("other_attribution", "locality",
                                                                        "relation_specificity", "forgetfulness",
                                                                        "locality_first_alias")}, u.key
        assert set(post) <= set(suite.metrics)
        fractions = [v for k, v in [*post.items(), *pre.items()] if k.rsplit(".", 1)[-1] not in margins]
        assert all(0.0 <= v <= 1.0 for v in fractions), (u.key, post)
        assert all(-1.0 <= v <= 1.0 for k, v in [*post.items(), *pre.items()] if k.rsplit(".", 1)[-1] in margins)


def test_counterfact_protocol(lm, data_root, tmp_path):
    suite = CounterFactSuite()
    units = suite.load(data_root, 3)
    assert [u.split for u in units] == ["one_hop"] * 3 + ["subject_replace"] * 3
    assert units[0].key == "one_hop:4482"

    def expected(u):
        port = u.split
        return ({"ES", "PS", "NS", "edit_succ", "rephrase", port} | ({"other_attribution"} if u.data["aux"] else set())
                | ({"NS+", "NM+"} if u.data["distracting"] else set()))

    store, ids, rows = _run(lm, suite, units, tmp_path)
    _check_rows(suite, units, rows, expected)
    assert any(u.data["aux"] for u in units) and {len(u.data["distracting"]) for u in units} == {0, 10}
    summary = suite_summary(store, ids["ft"], suite)
    assert summary["n"] == 6 and 0 <= summary["one_hop.Score"] <= 1 and "subject_replace.Score" in summary
    assert 0 <= summary["one_hop.NS+"] <= 1
    assert summary["one_hop.Score+"] == pytest.approx(harmonic_mean([summary[f"one_hop.{m}"] for m in ("ES", "PS", "NS", "NS+")]))


def test_counterfact_distracting_neighbours_by_hand(lm, data_root):
    """NS+ / NM+ of a unit: the CounterFact+ distracting prompts of the same edit (its statement, then a
    neighbour prompt), scored as g(true) against g(new) with mean token probabilities, by hand."""
    from editlab.suites.scoring import mean_token_probs

    unit = next(u for u in CounterFactSuite().load(data_root, 1) if u.key == "one_hop:4482")
    req, prompts = unit.data["request"], unit.data["distracting"]
    assert prompts[0].startswith("Spike Hughes originates from Philadelphia.")  # the edit statement first
    row, _ = CounterFactSuite().unedited(lm, unit)
    g_true = mean_token_probs(lm, prompts, [req.target_true] * len(prompts))
    g_new = mean_token_probs(lm, prompts, [req.target_new] * len(prompts))
    diffs = [t - n for t, n in zip(g_true, g_new)]
    assert row["one_hop.NS+"] == pytest.approx(sum(d > 0 for d in diffs) / 10)
    assert row["one_hop.NM+"] == pytest.approx(sum(diffs) / 10)


def test_zsre_protocol(lm, data_root, tmp_path):
    suite = ZsreSuite()
    units = suite.load(data_root, 3)
    assert [u.key for u in units][:4] == ["one_hop:0", "one_hop:1", "one_hop:2", "inverse_relation:0"]

    def expected(u):
        return {"edit_succ", "rephrase", u.split} | ({"locality"} if u.split == "one_hop" else set())

    _, _, rows = _run(lm, suite, units, tmp_path)
    _check_rows(suite, units, rows, expected)


def _short_bios(recs):
    # the tiny model's context is 256 tokens: keep each passage's first sentence (it names the concept)
    for r in recs:
        r["text"] = r["text"].split(". ")[0] + "."
        r["labels"] = " ".join(r["labels"].split()[:6])


def test_knowedit_protocol(lm, data_root, tmp_path):
    suite = KnowEditSuite()
    for split, rel in suite.files.items():
        _copy(data_root, tmp_path / "data", rel, _short_bios if split == "wikibio" else None)
    units = suite.load(tmp_path / "data", 3)
    assert [u.split for u in units] == ["recent"] * 3 + ["counterfact"] * 3 + ["zsre"] * 3 + ["wikibio"] * 3

    def expected(u):
        want = {"edit_succ"} | ({"rephrase"} if u.data["request"].paraphrases else set())
        for section in ("portability", "locality"):
            groups = u.data[section]
            want |= set(groups)
            if groups:
                want |= {section, f"{section}_first_alias"}
        return want

    _, _, rows = _run(lm, suite, units, tmp_path)
    _check_rows(suite, units, rows, expected)
    assert all("wikibio.portability" not in rows["ft"][u.key] for u in units if u.split == "wikibio")


# ------------------------------------------------------------------ the probes each protocol builds

def test_knowedit_scores_best_alias_and_group_means(lm, data_root):
    suite = KnowEditSuite()
    recent = [u for u in suite.load(data_root, 60, on_bad="skip") if u.split == "recent"]  # none has both sections

    def multi_alias(u, section):
        return any(len(a) > 1 for probes in u.data[section].values() for _, a in probes)

    unit = next(u for u in recent if multi_alias(u, "portability"))
    row, _ = suite.unedited(lm, unit)
    best, first = {}, {}
    for group, probes in unit.data["portability"].items():
        for prompt, answers in probes:
            accs = token_accuracies(lm, [(prompt, a) for a in answers])
            best.setdefault(group, []).append(max(accs))
            first.setdefault(group, []).append(accs[0])
    for group, values in best.items():
        assert row[f"recent.{group}"] == pytest.approx(sum(values) / len(values))
    assert row["recent.portability"] == pytest.approx(mean_of_group_means(best))
    assert row["recent.portability_first_alias"] == pytest.approx(mean_of_group_means(first))

    # locality after an edit: best-alias argmax agreement with the unedited model, per group
    unit = next(u for u in recent if multi_alias(u, "locality") and len(u.data["locality"]) == 2)
    _, state = suite.unedited(lm, unit)
    pairs = KnowEditSuite._pairs(unit.data["locality"])
    before = argmax_ids(lm, pairs)
    assert state == before
    editing = Editing(lm, "ft", ft_hparams(lm, {"layer": 0, "steps": 6, "lr": 0.05}))
    try:
        post = suite.edited(editing, unit, state)
        after = argmax_ids(editing.system, pairs)  # the edit is still applied: the runner undoes it
        agree = iter(agreement(a, b) for a, b in zip(after, before))
        want = {}
        for group, probes in unit.data["locality"].items():
            want[group] = [max(next(agree) for _ in answers) for _, answers in probes]
        for group, values in want.items():
            assert post[f"recent.{group}"] == pytest.approx(sum(values) / len(values))
        assert post["recent.locality"] == pytest.approx(mean_of_group_means(want))
        assert post["recent.locality"] >= post["recent.locality_first_alias"]
    finally:
        editing.undo(0)


def ft_hparams(lm, overrides):
    from editlab.methods import get_editor

    return get_editor("ft").hparams(lm, **overrides)


def test_counterfact_probes_and_other_attribution(lm, data_root):
    suite = CounterFactSuite()
    units = {u.key: u for u in suite.load(data_root, 3)}
    sr = units["subject_replace:4496"].data["request"]
    # requested_rewrite.prompt.format(alternative_subject) -> target_new.str
    assert sr.portability == (("Mary Eliza Wright passed away in", "Birmingham"),)
    oh = units["one_hop:4482"]
    assert oh.data["request"].portability == (
        ("What famous food is associated with the city where Spike Hughes originates from?", "Cheesesteaks"),)
    assert oh.data["aux"].locality == (("What is Spike Hughes an instance of?", "human"),)
    _, state = suite.unedited(lm, oh)
    pair = oh.data["aux"].locality[0]
    before = argmax_ids(lm, [pair])[0]
    editing = Editing(lm, "ft", ft_hparams(lm, {"layer": 0, "steps": 6, "lr": 0.05}))
    try:
        post = suite.edited(editing, oh, state)
        after = argmax_ids(editing.system, [pair])[0]
    finally:
        editing.undo(0)
    assert post["one_hop.other_attribution"] == pytest.approx(agreement(after, before))


def test_other_attribution_join_needs_the_same_edit(data_root, tmp_path):
    for rel in ("counterfact/counterfact_portability_gpt4.json", "counterfact/counterfact_subject_replace.json"):
        _copy(data_root, tmp_path, rel)

    def other_edit(recs):
        recs[0]["requested_rewrite"]["target_new"]["str"] = "Tokyo"

    _copy(data_root, tmp_path, "counterfact/counterfact_distracting_neighbor.json", other_edit, n=804)
    units = {u.key: u for u in CounterFactSuite().load(tmp_path)}
    assert units["one_hop:4482"].data["aux"] is None  # same case_id, another edit: not joined
    assert units["subject_replace:4496"].data["aux"] is not None


def test_zsre_probes(data_root):
    units = {u.key: u for u in ZsreSuite().load(data_root, 1)}
    assert units["inverse_relation:0"].data["request"].portability == (("Who is Marian Clairmont's sister?", "Claire Clairmont"),)
    assert units["subject_replace:0"].data["request"].portability == (("What is the constellation of UGC 6870?", "Triangulum"),)
    assert units["one_hop:0"].data["request"].locality == (("what is the name of the last episode of spongebob", "The String"),)


def test_fluency_option(lm, data_root):
    suite = CounterFactSuite(fluency=True, seed=3)
    unit = suite.load(data_root, 1)[0]
    row1, _ = suite.unedited(lm, unit)
    row2, _ = suite.unedited(lm, unit)
    assert row1["one_hop.fluency"] > 0 and row1["one_hop.fluency"] == row2["one_hop.fluency"]  # seeded per record
    assert "one_hop.fluency" not in CounterFactSuite().unedited(lm, unit)[0]  # off by default


# ------------------------------------------------------------------ records lacking fields

@pytest.mark.parametrize("suite_cls, rel, drop, field", [
    (CounterFactSuite, "counterfact/counterfact_subject_replace.json", "alternative_subject", "alternative_subject"),
    (ZsreSuite, "zsre/zsre_inverse_relation.json", "inverse question", "inverse question"),
    (KnowEditSuite, "knowedit/wiki_recent_recent_train.json", None, "locality.Relation_Specificity.0.ground_truth"),
])
def test_record_lacking_a_field(data_root, tmp_path, suite_cls, rel, drop, field):
    for other in suite_cls.files.values():
        if other != rel:
            _copy(data_root, tmp_path, other, n=804 if "distracting" in other else 3)

    def damage(recs):
        if drop:
            del recs[1][drop]
        else:
            recs[1]["locality"]["Relation_Specificity"][0]["ground_truth"] = ""

    _copy(data_root, tmp_path, rel, damage)
    with pytest.raises(RecordFieldError, match=rf"{Path(rel).name} record 1.*{field}"):
        suite_cls().load(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        units = suite_cls().load(tmp_path, on_bad="skip")
    split = next(s for s, r in suite_cls.files.items() if r == rel)
    assert len([u for u in units if u.split == split]) == 2
    assert any("skipped 1 record" in str(w.message) for w in caught)


def test_missing_file_names_it(data_root, tmp_path):
    shutil.copytree(data_root / "zsre", tmp_path / "zsre")
    (tmp_path / "zsre" / "zsre_inverse_relation.json").chmod(0o644)
    (tmp_path / "zsre" / "zsre_inverse_relation.json").unlink()
    from editlab.errors import DataFormatError

    with pytest.raises(DataFormatError, match="zsre_inverse_relation.json"):
        ZsreSuite().load(tmp_path)


# ------------------------------------------------------------------ the real model

@pytest.mark.slow
def test_rome_on_smollm2_edits_but_does_not_port_through_an_alias(smollm2, data_root, tmp_path):
    # measured: ROME reaches ES = PS = edit_succ = 1 on case 4482 (unedited 0), and, keyed on the
    # subject's tokens, leaves the edit unreachable through another name of the subject (case 4496)
    suite = CounterFactSuite()
    units = suite.load(data_root, 1)
    store, ids, rows = _run(smollm2, suite, units, tmp_path, "rome", None)
    one_hop, pre = rows["rome"]["one_hop:4482"], rows["unedited"]["one_hop:4482"]
    assert pre["one_hop.ES"] == 0.0 and one_hop["one_hop.ES"] == one_hop["one_hop.PS"] == one_hop["one_hop.edit_succ"] == 1.0
    assert rows["rome"]["subject_replace:4496"]["subject_replace.ES"] == 1.0
    assert rows["rome"]["subject_replace:4496"]["subject_replace.subject_replace"] == 0.0

