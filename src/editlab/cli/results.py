"""`editlab export | report`: what a result database holds, as CSV/JSON rows or one HTML report.

Both only read: the database is opened read-only (`Store.open_readonly`), so a missing, empty or
foreign file is refused and never turned into a store, and a damaged one gives the recovery step. The
output file is checked writable before the database is read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import EditlabError, OptionError, OutputPathError
from .common import check_output_file, console, write_out

DbArg = Annotated[Path, typer.Argument(help="Result database")]


def _existing(db: Path) -> Path:
    """`db` if it is a readable editlab store (checked by opening it read-only), else the named error."""
    from ..runner import Store

    Store.open_readonly(db).close()
    return db


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {e.strerror or e}") from None


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
    raise OptionError(f"unknown export format {format!r}; use csv or json")


def export(
    db: DbArg,
    format: Annotated[str, typer.Option(help="csv | json")] = "csv",
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output file (default: stdout)")] = None,
) -> None:
    """Write every row with its metrics as CSV or JSON."""
    from ..runner import Store

    if format not in ("csv", "json"):
        raise OptionError(f"unknown export format {format!r}; use csv or json")
    if out:
        check_output_file(out, "-o")
    with Store.open_readonly(db) as store:
        records = store.export_records()
    text = records_as_text(records, format)
    if out:
        _write(out, text)
        console.print(f"wrote {len(records)} rows to {out}")
    else:
        write_out(text)


def report(
    db: DbArg,
    out: Annotated[Path, typer.Option("-o", "--out", help="HTML file to write")] = Path("report.html"),
    title: Annotated[str, typer.Option(help="Title of the report")] = "editlab report",
    traces: Annotated[Optional[list[Path]], typer.Option(
        "--traces", help="An 'editlab trace' output folder whose heatmaps go into the report (repeatable)")] = None,
) -> None:
    """Write one self-contained HTML report (tables, embedded plots and causal-trace heatmaps)."""
    from ..report.html import trace_folders, write_report

    check_output_file(out, "-o")
    trace_folders(traces or [])
    try:
        path = write_report(_existing(db), out, title, traces or [])
    except EditlabError:
        raise
    except OSError as e:  # the output could still fail (disk full, a race); name it
        raise OutputPathError(f"cannot write report {out}: {e.strerror or e}") from None
    console.print(f"wrote {path}")
