import warnings

import pytest
import torch

from editlab.errors import DataFormatError
from editlab.hooks import hooks
from editlab.models import load_lm
from editlab.stats import StatsCacheWarning, cache_path, clean_wikitext, file_corpus, second_moments
from editlab.stats.covariance import _key


def _hand_moment(lm, layer, corpus, n_tokens, seq_len=64):
    """E[k kᵀ] from a plain forward pass with a hook, over the same token windows."""
    from editlab.stats.covariance import _token_windows

    rows = []
    path = lm.arch.mlp_out_path(layer)
    with torch.no_grad(), hooks(lm.model, pre={path: lambda m, i: rows.append(i[0][0])}):
        for w in _token_windows(lm, corpus, n_tokens, seq_len):
            lm.model(torch.tensor([w]))
    k = torch.cat(rows).double()
    return k.T @ k / k.shape[0]


def test_second_moment_matches_hand_computation(corpus_file):
    lm = load_lm("tiny-llama")
    corpus = file_corpus(corpus_file)
    got = second_moments(lm, [1, 2], corpus, n_tokens=300, seq_len=64, progress=False)
    for layer in (1, 2):
        assert torch.allclose(got[layer].double(), _hand_moment(lm, layer, corpus, 300), atol=1e-6)


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
    assert torch.allclose(got.double(), _hand_moment(fresh, 2, corpus, 200), atol=1e-6)


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
