"""Models: loading (`load_lm`), the `LM` interface and per-architecture `ArchSpec`s. Names are imported
on first use; `sources` (the model registry, source and dtype checks) loads without torch."""

from editlab.lazyimport import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".arch": ("ARCHS", "ArchSpec", "arch_for", "supported_architectures"),
    ".lm": ("LM", "ContinuationScore", "model_fingerprint"),
    ".loading": ("load_lm", "resolve_dtype"),
    ".sources": ("MODELS",),
})
