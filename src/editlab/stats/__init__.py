"""Covariance statistics of MLP keys over generic text (cached), and the corpora they come from."""

from .corpus import CLEANER_VERSION, Corpus, clean_wikitext, file_corpus, get_corpus, wikipedia_sample
from .covariance import (
    DEFAULT_N_TOKENS, DEFAULT_SEED, StatsCacheWarning, cache_path, compute_second_moments, load_cached,
    sample_windows, second_moments, stats_provenance,
)

__all__ = [
    "CLEANER_VERSION", "Corpus", "clean_wikitext", "file_corpus", "get_corpus", "wikipedia_sample",
    "DEFAULT_N_TOKENS", "DEFAULT_SEED", "StatsCacheWarning", "cache_path", "compute_second_moments",
    "load_cached", "sample_windows", "second_moments", "stats_provenance",
]
