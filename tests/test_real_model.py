"""Quality checks on the real embedded model (SmolLM2-135M-Instruct). Slow, still run in CI."""

import pytest
import torch

from editlab import EditRequest, get_editor
from editlab.eval import evaluate_requests, pre_edit, summarize

pytestmark = pytest.mark.slow

EIFFEL = EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")
UNRELATED = ["The capital of France is", "The Louvre is located in the city of"]


def test_embedded_model_knows_paris(smollm2):
    assert smollm2.generate([EIFFEL.prompt], 4)[0].strip().startswith("Paris")


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_edit_changes_the_fact_and_restores(smollm2, method):
    before = {k: v.clone() for k, v in smollm2.model.state_dict().items()}
    unrelated_before = smollm2.generate(UNRELATED, 3)
    edit = get_editor(method).apply(smollm2, EIFFEL)
    try:
        assert smollm2.generate([EIFFEL.prompt], 3)[0].strip().startswith("Rome")
        assert smollm2.generate(["The Eiffel Tower, which is in the city of"], 3)[0].strip().startswith("Rome")
        assert smollm2.generate(UNRELATED, 3) == unrelated_before
    finally:
        edit.restore()
    for k, v in smollm2.model.state_dict().items():
        assert torch.equal(before[k], v), k
    assert smollm2.generate([EIFFEL.prompt], 4)[0].strip().startswith("Paris")


def test_rome_on_counterfact_records(smollm2, data_root):
    from editlab.data import load_requests

    reqs = load_requests("counterfact", limit=6)
    pre = pre_edit(smollm2, reqs)
    rows = []
    editor = get_editor("rome")
    for r in reqs:
        with editor.apply(smollm2, r):
            rows.extend(evaluate_requests(smollm2, [r], pre))
    s = summarize(rows)
    assert s["efficacy_score"] >= 0.8
    assert s["rewrite_acc"] >= 0.6
    assert s["locality_acc"] >= 0.9
    assert smollm2.current_fingerprint() == smollm2.base_fingerprint == smollm2.fingerprint()


def test_memit_batch_on_counterfact_records(smollm2, data_root):
    from editlab.data import load_requests

    reqs = load_requests("counterfact", limit=8)
    pre = pre_edit(smollm2, reqs)
    with get_editor("memit").apply(smollm2, reqs):
        s = summarize(evaluate_requests(smollm2, reqs, pre))
    assert s["efficacy_score"] >= 0.75
    assert s["neighborhood_score"] >= 0.5
