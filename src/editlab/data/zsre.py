"""zsRE loaders (MEND format: src, subject, alt, answers, rephrase, loc, loc_ans) including the
one-hop portability, inverse-relation and subject-replace variants."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import EditRequestError
from ..requests import EditRequest
from .io import field, first_str, text_field


def _locate_subject(prompt: str, subject: str, path: Path | str, i: int) -> str:
    if subject in prompt:
        return subject
    m = re.search(re.escape(subject), prompt, flags=re.I)
    if m:
        return m.group(0)
    raise EditRequestError(f"subject {subject!r} does not occur in src {prompt!r}")


def zsre_mend(rec: dict[str, Any], path: Path | str, i: int) -> EditRequest:
    src = text_field(rec, "src", path=path, index=i)
    subject = _locate_subject(src, text_field(rec, "subject", path=path, index=i), path, i)
    new = text_field(rec, "alt", path=path, index=i)
    true = first_str(rec.get("answers"))
    loc = []
    if isinstance(rec.get("loc"), str) and rec.get("loc_ans"):
        q = rec["loc"]
        q = q[len("nq question: "):] if q.startswith("nq question: ") else q
        loc.append((q, rec["loc_ans"]))
    port = []
    p = rec.get("portability")
    if isinstance(p, dict) and p.get("New Question") and p.get("New Answer"):
        port.append((p["New Question"], p["New Answer"]))
    if rec.get("inverse question"):
        port.append((rec["inverse question"], subject))
    if rec.get("alter_subject_question"):
        port.append((rec["alter_subject_question"], new))
    return EditRequest.create(
        src, subject, new,
        true if true and true.strip().casefold() != new.strip().casefold() else None,
        rec.get("case_id", i),
        paraphrases=[(rec["rephrase"], new)] if rec.get("rephrase") else [],
        locality=loc,
        portability=port,
    )
