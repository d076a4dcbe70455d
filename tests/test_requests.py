import pytest

from editlab.errors import EditRequestError
from editlab.requests import EditRequest
from editlab.tokens import encode_pair, join_target, subject_last_index
from editlab.models.tiny import tiny_tokenizer


def test_valid_request_and_roundtrip():
    r = EditRequest.create("{} is located in", "Eiffel Tower", " Rome ", "Paris", 7, paraphrases=[("Where is Eiffel Tower? In", "Rome")])
    assert r.prompt == "Eiffel Tower is located in"
    assert r.target_new == "Rome" and r.case_id == "7"
    assert EditRequest.from_dict(r.to_dict()) == r


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prompt="The tower is in", subject="Eiffel Tower", target_new="Rome"), "subject"),
        (dict(prompt="Eiffel Tower is in", subject="Eiffel Tower", target_new=""), "target_new"),
        (dict(prompt="Eiffel Tower is in", subject="Eiffel Tower", target_new="   "), "target_new"),
        (dict(prompt="Eiffel Tower is in", subject="Eiffel Tower", target_new="Paris", target_true="paris"), "target_true"),
        (dict(prompt="", subject="Eiffel Tower", target_new="Rome"), "prompt"),
        (dict(prompt="Eiffel Tower is in", subject=3, target_new="Rome"), "subject"),
    ],
)
def test_invalid_requests_name_the_field(kwargs, field):
    with pytest.raises(EditRequestError, match=field):
        EditRequest.create(**kwargs)


def test_bad_probe_is_rejected():
    with pytest.raises(EditRequestError, match=r"paraphrases\[0\]"):
        EditRequest.create("Eiffel Tower is in", "Eiffel Tower", "Rome", paraphrases=["just a string"])


def test_join_target_spacing():
    assert join_target("The city of", "Paris") == " Paris"
    assert join_target("The city of ", "Paris") == "Paris"
    assert join_target("Q?", " A") == " A"


def test_encode_pair_matches_joint_tokenization():
    tok = tiny_tokenizer()
    p_ids, t_ids = encode_pair(tok, "The Eiffel Tower is located in the city of", "Paris")
    full = tok("The Eiffel Tower is located in the city of Paris")["input_ids"]
    assert p_ids + t_ids == full
    assert tok.decode(t_ids) == " Paris"


def test_subject_last_index_points_at_subject_end():
    tok = tiny_tokenizer()
    prompt = "I think the Eiffel Tower is located in"
    i = subject_last_index(tok, prompt, "Eiffel Tower")
    ids = tok(prompt)["input_ids"]
    assert tok.decode(ids[: i + 1]).endswith("Tower")
    assert not tok.decode(ids[: i]).endswith("Tower")
