"""Runs a method on requests in one of three modes and writes each finished row to the store.

- single: for each request, edit -> evaluate -> restore (one row per request).
- batch: k requests per edit (one row per request; the edit time is the batch's, shared).
- sequential: edits accumulate without restore; at each checkpoint (number of edits so far) one row
  evaluates the newest edits, retention of all earlier edits, locality probes and perplexity. The edit
  stack is saved at each checkpoint (`stacks.py`), so a resumed run continues after the newest one.
Pre-edit values are computed once per model fingerprint and kept in the store for every method/mode.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Collection, Sequence

from ..errors import EditlabError, EditRequestError
from ..eval.metrics import PreEdit, evaluate_requests, pre_edit, summarize
from ..eval.perplexity import perplexity, text_windows
from ..memory import release_freed_memory
from ..methods import get_editor, restore_all
from ..models.lm import LM
from ..requests import EditRequest
from .config import MODES, RunConfig  # noqa: F401 (re-exported)
from .stacks import RunStacks
from .store import Row, Store, ckpt_key


def run_id_for(lm: LM, cfg: RunConfig, requests: Sequence[EditRequest], hparams: dict[str, Any]) -> str:
    key = {
        "model": lm.base_fingerprint, "method": cfg.method, "mode": cfg.mode, "dataset": cfg.dataset,
        "batch": cfg.batch_size if cfg.mode == "batch" else None, "checkpoints": cfg.checkpoints if cfg.mode == "sequential" else None,
        "hparams": hparams, "seed": cfg.seed, "generation": cfg.generation, "fluency": cfg.fluency,
        "requests": hashlib.sha256(json.dumps([r.to_dict() for r in requests], sort_keys=True).encode()).hexdigest(),
    }
    if cfg.probes:  # absent otherwise, so that runs stored before probes existed keep their ids
        key["probes"] = {"names": sorted(cfg.probes), "budget": cfg.probe_budget}  # order measured is immaterial
    return f"{cfg.method}-{cfg.mode}-" + hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def versions() -> dict[str, str]:
    import platform

    import torch
    import transformers

    from .. import __version__

    return {"editlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def shared_pre_edit(lm: LM, store: Store, requests: Sequence[EditRequest]) -> PreEdit:
    """Pre-edit predictions for these requests, from the store where present, computed otherwise."""
    cache = PreEdit(store.load_pre_edit(lm.base_fingerprint))
    before = set(cache.argmax)
    pre_edit(lm, requests, cache)
    new = {k: v for k, v in cache.argmax.items() if k not in before}
    if new:
        store.save_pre_edit(lm.base_fingerprint, new)
    return cache


Progress = Callable[[int, int, str], None]


def _record_statistics(store: Store, run_id: str, edit: Any) -> None:
    """Keep in the run's config which covariance statistics the edits used (corpus, token counts)."""
    stats = edit.info.get("statistics")
    if stats:
        stats = json.loads(json.dumps(stats, default=str))
    if stats and store.runs_config(run_id).get("statistics") != stats:
        store.update_run_config(run_id, statistics=stats)


def _prepared_probes(lm: LM, cfg: RunConfig, store: Store, run_id: str, tick: Progress, total: int) -> list[Any]:
    """The run's probes, prepared on the unedited model (data read, reference values computed); their
    sizes are kept in the run's config."""
    if not cfg.probes:
        return []
    from ..probes import get_probes

    probes = get_probes(cfg.probes, cfg.probe_budget)
    for p in probes:
        tick(0, total, f"preparing probe {p.name} (unedited model)")
        p.prepare(lm)
    info = json.loads(json.dumps({p.name: p.info() for p in probes}, default=str))
    if store.runs_config(run_id).get("probe_info") != info:
        store.update_run_config(run_id, probe_info=info)
    return probes


def _measure_probes(probes: Sequence[Any], system: Any, lm: LM) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in probes:
        out.update(p.measure(system, lm))
    return out


@dataclass(frozen=True)
class RunPlan:
    """What a run is, as the store keeps it: its id and the fields of its `runs` row."""

    run_id: str
    fields: dict[str, Any]
    hparams: Any  # the method's resolved Hparams


def plan_run(lm: LM, cfg: RunConfig, requests: Sequence[EditRequest]) -> RunPlan:
    """Check `cfg` against the method and the model and name the run (before anything is edited)."""
    if not requests:
        raise EditRequestError("no requests to run")
    cfg.validate(len(requests))
    editor = get_editor(cfg.method)
    if cfg.mode == "batch" and cfg.batch_size > 1 and not editor.supports_batch:
        raise EditlabError(f"method {cfg.method!r} does not support batch edits; use --mode single or a batch method")
    hp = editor.hparams(lm, **cfg.hparams)
    run_id = run_id_for(lm, cfg, requests, hp.identity())
    fields = dict(
        model=lm.name, model_fingerprint=lm.base_fingerprint, method=cfg.method, mode=cfg.mode,
        dataset=cfg.dataset, n_requests=len(requests), seed=cfg.seed, hparams=hp.to_dict(),
        config={"batch_size": cfg.batch_size, "checkpoints": cfg.checkpoints, "generation": cfg.generation,
                "fluency": cfg.fluency, **({"probes": list(cfg.probes), "probe_budget": cfg.probe_budget} if cfg.probes else {})},
        versions=versions(),
    )
    return RunPlan(run_id, fields, hp)


def chunk_size(cfg: RunConfig) -> int:
    """Requests per edit of a single or batch run."""
    return cfg.batch_size if cfg.mode == "batch" else 1


def chunk_starts(cfg: RunConfig, n_requests: int) -> list[int]:
    """The first request index of each edit of a single or batch run (one edit per request or per batch)."""
    return list(range(0, n_requests, chunk_size(cfg)))


def row_key(i: int, r: EditRequest) -> str:
    """The store key of request `i`'s row in a single or batch run."""
    return f"{i}:{r.case_id}"


REFUSED = "refused:"


def refused_key(i: int) -> str:
    """The store key of the `error` row of request `i`, which a sequential run's method could not write."""
    return f"{REFUSED}{i}"


def refused_requests(done: Collection[str]) -> set[int]:
    """Indices of the requests a sequential run has recorded as refused (from its row keys)."""
    return {int(k[len(REFUSED):]) for k in done if k.startswith(REFUSED)}


def chunk_keys(cfg: RunConfig, requests: Sequence[EditRequest], start: int) -> list[str]:
    """The row keys of the edit that starts at request `start`."""
    return [row_key(i, requests[i]) for i in range(start, min(start + chunk_size(cfg), len(requests)))]


def sequence_finished(cfg: RunConfig, done: Collection[str]) -> bool:
    """Whether a sequential run has every checkpoint row in `done` (the rule that skips it)."""
    return all(ckpt_key(c) in done for c in cfg.checkpoints)


def edit_finished(cfg: RunConfig, requests: Sequence[EditRequest], start: int, done: set[str]) -> bool:
    """Whether the edit that starts at request `start` has every one of its rows in `done`."""
    return done.issuperset(chunk_keys(cfg, requests, start))


def _complete(cfg: RunConfig, requests: Sequence[EditRequest], shard: Collection[int] | None, done: set[str]) -> bool:
    """Whether every row this call would write is already in `done` (a finished run only prints that it
    is done, so it needs no editor)."""
    if cfg.mode == "sequential":
        return sequence_finished(cfg, done)
    starts = sorted(shard) if shard is not None else chunk_starts(cfg, len(requests))
    return all(edit_finished(cfg, requests, s0, done) for s0 in starts)


def run(
    lm: LM,
    requests: Sequence[EditRequest],
    cfg: RunConfig,
    store: Store,
    progress: Progress | None = None,
    resume: bool = True,
    shard: Collection[int] | None = None,
) -> str:
    """Run `cfg` on `requests`, writing rows to `store`. Returns the run id. With `resume`, rows
    already in the store for the same run are skipped. `shard` (single and batch modes) restricts the
    work to the edits starting at these request indices (see `chunk_starts`); the run, its id and its
    row keys stay those of all `requests`, so shards run anywhere fill one run between them."""
    if lm.active_edits:
        raise EditlabError("the model carries active edits; restore them before running")
    plan = plan_run(lm, cfg, requests)
    editor, hp, run_id = get_editor(cfg.method), plan.hparams, plan.run_id
    if shard is not None and cfg.mode == "sequential":
        raise EditlabError("a sequential run is one sequence of edits; it cannot be cut into shards")
    done = store.done_keys(run_id)
    if not _complete(cfg, requests, shard, done):
        editor.check_ready(lm, hp)  # before the unedited pass: a learned editor without its network fails now
    existed = store.ensure_run(run_id, **plan.fields)
    if existed and not resume and done:
        raise EditlabError(f"run {run_id} already has {len(done)} rows in {store.path}; pass --resume to continue it")
    tick = progress or (lambda i, n, msg: None)
    key_of = row_key

    if cfg.mode in ("single", "batch"):
        size = chunk_size(cfg)
        starts = chunk_starts(cfg, len(requests))
        if shard is not None:
            bad = sorted(set(shard) - set(starts))
            if bad:
                raise EditlabError(f"shard index {bad[0]} is not the first request of an edit of this run")
            starts = sorted(set(shard))
        mine = [r for s0 in starts for r in requests[s0 : s0 + size]]
        pre = shared_pre_edit(lm, store, mine)
        n_now = 0
        for start in starts:
            chunk = [(i, requests[i]) for i in range(start, min(start + size, len(requests)))]
            todo = [(i, r) for i, r in chunk if key_of(i, r) not in done]
            n_now += len(chunk)
            if not todo:
                tick(n_now, len(mine), "skipped (done)")
                continue
            batch_reqs = [r for _, r in chunk]
            t0 = time.perf_counter()
            edit = editor.apply(lm, batch_reqs if size > 1 else batch_reqs[0], hp)
            t_edit = time.perf_counter() - t0
            try:
                _record_statistics(store, run_id, edit)
                t1 = time.perf_counter()
                rows = evaluate_requests(edit.lm, [r for _, r in todo], pre, generation=cfg.generation,
                                         fluency=cfg.fluency, seed=cfg.seed)
                t_eval = (time.perf_counter() - t1) / len(todo)
            finally:
                edit.restore()
            for (i, r), m in zip(todo, rows):
                store.add_row(Row(run_id, key_of(i, r), r.case_id, "edit", len(chunk), t_edit / len(chunk), t_eval, m))
            tick(n_now, len(mine), f"{cfg.method} {n_now}/{len(mine)}")
        return run_id

    # sequential: a resumed run loads the edit stack saved at its newest finished checkpoint (see
    # stacks.py) and continues after it; without a usable one it re-applies the (deterministic) edits
    # from the first. Either way it evaluates only the missing checkpoints.
    pre = shared_pre_edit(lm, store, requests)
    stacks = RunStacks(store.path, run_id)
    if sequence_finished(cfg, done):
        stacks.discard()  # a kill after the last row may have left one
        tick(len(requests), len(requests), "skipped (done)")
        return run_id
    windows = text_windows(lm, cfg.ppl_text, 1024) if cfg.ppl_text else []
    base_ppl = perplexity(lm, windows) if windows else None  # before any edit is loaded or applied
    probes = _prepared_probes(lm, cfg, store, run_id, tick, len(requests))  # on the unedited model, like base_ppl
    final_ckpt = max(cfg.checkpoints)
    if 0 in cfg.checkpoints and ckpt_key(0) not in done:
        t1 = time.perf_counter()
        metrics = {"perplexity": base_ppl, "perplexity_base": base_ppl} if windows else {}
        metrics.update(_measure_probes(probes, lm, lm))
        store.add_row(Row(run_id, ckpt_key(0), None, "checkpoint", 0, None, time.perf_counter() - t1, metrics))
    # a request the method refuses (an EditlabError from `apply`, which leaves the model as it was) gets an
    # `error` row and the sequence goes on without it; checkpoints score the edits that were written and
    # count the refused ones (`edits_refused`)
    refused = refused_requests(done)
    try:
        start = stacks.resume(lm, cfg.method, requests, cfg.checkpoints, done, refused)
        refused = {i for i in refused if i < start}  # later requests are edited (or refused) again
        prev = lm.active_edits[-1] if lm.active_edits else None
        last = start  # a resumed stack ends at a checkpoint
        if start:
            tick(start, len(requests), f"{cfg.method} sequential: resumed from the edits saved at {start}")
        for n_done in range(start + 1, len(requests) + 1 if final_ckpt > 0 else 1):
            r = requests[n_done - 1]
            t0 = time.perf_counter()
            try:
                prev = editor.apply(lm, r, hp, on=prev if editor.supports_on else None)
            except EditlabError as e:
                t_edit = time.perf_counter() - t0
                refused.add(n_done - 1)
                warnings.warn(f"{cfg.method} refused edit {n_done} of the sequence ({r.prompt!r} -> {r.target_new!r}): "
                              f"{e} (recorded; the sequence goes on without it)", stacklevel=2)
                store.add_row(Row(run_id, refused_key(n_done - 1), r.case_id, "error", n_done, t_edit, None,
                                  {"error": f"{type(e).__name__}: {e}"}))  # type: ignore[dict-item]
            else:
                t_edit = time.perf_counter() - t0
                release_freed_memory()  # long sequences: keep resident memory to what is alive
                _record_statistics(store, run_id, prev)
            if n_done in cfg.checkpoints:
                row = None
                if ckpt_key(n_done) not in done:
                    t1 = time.perf_counter()
                    system = prev.lm if prev is not None else lm
                    written = [i for i in range(n_done) if i not in refused]
                    all_rows = evaluate_requests(system, [requests[i] for i in written], pre, fluency=cfg.fluency,
                                                 seed=cfg.seed) if written else []
                    s_all = summarize(all_rows) if all_rows else {}
                    newest = [m for i, m in zip(written, all_rows) if i >= last]
                    s_new = summarize(newest) if newest else {}
                    metrics = {f"retention_{k}": v for k, v in s_all.items()}
                    metrics.update({f"newest_{k}": v for k, v in s_new.items()})
                    metrics["edits_refused"] = float(len(refused))
                    if windows:
                        metrics["perplexity"] = perplexity(system, windows)
                        metrics["perplexity_base"] = base_ppl  # type: ignore[assignment]
                    metrics.update(_measure_probes(probes, system, lm))
                    row = Row(run_id, ckpt_key(n_done), None, "checkpoint", n_done, t_edit, time.perf_counter() - t1, metrics)
                # save the stack BEFORE writing the row: a kill in between leaves a stack whose row is
                # missing, which resume ignores (stacks.py). The last checkpoint needs no stack: once
                # its row exists the run is done.
                saved = stacks.save(lm, n_done) if n_done < final_ckpt else None
                if row is not None:
                    store.add_row(row)
                if saved is not None:
                    stacks.prune(saved)
                last = n_done
            tick(n_done, len(requests), f"{cfg.method} sequential {n_done}/{len(requests)}")
            if n_done >= final_ckpt:  # edits after the last checkpoint would never be evaluated
                break
        stacks.discard()  # finished: the stacks only serve to resume
    finally:
        restore_all(lm)
    return run_id
