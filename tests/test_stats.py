import bz2
import copy
import warnings
from pathlib import Path

import pytest
import torch

from editlab.errors import DataFormatError, StatsCacheError
from editlab.hooks import hooks
from editlab.models import load_lm
from editlab.paths import cache_dir
from editlab.stats import (
    StatsCacheWarning, cache_path, clean_wikitext, file_corpus, sample_windows, second_moments, stats_provenance,
)
from editlab.stats import corpus as corpus_mod
from editlab.stats.covariance import _key


def _hand_moment(lm, layer, corpus, n_tokens, seq_len=64):
    """E[k kᵀ] from a plain forward pass per window (head ids + window), over positions >= 1 and
    never over the head."""
    head = list(lm.prefix_ids)
    skip = max(1, len(head))
    rows = []
    path = lm.arch.mlp_out_path(layer)
    with torch.no_grad(), hooks(lm.model, pre={path: lambda m, i: rows.append(i[0][0, skip:])}):
        for w in sample_windows(lm, corpus, n_tokens, seq_len):
            lm.model(torch.tensor([head + list(w.ids)]))
    k = torch.cat(rows).double()
    return k.T @ k / k.shape[0], k.shape[0]


def _rel(a, b):
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


def _many_docs(tmp_path, n=40):
    """A corpus of `n` distinct documents of a few sentences each."""
    words = ["Paris", "Rome", "Tokyo", "Warsaw", "Ulm", "Japan", "France", "Italy"]
    docs = [
        f"Document {i} says that {words[i % 8]} and {words[(i * 3) % 8]} are places. " * (2 + i % 3)
        for i in range(n)
    ]
    p = tmp_path / "many.txt"
    p.write_text("\n\n".join(docs))
    return file_corpus(p)


@pytest.mark.parametrize("prefix", [[], [0]], ids=["no-prefix", "sink-prefix"])
def test_second_moment_matches_hand_computation_without_position_0(corpus_file, prefix):
    lm = load_lm("tiny-llama")
    lm.prefix_ids = list(prefix)
    corpus = file_corpus(corpus_file)
    got = second_moments(lm, [1, 2], corpus, n_tokens=300, seq_len=64, progress=False)
    for layer in (1, 2):
        want, n = _hand_moment(lm, layer, corpus, 300)
        assert n == 300
        assert _rel(got[layer], want) < 1e-5
    # position 0 counted (the old behaviour) gives different statistics: the test can tell
    rows = []
    with torch.no_grad(), hooks(lm.model, pre={lm.arch.mlp_out_path(1): lambda m, i: rows.append(i[0][0])}):
        for w in sample_windows(lm, corpus, 300, 64):
            lm.model(torch.tensor([prefix + list(w.ids)]))
    k = torch.cat(rows).double()
    assert _rel(got[1], k.T @ k / k.shape[0]) > 1e-3


def test_sink_prefix_is_part_of_the_key(corpus_file):
    lm = load_lm("tiny-llama")
    corpus = file_corpus(corpus_file)
    plain = second_moments(lm, [1], corpus, n_tokens=200, seq_len=64, progress=False)[1]
    key_plain = _key(lm, lm.arch.mlp_out_path(1), corpus, 200, torch.float32, 64)
    lm.prefix_ids = [0]
    key_prefix = _key(lm, lm.arch.mlp_out_path(1), corpus, 200, torch.float32, 64)
    assert cache_path(key_plain) != cache_path(key_prefix)
    with_prefix = second_moments(lm, [1], corpus, n_tokens=200, seq_len=64, progress=False)[1]
    assert _rel(plain, with_prefix) > 1e-3


def test_sampling_spreads_over_the_corpus_within_documents(tmp_path):
    lm = load_lm("tiny-llama")
    corpus = _many_docs(tmp_path)
    docs = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in corpus.texts]
    total = sum(len(d) for d in docs)
    windows = sample_windows(lm, corpus, total // 4, seq_len=16)
    used = {w.doc for w in windows}
    # a quarter of the tokens, taken from documents all over the corpus, not the first quarter
    assert max(used) >= 30 and min(used) < 10
    assert len(used) > 12
    for w in windows:  # every window is a piece of one document
        assert list(w.ids) == docs[w.doc][w.start : w.start + len(w.ids)]
        assert 0 < len(w.ids) <= 16
    assert sum(len(w.ids) - 1 for w in windows) == total // 4
    # asking for more than the corpus holds uses all of it, each token once
    everything = sample_windows(lm, corpus, 10 * total, seq_len=16)
    covered = sorted((w.doc, w.start + j) for w in everything for j in range(len(w.ids)))
    assert covered == sorted((d, j) for d, ids in enumerate(docs) for j in range(len(ids)))


def test_sampling_is_deterministic_for_a_seed_and_nested(tmp_path):
    lm = load_lm("tiny-llama")
    corpus = _many_docs(tmp_path)
    a = sample_windows(lm, corpus, 300, seq_len=16, seed=3)
    assert a == sample_windows(load_lm("tiny-llama"), corpus, 300, seq_len=16, seed=3)
    assert a != sample_windows(lm, corpus, 300, seq_len=16, seed=4)
    # the sample for n tokens is a prefix of the sample for 2n (the last window may be cut short)
    b = sample_windows(lm, corpus, 600, seq_len=16, seed=3)
    assert a[:-1] == b[: len(a) - 1]
    assert (a[-1].doc, a[-1].start) == (b[len(a) - 1].doc, b[len(a) - 1].start)
    assert b[len(a) - 1].ids[: len(a[-1].ids)] == a[-1].ids
    # the seed is part of the cache key
    k3 = _key(lm, lm.arch.mlp_out_path(1), corpus, 300, torch.float32, 16, seed=3)
    k4 = _key(lm, lm.arch.mlp_out_path(1), corpus, 300, torch.float32, 16, seed=4)
    assert cache_path(k3) != cache_path(k4)


def test_running_sums_at_checkpoints_equal_smaller_samples(tmp_path):
    """The convergence benchmark reads C_n off the pass for 2n: that must be what n tokens give."""
    from editlab.stats.covariance import accumulate_moments, compute_second_moments

    lm = load_lm("tiny-gpt2")
    corpus = _many_docs(tmp_path)
    snaps, count = accumulate_moments(lm, [1, 3], sample_windows(lm, corpus, 400, 16), checkpoints=[150], progress=False)
    assert count == 400 and set(snaps) == {150, 400}
    small, n = compute_second_moments(lm, [1, 3], corpus, 150, 16, progress=False)
    assert n == 150
    for layer in (1, 3):
        assert _rel(snaps[150][layer] / 150, small[layer]) < 1e-5


def test_key_changes_with_tokenizer(corpus_file):
    lm = load_lm("tiny-llama")
    corpus = file_corpus(corpus_file)
    before = _key(lm, lm.arch.mlp_out_path(1), corpus, 200, torch.float32, 64)
    assert before == _key(load_lm("tiny-llama"), lm.arch.mlp_out_path(1), corpus, 200, torch.float32, 64)
    lm.tokenizer = copy.deepcopy(lm.tokenizer)  # the tiny tokenizer object is shared: change a copy
    lm.tokenizer.add_tokens(["Warsawian"])
    after = _key(lm, lm.arch.mlp_out_path(1), corpus, 200, torch.float32, 64)
    assert before["tokenizer"] != after["tokenizer"]
    assert cache_path(before) != cache_path(after)


def test_key_changes_with_cleaner_version(tmp_path, monkeypatch):
    article = "'''Ulm''' is a city in [[Germany]] on the river Danube, known for its very tall minster church."
    xml = f"<mediawiki><page><text xml:space=\"preserve\">{article}\n\n{article}\n{article}</text></page></mediawiki>"
    src = tmp_path / "sample.xml.bz2"
    src.write_bytes(bz2.compress(xml.encode()))
    monkeypatch.setattr(corpus_mod, "_wiki_sample_path", lambda: src)
    lm = load_lm("tiny-llama")
    v1 = corpus_mod.wikipedia_sample()
    assert v1.cleaner == corpus_mod.CLEANER_VERSION
    assert "Ulm is a city in Germany" in v1.texts[0]
    monkeypatch.setattr(corpus_mod, "CLEANER_VERSION", corpus_mod.CLEANER_VERSION + 1)
    v2 = corpus_mod.wikipedia_sample()
    assert v2.cleaner == v1.cleaner + 1
    k1 = _key(lm, lm.arch.mlp_out_path(1), v1, 200, torch.float32, 64)
    k2 = _key(lm, lm.arch.mlp_out_path(1), v2, 200, torch.float32, 64)
    assert cache_path(k1) != cache_path(k2)


def test_computing_while_an_edit_is_active_is_refused_but_cache_reads_work(corpus_file):
    from editlab.methods import get_editor
    from editlab.requests import EditRequest

    lm = load_lm("tiny-llama")
    corpus = file_corpus(corpus_file)
    req = EditRequest.create("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome")
    edit = get_editor("ft-m").apply(lm, req, layer=0, steps=2)
    with pytest.raises(StatsCacheError, match="unedited model"):
        second_moments(lm, [1], corpus, n_tokens=200, seq_len=64, progress=False)
    assert not list(cache_dir("stats").rglob("*.safetensors"))
    assert stats_provenance(lm) == {}
    edit.restore()
    base = second_moments(lm, [1], corpus, n_tokens=200, seq_len=64, progress=False)[1]
    # statistics of the base model, cached, stay readable under an active edit (sequential editing)
    fresh = load_lm("tiny-llama")
    edit = get_editor("ft-m").apply(fresh, req, layer=0, steps=2)
    assert torch.equal(second_moments(fresh, [1], corpus, n_tokens=200, seq_len=64, progress=False)[1], base)
    with pytest.raises(StatsCacheError, match="restore"):  # a layer not cached yet is still refused
        second_moments(fresh, [2], corpus, n_tokens=200, seq_len=64, progress=False)
    edit.restore()


def test_provenance_reports_tokens_used_also_from_the_cache(corpus_file):
    lm = load_lm("tiny-gpt2")
    corpus = file_corpus(corpus_file)
    second_moments(lm, [1], corpus, n_tokens=200, seq_len=64, progress=False)
    second_moments(lm, [2], corpus, n_tokens=10**6, seq_len=64, progress=False)  # more than the corpus holds
    prov = stats_provenance(lm)
    assert set(prov) == {1, 2}
    assert prov[1]["n_tokens"] == prov[1]["tokens_used"] == 200
    assert prov[1]["corpus"] == corpus.name and prov[1]["seq_len"] == 64 and prov[1]["seed"] == 0
    docs = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in corpus.texts]
    whole = sum(len(d) - 1 for d in docs)  # each short document is one window; its position 0 is left out
    assert prov[2]["n_tokens"] == 10**6 and prov[2]["tokens_used"] == whole
    assert cache_path(_key(lm, lm.arch.mlp_out_path(2), corpus, 10**6, torch.float32, 64)) == Path(prov[2]["cache_file"])
    fresh = load_lm("tiny-gpt2")  # reads both from disk
    second_moments(fresh, [1, 2], corpus, n_tokens=200, seq_len=64, progress=False)
    second_moments(fresh, [2], corpus, n_tokens=10**6, seq_len=64, progress=False)
    assert stats_provenance(fresh) == prov


def test_cache_is_reused_and_corruption_is_detected(corpus_file):
    lm = load_lm("tiny-gpt2")
    corpus = file_corpus(corpus_file)
    first = second_moments(lm, [1], corpus, n_tokens=200, seq_len=64, progress=False)[1]
    key = _key(lm, lm.arch.mlp_out_path(1), corpus, 200, torch.float32, 64)
    path = cache_path(key)
    assert path.exists()
    fresh = load_lm("tiny-gpt2")  # no in-memory memo: must come from disk
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = second_moments(fresh, [1], corpus, n_tokens=200, seq_len=64, progress=False)[1]
    assert torch.equal(first, again)
    # flip bytes in the middle of the tensor data: checksum must catch it
    raw = bytearray(path.read_bytes())
    raw[-100:-90] = b"\x7f" * 10
    path.write_bytes(bytes(raw))
    fresh = load_lm("tiny-gpt2")
    with pytest.warns(StatsCacheWarning, match="checksum|unreadable|non-finite"):
        recomputed = second_moments(fresh, [1], corpus, n_tokens=200, seq_len=64, progress=False)[1]
    assert torch.equal(first, recomputed)
    # a truncated file is unreadable: also recomputed
    path.write_bytes(path.read_bytes()[:50])
    fresh = load_lm("tiny-gpt2")
    with pytest.warns(StatsCacheWarning):
        second_moments(fresh, [1], corpus, n_tokens=200, seq_len=64, progress=False)


def test_cache_for_another_key_is_not_used(corpus_file):
    lm = load_lm("tiny-llama")
    corpus = file_corpus(corpus_file)
    second_moments(lm, [1], corpus, n_tokens=200, seq_len=64, progress=False)
    src = cache_path(_key(lm, lm.arch.mlp_out_path(1), corpus, 200, torch.float32, 64))
    dst = cache_path(_key(lm, lm.arch.mlp_out_path(2), corpus, 200, torch.float32, 64))
    dst.write_bytes(src.read_bytes())  # layer-1 statistics placed where layer 2's belong
    fresh = load_lm("tiny-llama")
    with pytest.warns(StatsCacheWarning, match="computed for"):
        got = second_moments(fresh, [2], corpus, n_tokens=200, seq_len=64, progress=False)[2]
    assert _rel(got, _hand_moment(fresh, 2, corpus, 200)[0]) < 1e-5


def test_clean_wikitext():
    raw = "{{Infobox|a={{b}}}}'''Paris''' is the [[capital city|capital]] of [[France]].<ref>cite</ref> It is large and old and has many museums.\n== History ==\n[[Category:Cities]]"
    assert clean_wikitext(raw) == "Paris is the capital of France. It is large and old and has many museums."


def test_jsonl_corpus_errors(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "hello"}\n{"nope": 1}\n')
    with pytest.raises(DataFormatError, match="line 2"):
        file_corpus(p)
    with pytest.raises(DataFormatError, match="not found"):
        file_corpus(tmp_path / "missing.txt")


def test_statistics_of_a_bf16_model_are_summed_in_float64(corpus_file):
    """The keys of a bfloat16 model enter the sums exactly (upcast) and the sums are float64: the second
    moment equals a float64 computation by hand on the same keys, far closer than a bfloat16 sum."""
    lm = load_lm("tiny-llama", dtype="bfloat16")
    corpus = file_corpus(corpus_file)
    got = second_moments(lm, [1], corpus, n_tokens=300, seq_len=64, progress=False)[1]
    want, n = _hand_moment(lm, 1, corpus, 300)
    assert n == 300 and got.dtype == torch.float32
    rows = []
    head = list(lm.prefix_ids)
    with torch.no_grad(), hooks(lm.model, pre={lm.arch.mlp_out_path(1): lambda m, i: rows.append(i[0][0, max(1, len(head)):])}):
        for w in sample_windows(lm, corpus, 300, 64):
            lm.model(torch.tensor([head + list(w.ids)]))
    k = torch.cat(rows)
    in_bf16 = (k.T @ k) / k.shape[0]  # what summing in the model's dtype would give
    assert _rel(got, want) < 1e-5 < _rel(in_bf16, want)
