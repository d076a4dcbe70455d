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


@pytest.fixture(scope="module", params=["tiny-trained-llama", "tiny-trained-gpt2"])  # gpt2: Conv1D layout
def lm(request):
    lm = load_lm(request.param)
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
    gen_without = lm.generate(PROMPTS, 8)
    edit = _rome(lm, FACT)
    with_edit = lm.next_token_and_score(PROMPTS, TARGETS)
    gen_with = lm.generate(PROMPTS, 8)
    differ = [i for i in range(len(PROMPTS)) if gen_without[i] != gen_with[i]]
    moved = differ[0] if differ else 0  # a prompt whose continuation the edit changed, where there is one
    assert differ or lm.name != "tiny-trained-llama"  # on llama swapped generation halves would be seen
    assert not torch.allclose(without[0], with_edit[0], atol=1e-3)  # the edit moved something to compare
    fingerprint = lm.fingerprint()
    assert pairable(lm)
    with without_and_with_top(lm):
        first, second = lm.paired_next_token_and_score(PROMPTS, TARGETS)
        gens = lm.generate([PROMPTS[moved]] * 2, 8)
    _close(first, without)
    _close(second, with_edit)
    assert gens == [gen_without[moved], gen_with[moved]]
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


def test_a_tied_parameter_is_replaced_in_every_module_that_holds_it(lm):
    """Embeddings and LM head share one parameter here: a delta on it must be taken out of both for
    the first half, or that half is silently neither state."""
    from editlab.methods.edit import Edit
    from editlab.methods.patches import WeightDelta

    restore_all(lm)
    emb = lm.model.get_input_embeddings().weight
    assert emb is lm.model.get_output_embeddings().weight
    name = next(n for n, p in lm.model.named_parameters() if p is emb)
    without = lm.next_token_and_score(PROMPTS, TARGETS)
    delta = torch.randn(emb.shape, generator=torch.Generator().manual_seed(0)) * 0.05
    edit = Edit.install(lm, "test", {}, [FACT], [WeightDelta(name, delta)])
    with_edit = lm.next_token_and_score(PROMPTS, TARGETS)
    with without_and_with_top(lm):
        first, second = lm.paired_next_token_and_score(PROMPTS, TARGETS)
    _close(first, without)
    _close(second, with_edit)
    edit.restore()
