"""The contract every registered editing method must keep (PEFT's common-tester idea): a method gets
these tests by registering, with `tiny_hparams` in its registry metadata to keep them fast.

On a tiny trained model: the edit changes the prediction; restore is bit-exact; save -> load gives the
same outputs; bad input raises editlab's named error and changes nothing; batch and sequential editing
where the method supports them (sequential edits restore LIFO to the base bit for bit, and restoring a
lower edit first raises and changes nothing).

Two demonstration methods, defined here (not shipped), prove the other two patch kinds: a module swap
(a learned vector added to one MLP's output, through an `AdapterModule`) and an LM view (the new fact
put before every prompt).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import pytest
import torch

from editlab.errors import EditlabError, EditMismatchError, EditRequestError, EditStackError, HparamsError
from editlab.methods import Edit, ModuleSwap, ViewPatch, base, get_editor, restore_all
from editlab.methods.adapters.inject import WRAPPERS, AdapterModule, register_wrapper
from editlab.methods.base import Editor, Hparams
from editlab.models import load_lm
from editlab.requests import EditRequest

FACT = EditRequest.create("Michael Jordan plays", "Michael Jordan", "football", "basketball")
FACT2 = EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")
PROBES = ["Michael Jordan plays", "The Eiffel Tower is located in the city of", "Toyota was founded in"]


# ------------------------------------------------------------------ demonstration patch kinds
class ShiftWrapper(AdapterModule):
    """Adds a learned vector to the wrapped module's output at every position."""

    registered_name = "test-shift"

    def __init__(self, base_layer: torch.nn.Module, dim: int) -> None:
        super().__init__(base_layer)
        w = getattr(base_layer, "weight", None)
        self.shift = torch.nn.Parameter(torch.zeros(dim, dtype=w.dtype if w is not None else None), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.shift

    def config(self) -> dict[str, Any]:
        return {"dim": int(self.shift.shape[0])}

    @classmethod
    def from_config(cls, base_layer, config, tensors):
        w = cls(base_layer, int(config["dim"]))
        w.load_adapter_state(tensors)
        return w


register_wrapper(ShiftWrapper, "test wrapper: a vector added to a module's output")


from dataclasses import dataclass  # noqa: E402


@dataclass
class ShiftHparams(Hparams):
    layer: int = 0
    steps: int = 40
    lr: float = 0.2

    def validate(self, lm):
        self._check_layer("layer", self.layer, lm)


class ShiftEditor(Editor):
    """Learns the shift vector by gradient steps on the target NLL with the wrapper in place."""

    hparams_cls = ShiftHparams
    supports_on: ClassVar[bool] = True

    def compute_patches(self, lm, requests, hp, on):
        path = lm.arch.mlp_out_path(hp.layer)
        module = lm.module(path)
        dim = lm.arch.as_matrix(module.weight).shape[0] if hasattr(module, "weight") else module.shift.shape[0]
        wrapper = ShiftWrapper(module, dim)
        wrapper.shift.requires_grad_(True)
        patch = ModuleSwap(path, wrapper)
        patch.apply(lm)
        try:
            opt = torch.optim.Adam([wrapper.shift], lr=hp.lr)
            for _ in range(hp.steps):
                loss = -sum(s.sum() for s in _logprobs_grad(lm, requests))
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            patch.revert(lm)
            wrapper.shift.requires_grad_(False)
        return [patch], {"on": on is not None}


def _logprobs_grad(lm, requests):
    out = []
    for r in requests:
        p_ids, t_ids = lm.encode_pair(r.prompt, r.target_new)
        ids = torch.tensor([p_ids + t_ids])
        logits = lm.model(input_ids=ids).logits[0, len(p_ids) - 1 : -1]
        out.append(torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(t_ids)[:, None]))
    return out


@dataclass
class PrefixHparams(Hparams):
    template: str = "{prompt} {target}. "

    def validate(self, lm):
        if "{prompt}" not in self.template or "{target}" not in self.template:
            raise HparamsError("template must contain {prompt} and {target}")


class PrefixEditor(Editor):
    """States the new facts before every prompt (an LM view; weights untouched)."""

    hparams_cls = PrefixHparams
    supports_batch: ClassVar[bool] = True

    def compute_patches(self, lm, requests, hp, on):
        text = "".join(hp.template.format(prompt=r.prompt, target=r.target_new) for r in requests)
        return [ViewPatch("prefix", {"prefix": text})], {}


DEMOS = {
    "demo-module-swap": (ShiftEditor, {"layer": 1, "steps": 40, "lr": 0.2}),
    "demo-lm-view": (PrefixEditor, {}),
}
# A 4-layer toy model copies one stated fact from its context but not the second of two: in batch,
# the view demo is only required to change what the system predicts.
BATCH_GAIN = {"demo-lm-view": 0.0}


@pytest.fixture(autouse=True)
def _with_demo_methods(monkeypatch):
    reg = base.METHODS.copy()
    for name, (cls, hp) in DEMOS.items():
        reg.register(name, f"test-only {name}", (lambda c=cls: c), tiny_hparams=hp)
    monkeypatch.setattr(base, "METHODS", reg)


def _all_methods() -> list[str]:
    return base.METHODS.names() + list(DEMOS)


def _min_gain(name: str) -> float | None:
    """Least rise of log p(target) a method must show on the 4-layer toy model; None for methods that
    only move its distribution there. ROME and MEMIT write a key -> value association that a toy
    model's shared, low-dimensional keys cannot isolate, so they are held to fact-level changes on
    the real model instead (tests/test_real_model.py)."""
    if name in DEMOS:
        return 0.5
    return base.METHODS.entry(name).meta.get("tiny_min_gain", 0.5)


CORPUS: dict[str, str] = {}  # set per test by the `lm` fixture: a small statistics corpus file


def _tiny_hp(name: str) -> dict[str, Any]:
    if name in DEMOS:
        return dict(DEMOS[name][1])
    hp = dict(base.METHODS.entry(name).meta.get("tiny_hparams", {}))
    fields = {f.name for f in dataclasses.fields(get_editor(name).hparams_cls)}
    if "corpus" in fields and CORPUS:
        hp.setdefault("corpus", CORPUS["path"])  # covariance statistics from a small file, not Wikipedia
    return hp


def _editor(name: str, lm):
    """The method's editor, its network first trained on the toy model where it needs one (the builtin
    facts, `tiny_hparams`; a few seconds, cached for the test)."""
    editor = get_editor(name)
    if editor.requires_training:
        from editlab.data import load_requests

        editor.fit(lm, load_requests("builtin"), _tiny_hp(name), progress=False)
    return editor


def _snapshot(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _target_logprob(system, req) -> float:
    return float(system.score([req.prompt], [req.target_new])[0].logprobs.sum())


def _outputs(system) -> torch.Tensor:
    return system.next_token_logprobs(PROBES)


@pytest.fixture
def lm(corpus_file):
    CORPUS["path"] = str(corpus_file)
    yield load_lm("tiny-trained-llama")
    CORPUS.clear()


@pytest.mark.parametrize("method", _all_methods())
def test_edit_changes_prediction_and_restores_bit_exact(method, lm):
    editor = _editor(method, lm)
    before = _snapshot(lm)
    modules_before = dict(lm.model.named_modules())
    lp0 = _target_logprob(lm, FACT)
    out0 = lm.next_token_logprobs([FACT.prompt])
    edit = editor.apply(lm, FACT, **_tiny_hp(method))
    assert lm.active_edits == [edit] and edit.active
    lp1 = _target_logprob(edit.lm, FACT)
    gain = _min_gain(method)
    if gain is None:
        # the method's fact-level behaviour is checked on the real model (tests/test_real_model.py)
        moved = (edit.lm.next_token_logprobs([FACT.prompt]) - out0).abs().max()
        assert float(moved) > 1e-3, f"{method}: the edit did not change the prediction at the prompt"
    else:
        assert lp1 > lp0 + gain, f"{method}: log p(target) {lp0:.2f} -> {lp1:.2f}"
    edit.restore()
    assert _same(before, _snapshot(lm))
    assert dict(lm.model.named_modules()) == modules_before  # the very same module objects
    assert lm.active_edits == [] and not edit.active
    assert abs(_target_logprob(lm, FACT) - lp0) < 1e-6
    edit.restore()  # idempotent


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", _all_methods())
def test_low_precision_edit_keeps_dtypes_and_restores_bit_exact(method, dtype, corpus_file):
    """In bf16 and fp16 every method edits (the prediction moves, nothing becomes inf/NaN), leaves every
    weight in the model's dtype, and restores the weights bit for bit."""
    CORPUS["path"] = str(corpus_file)
    try:
        low = load_lm("tiny-trained-llama", dtype=dtype)
        editor = _editor(method, low)
        before = _snapshot(low)
        out0 = low.next_token_logprobs([FACT.prompt]).float()
        edit = editor.apply(low, FACT, **_tiny_hp(method))
        out1 = edit.lm.next_token_logprobs([FACT.prompt]).float()
        assert torch.isfinite(out1).all(), f"{method} in {dtype}: the edited model gives non-finite log-probs"
        assert float((out1 - out0).abs().max()) > 0, f"{method} in {dtype}: the edit did not change the prediction"
        after = _snapshot(low)
        assert all(after[k].dtype == before[k].dtype for k in before.keys() & after.keys())
        edit.restore()
        assert _same(before, _snapshot(low)) and low.active_edits == []
    finally:
        CORPUS.clear()


@pytest.mark.parametrize("method", _all_methods())
def test_save_load_gives_same_outputs(method, lm, tmp_path):
    editor = _editor(method, lm)
    before = _snapshot(lm)
    edit = editor.apply(lm, FACT, **_tiny_hp(method))
    out_edited = _outputs(edit.lm)
    edit.save(tmp_path / "e")
    edit.restore()
    loaded = Edit.load(tmp_path / "e", lm)
    assert loaded.method == method and loaded.requests == [FACT]
    assert torch.allclose(_outputs(loaded.lm), out_edited, atol=1e-5)
    # a second load on top of it is refused (it was saved on the bare model) and changes nothing
    mid = _snapshot(lm)
    with pytest.raises(EditMismatchError):
        Edit.load(tmp_path / "e", lm)
    assert _same(mid, _snapshot(lm)) and lm.active_edits == [loaded]
    loaded.restore()
    assert _same(before, _snapshot(lm))


@pytest.mark.parametrize("method", _all_methods())
def test_bad_input_raises_named_error_and_changes_nothing(method, lm):
    editor = _editor(method, lm)
    before = _snapshot(lm)
    with pytest.raises(HparamsError):
        editor.apply(lm, FACT, **{**_tiny_hp(method), "no_such_hparam": 1})
    with pytest.raises(EditRequestError):
        editor.apply(lm, "Michael Jordan plays football")  # type: ignore[arg-type]
    with pytest.raises(EditRequestError):
        editor.apply(lm, [])
    if not editor.supports_batch:
        with pytest.raises(EditRequestError):
            editor.apply(lm, [FACT, FACT2], **_tiny_hp(method))
    assert _same(before, _snapshot(lm)) and lm.active_edits == []


@pytest.mark.parametrize("method", [m for m in _all_methods()])
def test_batch_edit_where_supported(method, lm):
    editor = _editor(method, lm)
    if not editor.supports_batch:
        pytest.skip(f"{method} edits one request at a time")
    before = _snapshot(lm)
    lps = [_target_logprob(lm, r) for r in (FACT, FACT2)]
    with editor.apply(lm, [FACT, FACT2], **_tiny_hp(method)) as edit:
        after = [_target_logprob(edit.lm, r) for r in (FACT, FACT2)]
    gain = BATCH_GAIN.get(method, _min_gain(method))
    assert all((a > b + gain) if gain else (a != b) for a, b in zip(after, lps)), (lps, after)
    assert _same(before, _snapshot(lm))


@pytest.mark.parametrize("method", _all_methods())
def test_sequential_edits_form_a_stack(method, lm):
    editor = _editor(method, lm)
    before = _snapshot(lm)
    first = editor.apply(lm, FACT, **_tiny_hp(method))
    mid = _snapshot(lm)
    mid_out = _outputs(first.lm)
    second = editor.apply(lm, FACT2, on=first if editor.supports_on else None, **_tiny_hp(method))
    assert lm.active_edits == [first, second]
    top = _snapshot(lm)
    with pytest.raises(EditStackError):
        first.restore()
    assert _same(top, _snapshot(lm)) and lm.active_edits == [first, second] and first.active
    second.restore()
    assert _same(mid, _snapshot(lm))
    assert torch.equal(_outputs(first.lm), mid_out)
    first.restore()
    assert _same(before, _snapshot(lm))


def test_restore_all_unwinds_a_mixed_stack_at_once(lm):
    before = _snapshot(lm)
    modules_before = dict(lm.model.named_modules())
    # a weight edit, a swap of the same module, then a weight edit of the same weight through the wrapper
    get_editor("ft-m").apply(lm, FACT, **_tiny_hp("ft-m"))
    get_editor("demo-module-swap").apply(lm, FACT2, **_tiny_hp("demo-module-swap"))
    get_editor("ft-m").apply(lm, FACT2, **_tiny_hp("ft-m"))
    from editlab.methods.patches import WeightLedger

    assert len(WeightLedger.of(lm).originals) == 1  # one kept copy of the one weight touched
    view = get_editor("demo-lm-view").apply(lm, FACT)
    assert lm.edited is view.lm
    restore_all(lm)
    assert _same(before, _snapshot(lm)) and dict(lm.model.named_modules()) == modules_before
    assert lm.active_edits == [] and lm.edited is lm and not WeightLedger.of(lm).originals


def test_lifo_restore_through_a_module_swap_is_bit_exact(lm):
    before = _snapshot(lm)
    stack = [get_editor("ft-m").apply(lm, FACT, **_tiny_hp("ft-m")),
             get_editor("demo-module-swap").apply(lm, FACT2, **_tiny_hp("demo-module-swap")),
             get_editor("ft-m").apply(lm, FACT2, **_tiny_hp("ft-m"))]
    for e in reversed(stack):
        e.restore()
    assert _same(before, _snapshot(lm))


def test_view_that_fails_to_build_leaves_nothing_applied(lm):
    from editlab.methods.patches import WeightDelta, WeightLedger

    before = _snapshot(lm)
    name = f"{lm.arch.mlp_out_path(0)}.weight"
    patches = [WeightDelta(name, torch.ones_like(lm.model.get_parameter(name))), ViewPatch("prefix", {})]
    with pytest.raises(EditMismatchError, match="prefix"):
        Edit.install(lm, "x", {}, [FACT], patches)
    assert _same(before, _snapshot(lm)) and lm.active_edits == [] and not WeightLedger.of(lm).originals


def test_view_stacks_over_the_edits_below(lm):
    weight = get_editor("ft-m").apply(lm, FACT, **_tiny_hp("ft-m"))
    view = get_editor("demo-lm-view").apply(lm, FACT2)
    # the view's scores are the weight-edited model's scores on the prefixed prompt
    got = view.lm.score([FACT.prompt], [FACT.target_new])[0].logprobs
    prefix = view.patches[0].config["prefix"]
    want = lm.score([prefix + FACT.prompt], [FACT.target_new])[0].logprobs
    assert torch.equal(got, want)
    assert weight.lm is lm
    view.restore()
    weight.restore()


def test_on_must_be_the_top_edit_of_the_same_method(lm):
    swap = get_editor("demo-module-swap")
    first = swap.apply(lm, FACT, **_tiny_hp("demo-module-swap"))
    other = get_editor("ft-m").apply(lm, FACT2, **{**_tiny_hp("ft-m"), "layer": 0})
    state = _snapshot(lm)
    with pytest.raises(EditStackError, match="newest"):
        swap.apply(lm, FACT2, on=first, **_tiny_hp("demo-module-swap"))
    with pytest.raises(EditStackError, match="cannot extend"):
        get_editor("ft-m").apply(lm, FACT, on=other, **_tiny_hp("ft-m"))
    assert _same(state, _snapshot(lm))
    restore_all(lm)


def test_apply_is_atomic_when_a_later_patch_fails(lm, monkeypatch):
    """A failure while applying the k-th patch undoes the first k-1."""
    from editlab.methods.patches import WeightDelta

    before = _snapshot(lm)
    names = [f"{lm.arch.mlp_out_path(0)}.weight", f"{lm.arch.mlp_out_path(1)}.weight"]
    patches = [WeightDelta(n, torch.ones_like(lm.model.get_parameter(n))) for n in names]

    class Boom(WeightDelta):
        def apply(self, lm_):
            raise RuntimeError("boom")

    patches.append(Boom(names[0], torch.ones_like(lm.model.get_parameter(names[0]))))
    with pytest.raises(RuntimeError, match="boom"):
        Edit.install(lm, "ft", {}, [FACT], patches)
    assert _same(before, _snapshot(lm)) and lm.active_edits == []


def test_damaged_save_is_refused(lm, tmp_path):
    edit = get_editor("ft-m").apply(lm, FACT, **_tiny_hp("ft-m"))
    edit.save(tmp_path / "e")
    edit.restore()
    f = tmp_path / "e" / "patches.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    before = _snapshot(lm)
    with pytest.raises(EditMismatchError, match="checksum"):
        Edit.load(tmp_path / "e", lm)
    assert _same(before, _snapshot(lm)) and lm.active_edits == []


def test_format_1_folders_still_load(lm, tmp_path):
    """Format-1 folders carry editlab 0.1's (sampled) fingerprint of the base model."""
    import json

    from editlab.models.lm import model_fingerprint_v1

    from safetensors.torch import save_file

    name = f"{lm.arch.mlp_out_path(0)}.weight"
    delta = torch.full_like(lm.model.get_parameter(name), 1e-3)
    d = tmp_path / "v1"
    d.mkdir()
    save_file({name: delta.contiguous()}, str(d / "deltas.safetensors"))
    (d / "edit.json").write_text(json.dumps({"format": 1, "method": "ft", "hparams": {}, "requests": [FACT.to_dict()],
                                             "base_fingerprint": model_fingerprint_v1(lm.model), "model": lm.name,
                                             "parameters": [name]}))
    before = lm.model.get_parameter(name).detach().clone()
    edit = Edit.load(d, lm)
    assert torch.equal(lm.model.get_parameter(name).detach(), before + delta)
    edit.restore()
    assert torch.equal(lm.model.get_parameter(name).detach(), before)


def test_fingerprint_is_exact_and_thread_independent(lm):
    fp = lm.fingerprint()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert lm.fingerprint() == fp
    finally:
        torch.set_num_threads(threads)
    name = f"{lm.arch.mlp_out_path(0)}.weight"
    p = lm.model.get_parameter(name)
    with torch.no_grad():
        old = p[0, 0].item()
        p[0, 0] = torch.nextafter(p[0, 0], torch.tensor(float("inf")))  # one ulp
        assert lm.fingerprint() != fp
        p[0, 0] = old
    assert lm.fingerprint() == fp


def test_learned_editor_checkpoints_are_cached_and_verified(lm):
    from editlab.errors import CheckpointError

    calls = {"n": 0}

    @dataclass
    class ScaleHparams(Hparams):
        scale: float = 1.0

    class Learned(Editor):
        hparams_cls = ScaleHparams
        requires_training = True

        def train(self, lm_, requests, hp, *, progress=True, workdir=None):
            calls["n"] += 1
            return {"w": torch.full((3,), float(len(requests)) * hp.scale)}, {"records": len(requests)}

        def compute_patches(self, lm_, requests, hp, on):
            return [ViewPatch("prefix", {"prefix": "Note: "})], {}

    ed = Learned()
    ed.name = "learned-demo"
    with pytest.raises(CheckpointError, match="editlab train learned-demo"):
        ed.apply(lm, FACT)
    ck = ed.fit(lm, [FACT, FACT2])
    assert calls["n"] == 1 and torch.equal(ck.tensors()["w"], torch.full((3,), 2.0))
    assert ed.fit(lm, [FACT, FACT2]).sha256 == ck.sha256 and calls["n"] == 1  # cached
    ed.fit(lm, [FACT])  # other data: trained again
    assert calls["n"] == 2
    edit = ed.apply(lm, FACT)
    assert edit.checkpoint_sha256 is not None and edit.manifest()["checkpoint_sha256"] == edit.checkpoint_sha256
    edit.restore()
    (ck.path / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="checksum"):
        ed.fit(lm, [FACT, FACT2])


def test_wrapper_registry_names_unknown_wrappers(lm, tmp_path):
    assert "test-shift" in WRAPPERS
    with pytest.raises(EditlabError):
        WRAPPERS.get("nope")
