"""`editlab methods | models | datasets`: what is registered, read from the registries themselves."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, NamedTuple, Optional

import typer
from rich.table import Table

from . import options
from ..errors import EditlabError
from .common import console


class Listed(NamedTuple):
    name: str
    description: str
    meta: dict[str, Any]
    aliases: tuple[str, ...]


def registry_entries(registry: Any) -> list[Listed]:
    """Entries of an `editlab.registry.Registry`, or of a plain name -> record dict (the form some
    registries had before moving to `Registry`; the record's other fields become its metadata)."""
    if hasattr(registry, "entries"):
        return [Listed(e.name, e.description, dict(e.meta), tuple(e.aliases)) for e in registry.entries()]
    out = []
    for name, rec in registry.items():
        fields = dataclasses.asdict(rec) if dataclasses.is_dataclass(rec) else dict(vars(rec))
        desc = fields.pop("description", "")
        fields.pop("name", None)
        out.append(Listed(getattr(rec, "name", name), desc, fields, ()))
    return out


def _table(title: str, columns: list[str], rows: list[tuple[str, ...]]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    return t


def methods() -> None:
    """List editing methods."""
    from ..methods.catalogue import METHODS

    entries = registry_entries(METHODS)
    rows = [(e.name, ", ".join(e.aliases), str(e.meta.get("family", "")), e.description) for e in entries]
    console.print(_table("methods", ["name", "aliases", "family", "description"], rows))


def models(
    estimate: Annotated[Optional[str], typer.Option(
        help="Estimate the memory NAME (a named model or a local folder) needs, from its files, without loading it")] = None,
    dtype: options.Dtype = "float32",
    device: options.Device = "cpu",
    methods: Annotated[str, typer.Option(help="With --estimate: methods whose statistics and peak to show")] = "ft,rome,memit",
) -> None:
    """List named models (any local Hugging Face folder works too), or estimate one's memory."""
    from ..models import MODELS

    if estimate is None:
        rows = [(e.name, e.description) for e in registry_entries(MODELS)]
        console.print(_table("models", ["name", "description"], rows))
        return
    from ..methods.catalogue import METHODS
    from ..models.estimate import available_memory, gib
    from ..models.estimate import estimate as estimate_memory
    from ..models.sources import check_device, check_model_source

    names = [METHODS.resolve(m.strip()) for m in methods.split(",") if m.strip()]
    check_device(device)
    check_model_source(estimate, None)
    est = estimate_memory(estimate, dtype, names)  # CannotSizeError (an EditlabError) names what is missing
    if est is None:
        raise EditlabError(f"{estimate} is built in memory or is a hub id; only a named model or a local folder "
                           "with safetensors weights can be estimated")
    t = Table(title=f"memory estimate: {estimate} in {est.dtype} ({est.n_params / 1e6:,.0f}M parameters)",
              caption="peak = (weights + statistics + scoring batch) x 1.25 (docs/scale.md)")
    for c in ("", "bytes"):
        t.add_column(c, justify="left" if not c else "right")
    t.add_row("weights", gib(est.weights))
    t.add_row("scoring batch (4096 tokens)", gib(est.scoring))
    for m in names:
        if m in est.statistics:
            t.add_row(f"statistics ({m})", gib(est.statistics[m]))
    for m in names:
        t.add_row(f"peak ({m})", gib(est.peak(m)))
    free = available_memory(device)
    t.add_row(f"free on {device} now", "unknown" if free is None else gib(free))
    console.print(t)


def datasets() -> None:
    """List dataset names (resolved under $EDITLAB_DATA, default ../shared/data)."""
    from ..data import DATASETS

    rows = [(e.name, str(e.meta.get("relpath", e.meta.get("file", ""))), e.description) for e in registry_entries(DATASETS)]
    console.print(_table("datasets", ["name", "file", "description"], rows))


def probes() -> None:
    """List the probes a sequential run can measure at each checkpoint (--probes)."""
    from ..probes import PROBES

    rows = []
    for e in registry_entries(PROBES):
        cls = PROBES.get(e.name)
        rows.append((e.name, ", ".join(cls.metrics), ", ".join(cls.files) or "-", e.description))
    console.print(_table("probes (editlab eval --mode sequential --probes a,b)", ["name", "metrics", "data", "description"], rows))
