"""SQLite result store. Every finished row is committed on its own (one transaction per row), so an
interrupted run keeps every finished row and never holds a partial one; `--resume` skips rows whose
key is already present, so resumed runs hold each row exactly once."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import EditlabError

SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"


class StoreError(EditlabError):
    """The database file is not an editlab store, or is from an incompatible version."""


@dataclass
class Row:
    run_id: str
    row_key: str
    case_id: str | None
    kind: str
    n_edits: int
    edit_s: float | None
    eval_s: float | None
    metrics: dict[str, float]


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                if f.read(16) != _SQLITE_MAGIC:
                    raise StoreError(f"{self.path} is not an SQLite database; refusing to overwrite it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a usable SQLite database: {e}") from None
        if tables and "meta" not in tables:
            raise StoreError(f"{self.path} is an SQLite database but not an editlab store (tables: {sorted(tables)})")
        if "meta" in tables:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None or int(row[0]) != SCHEMA_VERSION:
                raise StoreError(f"{self.path} has store schema version {row[0] if row else '?'}; this editlab reads version {SCHEMA_VERSION}")
        else:
            with self.db:
                self.db.executescript(
                    """
                    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                    CREATE TABLE runs (run_id TEXT PRIMARY KEY, created REAL, model TEXT, model_fingerprint TEXT,
                        method TEXT, mode TEXT, dataset TEXT, n_requests INTEGER, seed INTEGER,
                        hparams TEXT, config TEXT, versions TEXT);
                    CREATE TABLE rows (run_id TEXT NOT NULL, row_key TEXT NOT NULL, case_id TEXT, kind TEXT NOT NULL,
                        n_edits INTEGER, edit_s REAL, eval_s REAL, metrics TEXT NOT NULL, created REAL,
                        PRIMARY KEY (run_id, row_key));
                    CREATE TABLE pre_edit (fingerprint TEXT NOT NULL, prompt TEXT NOT NULL, answer TEXT NOT NULL,
                        argmax TEXT NOT NULL, PRIMARY KEY (fingerprint, prompt, answer));
                    """
                )
                self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # ------------------------------------------------------------ runs
    def ensure_run(self, run_id: str, **fields: Any) -> bool:
        """Create the run record if new; return True if it already existed."""
        if self.db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone():
            return True
        cols = ["run_id", "created", "model", "model_fingerprint", "method", "mode", "dataset", "n_requests", "seed",
                "hparams", "config", "versions"]
        vals = [run_id, time.time()] + [
            json.dumps(fields.get(c)) if c in ("hparams", "config", "versions") else fields.get(c) for c in cols[2:]
        ]
        with self.db:
            self.db.execute(f"INSERT INTO runs ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})", vals)
        return False

    def runs_config(self, run_id: str) -> dict[str, Any]:
        row = self.db.execute("SELECT config FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else {}

    def update_run_config(self, run_id: str, **extra: Any) -> None:
        """Merge `extra` into a run's stored config (e.g. the statistics an edit actually used)."""
        row = self.db.execute("SELECT config FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            raise StoreError(f"no run {run_id} in {self.path}")
        config = {**(json.loads(row[0]) if row[0] else {}), **extra}
        with self.db:
            self.db.execute("UPDATE runs SET config=? WHERE run_id=?", (json.dumps(config, default=str), run_id))

    def runs(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT * FROM runs ORDER BY created")
        names = [d[0] for d in cur.description]
        out = []
        for r in cur.fetchall():
            d = dict(zip(names, r))
            for k in ("hparams", "config", "versions"):
                d[k] = json.loads(d[k]) if d[k] else None
            out.append(d)
        return out

    # ------------------------------------------------------------ rows
    def done_keys(self, run_id: str) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT row_key FROM rows WHERE run_id=?", (run_id,))}

    def add_row(self, row: Row) -> None:
        with self.db:  # one transaction: the row is either fully there or absent
            self.db.execute(
                "INSERT INTO rows VALUES (?,?,?,?,?,?,?,?,?)",
                (row.run_id, row.row_key, row.case_id, row.kind, row.n_edits, row.edit_s, row.eval_s,
                 json.dumps(row.metrics), time.time()),
            )

    def rows(self, run_id: str | None = None) -> Iterator[Row]:
        q = "SELECT run_id,row_key,case_id,kind,n_edits,edit_s,eval_s,metrics FROM rows"
        args: tuple[Any, ...] = ()
        if run_id:
            q += " WHERE run_id=?"
            args = (run_id,)
        for r in self.db.execute(q + " ORDER BY rowid", args):
            yield Row(*r[:7], json.loads(r[7]))  # type: ignore[arg-type]

    # ------------------------------------------------------------ pre-edit cache
    def load_pre_edit(self, fingerprint: str) -> dict[tuple[str, str], list[int]]:
        return {(p, a): json.loads(v) for p, a, v in
                self.db.execute("SELECT prompt, answer, argmax FROM pre_edit WHERE fingerprint=?", (fingerprint,))}

    def save_pre_edit(self, fingerprint: str, values: dict[tuple[str, str], list[int]]) -> None:
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO pre_edit VALUES (?,?,?,?)",
                                [(fingerprint, p, a, json.dumps(v)) for (p, a), v in values.items()])

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------ export
    def export_records(self) -> list[dict[str, Any]]:
        runs = {r["run_id"]: r for r in self.runs()}
        out = []
        for row in self.rows():
            run = runs.get(row.run_id, {})
            rec = {"run_id": row.run_id, "method": run.get("method"), "model": run.get("model"), "mode": run.get("mode"),
                   "dataset": run.get("dataset"), "row_key": row.row_key, "case_id": row.case_id, "kind": row.kind,
                   "n_edits": row.n_edits, "edit_s": row.edit_s, "eval_s": row.eval_s}
            rec.update(row.metrics)
            out.append(rec)
        return out
