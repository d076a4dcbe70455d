"""Command-line interface (`editlab ...`, Typer + Rich): one module per command group, each a thin
layer over the library.

    edit.py     edit                     run.py      eval, compare, demo
    results.py  export, report           listing.py  methods, models, datasets, probes
    suites.py   suites, eval/compare --suite         trace.py    trace
    serve.py    serve (the web playground)        pitfalls.py pitfalls (every suite and probe, one report)
    train.py    train (learned editors: MEND, MALMEN, KE)
    options.py  options declared once    common.py   errors, model loading, progress, summary table

Errors: an `EditlabError` prints one `error: ...` line and exits with 2; any other exception is a bug
and prints where it happened (exit 1); `editlab --debug ...` adds the traceback.
"""

from __future__ import annotations

import typer

from . import edit, listing, pitfalls, results, run, serve, suites, sweep, trace, train
from .common import EditlabGroup
from .options import Debug

app = typer.Typer(
    cls=EditlabGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # EditlabGroup reports every exception itself
    help="Edit the factual knowledge of language models and measure what editing breaks.",
)


@app.callback()
def _global_options(debug: Debug = False) -> None:
    """Global options; `debug` is read by EditlabGroup.invoke from the group's parameters."""


app.command("edit")(edit.edit)
app.command("eval")(run.eval_)
app.command("compare")(run.compare)
app.command("sweep")(sweep.sweep)
app.command("export")(results.export)
app.command("report")(results.report)
app.command("demo")(run.demo)
app.command("methods")(listing.methods)
app.command("models")(listing.models)
app.command("datasets")(listing.datasets)
app.command("suites")(suites.suites)
app.command("probes")(listing.probes)
app.command("pitfalls")(pitfalls.pitfalls)
app.command("trace")(trace.trace)
app.command("train")(train.train)
app.command("serve")(serve.serve)


def main() -> None:
    """Console entry point (`editlab = "editlab.cli:main"`)."""
    app(prog_name="editlab")


__all__ = ["app", "main"]
