"""Data loaders: benchmark files (CounterFact, zsRE, KnowEdit) to `EditRequest`s with their probes.

`load_requests(name_or_path, limit=None, format=None)` accepts a dataset name (see `DATASETS`) resolved
under the data folder (`$EDITLAB_DATA`, default `../shared/data`), or a file path whose format is
detected from its first record.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import DataFormatError, EditRequestError
from ..paths import data_dir
from ..registry import Registry
from ..requests import EditRequest
from .counterfact import counterfact_compact, counterfact_full
from .io import read_records
from .knowedit import knowedit, wikibio
from .zsre import zsre_mend

Parser = Callable[[dict[str, Any], Any, int], EditRequest]

FORMATS: Registry[Parser] = Registry("dataset format", DataFormatError)
FORMATS.register("counterfact", "CounterFact as released with ROME (requested_rewrite, paraphrase/neighbourhood prompts)",
                 lambda: counterfact_full)
FORMATS.register("counterfact-compact", "CounterFact in EasyEdit's compact form (prompt, rephrase_prompt, locality_prompt)",
                 lambda: counterfact_compact)
FORMATS.register("zsre", "zsRE in MEND's form (src, alt, rephrase, loc, loc_ans, portability)", lambda: zsre_mend)
FORMATS.register("knowedit", "KnowEdit records (prompt, target_new, portability and locality groups)", lambda: knowedit)
FORMATS.register("wikibio", "KnowEdit WikiBio records (text, labels, concept)", lambda: wikibio)


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    relpath: str
    format: str
    description: str


_ENTRIES = [
    DatasetEntry("builtin", "(inside the package)", "builtin",
                 "built-in facts SmolLM2-135M knows, 8 relations, with paraphrases, neighbours and portability"),
    DatasetEntry("counterfact", "counterfact/counterfact_portability_gpt4.json", "counterfact",
                 "CounterFact (ROME format) with one-hop portability questions, 766 records"),
    DatasetEntry("counterfact-edit", "counterfact/counterfact-edit.json", "counterfact-compact",
                 "CounterFact, EasyEdit compact format, 10,000 records"),
    DatasetEntry("counterfact-train", "counterfact/counterfact-train.json", "counterfact-compact",
                 "CounterFact training split, EasyEdit compact format, 10,000 records (for tuning and training only)"),
    DatasetEntry("counterfact-val", "counterfact/counterfact-val.json", "counterfact-compact",
                 "CounterFact validation split, EasyEdit compact format (for tuning only)"),
    DatasetEntry("zsre-train", "zsre/zsre_mend_train-1k.json", "zsre",
                 "zsRE MEND training subset, 1,000 records (for tuning and training only)"),
    DatasetEntry("counterfact-distracting", "counterfact/counterfact_distracting_neighbor.json", "counterfact",
                 "CounterFact+ distracting-neighbour prompts, 804 records"),
    DatasetEntry("counterfact-subject-replace", "counterfact/counterfact_subject_replace.json", "counterfact",
                 "CounterFact with subject-alias portability, 213 records"),
    DatasetEntry("zsre", "zsre/zsre_mend_eval_portability_gpt4.json", "zsre",
                 "zsRE (MEND eval format) with one-hop portability, 1,037 records"),
    DatasetEntry("zsre-inverse", "zsre/zsre_inverse_relation.json", "zsre", "zsRE inverse-relation portability, 385 records"),
    DatasetEntry("zsre-subject-replace", "zsre/zsre_subject_replace.json", "zsre", "zsRE subject-replace portability, 293 records"),
    DatasetEntry("knowedit-zsre", "knowedit/ccks_ZsRE-test-all.json", "knowedit", "KnowEdit ZsRE test, 1,301 records"),
    DatasetEntry("knowedit-counterfact", "knowedit/wiki_counterfact_train_cf.json", "knowedit",
                 "KnowEdit WikiData counterfact (train), 1,428 records"),
    DatasetEntry("knowedit-recent", "knowedit/wiki_recent_recent_train.json", "knowedit", "KnowEdit WikiData recent, 570 records"),
    DatasetEntry("knowedit-wikibio", "knowedit/WikiBio_wikibio-test-all.json", "wikibio", "KnowEdit WikiBio test, 306 records"),
]

DATASETS: Registry[DatasetEntry] = Registry("dataset", DataFormatError, case_sensitive=True)
for _e in _ENTRIES:
    DATASETS.register(_e.name, _e.description, (lambda e=_e: e), relpath=_e.relpath, format=_e.format)


def detect_format(rec: dict[str, Any], path: Any = "<records>") -> str:
    if "requested_rewrite" in rec:
        return "counterfact"
    if "src" in rec and "alt" in rec:
        return "zsre"
    if "text" in rec and "labels" in rec and "concept" in rec:
        return "wikibio"
    if "prompt" in rec and "target_new" in rec:
        return "counterfact-compact" if "locality_prompt" in rec or "rephrase_prompt" in rec and "locality" not in rec else "knowedit"
    raise DataFormatError(f"{path}: cannot tell the format of record 0 (fields {sorted(rec)[:8]}); pass format=")


def resolve(name_or_path: str | Path, root: Path | None = None) -> tuple[Path, str | None]:
    s = str(name_or_path)
    if s in DATASETS:
        e = DATASETS.get(s)
        p = (root or data_dir()) / e.relpath
        if not p.exists():
            raise DataFormatError(f"dataset {s!r} expects {p}, which does not exist (set EDITLAB_DATA to the data folder)")
        return p, e.format
    p = Path(s).expanduser()
    if p.exists():
        return p, None
    if "/" in s or p.suffix in (".json", ".jsonl"):
        raise DataFormatError(f"data file not found: {p}")
    raise DataFormatError(f"unknown dataset {s!r}: not a dataset name ({', '.join(DATASETS.names())}) nor an existing file")


def parse_records(records: list[dict[str, Any]], format: str | None = None, path: Any = "<records>",
                  limit: int | None = None, strict: bool = False) -> list[EditRequest]:
    """Parse records; a record that lacks a field raises `DataFormatError`. A record whose fields
    are present but do not make a valid edit (subject absent from the prompt, target equal to the
    true answer) is skipped with a warning, or raises when `strict`."""
    if not records:
        raise DataFormatError(f"{path}: holds no records")
    fmt = format or detect_format(records[0], path)
    parse = FORMATS.get(fmt)
    out: list[EditRequest] = []
    skipped: list[str] = []
    for i, rec in enumerate(records):
        if limit is not None and len(out) >= limit:
            break
        try:
            out.append(parse(rec, path, i))
        except EditRequestError as e:
            if strict:
                raise DataFormatError(f"{path}: record {i}: {e}") from None
            skipped.append(f"record {i}: {e}")
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} invalid record(s), e.g. {skipped[0]}", stacklevel=2)
    if limit is not None and len(out) < limit:
        warnings.warn(f"{path}: asked for {limit} records, only {len(out)} available; using all", stacklevel=2)
    return out


def load_requests(name_or_path: str | Path, limit: int | None = None, format: str | None = None,
                  root: Path | None = None, strict: bool = False) -> list[EditRequest]:
    """EditRequests (with probes) from a dataset name or a file. `limit` takes the first N records."""
    if limit is not None and limit < 1:
        raise DataFormatError(f"limit must be >= 1, got {limit}")
    if str(name_or_path) == "builtin":
        from .builtin import builtin_requests

        reqs = builtin_requests()
        if limit is not None and limit > len(reqs):
            warnings.warn(f"builtin: asked for {limit} records, only {len(reqs)} available; using all", stacklevel=2)
        return builtin_requests(limit) if limit is not None else reqs
    path, fmt = resolve(name_or_path, root)
    return parse_records(read_records(path), format or fmt, path, limit, strict)


__all__ = ["DATASETS", "FORMATS", "DatasetEntry", "detect_format", "load_requests", "parse_records", "read_records", "resolve"]
