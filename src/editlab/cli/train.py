"""`editlab train METHOD`: train a learned editor (MEND, MALMEN, KE) for a base model and cache it.

The checkpoint is stored in the user cache under (base-model fingerprint, hyper-parameters, training-data
hash); `editlab eval/edit --method METHOD` with the same hyper-parameters uses it. Checked before the model
loads: the method (and that it learns anything), the hyper-parameters, the model options and the training
data (a missing file, or no usable record). Interrupted (Ctrl-C or killed), the same command continues
from the last validation."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from . import options
from ..errors import EditlabError
from .common import check_hparams_early, check_model_options, check_positive, console, hparam_overrides, load_model
from .options import HparamOptions, ModelOptions, with_option_groups

TrainMethod = Annotated[str, typer.Argument(help="Learned editor to train: mend, malmen or ke (see `editlab methods`)")]
TrainData = Annotated[str, typer.Option(help="Training records: a dataset name (see `editlab datasets`) or a file")]
Steps = Annotated[Optional[int], typer.Option(help="Optimizer steps (default: the method's preset for the model)")]
Force = Annotated[bool, typer.Option(help="Train again even when a checkpoint (or a resumable run) exists")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object")]


@with_option_groups
def train(method: TrainMethod, model: ModelOptions = ModelOptions(), data: TrainData = "counterfact-train",
          limit: options.Limit = None, steps: Steps = None, hp: HparamOptions = HparamOptions(),
          force: Force = False, json_out: JsonOut = False) -> None:
    """Train a learned editor on edit records and cache it for `editlab eval/edit --method METHOD`."""
    from ..methods.catalogue import METHODS

    name = METHODS.resolve(method)
    if not METHODS.entry(name).meta.get("trained"):
        trained = [n for n in METHODS.names() if METHODS.entry(n).meta.get("trained")]
        raise EditlabError(f"method {name!r} needs no training; the trained editors are: {', '.join(trained)}")
    overrides = hparam_overrides(hp)
    if steps is not None:
        check_positive("--steps", steps, 10_000_000)
        overrides["steps"] = steps
    check_hparams_early(name, overrides)
    check_model_options(model)
    from ..data import load_requests
    from ..train.meta import examples_from_requests

    requests = load_requests(data, limit=limit)
    examples_from_requests(requests)  # no usable record: said now, not after the model has loaded
    lm = load_model(model)
    from ..methods import get_editor

    editor = get_editor(name)
    hparams = editor.hparams(lm, **overrides)
    console.print(f"training {name} for {lm.name} on {len(requests):,} records of {data} "
                  f"({hparams.steps:,} steps; a killed run resumes where it stopped)")
    try:
        ckpt = editor.fit(lm, requests, hparams, force=force)
    except KeyboardInterrupt:
        console.print("interrupted: run the same command again to continue from the last validation")
        raise typer.Exit(130) from None
    meta = ckpt.meta
    kept = kept_validation(meta)
    summary = {"method": name, "model": lm.name, "checkpoint": str(ckpt.path), "sha256": ckpt.sha256,
               "steps": meta.get("steps"), "stopped_early": meta.get("stopped_early"),
               "train_records": meta.get("train_records"), "val_records": meta.get("val_records"),
               "best_val_loss": meta.get("best_val_loss"), "seconds": meta.get("seconds"),
               "kept_step": kept.get("step"), **{k: v for k, v in kept.items() if k.startswith("val_")}}
    if json_out:
        typer.echo(json.dumps(summary))
        return
    table = Table(title=f"{name} editor for {lm.name}", show_header=False)
    for k, v in summary.items():
        table.add_row(k, str(v))
    console.print(table)
    console.print(f"use it with: editlab eval --method {name} --model {model.model}{editor.network_sets(lm, hparams)} ...")


def kept_validation(meta: dict[str, Any]) -> dict[str, Any]:
    """The validation of the saved editor: the one with the best validation loss (the trainer keeps that
    state), not the last one; the last when no validation recorded the best loss."""
    history = meta.get("history") or [{}]
    best = meta.get("best_val_loss")
    return next((h for h in history if best is not None and h.get("val_loss") == best), history[-1])
