"""Hyper-parameter handling shared by every method: string coercion from the CLI, rejection of bad
values, and presets chosen by the model's architecture and size rather than its name."""

import pytest

from editlab.errors import HparamsError
from editlab.methods import base, get_editor, known_model
from editlab.methods.hparams import _parse_list, model_signature
from editlab.models import load_lm


@pytest.mark.parametrize("text, want", [
    ("3,4,5", [3, 4, 5]),
    ("[3, 4, 5]", [3, 4, 5]),
    ("0.5,1e-3", [0.5, 0.001]),
    ("[[5, 10], [10, 10]]", [[5, 10], [10, 10]]),
    ("a, b", ["a", "b"]),
])
def test_list_strings_are_parsed(text, want):
    assert _parse_list(text) == want


def test_non_finite_and_wrong_type_values_are_rejected():
    lm = load_lm("tiny-llama")
    ed = get_editor("ft-m")
    for bad in ("nan", "inf", float("nan")):
        with pytest.raises(HparamsError, match="lr"):
            ed.hparams(lm, lr=bad)
    with pytest.raises(HparamsError, match="steps"):
        ed.hparams(lm, steps="2.5")
    with pytest.raises(HparamsError, match="layer"):
        ed.hparams(lm, layer=[1, 2])
    wise = get_editor("wise")  # a switch takes a bool, 0 / 1 or a yes/no word, not any truthy object
    for bad in ([1], "maybe", 2, {"on": True}):
        with pytest.raises(HparamsError, match="replay"):
            wise.hparams(lm, replay=bad)
    assert wise.hparams(lm, replay=1).replay is True and wise.hparams(lm, replay="off").replay is False


def test_presets_follow_the_architecture_not_the_name(monkeypatch):
    lm = load_lm("tiny-llama")
    assert known_model(lm) is None
    ed = get_editor("ft-m")
    preset = next(iter(ed.hparams_cls.PRESETS))
    # a folder named like a known model, with other weights, gets no preset
    lm.name = f"/models/{preset}-finetuned"
    assert ed.hparams_cls.preset_name(lm) is None
    # the same weights recognised by signature get the preset, whatever the name
    monkeypatch.setitem(base.KNOWN_MODELS, preset, model_signature(lm))
    lm.name = "my-model"
    assert known_model(lm) == preset
    assert ed.hparams_cls.preset_name(lm) == preset
    want = {**ed.hparams_cls.defaults_for(lm), **ed.hparams_cls.PRESETS[preset]}
    got = ed.hparams(lm, layer=0).to_dict()  # the preset's layer may not exist in a 4-layer model
    assert all(got[k] == v for k, v in want.items() if k in got and k != "layer")


def test_smollm2_signature_is_registered():
    assert base.KNOWN_MODELS["smollm2-135m"] == ("llama", 30, 576, 49152)
