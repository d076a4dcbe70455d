"""Flushing subnormal floats: on inside the block, the previous state after it, and no change to a KN
edit of a healthy model (whose numbers never get that small)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from editlab.methods import get_editor
from editlab.methods.locate import kn
from editlab.models import load_lm
from editlab.numerics import flush_denormals, flushing_denormals
from editlab.requests import EditRequest

SUBNORMAL = torch.tensor([1e-39], dtype=torch.float32)


@pytest.fixture(autouse=True)
def _flushing_off():
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)


def test_subnormals_are_flushed_inside_the_block_and_kept_after_it():
    assert float(SUBNORMAL.mul(1.0)) > 0 and not flushing_denormals()
    with flush_denormals() as on:
        if not on:
            pytest.skip("this CPU cannot flush subnormals")
        assert float(SUBNORMAL.mul(1.0)) == 0.0 and flushing_denormals()
    assert float(SUBNORMAL.mul(1.0)) > 0 and not flushing_denormals()


def test_a_caller_who_flushes_already_keeps_flushing():
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    with flush_denormals() as on:
        assert on
    assert flushing_denormals()


def test_the_previous_state_is_restored_when_the_block_raises():
    with pytest.raises(RuntimeError), flush_denormals():
        raise RuntimeError("boom")
    assert not flushing_denormals()


def test_kn_edit_of_a_healthy_model_is_the_same_with_and_without_flushing(monkeypatch):
    req = EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")
    lm = load_lm("tiny-trained-llama")
    editor = get_editor("kn")

    def deltas() -> dict[str, torch.Tensor]:
        edit = editor.apply(lm, req, layers=[0, 1, 2, 3])
        after = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
        edit.restore()
        return after

    seen: list[bool] = []

    @contextlib.contextmanager
    def watched():
        with flush_denormals() as on:
            seen.append(flushing_denormals() == on)
            yield on

    monkeypatch.setattr(kn, "flush_denormals", watched)
    flushed = deltas()
    assert seen == [True]  # the attribution ran inside the block
    assert not flushing_denormals()  # the edit gave the setting back
    monkeypatch.setattr(kn, "flush_denormals", contextlib.nullcontext)
    plain = deltas()
    assert flushed.keys() == plain.keys()
    assert all(torch.equal(flushed[k], plain[k]) for k in flushed)
