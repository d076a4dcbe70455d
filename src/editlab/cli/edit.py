"""`editlab edit`: apply one edit and show before/after completions.

Everything that can be wrong without the model (the request's fields, method, hyper-parameter names,
types and model-free ranges, dtype, device, model name, `--save` folder) is checked before the model is
loaded; the prompt's length against the model's context and the method's own ranges are checked right
after, before the edit."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import EditlabError

from . import options
from .common import check_hparams_early, check_model_options, check_positive, console, hparam_overrides, load_model, print_warning
from .options import HparamOptions, ModelOptions, OptionGroup, with_option_groups


@dataclass(frozen=True)
class RequestOptions(OptionGroup):
    """The fact to write (fields of `EditRequest.create`)."""

    prompt: Annotated[str, typer.Option(help="Prompt containing the subject, e.g. 'The Eiffel Tower is located in the city of'")]
    subject: Annotated[str, typer.Option(help="Subject inside the prompt")]
    target: Annotated[str, typer.Option(help="New answer the edited model should give")]
    target_true: Annotated[Optional[str], typer.Option(help="Current answer (optional, checked to differ)")] = None


@dataclass(frozen=True)
class ShowOptions(OptionGroup):
    """What is generated before and after the edit."""

    related: Annotated[Optional[list[str]], typer.Option(help="Extra related prompts to show before/after")] = None
    unrelated: Annotated[Optional[list[str]], typer.Option(help="Extra unrelated prompts to show before/after")] = None
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per completion")] = 12


MAX_NEW_TOKENS = 2048


def _already_answers(completion: str, target: str) -> bool:
    """Whether greedy `completion` already starts with `target` (ignoring case and leading space)."""
    return completion.strip().casefold().startswith(target.strip().casefold())


SaveDir = Annotated[Optional[Path], typer.Option(help="Directory to save the edit (safetensors + manifest)")]


@with_option_groups
def edit(request: RequestOptions, method: options.Method = options.DEFAULT_METHOD, model: ModelOptions = ModelOptions(),
         hp: HparamOptions = HparamOptions(), show: ShowOptions = ShowOptions(), save: SaveDir = None) -> None:
    """Apply one edit and print before/after completions of the prompt and of related/unrelated prompts."""
    from ..methods.catalogue import METHODS
    from ..methods.edit_folder import check_save_target
    from ..requests import EditRequest, check_fits

    # user mistakes surface before the model (and torch) is loaded
    req = EditRequest.create(request.prompt, request.subject, request.target, request.target_true)
    METHODS.resolve(method)
    overrides = hparam_overrides(hp)
    check_hparams_early(method, overrides)
    check_positive("--max-new-tokens", show.max_new_tokens, MAX_NEW_TOKENS)
    extra = [p for p in list(show.related or []) + list(show.unrelated or [])]
    for i, p in enumerate(extra):
        if not p.strip():
            raise EditlabError(f"--related/--unrelated prompt {i + 1} is empty")
    check_model_options(model)
    if save is not None:
        check_save_target(save)
    lm = load_model(model)
    from ..methods import get_editor

    editor = get_editor(method)
    hparams = editor.hparams(lm, **overrides)
    check_fits(req, lm, reserve=show.max_new_tokens)
    rel = list(show.related or []) or [f"{request.subject} is", f"Where is {request.subject}? It is in"]
    unrel = list(show.unrelated or []) or ["The capital of France is", "The Colosseum is located in the city of"]
    probes = [("edited", req.prompt)] + [("related", p) for p in rel] + [("unrelated", p) for p in unrel]
    prompts = [p for _, p in probes]
    before = lm.generate(prompts, show.max_new_tokens)
    if _already_answers(before[0], req.target_new):
        print_warning(f"the model already continues the prompt with {req.target_new!r}; the edit has little to change")
    t0 = time.perf_counter()
    result = editor.apply(lm, req, hparams)
    try:
        elapsed = time.perf_counter() - t0
        after = result.lm.generate(prompts, show.max_new_tokens)  # the edited system (a view for some methods)
        table = Table(title=f"{method} on {model.model}: {request.subject!r} -> {request.target!r}  ({elapsed:.1f} s)")
        table.add_column("kind", style="dim")
        table.add_column("prompt")
        table.add_column("before", style="yellow")
        table.add_column("after", style="green")
        for (kind, p), b, a in zip(probes, before, after):
            table.add_row(kind, p, b.strip().replace("\n", " "), a.strip().replace("\n", " "))
        console.print(table)
        if save:
            result.save(save)
            console.print(f"saved edit to {save}")
    finally:
        result.restore()
