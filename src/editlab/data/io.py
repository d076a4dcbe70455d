"""Reading benchmark files: JSON arrays or JSON Lines, with errors that name the file and record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataFormatError


def read_records(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(f"data file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{p}: cannot read as UTF-8 text ({e})") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataFormatError(f"{p}: file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole_err:
        # JSON Lines: one object per line
        data = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataFormatError(f"{p}: not valid JSON ({whole_err.msg} at line {whole_err.lineno}) "
                                      f"nor JSON Lines (line {n} does not parse)") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataFormatError(f"{p}: expected a list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataFormatError(f"{p}: record {i} is a {type(rec).__name__}, not an object")
    return data


def field(rec: dict[str, Any], *keys: str, path: Path | str, index: int) -> Any:
    """rec[k1][k2]... or a DataFormatError naming the file, record and missing field."""
    cur: Any = rec
    for depth, k in enumerate(keys):
        if not isinstance(cur, dict) or k not in cur:
            raise DataFormatError(f"{path}: record {index} lacks field {'.'.join(keys[: depth + 1])!r}")
        cur = cur[k]
    return cur


def text_field(rec: dict[str, Any], key: str, *, path: Path | str, index: int) -> str:
    """rec[key] as a string, or a DataFormatError naming the file, record and field."""
    value = field(rec, key, path=path, index=index)
    if not isinstance(value, str):
        raise DataFormatError(f"{path}: record {index} field {key!r} is a {type(value).__name__}, not a string")
    return value


def first_str(value: Any) -> str | None:
    """First string in a value that may be a string, a list of strings or nested lists."""
    while isinstance(value, list):
        if not value:
            return None
        value = value[0]
    return value if isinstance(value, str) else None
