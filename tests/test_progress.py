"""Progress of long computations reaches the watchers of the thread that runs them (and nobody else), a
broken watcher never breaks the work, covariance statistics report their tokens up to the total, and the
playground's status shows the progress of the edit it is running."""

from __future__ import annotations

import threading

import pytest

from editlab.models import load_lm
from editlab.progress import report, watching


def test_reports_reach_this_threads_watchers_only():
    seen, inner = [], []
    report("nobody watches", 1, 2)  # no watcher: nothing happens
    with watching(lambda *a: seen.append(a)):
        report("a", 1, 4)
        with watching(lambda *a: inner.append(a)):
            report("b", 2, 4)
        other = threading.Thread(target=report, args=("another thread", 1, 1))
        other.start()
        other.join()
        report("c", 3, 4)
    report("after", 4, 4)
    assert seen == [("a", 1, 4), ("b", 2, 4), ("c", 3, 4)] and inner == [("b", 2, 4)]


def test_a_watcher_that_raises_does_not_break_the_work():
    def broken(*_):
        raise RuntimeError("watcher bug")

    seen = []
    with watching(broken), watching(lambda *a: seen.append(a)):
        report("t", 1, 1)
    assert seen == [("t", 1, 1)]


def test_covariance_statistics_report_tokens_up_to_the_total(tmp_path):
    from editlab.stats.corpus import file_corpus
    from editlab.stats.covariance import compute_second_moments

    lm = load_lm("tiny-gpt2")
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(f"Document {i} says some words of text here. " * 6 for i in range(30)))
    corpus = file_corpus(path)
    seen = []
    with watching(lambda *a: seen.append(a)):
        _, n = compute_second_moments(lm, [1, 3], corpus, 300, 16, progress=False)
    assert seen[0] == ("covariance statistics of layers 1, 3", 0, n)
    assert [d for _, d, _ in seen] == sorted(d for _, d, _ in seen) and seen[-1][1:] == (n, n) and len(seen) > 2


def test_the_playground_status_shows_the_running_edits_progress(monkeypatch):
    from editlab.methods import restore_all
    from editlab.serve import Playground
    from editlab.serve import playground as module

    lm = load_lm("tiny-trained-llama")
    restore_all(lm)
    pg = Playground(lm)
    halfway, go = threading.Event(), threading.Event()
    real = module.get_editor

    class Slow:
        def __init__(self, editor):
            self._e = editor

        def __getattr__(self, name):
            return getattr(self._e, name)

        def apply(self, *args, **kwargs):
            report("covariance statistics of layer 2", 40, 100)
            halfway.set()
            assert go.wait(30)
            return self._e.apply(*args, **kwargs)

    monkeypatch.setattr(module, "get_editor", lambda name: Slow(real(name)))
    from editlab.methods.catalogue import METHODS

    done = []
    t = threading.Thread(target=lambda: done.append(pg.apply(
        "rome", "The capital of France is", "France", "Rome", "Paris", hparams=METHODS.entry("rome").meta["tiny_hparams"])))
    t.start()
    try:
        assert halfway.wait(30)
        status = pg.status()
        assert status["busy"] and status["progress"] == {"task": "covariance statistics of layer 2", "done": 40, "total": 100}
    finally:
        go.set()
        t.join(120)
    assert done and pg.status()["progress"] is None and not pg.status()["busy"]
    pg.undo()
    pg.close()
    assert not lm.active_edits


@pytest.fixture(autouse=True)
def _no_leftover_watchers():
    yield
    from editlab import progress

    assert getattr(progress._local, "watchers", ()) == ()
