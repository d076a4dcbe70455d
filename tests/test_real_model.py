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


@pytest.mark.parametrize("method", ["rome", "memit", "emmet", "pmet", "alphaedit"])
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


def test_alphaedit_moves_wikitext_keys_only_through_the_null_space(smollm2, data_root):
    """The issue's check, ‖ΔW k‖ ≈ 0 for Wikipedia keys, in the form AlphaEdit guarantees it: ΔW = ΔW·P, so
    a key of text the statistics never saw (WikiText-2 test) moves by at most ‖ΔW‖·‖P k‖, and the null
    space holds only a small part of such keys' energy. (How this compares with MEMIT: docs/benchmarks.md.)"""
    from editlab.hooks import capture
    from editlab.methods.locate.alphaedit import projector
    from editlab.stats import second_moments

    text = (data_root / "wikitext" / "wikitext-2-raw-test.txt").read_text()[:20000]
    ids = torch.tensor([smollm2.tokenizer(text, add_special_tokens=False)["input_ids"][:512]])
    editor = get_editor("alphaedit")
    hp = editor.hparams(smollm2)
    layer = hp.layers[0]
    path = smollm2.arch.mlp_out_path(layer)
    got: list[torch.Tensor] = []
    capture(smollm2.model, lambda: smollm2.model(ids), inputs={path: got.append}, stop_after=path)
    generic = got[0][0, 1:].double()
    p = projector(smollm2, layer, second_moments(smollm2, [layer], hp.corpus, hp.mom2_n_tokens)[layer], hp)
    with editor.apply(smollm2, EIFFEL, hp) as edit:
        name = smollm2.param_name(path)
        patch = next(x for x in edit.patches if getattr(x, "name", None) == name and hasattr(x, "delta"))
        d = smollm2.arch.as_matrix(patch.dense(smollm2.model.get_parameter(name))).double()
    moved = (generic @ d.T).norm(dim=1)
    bound = torch.linalg.matrix_norm(d, 2) * (generic @ p).norm(dim=1)
    assert (moved <= bound * (1 + 1e-4) + 1e-9).all()
    # the null space holds the share 1 - energy of the statistics' key energy; keys of unseen text carry
    # about as much of theirs there (not more than 1.5 times it): most of a generic key's energy cannot move
    share = float((generic @ p).norm(dim=1).pow(2).sum() / generic.norm(dim=1).pow(2).sum())
    assert hp.null_space == "energy" and share < 1.5 * (1 - hp.null_space_energy), share
