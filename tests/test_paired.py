"""One forward pass of twice the rows for the model without and with its newest edit
(`methods.paired`): its halves equal the separate passes, the block leaves nothing behind, and
what it cannot do is refused rather than answered wrong."""

from __future__ import annotations

import pytest
import torch

from editlab.methods import get_editor, restore_all
from editlab.methods.catalogue import METHODS
from editlab.methods.paired import pairable, without_and_with_top
from editlab.models import load_lm
from editlab.requests import EditRequest

PROMPTS = ["The capital of France is", "The capital city of France is", "Toyota was founded in", "A"]
TARGETS = ["Rome", "Paris"]
FACT = EditRequest.create("The capital of France is", "France", "Rome", "Paris")
OTHER = EditRequest.create("Toyota was founded in", "Toyota", "Berlin", "Japan")


@pytest.fixture(scope="module")
def lm():
    lm = load_lm("tiny-trained-llama")
    yield lm
    restore_all(lm)


def _rome(lm, req):
    editor = get_editor("rome")
    return editor.apply(lm, req, editor.hparams(lm, **METHODS.entry("rome").meta["tiny_hparams"]))


def _close(a, b):
    (rows_a, scores_a), (rows_b, scores_b) = a, b
    assert torch.allclose(rows_a, rows_b, atol=1e-4)
    for sa, sb in zip(scores_a, scores_b):
        for x, y in zip(sa, sb):
            assert x.target_ids == y.target_ids and x.argmax_ids == y.argmax_ids
            assert torch.allclose(x.logprobs, y.logprobs, atol=1e-4)


@pytest.mark.parametrize("stacked", [False, True])
def test_halves_equal_the_model_without_and_with_its_newest_edit(lm, stacked):
    restore_all(lm)
    below = _rome(lm, OTHER) if stacked else None
    without = lm.next_token_and_score(PROMPTS, TARGETS)
    gen_without = lm.generate(PROMPTS[:1], 6)
    edit = _rome(lm, FACT)
    with_edit = lm.next_token_and_score(PROMPTS, TARGETS)
    gen_with = lm.generate(PROMPTS[:1], 6)
    assert not torch.allclose(without[0], with_edit[0], atol=1e-3)  # the edit moved something to compare
    fingerprint = lm.fingerprint()
    assert pairable(lm)
    with without_and_with_top(lm):
        first, second = lm.paired_next_token_and_score(PROMPTS, TARGETS)
        gens = lm.generate(PROMPTS[:1] * 2, 6)
    _close(first, without)
    _close(second, with_edit)
    assert gens == gen_without + gen_with
    # nothing left behind: same weights, plain passes, shared prefixes back on
    assert lm.fingerprint() == fingerprint and lm.min_shared_prefix == 128
    _close(lm.next_token_and_score(PROMPTS, TARGETS), with_edit)
    edit.restore()
    if below is not None:
        below.restore()


def test_an_odd_batch_or_an_edit_that_is_not_weight_deltas_is_refused(lm):
    restore_all(lm)
    assert not pairable(lm)
    with pytest.raises(ValueError, match="weight deltas"):
        with without_and_with_top(lm):
            pass
    edit = _rome(lm, FACT)
    with without_and_with_top(lm):
        with pytest.raises(RuntimeError, match="even batch"):
            lm.next_token_logprobs(PROMPTS[:3])
    assert torch.allclose(lm.next_token_logprobs(PROMPTS[:3]), lm.next_token_logprobs(PROMPTS[:3]))
    edit.restore()
    grace = get_editor("grace")
    edit = grace.apply(lm, FACT, grace.hparams(lm, **METHODS.entry("grace").meta.get("tiny_hparams", {})))
    assert not pairable(lm)  # a codebook beside the weights: measured apart
    edit.restore()
