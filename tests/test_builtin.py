import pytest

from editlab.data.builtin import RELATIONS, builtin_requests


def test_builtin_benchmark_shape():
    reqs = builtin_requests()
    assert len(reqs) >= 60
    assert len({r.extra["relation"] for r in reqs}) >= 8 == len(RELATIONS) or len(RELATIONS) >= 8
    for r in reqs:
        assert r.target_new != r.target_true
        assert len(r.paraphrases) >= 2 and len(r.neighborhood) >= 5 and len(r.portability) == 1
        assert all(ans != r.target_new for _, ans in r.neighborhood)
    assert len({r.case_id for r in reqs}) == len(reqs)


@pytest.mark.slow
def test_smollm2_knows_every_builtin_fact(smollm2):
    reqs = builtin_requests()
    gens = smollm2.generate([r.prompt for r in reqs], 6)
    wrong = [(r.prompt, r.target_true, g) for r, g in zip(reqs, gens) if not g.strip().lower().startswith(r.target_true.lower())]
    assert not wrong, wrong
