"""Texts that adapters train to leave alone, drawn from a dataset's probes (shared by WISE's x_irr and
T-Patcher's memory): the prompt + answer of every neighbourhood and locality probe of a dataset's records.
The reference runs of both methods take these from a training split, disjoint from the records whose
locality is scored; a dataset is loaded once per process."""

from __future__ import annotations

from typing import Sequence

from ...errors import HparamsError
from ...requests import EditRequest

_POOLS: dict[str, tuple[str, ...]] = {}


def probe_texts(requests: Sequence[EditRequest]) -> list[str]:
    """`"prompt answer"` of every neighbourhood and locality probe of `requests`, in order, without repeats."""
    texts = [f"{prompt} {answer.strip()}".strip() for r in requests
             for prompt, answer in (*r.neighborhood, *r.locality)]
    return list(dict.fromkeys(texts))


def probe_pool(source: str, what: str = "irr_data") -> tuple[str, ...]:
    """`probe_texts` of every record of dataset `source` (a name or a file). A dataset without probes
    raises `HparamsError` naming the hyper-parameter `what`."""
    if source not in _POOLS:
        from ...data import load_requests

        pool = tuple(probe_texts(load_requests(source)))
        if not pool:
            raise HparamsError(f"{what} {source!r} has no neighbourhood or locality probes to draw from")
        _POOLS[source] = pool
    return _POOLS[source]
