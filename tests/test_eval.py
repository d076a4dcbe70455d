"""Metrics against values computed by hand on a tiny, fully specified case."""

import math

import pytest
import torch

from editlab.eval import evaluate_request, ngram_entropy, pre_edit, summarize
from editlab.models.lm import ContinuationScore
from editlab.requests import EditRequest


class FakeLM:
    """Returns fixed per-token log-probs / argmax ids for each (prompt, continuation)."""

    def __init__(self, table):
        self.table = table

    def score(self, prompts, conts):
        out = []
        for p, c in zip(prompts, conts):
            lps, tgt, arg = self.table[(p, c)]
            out.append(ContinuationScore(target_ids=tgt, logprobs=torch.tensor(lps), argmax_ids=arg))
        return out


REQ = EditRequest.create(
    "Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris",
    paraphrases=[("The Eiffel Tower lies in", "Rome"), ("Eiffel Tower, located in", "Rome")],
    neighborhood=[("The Louvre is in", "Paris")],
    portability=[("Eiffel Tower's country is", "Italy")],
)

BEFORE = {("The Louvre is in", "Paris"): ([-0.1], [7], [7])}
AFTER = {
    ("Eiffel Tower is in", "Rome"): ([-1.0], [5], [5]),
    ("Eiffel Tower is in", "Paris"): ([-2.0], [7], [5]),
    ("The Eiffel Tower lies in", "Rome"): ([-0.5, -0.5], [5, 6], [5, 9]),  # P = e^-0.5
    ("The Eiffel Tower lies in", "Paris"): ([-0.2], [7], [5]),  # P = e^-0.2 > e^-0.5: failure
    ("Eiffel Tower, located in", "Rome"): ([-0.1], [5], [5]),
    ("Eiffel Tower, located in", "Paris"): ([-3.0], [7], [5]),
    ("The Louvre is in", "Rome"): ([-4.0], [5], [7]),
    ("The Louvre is in", "Paris"): ([-0.3], [7], [3]),  # argmax changed: locality 0
    ("Eiffel Tower's country is", "Italy"): ([-0.7, -0.1], [11, 12], [11, 13]),
}


def test_metrics_match_hand_computation():
    pre = pre_edit(FakeLM(BEFORE), [REQ])
    m = evaluate_request(FakeLM(AFTER), REQ, pre)
    e = math.exp
    assert m["efficacy_score"] == 1.0
    assert m["efficacy_magnitude"] == pytest.approx(e(-1) - e(-2))
    assert m["paraphrase_score"] == 0.5
    assert m["paraphrase_magnitude"] == pytest.approx(((e(-0.5) - e(-0.2)) + (e(-0.1) - e(-3.0))) / 2)
    assert m["neighborhood_score"] == 1.0
    assert m["neighborhood_magnitude"] == pytest.approx(e(-0.3) - e(-4.0))
    assert m["rewrite_acc"] == 1.0
    assert m["rephrase_acc"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["locality_acc"] == 0.0
    assert m["portability_acc"] == 0.5


def test_locality_needs_pre_edit_values():
    with pytest.raises(KeyError, match="pre_edit"):
        evaluate_request(FakeLM(AFTER), REQ, pre_edit(FakeLM({}), []))


def test_summarize_means_and_harmonic_score():
    rows = [
        {"efficacy_score": 1.0, "paraphrase_score": 0.5, "neighborhood_score": 1.0},
        {"efficacy_score": 0.0, "paraphrase_score": 0.5, "neighborhood_score": 0.5, "portability_acc": 1.0},
    ]
    s = summarize(rows)
    assert s["efficacy_score"] == 0.5 and s["neighborhood_score"] == 0.75 and s["portability_acc"] == 1.0
    assert s["cf_score"] == pytest.approx(3 / (1 / 0.5 + 1 / 0.5 + 1 / 0.75))


def test_ngram_entropy_hand_value():
    # words a b a b: bigrams {ab: 2, ba: 1} -> H2 = 0.9183; trigrams {aba, bab} -> H3 = 1
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("the the the the the") < ngram_entropy("the cat sat on a mat")


def test_generation_exact_match_on_tiny_model():
    from editlab.eval import generation_exact_match
    from editlab.models import load_lm

    lm = load_lm("tiny-trained-llama")
    greedy = lm.generate(["Michael Jordan plays"], 3)[0]
    assert generation_exact_match(lm, ["Michael Jordan plays", "Michael Jordan plays"], [greedy.strip(), "zebra"]) == [1.0, 0.0]
