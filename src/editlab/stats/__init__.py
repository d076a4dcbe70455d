"""Covariance statistics of MLP keys over generic text (cached), and the corpora they come from.

Names are imported on first use, so `editlab.stats.defaults` (and the corpus helpers) load without torch."""

from editlab.lazyimport import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".corpus": ("CLEANER_VERSION", "Corpus", "clean_wikitext", "file_corpus", "get_corpus", "wikipedia_sample"),
    ".defaults": ("DEFAULT_N_TOKENS", "DEFAULT_SEED"),
    ".covariance": (
        "StatsCacheWarning", "cache_path", "compute_second_moments", "load_cached", "sample_windows",
        "second_moments", "stats_provenance", "warm_statistics", "shared_moments", "install_moments",
    ),
})
