import json

import pytest

from editlab.data import DATASETS, load_requests, parse_records
from editlab.errors import DataFormatError

FULL = {
    "case_id": 3,
    "requested_rewrite": {"prompt": "{} is located in", "subject": "Eiffel Tower",
                          "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
    "paraphrase_prompts": ["Where is the Eiffel Tower? The Eiffel Tower is in"],
    "neighborhood_prompts": ["The Louvre is located in"],
    "portability": {"New Question": "Which country is the Eiffel Tower in?", "New Answer": "Italy"},
}
COMPACT = {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "target_new": "English",
           "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux speaks", "locality_prompt": "Michel Rocard speaks",
           "locality_ground_truth": "French"}
ZSRE = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
        "rephrase": "What does UniFirst make?", "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}


def write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return p


def test_counterfact_full_format(tmp_path):
    (r,) = load_requests(write(tmp_path, "cf.json", [FULL]))
    assert r.prompt == "Eiffel Tower is located in" and r.target_new == "Rome" and r.target_true == "Paris"
    assert r.paraphrases == (("Where is the Eiffel Tower? The Eiffel Tower is in", "Rome"),)
    assert r.neighborhood == (("The Louvre is located in", "Paris"),)
    assert r.portability == (("Which country is the Eiffel Tower in?", "Italy"),)
    assert r.case_id == "3"


def test_compact_and_zsre_formats(tmp_path):
    (c,) = load_requests(write(tmp_path, "c.json", [COMPACT]))
    assert c.paraphrases == (("Danielle Darrieux speaks", "English"),) and c.neighborhood == (("Michel Rocard speaks", "French"),)
    (z,) = load_requests(write(tmp_path, "z.jsonl", json.dumps(ZSRE) + "\n"))
    assert z.prompt == ZSRE["src"] and z.target_new == "unmanned aircraft" and z.target_true == "uniform"
    assert z.locality == (("who wrote hamlet", "Shakespeare"),)


def test_not_json_names_the_file(tmp_path):
    p = write(tmp_path, "bad.json", "{not json")
    with pytest.raises(DataFormatError, match="bad.json.*not valid JSON"):
        load_requests(p)


def test_missing_field_names_file_record_and_field(tmp_path):
    broken = json.loads(json.dumps(FULL))
    del broken["requested_rewrite"]["subject"]
    p = write(tmp_path, "cf.json", [FULL, broken])
    with pytest.raises(DataFormatError, match=r"cf.json: record 1 lacks field 'requested_rewrite.subject'"):
        load_requests(p)


def test_invalid_record_is_skipped_with_warning_or_raises_when_strict(tmp_path):
    bad = dict(ZSRE, src="What does the company make?")
    p = write(tmp_path, "z.json", [ZSRE, bad])
    with pytest.warns(UserWarning, match="skipped 1 invalid record.*record 1"):
        assert len(load_requests(p)) == 1
    with pytest.raises(DataFormatError, match="record 1: subject"):
        load_requests(p, strict=True)


def test_unknown_dataset_and_limit(tmp_path):
    with pytest.raises(DataFormatError, match="unknown dataset 'nope'"):
        load_requests("nope")
    with pytest.raises(DataFormatError, match="limit"):
        load_requests(write(tmp_path, "c.json", [COMPACT]), limit=0)
    with pytest.warns(UserWarning, match="only 1 available"):
        assert len(load_requests(write(tmp_path, "c2.json", [COMPACT]), limit=5)) == 1
    with pytest.raises(DataFormatError, match="cannot tell the format"):
        parse_records([{"foo": 1}])
    with pytest.raises(DataFormatError, match="not found"):
        load_requests(tmp_path / "missing.json", format="zsre")


EXPECTED = {"counterfact": 766, "counterfact-edit": 10000, "zsre": 1037, "knowedit-zsre": 1301, "knowedit-counterfact": 1428}


@pytest.mark.parametrize("name", sorted(n for n in DATASETS.names() if n != "builtin"))
def test_real_benchmark_files_load(name, data_root):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reqs = load_requests(name)
    assert len(reqs) > 100
    if name in EXPECTED:
        assert len(reqs) == EXPECTED[name]
    assert all(r.subject in r.prompt for r in reqs)
    if name == "counterfact":
        assert all(len(r.neighborhood) == 10 and len(r.paraphrases) == 2 and r.portability for r in reqs)
