"""SQLite result store. Every finished row is committed on its own (one transaction per row), so an
interrupted run keeps every finished row and never holds a partial one; `--resume` skips rows whose
key is already present, so resumed runs hold each row exactly once.

Several processes may write one database at once (two runs started together, a sweep's workers, the
same run started twice):

- the schema is created inside one `BEGIN IMMEDIATE` transaction with `CREATE TABLE IF NOT EXISTS`,
  so two processes creating a new database never race (the second finds the tables made);
- rows are keyed by (run_id, row_key) and inserted with `INSERT OR IGNORE`: a second writer of the same
  run skips the rows that already exist instead of dying on the UNIQUE constraint;
- every write waits for the lock (SQLite's busy timeout) and is retried a few times with back-off
  before `StoreBusyError` is raised.

Readers (`report`, `export`, `compare` reading results) open with `Store.open_readonly(path)`: the file
must already be an editlab store (an empty or foreign file is never turned into one), SQLite is told
`mode=ro`, and a damaged file gives `StoreCorruptError` naming the file and the recovery step.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import quote

from ..errors import StoreBusyError, StoreCorruptError, StoreError

SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT_S = 30.0  # how long one statement waits for another writer's lock
RETRIES = 5  # further attempts (with back-off) after a statement timed out on the lock

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, created REAL, model TEXT, model_fingerprint TEXT,
        method TEXT, mode TEXT, dataset TEXT, n_requests INTEGER, seed INTEGER,
        hparams TEXT, config TEXT, versions TEXT)""",
    """CREATE TABLE IF NOT EXISTS rows (run_id TEXT NOT NULL, row_key TEXT NOT NULL, case_id TEXT, kind TEXT NOT NULL,
        n_edits INTEGER, edit_s REAL, eval_s REAL, metrics TEXT NOT NULL, created REAL,
        PRIMARY KEY (run_id, row_key))""",
    """CREATE TABLE IF NOT EXISTS pre_edit (fingerprint TEXT NOT NULL, prompt TEXT NOT NULL, answer TEXT NOT NULL,
        argmax TEXT NOT NULL, PRIMARY KEY (fingerprint, prompt, answer))""",
)
_TABLES = {"meta", "runs", "rows", "pre_edit"}

T = TypeVar("T")

__all__ = ["Row", "Store", "StoreError", "StoreBusyError", "StoreCorruptError", "ckpt_key", "recovery_hint"]


def ckpt_key(n: int) -> str:
    """The row key of a sequential run's checkpoint after `n` edits."""
    return f"ckpt:{n}"


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


def recovery_hint(path: Path) -> str:
    """The recovery step for a damaged database, with the file's own name in the commands."""
    p = str(path)
    return (f"check it with `sqlite3 {p} 'PRAGMA integrity_check'`; recover what is readable with "
            f"`sqlite3 {p} .recover | sqlite3 {p}.recovered` and use {p}.recovered (or move the file away "
            "and run again with --resume)")


def _is_busy(e: sqlite3.OperationalError) -> bool:
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg


def _is_corrupt(e: sqlite3.DatabaseError) -> bool:
    msg = str(e).lower()
    return "malformed" in msg or "not a database" in msg or "corrupt" in msg or "disk image" in msg


class Store:
    """An editlab result database. `Store(path)` opens it for writing (creating it if needed);
    `Store.open_readonly(path)` opens an existing store for reading only."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._check_file()
        try:
            if readonly:
                uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
                self.db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            else:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise StoreError(f"cannot create the folder for database {self.path}: {e.strerror or e}") from None
                self.db = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open database {self.path}: {e}") from None
        try:
            if readonly:
                self._check_readable()
            else:
                self._retry(self._refuse_foreign)  # before WAL mode, which would rewrite a foreign file's header
                self._retry(lambda: self.db.execute("PRAGMA journal_mode=WAL").fetchone())
                self._retry(self._create_schema)
        except BaseException:
            self.db.close()
            raise

    @classmethod
    def open_readonly(cls, path: str | Path) -> "Store":
        """An existing store, opened so that nothing can be written to it (report, export, compare)."""
        return cls(path, readonly=True)

    # ------------------------------------------------------------ opening
    def _check_file(self) -> None:
        """Refuse what SQLite would silently accept: a foreign file (it would be overwritten), and for
        readers a missing or empty file (it would become a new, empty store)."""
        p = self.path
        if p.is_dir():
            raise StoreError(f"database path {p} is a folder; give a file name such as {p / 'runs.db'}")
        if not p.exists():
            if self.readonly:
                raise StoreError(f"database {p} does not exist")
            return
        size = p.stat().st_size
        if size == 0:
            if self.readonly:
                raise StoreError(f"database {p} is an empty file, not an editlab store")
            return
        try:
            with open(p, "rb") as f:
                head = f.read(16)
        except OSError as e:
            raise StoreError(f"cannot read database {p}: {e.strerror or e}") from None
        if head != _SQLITE_MAGIC:
            raise StoreError(f"{p} is not an SQLite database; refusing to {'read' if self.readonly else 'overwrite'} it")

    def _tables(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    def _check_schema(self, tables: set[str]) -> None:
        if "meta" not in tables:
            raise StoreError(f"{self.path} is an SQLite database but not an editlab store (tables: {sorted(tables)})")
        row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = row[0] if row else None
        if version is None or str(version) != str(SCHEMA_VERSION):
            raise StoreError(f"{self.path} has store schema version {version or '?'}; this editlab reads version {SCHEMA_VERSION}")
        missing = _TABLES - tables
        if missing:
            raise StoreCorruptError(f"{self.path} lacks table(s) {sorted(missing)}; {recovery_hint(self.path)}")

    def _refuse_foreign(self) -> None:
        tables = self._tables()
        if tables and "meta" not in tables:
            raise StoreError(f"{self.path} is an SQLite database but not an editlab store (tables: {sorted(tables)})")

    def _create_schema(self) -> None:
        """Create the tables if absent and check the store's identity, in ONE immediate transaction:
        a second process creating the same new database waits, then finds the tables made."""
        with self._write():
            self._refuse_foreign()
            for stmt in _SCHEMA:
                self.db.execute(stmt)
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self._check_schema(self._tables())

    def _check_readable(self) -> None:
        def check() -> None:
            self._check_schema(self._tables())
            result = self.db.execute("PRAGMA quick_check").fetchone()
            if not result or result[0] != "ok":
                raise StoreCorruptError(f"database {self.path} is damaged ({result[0] if result else 'no answer'}); "
                                        f"{recovery_hint(self.path)}")

        self._retry(check)

    # ------------------------------------------------------------ error handling
    def _retry(self, fn: Callable[[], T]) -> T:
        """Run `fn`, retrying with back-off while another writer holds the lock past the busy timeout;
        SQLite errors become editlab's (busy, damaged, unusable), each naming the file."""
        for attempt in range(RETRIES + 1):
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if _is_busy(e) and attempt < RETRIES:
                    time.sleep(min(2.0, 0.05 * 2**attempt) * (1 + random.random()))
                    continue
                if _is_busy(e):
                    raise StoreBusyError(f"database {self.path} stayed locked by another process "
                                         f"({RETRIES + 1} waits of {BUSY_TIMEOUT_S:.0f} s); try again when it is done") from None
                if _is_corrupt(e):
                    raise StoreCorruptError(f"database {self.path} is damaged ({e}); {recovery_hint(self.path)}") from None
                if self.readonly and "readonly" in str(e).lower().replace(" ", ""):
                    raise StoreError(f"database {self.path} was opened read-only and cannot be written") from None
                raise StoreError(f"database {self.path}: {e}") from None
            except sqlite3.DatabaseError as e:
                if _is_corrupt(e):
                    raise StoreCorruptError(f"database {self.path} is damaged ({e}); {recovery_hint(self.path)}") from None
                raise StoreError(f"database {self.path}: {e}") from None
        raise AssertionError("unreachable")

    class _Txn:
        """`BEGIN IMMEDIATE` ... `COMMIT` (rollback on error): the write lock is taken up front, so a
        transaction never fails half way on a lock it could not upgrade."""

        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> None:
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, exc_type: Any, *exc: Any) -> None:
            if exc_type is None:
                try:
                    self.db.execute("COMMIT")
                    return
                except sqlite3.Error:
                    self.db.execute("ROLLBACK")  # leave no open transaction behind for the retry
                    raise
            self.db.execute("ROLLBACK")

    def _write(self) -> "Store._Txn":
        if self.readonly:
            raise StoreError(f"database {self.path} was opened read-only and cannot be written")
        return Store._Txn(self.db)

    def _json(self, text: str | None, what: str) -> Any:
        try:
            return json.loads(text) if text else None
        except ValueError:
            raise StoreCorruptError(f"database {self.path}: {what} is not valid JSON; {recovery_hint(self.path)}") from None

    # ------------------------------------------------------------ runs
    def ensure_run(self, run_id: str, **fields: Any) -> bool:
        """Create the run record if new; return True if it already existed (also when another process
        created it at the same moment)."""
        cols = ["run_id", "created", "model", "model_fingerprint", "method", "mode", "dataset", "n_requests", "seed",
                "hparams", "config", "versions"]
        vals = [run_id, time.time()] + [
            json.dumps(fields.get(c)) if c in ("hparams", "config", "versions") else fields.get(c) for c in cols[2:]
        ]

        def insert() -> bool:
            with self._write():
                cur = self.db.execute(f"INSERT OR IGNORE INTO runs ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})", vals)
                return cur.rowcount == 0

        return self._retry(insert)

    def runs_config(self, run_id: str) -> dict[str, Any]:
        row = self._retry(lambda: self.db.execute("SELECT config FROM runs WHERE run_id=?", (run_id,)).fetchone())
        return (self._json(row[0], f"config of run {run_id}") or {}) if row else {}

    def update_run_config(self, run_id: str, **extra: Any) -> None:
        """Merge `extra` into a run's stored config (e.g. the statistics an edit actually used)."""

        def update() -> None:
            with self._write():  # read and write under one lock: concurrent merges never drop a key
                row = self.db.execute("SELECT config FROM runs WHERE run_id=?", (run_id,)).fetchone()
                if row is None:
                    raise StoreError(f"no run {run_id} in {self.path}")
                config = {**(self._json(row[0], f"config of run {run_id}") or {}), **extra}
                self.db.execute("UPDATE runs SET config=? WHERE run_id=?", (json.dumps(config, default=str), run_id))

        self._retry(update)

    def runs(self) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            cur = self.db.execute("SELECT * FROM runs ORDER BY created")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

        out = self._retry(read)
        for d in out:
            for k in ("hparams", "config", "versions"):
                d[k] = self._json(d[k], f"{k} of run {d['run_id']}")
        return out

    # ------------------------------------------------------------ records beside the runs (e.g. sweeps)
    def put_record(self, key: str, value: Any) -> None:
        """Keep `value` (JSON) under `key`, replacing an earlier one, e.g. `sweep:<id>` for a sweep."""
        if key == "schema_version":
            raise StoreError("the key schema_version is the store's own")
        text = json.dumps(value, default=str)

        def put() -> None:
            with self._write():
                self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, text))

        self._retry(put)

    def records(self, prefix: str) -> dict[str, Any]:
        """Every record whose key starts with `prefix`, by key."""
        fetched = self._retry(lambda: self.db.execute(
            "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ? ORDER BY key", (len(prefix), prefix)).fetchall())
        return {k: self._json(v, f"record {k}") for k, v in fetched if k != "schema_version"}

    # ------------------------------------------------------------ rows
    def done_keys(self, run_id: str) -> set[str]:
        return self._retry(lambda: {r[0] for r in self.db.execute("SELECT row_key FROM rows WHERE run_id=?", (run_id,))})

    def add_row(self, row: Row) -> bool:
        """Write one row in its own transaction; False (and nothing written) if a row with the same
        (run_id, row_key) is already there, e.g. written by a second process running the same run."""
        vals = (row.run_id, row.row_key, row.case_id, row.kind, row.n_edits, row.edit_s, row.eval_s,
                json.dumps(row.metrics), time.time())

        def insert() -> bool:
            with self._write():  # one transaction: the row is either fully there or absent
                return self.db.execute("INSERT OR IGNORE INTO rows VALUES (?,?,?,?,?,?,?,?,?)", vals).rowcount == 1

        return self._retry(insert)

    def rows(self, run_id: str | None = None) -> Iterator[Row]:
        q = "SELECT run_id,row_key,case_id,kind,n_edits,edit_s,eval_s,metrics FROM rows"
        args: tuple[Any, ...] = ()
        if run_id:
            q += " WHERE run_id=?"
            args = (run_id,)
        fetched = self._retry(lambda: self.db.execute(q + " ORDER BY rowid", args).fetchall())
        for r in fetched:
            yield Row(*r[:7], self._json(r[7], f"metrics of row {r[1]!r}") or {})  # type: ignore[arg-type]

    def count_rows(self, run_id: str | None = None) -> int:
        q, args = ("SELECT COUNT(*) FROM rows WHERE run_id=?", (run_id,)) if run_id else ("SELECT COUNT(*) FROM rows", ())
        return int(self._retry(lambda: self.db.execute(q, args).fetchone()[0]))

    # ------------------------------------------------------------ pre-edit cache
    def load_pre_edit(self, fingerprint: str) -> dict[tuple[str, str], list[int]]:
        fetched = self._retry(lambda: self.db.execute(
            "SELECT prompt, answer, argmax FROM pre_edit WHERE fingerprint=?", (fingerprint,)).fetchall())
        return {(p, a): self._json(v, "a pre-edit value") for p, a, v in fetched}

    def save_pre_edit(self, fingerprint: str, values: dict[tuple[str, str], list[int]]) -> None:
        rows = [(fingerprint, p, a, json.dumps(v)) for (p, a), v in values.items()]

        def insert() -> None:
            with self._write():
                self.db.executemany("INSERT OR IGNORE INTO pre_edit VALUES (?,?,?,?)", rows)

        self._retry(insert)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

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
