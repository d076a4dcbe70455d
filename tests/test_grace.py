"""GRACE: the codebook lookup computed by hand, the edit rules (add / expand / split), exact locality
below the radius, sequential edits sharing one codebook (retained, restored LIFO bit for bit, saved and
loaded edit by edit), and bad input refused with the model unchanged."""

from __future__ import annotations

import pytest
import torch

from editlab.errors import EditStackError, HparamsError
from editlab.methods import Edit, TableUpdate, get_editor, restore_all
from editlab.methods.adapters.grace import GraceCodebook, label_id
from editlab.models import load_lm
from editlab.requests import EditRequest

FACTS = [
    EditRequest.create("Michael Jordan plays", "Michael Jordan", "football", "basketball"),
    EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris"),
    EditRequest.create("Toyota was founded in", "Toyota", "California", "Japan"),
    EditRequest.create("Albert Einstein was born in", "Albert Einstein", "Rome", "Ulm"),
    EditRequest.create("The capital of Japan is", "Japan", "Rome", "Tokyo"),
]
UNRELATED = ["Python is a programming language.", "London is the capital of", "Marie Curie was born in"]
HP = {"layer": 2, "steps": 40, "lr": 1.0}


@pytest.fixture
def lm():
    return load_lm("tiny-trained-llama")


def _snapshot(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _argmax_first(system, req) -> bool:
    s = system.score([req.prompt], [req.target_new])[0]
    return s.argmax_ids == s.target_ids


def test_lookup_by_hand():
    base = torch.nn.Linear(3, 2)
    book = GraceCodebook(base, 3, 2)
    rows = {"keys": torch.tensor([[1.0, 0, 0], [0, 5.0, 0]]), "values": torch.tensor([[10.0, 20], [30, 40]]),
            "radii": torch.tensor([0.5, 1.0]), "labels": torch.tensor([1, 2])}
    book.update_rows(rows, torch.zeros(0, dtype=torch.long), {})
    x = torch.tensor([[[1.2, 0, 0], [0, 5.9, 0], [0, 0, 3.0], [1.6, 0, 0]]])  # in, in, out, out (0.6 > 0.5)
    out = book(x)
    plain = base(x)
    assert torch.equal(out[0, 0], torch.tensor([10.0, 20]))
    assert torch.equal(out[0, 1], torch.tensor([30.0, 40]))
    assert torch.equal(out[0, 2], plain[0, 2]) and torch.equal(out[0, 3], plain[0, 3])
    # nothing in scope: the base output itself
    far = torch.tensor([[[0.0, 0, 9], [9.0, 9, 9]]])
    assert torch.equal(book(far), base(far))


def test_edit_sets_target_and_leaves_unrelated_prompts_bit_identical(lm):
    before = lm.next_token_logprobs(UNRELATED)
    req = FACTS[0]
    assert not _argmax_first(lm, req)
    with get_editor("grace").apply(lm, req, **HP) as edit:
        assert _argmax_first(edit.lm, req)
        assert edit.info["action"] == "add" and edit.info["codebook_size"] == 1
        assert torch.equal(edit.lm.next_token_logprobs(UNRELATED), before)
        # greedy generation takes the edited answer first (lookup per token, under the KV cache too)
        first = lm.tokenizer.decode(lm.generate_ids([req.prompt], max_new_tokens=3)[0][:1])
        assert req.target_new.startswith(first.strip()) and first.strip()
    assert torch.equal(lm.next_token_logprobs(UNRELATED), before)


def test_sequential_edits_share_one_codebook_and_restore_lifo(lm, tmp_path):
    base = _snapshot(lm)
    ed = get_editor("grace")
    states, outputs, stack = [], [], []
    prev = None
    for r in FACTS:
        states.append(_snapshot(lm))
        outputs.append(lm.edited.next_token_logprobs(UNRELATED + [f.prompt for f in FACTS]))
        prev = ed.apply(lm, r, on=prev, **HP)
        stack.append(prev)
    book = lm.model.get_submodule(lm.arch.mlp_out_path(2))
    assert isinstance(book, GraceCodebook) and book.n_rows == len(FACTS)
    assert isinstance(book.base_layer, torch.nn.Linear)  # one wrapper, not a cascade
    assert all(_argmax_first(prev.lm, r) for r in FACTS)
    assert [type(p) for p in stack[1].patches] == [TableUpdate]
    final = lm.next_token_logprobs(UNRELATED + [f.prompt for f in FACTS])
    for i, e in enumerate(stack):
        e.save(tmp_path / f"e{i}")
    for i in reversed(range(len(stack))):
        stack[i].restore()
        after = _snapshot(lm)
        assert after.keys() == states[i].keys() and all(torch.equal(after[k], states[i][k]) for k in after)
        assert torch.equal(lm.edited.next_token_logprobs(UNRELATED + [f.prompt for f in FACTS]), outputs[i])
    assert all(torch.equal(v, base[k]) for k, v in _snapshot(lm).items())
    # saved edit by edit, loaded back in order: the same system
    for i in range(len(stack)):
        Edit.load(tmp_path / f"e{i}", lm)
        assert lm.model.get_submodule(lm.arch.mlp_out_path(2)).n_rows == i + 1  # only that edit's rows
    assert torch.equal(lm.edited.next_token_logprobs(UNRELATED + [f.prompt for f in FACTS]), final)
    restore_all(lm)


def test_same_prompt_new_answer_replaces_the_entry(lm):
    ed = get_editor("grace")
    first = ed.apply(lm, FACTS[0], **HP)
    conflict = EditRequest.create(FACTS[0].prompt, FACTS[0].subject, "Rome", "basketball")
    second = ed.apply(lm, conflict, on=first, **HP)
    book = lm.model.get_submodule(lm.arch.mlp_out_path(2))
    assert second.info["action"] == "replace" and book.n_rows == 1
    assert _argmax_first(second.lm, conflict) and not _argmax_first(second.lm, FACTS[0])
    # scoring and generation give the same (newest) answer
    first_tok = lm.generate_ids([conflict.prompt], max_new_tokens=1)[0]
    assert first_tok == second.lm.score([conflict.prompt], [conflict.target_new])[0].argmax_ids[:1]
    second.restore()
    assert _argmax_first(first.lm, FACTS[0]) and int(book.labels[0]) == first.patches[-1].append["labels"][0]
    restore_all(lm)


def test_codebook_rules_split_and_expand(lm):
    ed = get_editor("grace")
    first = ed.apply(lm, FACTS[0], **HP)  # eps 0.1 of the key norm
    book = lm.model.get_submodule(lm.arch.mlp_out_path(2))
    r0 = float(book.radii[0])
    q0 = book.keys[0].clone()
    # another prompt with another answer, within reach of a wide new radius: the entries split the distance,
    # and the older radius never grows
    other = EditRequest.create("Michael Jordan plays the game of", "Michael Jordan", "Rome", "basketball")
    second = ed.apply(lm, other, on=first, **{**HP, "eps": 10.0})
    assert second.info["action"] == "split" and book.n_rows == 2
    d = float((book.keys[1] - q0).norm())
    assert float(book.radii[1]) == pytest.approx(max(d / 2, 1e-2 * float(book.keys[1].norm())))
    assert float(book.radii[0]) == pytest.approx(min(r0, d / 2))
    assert _argmax_first(second.lm, other) and _argmax_first(second.lm, FACTS[0])
    second.restore()
    assert float(book.radii[0]) == r0 and book.n_rows == 1  # the older radius came back exactly
    restore_all(lm)
    # the same answer for another prompt within reach: the entry grows to cover it and retrains on it
    rome = EditRequest.create("Michael Jordan plays", "Michael Jordan", "Rome", "basketball")
    base_edit = ed.apply(lm, rome, **HP)
    book = lm.model.get_submodule(lm.arch.mlp_out_path(2))
    r0 = float(book.radii[0])
    same = EditRequest.create("Michael Jordan plays the game of", "Michael Jordan", "Rome", "basketball")
    third = ed.apply(lm, same, on=base_edit, **{**HP, "eps": 10.0})
    assert third.info["action"] == "expand" and book.n_rows == 1
    assert float(book.radii[0]) == pytest.approx(third.info["distance"]) and third.info["distance"] > r0
    assert _argmax_first(third.lm, same)
    third.restore()
    assert float(book.radii[0]) == r0
    restore_all(lm)
    assert label_id([1, 2]) == label_id([1, 2]) != label_id([2, 1])


def test_lookup_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 8)
    book = GraceCodebook(base, 64, 8)
    keys = torch.randn(40, 64) * 20
    book.update_rows({"keys": keys, "values": torch.randn(40, 8), "radii": torch.full((40,), 1e-3),
                      "labels": torch.arange(40)}, torch.zeros(0, dtype=torch.long), {})
    x = keys[:3] + 1e-5  # inside the tiny radius
    alone = book(x[:1, None, :])[0, 0]
    crowd = book(torch.cat([x, torch.randn(60, 64)])[:, None, :])[0, 0]
    assert torch.equal(alone, book.values[0]) and torch.equal(crowd, alone)


def test_bad_input_changes_nothing(lm):
    ed = get_editor("grace")
    before = _snapshot(lm)
    for bad in ({"eps": -1.0}, {"eps": 0.0}, {"layer": 99}, {"eps_unit": "cm"}, {"val_init": "hot"}):
        with pytest.raises(HparamsError):
            ed.apply(lm, FACTS[0], **{**HP, **bad})
    first = ed.apply(lm, FACTS[0], **HP)
    mid = _snapshot(lm)
    with pytest.raises(EditStackError, match="codebook"):
        ed.apply(lm, FACTS[1], on=first, **{**HP, "layer": 1})  # no codebook of this sequence there
    assert lm.active_edits == [first] and all(torch.equal(v, mid[k]) for k, v in _snapshot(lm).items())
    first.restore()
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(lm).items())


def test_independent_codebooks_stack_around_each_other(lm):
    ed = get_editor("grace")
    a = ed.apply(lm, FACTS[0], **HP)
    b = ed.apply(lm, FACTS[1], **HP)  # no on=: a second codebook around the first
    outer = lm.model.get_submodule(lm.arch.mlp_out_path(2))
    assert isinstance(outer, GraceCodebook) and isinstance(outer.base_layer, GraceCodebook)
    assert _argmax_first(b.lm, FACTS[0]) and _argmax_first(b.lm, FACTS[1])
    b.restore()
    a.restore()
    assert isinstance(lm.model.get_submodule(lm.arch.mlp_out_path(2)), torch.nn.Linear)


def test_saved_codebook_refuses_another_model(lm, tmp_path):
    from editlab.errors import EditMismatchError

    with get_editor("grace").apply(lm, FACTS[0], **HP) as edit:
        edit.save(tmp_path / "g")
    other = load_lm("tiny-trained-gpt2")
    before = _snapshot(other)
    modules = dict(other.model.named_modules())
    with pytest.raises(EditMismatchError):
        Edit.load(tmp_path / "g", other)
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(other).items())
    assert dict(other.model.named_modules()) == modules and other.active_edits == []
