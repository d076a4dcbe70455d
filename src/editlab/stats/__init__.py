"""Covariance statistics of MLP keys over generic text (cached), and the corpora they come from."""

from .corpus import Corpus, clean_wikitext, file_corpus, get_corpus, wikipedia_sample
from .covariance import DEFAULT_N_TOKENS, StatsCacheWarning, cache_path, compute_second_moments, load_cached, second_moments

__all__ = [
    "Corpus", "clean_wikitext", "file_corpus", "get_corpus", "wikipedia_sample", "DEFAULT_N_TOKENS", "StatsCacheWarning",
    "cache_path", "compute_second_moments", "load_cached", "second_moments",
]
