"""A saved adapter edit loads in a fresh interpreter. The wrappers (GRACE's codebook, MELO's LoRA blocks,
WISE's side memories, T-Patcher/CaliNET's side units) used to register themselves when their method's
module was imported, so `Edit.load` in a new process, before anything had imported the method, failed with
"unknown adapter wrapper". The fresh process below imports `editlab` only."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from editlab.methods import get_editor, restore_all
from editlab.models import load_lm
from editlab.requests import EditRequest

REQ = EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")
PROMPT = "The Eiffel Tower is located in the city of"
METHODS = {
    "grace": {"layer": 2, "steps": 10, "lr": 1.0},
    "melo": {"layers": [2], "steps": 10, "lr": 1e-2},
    "wise": {"layer": 2, "n_iter": 10},
    "t-patcher": {"steps": 10, "memory_size": 200, "memory_top_k": 20},
}

FRESH = """
import json, sys
import editlab
from editlab.methods import Edit
from editlab.models import load_lm
lm = load_lm("tiny-trained-llama")
out = {}
for name, folder in json.loads(sys.argv[1]).items():
    edit = Edit.load(folder, lm)
    out[name] = edit.lm.next_token_logprobs([PROMPT])[0].tolist()
    edit.restore()
print(json.dumps(out))
""".replace("PROMPT", repr(PROMPT))


def test_saved_adapter_edits_load_in_a_fresh_process(tmp_path, corpus_file):
    lm = load_lm("tiny-trained-llama")
    unedited = lm.next_token_logprobs([PROMPT])[0]
    folders, expected = {}, {}
    for name, hp in METHODS.items():
        ed = get_editor(name)
        extra = {"corpus": str(corpus_file)} if name == "t-patcher" else {}
        edit = ed.apply(lm, REQ, **hp, **extra)
        expected[name] = edit.lm.next_token_logprobs([PROMPT])[0]
        assert not torch.equal(expected[name], unedited), f"{name}: the edit changed nothing to check"
        folders[name] = str(edit.save(tmp_path / name))
        restore_all(lm)
    out = subprocess.run([sys.executable, "-c", FRESH, json.dumps(folders)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for name in METHODS:
        assert torch.allclose(torch.tensor(got[name]), expected[name].float(), atol=1e-5), name
