"""`editlab methods | models | datasets`: what is registered, read from the registries themselves."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from rich.table import Table

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


def models() -> None:
    """List named models (any local Hugging Face folder works too)."""
    from ..models import MODELS

    rows = [(e.name, e.description) for e in registry_entries(MODELS)]
    console.print(_table("models", ["name", "description"], rows))


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
