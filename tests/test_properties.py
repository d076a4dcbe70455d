"""Property-based tests (hypothesis): whatever a user or a damaged file hands them, the request
constructor, hyper-parameter coercion, the data loaders and `Edit.load` either succeed with a valid
result or raise one of editlab's own errors, and a refused load leaves the model untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from editlab.data import FORMATS, parse_records, read_records
from editlab.errors import EditlabError, EditMismatchError, EditRequestError, HparamsError
from editlab.methods import Edit
from editlab.methods.base import METHODS
from editlab.methods.patches import LowRank, WeightDelta
from editlab.models import load_lm
from editlab.requests import EditRequest

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=40))
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                           max_leaves=12)
field_values = st.one_of(st.text(max_size=60), scalars, st.lists(st.text(max_size=10), max_size=3))


# ----------------------------------------------------------------------------------- EditRequest.create
@SETTINGS
@given(prompt=field_values, subject=field_values, target=field_values, true=st.one_of(st.none(), field_values),
       probes=st.one_of(st.none(), st.lists(st.one_of(st.tuples(st.text(max_size=8), st.text(max_size=8)), json_values), max_size=3)))
def test_edit_request_create_is_valid_or_a_request_error(prompt, subject, target, true, probes):
    try:
        r = EditRequest.create(prompt, subject, target, true, paraphrases=probes)
    except EditRequestError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert r.subject in r.prompt and r.target_new.strip()
    assert r.target_true is None or r.target_true.casefold() != r.target_new.casefold()
    assert EditRequest.from_dict(r.to_dict()) == r  # what is accepted also round-trips


@SETTINGS
@given(record=st.dictionaries(st.sampled_from(["prompt", "subject", "target_new", "target_true", "case_id", "locality", "x"]),
                              json_values, max_size=6))
def test_edit_request_from_dict_is_valid_or_a_request_error(record):
    try:
        EditRequest.from_dict(record)
    except EditRequestError:
        pass


# ----------------------------------------------------------------------------------- hyper-parameters
HPARAM_CLASSES = sorted({(e.name, METHODS.get(e.name).hparams_cls) for e in METHODS.entries()}, key=lambda x: x[0])


@pytest.mark.parametrize("method,cls", HPARAM_CLASSES, ids=[m for m, _ in HPARAM_CLASSES])
@SETTINGS
@given(data=st.data())
def test_hparam_coercion_accepts_or_raises_hparams_error(method, cls, data):
    import dataclasses

    names = [f.name for f in dataclasses.fields(cls)]
    keys = data.draw(st.lists(st.one_of(st.sampled_from(names), st.text(max_size=8)), max_size=3, unique=True))
    values = {k: data.draw(st.one_of(json_values, st.text(alphabet="0123456789.,-[]eE naif", max_size=12))) for k in keys}
    try:
        hp = cls.from_dict(values)
    except HparamsError as e:
        assert "\n" not in str(e)
        return
    for k in values:  # what was accepted has the field's type
        default = getattr(cls(), k)
        got = getattr(hp, k)
        if isinstance(default, bool):
            assert isinstance(got, bool)
        elif isinstance(default, int):
            assert isinstance(got, int)
        elif isinstance(default, float):
            assert isinstance(got, float) and got == got and abs(got) != float("inf")
        elif isinstance(default, list):
            assert isinstance(got, list)


# ----------------------------------------------------------------------------------- data loaders
LOADER_FORMATS = [None] + FORMATS.names()  # None: auto-detection


@pytest.mark.parametrize("fmt", LOADER_FORMATS)
@SETTINGS
@given(records=st.lists(st.dictionaries(st.sampled_from(
    ["prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth", "src",
     "alt", "answers", "rephrase", "loc", "loc_ans", "requested_rewrite", "text", "labels", "concept", "portability", "locality",
     "case_id", "paraphrase_prompts", "neighborhood_prompts"]), json_values, max_size=8), min_size=1, max_size=3))
def test_parse_records_gives_requests_or_a_data_error(fmt, records):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = parse_records(records, fmt, "<test>")
        except EditlabError as e:
            assert "\n" not in str(e).strip()
            return
    assert all(isinstance(r, EditRequest) for r in out)


@SETTINGS
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                         json_values.map(lambda v: json.dumps(v).encode())))
def test_read_records_gives_records_or_a_data_error(tmp_path_factory, content):
    p = tmp_path_factory.mktemp("rec") / "data.json"
    p.write_bytes(content)
    try:
        recs = read_records(p)
    except EditlabError:
        return
    assert isinstance(recs, list) and all(isinstance(r, dict) for r in recs)


# ----------------------------------------------------------------------------------- Edit.load
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model and a saved two-patch edit of it (one dense, one low-rank delta)."""
    lm = load_lm("tiny-llama")
    names = [f"{lm.arch.mlp_out_path(0)}.weight", f"{lm.arch.mlp_out_path(1)}.weight"]
    g = torch.Generator().manual_seed(0)
    p1 = lm.model.get_parameter(names[1])
    patches = [WeightDelta(names[0], torch.randn(lm.model.get_parameter(names[0]).shape, generator=g) * 1e-2),
               WeightDelta(names[1], LowRank(torch.randn(p1.shape[0], 1, generator=g), torch.randn(1, p1.shape[1], generator=g) * 1e-2))]
    req = EditRequest.create("The Eiffel Tower is located in", "Eiffel Tower", "Rome")
    edit = Edit.install(lm, "ft", {"layer": 0}, [req], patches)
    folder = tmp_path_factory.mktemp("edit") / "e"
    edit.save(folder)
    edited = lm.fingerprint()
    edit.restore()
    return lm, folder, edited


def _load_or_refuse(lm, folder: Path, edited_fp: str) -> str:
    """'loaded' (then restored) or 'refused' (with the model untouched); anything else fails the test.
    A load must give exactly the saved edit's weights: whatever it accepts, it never applies something else."""
    fp = lm.fingerprint()
    try:
        e = Edit.load(folder, lm)
    except EditlabError as err:
        assert "\n" not in str(err)
        assert lm.fingerprint() == fp and lm.active_edits == []
        return "refused"
    assert lm.fingerprint() == edited_fp, "a mutated save loaded and applied other weights than were saved"
    e.restore()
    assert lm.fingerprint() == fp
    return "loaded"


def _copy(src: Path, dst_root: Path) -> Path:
    dst = dst_root / "e"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def test_an_untouched_save_loads_to_the_same_weights(saved, tmp_path):
    lm, folder, edited_fp = saved
    e = Edit.load(folder, lm)
    assert lm.fingerprint() == edited_fp
    e.restore()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_any_changed_byte_or_truncation_of_the_tensor_file_is_refused(saved, tmp_path, data):
    lm, folder, edited_fp = saved
    d = _copy(folder, tmp_path)
    f = d / "patches.safetensors"
    raw = bytearray(f.read_bytes())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    f.write_bytes(bytes(raw))
    assert _load_or_refuse(lm, d, edited_fp) == "refused"


def _rewrite_tensors(d: Path, change) -> None:
    """Apply `change(tensors, header)` to the tensor file and re-record the whole-file checksum and size
    in the manifest, so only the per-tensor checks can notice."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from editlab.fileio import sha256_file

    f = d / "patches.safetensors"
    with safe_open(str(f), framework="pt") as h:
        header = dict(h.metadata() or {})
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    change(tensors, header)
    save_file(tensors, str(f), metadata=header)
    m = json.loads((d / "edit.json").read_text())
    m["tensors_sha256"], m["tensors_bytes"] = sha256_file(f), f.stat().st_size
    (d / "edit.json").write_text(json.dumps(m))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kind=st.sampled_from(["scale", "one-value", "swap", "retype", "reshape", "header-target", "drop", "extra"]),
       factor=st.floats(1.0001, 1e3) | st.floats(-1e3, 0.9999), which=st.integers(0, 2))
def test_altered_tensors_with_a_matching_file_checksum_are_refused(saved, tmp_path, kind, factor, which):
    lm, folder, edited_fp = saved
    assume(factor != 0)
    d = _copy(folder, tmp_path)

    def change(ts: dict[str, torch.Tensor], header: dict[str, str]) -> None:
        keys = sorted(ts)
        k = keys[which % len(keys)]
        if kind == "scale":
            ts[k] = ts[k] * factor
        elif kind == "one-value":
            t = ts[k].clone().reshape(-1)
            t[which] = t[which] + 1e-3
            ts[k] = t.reshape(ts[k].shape)
        elif kind == "swap":  # two tensors of equal shape trade places
            a, b = keys[1], keys[2]
            ts[a], ts[b] = ts[b].reshape(ts[a].shape) if ts[b].numel() == ts[a].numel() else ts[a] * 2, ts[a].reshape(ts[b].shape) if ts[a].numel() == ts[b].numel() else ts[b]
        elif kind == "retype":
            ts[k] = ts[k].to(torch.float64)
        elif kind == "reshape":
            ts[k] = ts[k].reshape(-1)
        elif kind == "header-target":
            targets = json.loads(header["editlab_targets"])
            targets[k] = "model.lm_head.weight"
            header["editlab_targets"] = json.dumps(targets)
        elif kind == "drop":
            del ts[k]
        elif kind == "extra":
            ts["9/delta"] = torch.zeros(2)

    _rewrite_tensors(d, change)
    assert _load_or_refuse(lm, d, edited_fp) == "refused"


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_manifests_are_refused_or_load_exactly_the_saved_edit(saved, tmp_path, data):
    lm, folder, edited_fp = saved
    d = _copy(folder, tmp_path)
    manifest = json.loads((d / "edit.json").read_text())
    path = data.draw(st.sampled_from([p for p in _paths(manifest) if p]))
    action = data.draw(st.sampled_from(["replace", "delete"]))
    parent = manifest
    for k in path[:-1]:
        parent = parent[k]
    old = parent[path[-1]]
    if action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        new = data.draw(json_values)
        assume(new != old)
        parent[path[-1]] = new
    (d / "edit.json").write_text(json.dumps(manifest))
    _load_or_refuse(lm, d, edited_fp)


@pytest.mark.parametrize("garbage", [b"", b"{", b"[]", b"null", b'{"format": true}', b'{"format": 3}', b"\xff\xfe"])
def test_garbage_manifests_are_refused(saved, tmp_path, garbage):
    lm, folder, edited_fp = saved
    d = _copy(folder, tmp_path)
    (d / "edit.json").write_bytes(garbage)
    with pytest.raises(EditMismatchError):
        Edit.load(d, lm)
    assert lm.active_edits == []


def test_saving_over_an_earlier_save_replaces_it_and_a_failed_save_keeps_it(saved, tmp_path, monkeypatch):
    import safetensors.torch

    lm, folder, edited_fp = saved
    d = _copy(folder, tmp_path)
    e = Edit.load(d, lm)
    e.save(d)  # replaces the earlier save of the same edit
    e.restore()
    assert sorted(p.name for p in d.iterdir()) == ["edit.json", "patches.safetensors"]
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    e = Edit.load(d, lm)
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(EditlabError, match="No space left"):
        e.save(d)
    e.restore()
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # the old save, untouched
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert _load_or_refuse(lm, d, edited_fp) == "loaded"


@pytest.mark.parametrize("mutate", [
    lambda m: m.__setitem__("patches", []),  # found by the property test above: loaded as an empty edit
    lambda m: m["patches"].pop(),
    lambda m: m["patches"][0]["config"].__setitem__("extra", 1),
])
def test_a_manifest_whose_patch_list_changed_is_refused(saved, tmp_path, mutate):
    lm, folder, edited_fp = saved
    d = _copy(folder, tmp_path)
    manifest = json.loads((d / "edit.json").read_text())
    mutate(manifest)
    (d / "edit.json").write_text(json.dumps(manifest))
    assert _load_or_refuse(lm, d, edited_fp) == "refused"
