"""Models: loading (`load_lm`), the `LM` interface and per-architecture `ArchSpec`s."""

from .arch import ARCHS, ArchSpec, arch_for, supported_architectures
from .lm import LM, ContinuationScore, model_fingerprint
from .loading import MODELS, load_lm, resolve_dtype

__all__ = [
    "ARCHS", "ArchSpec", "arch_for", "supported_architectures", "LM", "ContinuationScore",
    "model_fingerprint", "MODELS", "load_lm", "resolve_dtype",
]
