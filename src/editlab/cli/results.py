"""`editlab export | report`: what a result database holds, as CSV/JSON rows or one HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import EditlabError
from .common import console, write_out

DbArg = Annotated[Path, typer.Argument(help="Result database")]


def _existing(db: Path) -> Path:
    if not db.exists():
        raise EditlabError(f"database {db} does not exist")
    return db


def records_as_text(records: list[dict[str, Any]], format: str) -> str:
    import csv
    import io
    import json

    if format == "json":
        return json.dumps(records, indent=2)
    if format == "csv":
        cols: list[str] = []
        for r in records:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(records)
        return buf.getvalue()
    raise EditlabError(f"unknown export format {format!r}; use csv or json")


def export(
    db: DbArg,
    format: Annotated[str, typer.Option(help="csv | json")] = "csv",
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output file (default: stdout)")] = None,
) -> None:
    """Write every row with its metrics as CSV or JSON."""
    from ..runner import Store

    records = Store(_existing(db)).export_records()
    text = records_as_text(records, format)
    if out:
        out.write_text(text)
        console.print(f"wrote {len(records)} rows to {out}")
    else:
        write_out(text)


def report(
    db: DbArg,
    out: Annotated[Path, typer.Option("-o", "--out", help="HTML file to write")] = Path("report.html"),
    title: Annotated[str, typer.Option(help="Title of the report")] = "editlab report",
) -> None:
    """Write one self-contained HTML report (tables and embedded plots)."""
    from ..report import write_report

    path = write_report(_existing(db), out, title)
    console.print(f"wrote {path}")
