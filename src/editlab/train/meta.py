"""One training loop for every hypernetwork editor (MEND, MALMEN, KE): `train_editor`.

The editor network implements `EditorNet`: `losses(lm, examples, hp, training=...)` returns the edit loss
(NLL of the new answer on the edit prompt and its paraphrases, made by the *edited* model), the locality
KL (unedited ‖ edited on unrelated prompts) and accuracies. The loop:

- holds out the last `val_records` training records as the validation split (never reported results);
- walks the remaining records in a seeded order, `edits_per_step` edits per micro-batch, `accumulate`
  micro-batches per Adam step, gradient norm clipped to `grad_clip`;
- validates every `val_every` steps, keeps the best editor by validation loss and stops after `patience`
  validations without improvement;
- with `ema > 0` (editlab's option, off in the papers' presets) validates and keeps an exponential moving
  average of the editor's parameters (Polyak averaging, decay `ema` per step) instead of the live ones:
  with a large editor learning rate the live editor swings between strong, unspecific edits and weak ones
  from one validation to the next; the average follows the trend without the swing;
- writes a resumable state (editor, optimizer, step, best editor, history) at every validation into
  `workdir/state.pt` by rename, so a killed run continues from its last validation when started again;
- shows a progress bar with the running loss, the last validation and the ETA.

Training never changes the LM: edits are made through forward hooks (`methods/meta/factors.py`)."""

from __future__ import annotations

import contextlib
import copy
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from ..errors import CheckpointError, DataFormatError
from ..fileio import temp_path_in
from ..requests import EditRequest

STATE = "state.pt"
STATE_FORMAT = 1


@dataclass(frozen=True)
class Example:
    """One training edit: the edit (prompt, new answer), texts that must follow it (the edit itself and
    its paraphrases, each with the new answer) and unrelated texts that must not move."""

    edit: tuple[str, str]
    equiv: tuple[tuple[str, str], ...]
    loc: tuple[tuple[str, str], ...]
    subject: str = ""
    old: str | None = None


def examples_from_requests(requests: Sequence[EditRequest]) -> list[Example]:
    """Examples from edit requests. Locality texts: the record's neighbourhood and locality probes; a
    record without any borrows the next record's prompt with that record's true answer (an unrelated
    fact). Raises `DataFormatError` when no record gives a usable example."""
    reqs = list(requests)
    out: list[Example] = []
    for i, r in enumerate(reqs):
        equiv = ((r.prompt, r.target_new),) + tuple((p, r.target_new) for p, _ in r.paraphrases)
        loc = tuple(r.neighborhood) + tuple(r.locality)
        if not loc and len(reqs) > 1:
            other = reqs[(i + 1) % len(reqs)]
            loc = ((other.prompt, other.target_true or other.target_new),)
        if not loc:
            continue
        out.append(Example((r.prompt, r.target_new), equiv, loc, r.subject, r.target_true))
    if not out:
        raise DataFormatError("the training data has no usable record: each needs an unrelated (neighbourhood or "
                              "locality) prompt, or there must be at least two records")
    return out


class EditorNet(Protocol):
    def losses(self, lm: Any, examples: Sequence[Example], hp: Any, *, training: bool) -> dict[str, torch.Tensor]:
        """'loss' (differentiable when training) plus float tensors 'edit_nll', 'loc_kl', 'edit_acc', 'loc_acc'."""
        ...

    def param_groups(self, hp: Any) -> list[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...

    def after_validation(self, metrics: dict[str, float]) -> None: ...


@dataclass
class TrainResult:
    state: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


def split_examples(examples: list[Example], val_records: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): the last `val_records` examples validate when enough remain to train on."""
    if val_records and len(examples) > val_records + 1:
        return examples[:-val_records], examples[-val_records:]
    return examples, []


def _batches(n: int, size: int, seed: int, start: int) -> Any:
    """Endless seeded walk over range(n) in chunks of `size`, starting at chunk number `start`."""
    per_epoch = max(1, n // size)
    k = start
    while True:
        epoch, i = divmod(k, per_epoch)
        order = list(range(n))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        yield order[i * size : (i + 1) * size] or order[:size]
        k += 1


def evaluate(net: EditorNet, lm: Any, examples: Sequence[Example], hp: Any) -> dict[str, float]:
    """Mean validation metrics over `examples`, in micro-batches of `edits_per_step`."""
    totals: dict[str, float] = {}
    n = 0
    size = max(1, hp.edits_per_step)
    for i in range(0, len(examples), size):
        chunk = examples[i : i + size]
        out = net.losses(lm, chunk, hp, training=False)
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v) * len(chunk)
        n += len(chunk)
    return {k: v / max(1, n) for k, v in totals.items()}


def _save_state(workdir: Path, state: dict[str, Any]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_in(workdir, STATE)
    try:
        torch.save(state, tmp)
        os.replace(tmp, workdir / STATE)
    finally:
        tmp.unlink(missing_ok=True)


def _load_state(workdir: Path) -> dict[str, Any] | None:
    path = workdir / STATE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged resume file: say so, then start over rather than crash
        raise CheckpointError(f"the resumable training state {path} is damaged ({type(e).__name__}); "
                              f"delete it or train with --force") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"the resumable training state {path} has another format; delete it or train with --force")
    return state


class _Average:
    """Exponential moving average of a network's floating-point parameters (buffers, such as MEND's running
    factor statistics, are not averaged: the live ones are used)."""

    def __init__(self, net: Any, decay: float) -> None:
        self.decay = decay
        self.params = {n: p.detach().clone() for n, p in net.named_parameters() if p.is_floating_point()}

    @torch.no_grad()
    def update(self, net: Any) -> None:
        for n, p in net.named_parameters():
            if n in self.params:
                self.params[n].lerp_(p.detach(), 1.0 - self.decay)

    def state(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.params.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.params.keys() or any(state[n].shape != t.shape for n, t in self.params.items()):
            raise CheckpointError("the resumable training state's averaged editor does not fit this editor; "
                                  "train with --force")
        for n, t in self.params.items():  # in place: keeps the network's device (the state loads on CPU)
            t.copy_(state[n])


@contextlib.contextmanager
def _swapped(net: Any, shadow: _Average | None) -> Any:
    """Inside: `net` holds the averaged parameters (when averaging); after: its live ones again."""
    if shadow is None:
        yield
        return
    live = {n: p.detach().clone() for n, p in net.named_parameters() if n in shadow.params}
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n in shadow.params:
                p.copy_(shadow.params[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in net.named_parameters():
                if n in live:
                    p.copy_(live[n])


def train_editor(net: Any, lm: Any, examples: list[Example], hp: Any, *, workdir: Path | None = None,
                 progress: bool = True, name: str = "editor") -> TrainResult:
    """Train `net` (an `EditorNet` nn.Module) on `examples`; see the module docstring."""
    from tqdm.auto import tqdm

    train, val = split_examples(examples, hp.val_records)
    opt = torch.optim.Adam(net.param_groups(hp))
    decay = float(getattr(hp, "ema", 0.0) or 0.0)
    shadow = _Average(net, decay) if decay > 0 else None
    step, best_loss, bad, history = 0, float("inf"), 0, []
    best_state: dict[str, torch.Tensor] | None = None
    elapsed = 0.0
    resumed = False
    if workdir is not None:
        saved = _load_state(workdir)
        if saved is not None:
            try:
                net.load_state_dict(saved["net"])
                opt.load_state_dict(saved["opt"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise CheckpointError(f"the resumable training state in {workdir} does not fit this editor "
                                      f"({str(e).splitlines()[0][:120]}); train with --force") from None
            step, best_loss, bad, history = saved["step"], saved["best_loss"], saved["bad"], list(saved["history"])
            best_state, elapsed, resumed = saved.get("best"), float(saved.get("elapsed", 0.0)), True
            if shadow is not None:
                if saved.get("ema") is None:
                    raise CheckpointError(f"the resumable training state in {workdir} was written without ema; "
                                          f"train with --force")
                shadow.load(saved["ema"])
    size = min(hp.edits_per_step, len(train))
    walk = _batches(len(train), size, hp.seed, step * hp.accumulate)
    bar = tqdm(total=hp.steps, initial=step, desc=f"train {name}", unit="step", disable=not progress, leave=False)
    running: float | None = None
    stopped_early = False
    t0 = time.perf_counter() - elapsed
    net.train()
    try:
        while step < hp.steps:
            opt.zero_grad()
            total = 0.0
            for _ in range(hp.accumulate):
                batch = [train[i] for i in next(walk)]
                out = net.losses(lm, batch, hp, training=True)
                (out["loss"] / hp.accumulate).backward()
                total += float(out["loss"].detach()) / hp.accumulate
            if hp.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], hp.grad_clip)
            opt.step()
            if shadow is not None:
                shadow.update(net)
            step += 1
            running = total if running is None else 0.95 * running + 0.05 * total
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", val=f"{best_loss:.3f}" if best_loss < float("inf") else "-")
            if step % hp.val_every == 0 or step == hp.steps:
                entry: dict[str, Any] = {"step": step, "train_loss": round(running, 5),
                                         "seconds": round(time.perf_counter() - t0, 1)}
                if val:
                    net.eval()
                    with _swapped(net, shadow):
                        metrics = evaluate(net, lm, val, hp)
                        candidate = {k: v.detach().clone() for k, v in net.state_dict().items()}
                    net.train()
                    entry.update({f"val_{k}": round(v, 5) for k, v in metrics.items()})
                    net.after_validation(metrics)
                    if metrics["loss"] < best_loss:
                        best_loss, bad = metrics["loss"], 0
                        best_state = candidate
                    else:
                        bad += 1
                history.append(entry)
                if workdir is not None:
                    _save_state(workdir, {"format": STATE_FORMAT, "net": net.state_dict(), "opt": opt.state_dict(),
                                          "step": step, "best_loss": best_loss, "bad": bad, "history": history,
                                          "best": best_state, "elapsed": time.perf_counter() - t0,
                                          "ema": None if shadow is None else shadow.state()})
                if val and hp.patience and bad >= hp.patience:
                    stopped_early = True
                    break
    finally:
        bar.close()
        net.eval()
    if best_state is not None:
        final = best_state
    else:
        with _swapped(net, shadow):
            final = {k: v.detach().clone() for k, v in net.state_dict().items()}
    meta = {"steps": step, "stopped_early": stopped_early, "resumed": resumed, "train_records": len(train),
            "val_records": len(val), "best_val_loss": None if best_loss == float("inf") else round(best_loss, 5),
            "history": history, "seconds": round(time.perf_counter() - t0, 1)}
    return TrainResult(copy.copy(final), meta)
