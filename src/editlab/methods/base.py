"""Shared editor machinery: the `Editor` base class (`apply` with transactional weight updates) and
`get_editor`. Hyper-parameters live in `hparams.py`, the method catalogue in `catalogue.py` (both torch-free)."""

from __future__ import annotations

import shutil
from abc import ABC
from typing import Any, ClassVar, Mapping, Sequence

import torch

from ..errors import CheckpointError, EditlabError, EditRequestError, EditStackError, HparamsError
from ..models.lm import LM
from ..requests import EditRequest, check_fits
from ..train.checkpoints import Checkpoint, checkpoint_key, find_checkpoint, latest_checkpoint, save_checkpoint, work_dir
from .catalogue import METHODS, available_methods  # noqa: F401 (re-exported)
from .edit import Edit
from .hparams import KNOWN_MODELS, Hparams, known_model, model_signature  # noqa: F401 (re-exported)
from .patches import Patch, WeightDelta


class Editor(ABC):
    """One editing method. Weight-delta methods implement `compute_deltas`; methods that add modules or
    views (or mix patch kinds) override `compute_patches`. Learned editors set `requires_training` and
    implement `train` (see `fit`)."""

    name: ClassVar[str]
    hparams_cls: ClassVar[type[Hparams]]
    supports_batch: ClassVar[bool] = False
    supports_on: ClassVar[bool] = False  # can extend the previous edit: apply(..., on=previous)
    # a sequence (on=) may edit a prompt it already edited to another answer (RoundEdit's way back)
    reedits_prompts: ClassVar[bool] = True
    requires_training: ClassVar[bool] = False
    checkpoint_format: ClassVar[int] = 1  # bump when a learned editor's network changes meaning

    def hparams(self, lm: LM, **overrides: Any) -> Hparams:
        return self.hparams_cls.for_model(lm, **overrides)

    def prepare(self, lm: LM, hp: Any) -> None:
        """Do ahead what this method's first edit on `lm` computes once and keeps (ROME's context
        templates, ...), so that edit is no slower than the next: a server calls it when it starts.
        Never anything of minutes (statistics are computed by the first edit that needs them, or by
        `editlab stats`). Default: nothing."""

    def check_ready(self, lm: LM, hp: Any) -> None:
        """Raise the named error now if this method cannot edit `lm` with `hp` at all, so that a run
        stops before its first unit (and before minutes of unedited passes) instead of recording the
        same failure for every record. Default: a learned editor needs its trained network
        (`CheckpointError`, naming the training command); other methods are always ready."""
        if self.requires_training:
            self.checkpoint(lm, hp)

    def _resolve_hparams(self, lm: LM, hparams: Hparams | Mapping[str, Any] | None, overrides: dict[str, Any]) -> Hparams:
        if hparams is None:
            return self.hparams(lm, **overrides)
        if isinstance(hparams, Hparams):
            hp = hparams.replace(**overrides) if overrides else hparams
            hp.check_counts()
            hp.validate(lm)
            return hp
        if isinstance(hparams, Mapping):
            return self.hparams(lm, **{**dict(hparams), **overrides})
        raise HparamsError(f"hparams must be a {self.hparams_cls.__name__}, a mapping or None; got {type(hparams).__name__}")

    def apply(
        self,
        lm: LM,
        requests: EditRequest | Sequence[EditRequest],
        hparams: Hparams | Mapping[str, Any] | None = None,
        *,
        on: Edit | None = None,
        **overrides: Any,
    ) -> Edit:
        """Edit `lm` and return the reversible `Edit` (pushed on the LM's edit stack). With `on`, the new
        edit extends `on` (which must be the LM's newest edit), for methods whose memory grows across a
        sequence. If anything fails, the model is left exactly as it was."""
        lm = getattr(lm, "base", lm)  # an edited system (a view) stands for its LM
        reqs = [requests] if isinstance(requests, EditRequest) else list(requests) if isinstance(requests, (list, tuple)) else None
        if reqs is None:
            raise EditRequestError(f"requests must be an EditRequest or a list of them, not {type(requests).__name__}")
        if not reqs:
            raise EditRequestError("no edit requests given")
        for i, r in enumerate(reqs):
            if not isinstance(r, EditRequest):
                raise EditRequestError(f"requests[{i}] is a {type(r).__name__}, not an EditRequest")
        if len(reqs) > 1 and not self.supports_batch:
            raise EditRequestError(f"method {self.name!r} edits one request at a time; got {len(reqs)}")
        check_fits(reqs, lm)  # a prompt past the context window fails here, not deep inside a solve
        if on is not None:
            self._check_on(lm, on)
        hp = self._resolve_hparams(lm, hparams, overrides)
        checkpoint = self.checkpoint(lm, hp) if self.requires_training else None
        self.current_checkpoint = checkpoint  # the one this edit is made with (compute_patches reads it)
        grads = {n: p.requires_grad for n, p in lm.model.named_parameters()}
        try:
            for p in lm.model.parameters():
                p.requires_grad_(False)
            patches, info = self.compute_patches(lm, reqs, hp, on)
        finally:
            for n, p in lm.model.named_parameters():
                if n in grads:
                    p.requires_grad_(grads[n])
        stats = _stats_provenance(lm)
        if stats:
            info = {**info, "statistics": stats}
        return Edit.install(lm, self.name, hp.to_dict(), reqs, patches, info,
                            checkpoint_sha256=checkpoint.sha256 if checkpoint else None)

    def _check_on(self, lm: LM, on: Edit) -> None:
        if not self.supports_on:
            raise EditStackError(f"method {self.name!r} cannot extend a previous edit (on=...); apply it on its own")
        if not isinstance(on, Edit):
            raise EditStackError(f"on= must be an Edit, not {type(on).__name__}")
        if on.base_lm is not lm or not on.active:
            raise EditStackError("on= must be an active edit of this same model")
        if lm.active_edits[-1] is not on:
            raise EditStackError("on= must be the model's newest edit (edits extend the top of the stack)")
        if on.method != self.name:
            raise EditStackError(f"on= is a {on.method!r} edit; a {self.name!r} edit can only extend its own method's edits")

    def compute_patches(self, lm: LM, requests: list[EditRequest], hp: Any, on: Edit | None) -> tuple[list[Patch], dict[str, Any]]:
        """The patches that make the edit (and an info dict). Must not leave the model modified.
        Default: one weight-delta patch per parameter from `compute_deltas`."""
        deltas, info = self.compute_deltas(lm, requests, hp)
        return [WeightDelta(name, d) for name, d in deltas.items()], info

    def compute_deltas(self, lm: LM, requests: list[EditRequest], hp: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return (parameter name -> weight delta, dense tensor or `LowRank`, info). Must not leave the
        model modified."""
        raise NotImplementedError(f"{type(self).__name__} implements neither compute_patches nor compute_deltas")

    # ------------------------------------------------------------- learned editors
    def fit(self, lm: LM, train_requests: Sequence[EditRequest], hparams: Hparams | Mapping[str, Any] | None = None,
            *, force: bool = False, progress: bool = True) -> Checkpoint:
        """Train this editor for `lm` on `train_requests` (or return the cached checkpoint for the same
        base model, hyper-parameters and data). Checkpoints live in the user cache; a killed run resumes
        from its last saved state (unless `force`, which also retrains over a cached checkpoint)."""
        if not self.requires_training:
            raise EditlabError(f"method {self.name!r} has nothing to train")
        if lm.active_edits:
            raise EditStackError("train an editor on the unedited model: restore the active edits first")
        reqs = list(train_requests)
        if not reqs:
            raise EditRequestError("no training requests given")
        for i, r in enumerate(reqs):
            if not isinstance(r, EditRequest):
                raise EditRequestError(f"train_requests[{i}] is a {type(r).__name__}, not an EditRequest")
        hp = self._resolve_hparams(lm, hparams, {})
        key = {**checkpoint_key(lm, self.name, hp.identity(), reqs), "format": self.checkpoint_format}
        if not force:
            found = find_checkpoint(key)
            if found is not None:
                return found
        workdir = work_dir(key)
        if force:
            shutil.rmtree(workdir, ignore_errors=True)
        tensors, meta = self.train(lm, reqs, hp, progress=progress, workdir=workdir)
        return save_checkpoint(key, tensors, meta)

    def train(self, lm: LM, requests: list[EditRequest], hp: Any, *, progress: bool = True,
              workdir: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Learn the editor's parameters: (tensors, metadata). Learned editors implement this; `workdir`
        is where a resumable state may be kept while training."""
        raise NotImplementedError

    def network_fields(self, hp: Any) -> dict[str, Any]:
        """The hyper-parameters that define a learned editor's network (all but `TRAINING_FIELDS`): the
        ones a checkpoint must match to serve an edit."""
        skip = getattr(hp, "TRAINING_FIELDS", frozenset())
        return {k: v for k, v in hp.to_dict().items() if k not in skip}

    def network_sets(self, lm: LM, hp: Any) -> str:
        """` --set k=v` for each network field of `hp` that differs from the defaults for `lm`: what a
        command needs to reach the same checkpoint."""
        default = self.hparams(lm).to_dict()
        return "".join(f" --set {k}={_cli_value(v)}" for k, v in self.network_fields(hp).items() if default.get(k) != v)

    def checkpoint(self, lm: LM, hp: Any) -> Checkpoint:
        """The checkpoint `apply` uses: the newest cached one for this base model and network."""
        found = latest_checkpoint(lm, self.name, self.network_fields(hp), self.checkpoint_format,
                                  hp.ABSENT_MEANS)
        if found is None:
            raise CheckpointError(
                f"method {self.name!r} needs a trained editor for {lm.name} with these hyper-parameters; "
                f"train one with: editlab train {self.name} --model {lm.name} --data counterfact-train"
                f"{self.network_sets(lm, hp)}"
            )
        return found


def _cli_value(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _stats_provenance(lm: LM) -> dict[str, Any]:
    try:
        from ..stats import stats_provenance  # type: ignore[attr-defined]
    except ImportError:
        return {}
    return stats_provenance(lm)


def get_editor(name: str) -> Editor:
    """A fresh editor instance for a registered method name or alias (UnknownMethodError otherwise)."""
    cls = METHODS.get(name)
    editor = cls()
    editor.name = METHODS.resolve(name)
    return editor
