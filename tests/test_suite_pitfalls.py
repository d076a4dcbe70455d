"""The `conflict` (ConflictEdit) and `distortion` (RoundEdit) suites: the per-record formulas against the
spec's worked examples (section 2.1, 2.2), the records read as the spec describes them, each protocol on
the tiny trained model, and bad input."""

import json
import shutil
import warnings

import pytest

from editlab.errors import CannotExtendError, DataFormatError
from editlab.methods import get_editor
from editlab.models import load_lm
from editlab.runner.store import Store
from editlab.suites import SuiteError, metric_info
from editlab.suites.base import Editing, RecordFieldError
from editlab.suites.conflict import Conflict, beats, conflict_magnitude, read_relation_prompts, tied_fact_damage
from editlab.suites.distortion import Distortion, DistortionMLE, distortion_metrics, round_success
from editlab.suites.runner import UNEDITED, SuitePlan, run_suite, suite_summary
from editlab.suites.scoring import fact_probs

FT_M = {"layer": 0, "steps": 30, "lr": 0.01}


@pytest.fixture(scope="module")
def lm():
    return load_lm("tiny-trained-llama")


def _records(root, name):
    return json.loads((root / "pitfalls" / name).read_text())


# --- per-record formulas: the spec's worked examples ----------------------------------------------------------
def test_conflict_formulas_match_the_reverse_worked_example():
    # P̄_θ'(k_o)=0.40, P̄_θ''(k_o)=0.30, P̄_θ''(k_f,exp)=0.50, P̄_θ''(k_f,imp)=0.01
    assert beats(0.50, 0.30) == 1.0  # CS_exp
    assert beats(0.01, 0.30) == 0.0  # CS_imp
    assert conflict_magnitude(0.40, 0.30) == pytest.approx(0.25)
    assert beats(0.3, 0.3) == 0.0  # a tie is not a win


def test_conflict_magnitude_is_clipped_at_minus_one_and_tfd_is_not():
    assert conflict_magnitude(0.1, 0.5) == -1.0  # raw value −4
    assert conflict_magnitude(0.1, 0.15) == pytest.approx(-0.5)
    assert tied_fact_damage(0.2, 0.05) == pytest.approx(0.75)
    assert tied_fact_damage(0.2, 0.5) == pytest.approx(-1.5)
    with pytest.raises(ValueError):
        conflict_magnitude(0.0, 0.1)


def test_distortion_metrics_match_the_roundedit_worked_example():
    out = distortion_metrics([0.020, 0.010, 0.005], [0.060, 0.004, 0.006])
    assert out["D"] == pytest.approx(0.05958, abs=1e-5)
    assert out["D_repo"] == pytest.approx(0.01986, abs=1e-5)
    assert out["IR"] == 0.5  # only the first other object fell
    assert out["FR"] == 0.0  # 1[0.5 > 0.5]
    worse = distortion_metrics([0.02, 0.01, 0.005, 0.004], [0.06, 0.004, 0.001, 0.009])
    assert worse["IR"] == pytest.approx(2 / 3) and worse["FR"] == 1.0
    same_shape = distortion_metrics([0.2, 0.1], [0.4, 0.2])  # both doubled: no distortion, nothing fell
    zero = pytest.approx(0.0, abs=1e-12)
    assert same_shape == {"D": zero, "D_repo": zero, "IR": 0.0, "FR": 0.0}
    with pytest.raises(ValueError):
        distortion_metrics([0.2], [0.3])


def test_round_success_gives_half_a_point_per_leg():
    assert round_success(p1_a=0.1, p1_b=0.3, p2_a=0.4, p2_b=0.2) == 1.0
    assert round_success(p1_a=0.3, p1_b=0.1, p2_a=0.4, p2_b=0.2) == 0.5
    assert round_success(p1_a=0.1, p1_b=0.3, p2_a=0.1, p2_b=0.2) == 0.5
    assert round_success(p1_a=0.3, p1_b=0.3, p2_a=0.2, p2_b=0.2) == 0.0


# --- records read as the spec describes them ---------------------------------------------------------------------
def test_conflict_records_give_the_worked_example_facts(data_root):
    units = {u.key: u for u in Conflict().load(data_root, 1)}
    assert list(units) == ["coverage:0", "reverse:0", "composite:0"]
    p800 = read_relation_prompts(data_root / "pitfalls" / "GPT2-XL_conflict_prompts.json")["P800"]
    rev = units["reverse:0"].data
    assert rev.e1.prompt == "The notable work of Francisco de Goya is"
    assert rev.e1.target_new == "landscape with fighting bulls"
    assert rev.e2.subject == "landscape with fighting bulls" and rev.e2.target_new == "Richard Strauss"
    assert rev.k_o == (("The notable work of Francisco de Goya is", *[p.format("Francisco de Goya") for p in p800]),
                       "landscape with fighting bulls")
    assert len(rev.k_o[0]) == 11
    assert rev.k_exp[1] == "Richard Strauss" and rev.k_exp[0][0] == "The creater of landscape with fighting bulls is"
    assert rev.k_imp == (tuple(p.format("Richard Strauss") for p in ("The notable work of {} is", *p800)),
                         "landscape with fighting bulls")
    comp = units["composite:0"].data
    assert comp.tied[0][0] == "The mother of Archduchess Maria Josepha of Austria is"
    assert comp.tied[1] == "Maria Theresa of Austria"
    assert comp.k_imp[0][0] == "The spouse of Maria Theresa of Austria is" and comp.k_imp[1] == "John Forbes-Robertson"
    cov = units["coverage:0"].data
    assert (cov.k_o[1], cov.k_exp[1]) == ("Ludwig Cromme", "Heinz Prüfer") and cov.k_o[0] == cov.k_exp[0]
    assert cov.old_on_e2 == (cov.k_exp[0], "Ludwig Cromme") and cov.e1.target_true == "Mansour M'henni"


def test_an_edit_asserting_the_existing_fact_is_kept_without_target_true(data_root):
    prompts = read_relation_prompts(data_root / "pitfalls" / "GPT2-XL_conflict_prompts.json")
    rec = _records(data_root, "GPT2-XL_coverage_edit.json")[2356]  # edits[0]: Chiara Monfardini -> Chiara Monfardini
    case = Conflict._unit("coverage", prompts, 2356, rec, "record 2356").data
    assert case.e1.target_new == "Chiara Monfardini" and case.e1.target_true is None
    assert case.e2.target_true == "Chiara Monfardini"


def test_roundedit_records_deduplicate_true_objects(data_root):
    units = Distortion().load(data_root, 1)
    assert [u.key for u in units] == ["easy:0", "hard:0"]
    case = units[0].data
    assert case.prompts[0] == "fpart has use(s), such as" and len(case.prompts) == 11
    assert (case.a, case.b) == ("data migration", "franking")
    assert case.others == ("data synchronization", "computer file management")
    assert case.there.target_true == "data migration" and case.back.target_new == "data migration"
    prompts = read_relation_prompts(data_root / "pitfalls" / "GPT2-XL_round_prompts.json")
    rec = _records(data_root, "GPT2-XL_easy.json")[2229]  # true objects: Cirebon, West Java, Indonesia, Cirebon
    dup = Distortion._unit("easy", prompts, 2229, rec, "record 2229").data
    assert dup.a == "Cirebon" and dup.others == ("West Java", "Indonesia")
    assert [r.target_new for r in dup.back_multi] == ["Cirebon", "West Java", "Indonesia"]


# --- whole protocols on the tiny trained model ---------------------------------------------------------------------
def _run(lm, suite, units, tmp_path, method="ft-m"):
    plan = SuitePlan(suite=suite, units=units, methods=[method], data={}, limit=None, on_bad="stop")
    store = Store(tmp_path / "r.db")
    ids = run_suite(lm, plan, store, hparams={method: FT_M})
    rows = {m: {r.row_key: r.metrics for r in store.rows(rid)} for m, rid in ids.items()}
    return rows, {m: suite_summary(store, rid, suite) for m, rid in ids.items()}


def _in_range(name, value):
    info = metric_info(name)
    return (info.lo is None or value >= info.lo) and (info.hi is None or value <= info.hi)


def test_conflict_protocol_on_three_records_restores_the_model(lm, data_root, tmp_path):
    suite = Conflict()
    units = suite.load(data_root, 1)
    before = lm.fingerprint()
    rows, summary = _run(lm, suite, units, tmp_path)
    assert lm.fingerprint() == before and not lm.active_edits
    post, pre = summary["ft-m"], summary[UNEDITED]
    for name in Conflict.metrics:
        assert name in post and _in_range(name, post[name]), name
    assert set(pre) - {"n"} == {"coverage.CS", "coverage.Succ_single", "reverse.CS_exp", "reverse.CS_imp",
                                "composite.CS_exp", "composite.CS_imp"}  # no CM, no TFD on θ
    assert set(rows["ft-m"]["reverse:0"]) == {"reverse.CS_exp", "reverse.CS_imp", "reverse.CM"}
    # FT-M's second edit wins when applied alone and pulls the first edit's fact down when stacked on it
    assert post["coverage.Succ_single"] == 1.0 and post["reverse.CS_exp"] == 1.0
    assert post["coverage.CM"] > 0 and post["reverse.CM"] > 0 and post["composite.CM"] > 0


def test_conflict_scores_theta_double_prime_then_theta_prime(lm, data_root):
    """The protocol by hand (e₁, e₂ on top, undo to after e₁) gives the suite's CM, CS and TFD."""
    suite = Conflict()
    unit = next(u for u in suite.load(data_root, 1) if u.split == "composite")
    case = unit.data
    hp = get_editor("ft-m").hparams(lm, **FT_M)
    pre_metrics, state = suite.unedited(lm, unit)
    ed = Editing(lm, "ft-m", hp)
    try:
        got = suite.edited(ed, unit, state)
        assert ed.n_edits == 2 and len(ed.stack) == 1  # left on θ' for the runner to undo
    finally:
        ed.undo()
    assert state == pytest.approx(fact_probs(lm, [case.tied])[0])
    ed = Editing(lm, "ft-m", hp)
    try:
        ed.push([case.e1])
        p1 = fact_probs(ed.system, [case.k_o])[0]
        ed.push([case.e2])
        p_o, p_exp, p_imp, p_t = fact_probs(ed.system, [case.k_o, case.k_exp, case.k_imp, case.tied])
    finally:
        ed.undo()
    assert got["composite.CM"] == pytest.approx(conflict_magnitude(p1, p_o), rel=1e-4, abs=1e-6)
    assert got["composite.TFD"] == pytest.approx(tied_fact_damage(state, p_t), rel=1e-4, abs=1e-6)
    assert got["composite.CS_exp"] == beats(p_exp, p_o) and got["composite.CS_imp"] == beats(p_imp, p_o)
    assert p1 != pytest.approx(p_o, rel=1e-3)  # θ' and θ'' really are different models


def test_coverage_succ_single_is_scored_with_the_second_edit_alone(lm, data_root):
    """Succ_single reads θ₃ = θ + e₂ only (not θ''): the protocol makes a third edit on the restored model."""
    suite = Conflict()
    unit = next(u for u in suite.load(data_root, 1) if u.split == "coverage")
    case = unit.data
    hp = get_editor("ft-m").hparams(lm, **FT_M)
    _, state = suite.unedited(lm, unit)
    ed = Editing(lm, "ft-m", hp)
    try:
        got = suite.edited(ed, unit, state)
        assert ed.n_edits == 3
    finally:
        ed.undo()
    ed = Editing(lm, "ft-m", hp)
    try:
        ed.push([case.e2])
        p_new, p_old = fact_probs(ed.system, [case.k_exp, case.old_on_e2])
    finally:
        ed.undo()
    assert got["coverage.Succ_single"] == beats(p_new, p_old)


def test_distortion_protocol_on_three_records_restores_the_model(lm, data_root, tmp_path):
    suite = Distortion()
    units = suite.load(data_root, 2)[:3]
    before = lm.fingerprint()
    rows, summary = _run(lm, suite, units, tmp_path)
    assert lm.fingerprint() == before and not lm.active_edits
    post = summary["ft-m"]
    for name in Distortion.metrics:
        assert name in post and _in_range(name, post[name]), name
    assert set(summary[UNEDITED]) == {"n"}  # nothing on θ says anything (D = IR = FR = 0, Succ = ½ by definition)
    for key, row in rows["ft-m"].items():
        n_objects = 1 + len(next(u for u in units if u.key == key).data.others)
        split = key.split(":")[0]
        assert row[f"{split}.D_repo"] == pytest.approx(row[f"{split}.D"] / n_objects)
        assert row[f"{split}.D"] > 0  # the round trip moved the distribution
    assert post["easy.Succ"] == 1.0  # FT-M wins both legs


def test_mle_needs_a_batch_method_and_makes_one_batch_edit_back(lm, data_root):
    with pytest.raises(SuiteError, match="one request at a time"):
        DistortionMLE().check_method(get_editor("rome"))
    Distortion().check_method(get_editor("rome"))  # the plain round trip takes any method that re-edits a prompt
    suite = DistortionMLE()
    unit = suite.load(data_root, 1)[0]
    ed = Editing(lm, "ft-m", get_editor("ft-m").hparams(lm, **FT_M))
    before = lm.fingerprint()
    try:
        _, state = suite.unedited(lm, unit)
        out = suite.edited(ed, unit, state)
        # two edit calls (the way back was one batch edit), and the model is left on θ' for the runner to undo
        assert ed.n_edits == 2 and [len(e.requests) for e in lm.active_edits] == [1]
    finally:
        ed.undo()
    assert lm.fingerprint() == before
    assert set(out) == {"easy.Succ", "easy.D", "easy.D_repo", "easy.IR", "easy.FR"}


def test_a_method_that_refuses_to_re_edit_a_prompt_is_refused_by_the_round_trip_before_any_work(lm, data_root):
    """MELO refuses to edit, within a sequence, an input it already edited to another answer; every RoundEdit
    record's way back is such an edit, so the suite refuses the method up front instead of failing each record."""
    melo = get_editor("melo")
    assert not melo.reedits_prompts and get_editor("grace").reedits_prompts
    for suite in (Distortion(), DistortionMLE()):
        with pytest.raises(SuiteError, match="already edited to another answer"):
            suite.check_method(melo)
    # the reason is real: the way back of a round trip is refused by MELO itself
    unit = Distortion().load(data_root, 1)[0]
    ed = Editing(lm, "melo", melo.hparams(lm, layers=[2], steps=5))
    before = lm.fingerprint()
    _, state = Distortion().unedited(lm, unit)
    try:
        with pytest.raises(CannotExtendError, match="already edited to another answer"):
            Distortion().edited(ed, unit, state)
        assert len(ed.stack) == 1  # a→b was made; b→a on top of it was refused and left nothing
    finally:
        ed.undo()
    assert lm.fingerprint() == before and not lm.active_edits


# --- bad input ---------------------------------------------------------------------------------------------------
def _copy_pitfalls(data_root, tmp_path, name, records):
    (tmp_path / "pitfalls").mkdir()
    for f in (data_root / "pitfalls").iterdir():
        if f.name != name:
            shutil.copy(f, tmp_path / "pitfalls" / f.name)
    (tmp_path / "pitfalls" / name).write_text(json.dumps(records))


def test_conflict_record_lacking_a_field_stops_or_is_skipped(data_root, tmp_path):
    recs = _records(data_root, "GPT2-XL_reverse_edit.json")[:3]
    del recs[1]["edits"][1]["new_object"]
    _copy_pitfalls(data_root, tmp_path, "GPT2-XL_reverse_edit.json", recs)
    named = r"GPT2-XL_reverse_edit.json record 1 edits\[1\]: missing field 'new_object.label'"
    with pytest.raises(RecordFieldError, match=named):
        Conflict().load(tmp_path, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        units = Conflict().load(tmp_path, 3, on_bad="skip")
    assert [u.key for u in units if u.split == "reverse"] == ["reverse:0", "reverse:2"]
    assert any("skipped 1 record" in str(w.message) for w in caught)


def test_conflict_relation_without_paraphrases_is_named(data_root, tmp_path):
    recs = _records(data_root, "GPT2-XL_composite_edit.json")[:1]
    recs[0]["triples"][0]["relation"]["id"] = "P9999"
    _copy_pitfalls(data_root, tmp_path, "GPT2-XL_composite_edit.json", recs)
    with pytest.raises(RecordFieldError, match=r"record 0 triples\[0\]: relation.id 'P9999' has no paraphrases"):
        Conflict().load(tmp_path, 1)


def test_roundedit_record_lacking_true_objects_stops_or_is_skipped(data_root, tmp_path):
    recs = _records(data_root, "GPT2-XL_hard.json")[:2]
    del recs[0]["true_objects"]
    _copy_pitfalls(data_root, tmp_path, "GPT2-XL_hard.json", recs)
    with pytest.raises(RecordFieldError, match="GPT2-XL_hard.json record 0: missing field 'true_objects'"):
        Distortion().load(tmp_path, 2)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        units = Distortion().load(tmp_path, 2, on_bad="skip")
    assert [u.key for u in units] == ["easy:0", "easy:1", "hard:1"]


def test_missing_prompts_file_is_named(data_root, tmp_path):
    _copy_pitfalls(data_root, tmp_path, "GPT2-XL_round_prompts.json", {})
    (tmp_path / "pitfalls" / "GPT2-XL_round_prompts.json").unlink()
    with pytest.raises(DataFormatError, match="GPT2-XL_round_prompts.json.*EDITLAB_DATA"):
        Distortion().load(tmp_path)
    (tmp_path / "pitfalls" / "GPT2-XL_round_prompts.json").write_text('{"P366": "not a list"}')
    with pytest.raises(DataFormatError, match="P366"):
        Distortion().load(tmp_path)


def test_every_announced_metric_has_metadata():
    for suite in (Conflict, Distortion, DistortionMLE):
        for name in suite.metrics:
            metric_info(name)


def test_conflict_records_coverage_as_not_run_for_a_method_that_refuses_re_edits(lm, data_root, tmp_path):
    """ConflictEdit's coverage records re-edit the prompt they just edited, which MELO refuses; those units
    are stored as errors with the reason and no edit, once warned, while reverse and composite run."""
    suite = Conflict()
    units = suite.load(data_root, 1)
    melo = get_editor("melo")
    assert [u.split for u in units if suite.refuses_unit(melo, u)] == ["coverage"]
    assert not [u for u in units if suite.refuses_unit(get_editor("grace"), u)]
    plan = SuitePlan(suite=suite, units=units, methods=["melo"], data={}, limit=None, on_bad="stop")
    store = Store(tmp_path / "r.db")
    before = lm.fingerprint()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = run_suite(lm, plan, store, hparams={"melo": {"layers": [2], "steps": 5}})
    assert lm.fingerprint() == before and not lm.active_edits
    rows = {r.row_key: r for r in store.rows(ids["melo"])}
    cov = rows["coverage:0"]
    assert cov.kind == "error" and cov.n_edits == 0 and "not run" in cov.metrics["error"]
    assert rows["reverse:0"].kind == "suite" and rows["composite:0"].kind == "suite"
    assert len([w for w in caught if "not run on conflict coverage" in str(w.message)]) == 1
