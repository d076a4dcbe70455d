"""The method catalogue (`editlab.methods.catalogue`) names each method's editor and hyper-parameter
classes without importing them; these tests hold it to the classes themselves, and hold the torch-free
modules the CLI checks with to being torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest

from editlab.errors import UnknownMethodError
from editlab.methods import get_editor
from editlab.methods.catalogue import METHODS, can_batch, hparams_class


@pytest.mark.parametrize("name", METHODS.names())
def test_catalogue_entry_agrees_with_its_editor(name):
    editor = get_editor(name)
    assert editor.hparams_cls is hparams_class(name)
    assert editor.supports_batch is can_batch(name)
    assert editor.requires_training is bool(METHODS.entry(name).meta.get("trained"))  # `editlab train` reads it
    for alias in METHODS.entry(name).aliases:
        assert hparams_class(alias) is editor.hparams_cls


def test_unknown_method_is_refused_by_the_catalogue():
    with pytest.raises(UnknownMethodError, match="unknown method 'nope'; available: ft"):
        hparams_class("nope")
    with pytest.raises(UnknownMethodError):
        can_batch("")


COLD = """
import sys
from editlab.methods.catalogue import METHODS, hparams_class
from editlab.models.sources import MODELS, check_device, check_model_source, dtype_name
from editlab.runner.config import MODES, RunConfig
from editlab.methods.edit_folder import check_save_target
from editlab.tracing.kinds import parse_kinds
for name in METHODS.names():
    hparams_class(name).from_dict({})  # every class builds from its defaults
check_model_source("smollm2-135m"); dtype_name("bf16"); check_device("cpu"); parse_kinds("hidden,mlp")
print(sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules))
"""


def test_checks_before_the_model_need_no_torch():
    out = subprocess.run([sys.executable, "-c", COLD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
