"""CounterFact loaders: the full ROME format (requested_rewrite, paraphrase/neighborhood/attribute/
generation prompts, optional portability and distracting-neighbour fields) and EasyEdit's compact
format (prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..requests import EditRequest
from .io import field


def counterfact_full(rec: dict[str, Any], path: Path | str, i: int) -> EditRequest:
    rw = field(rec, "requested_rewrite", path=path, index=i)
    subject = field(rec, "requested_rewrite", "subject", path=path, index=i)
    template = field(rec, "requested_rewrite", "prompt", path=path, index=i)
    new = field(rec, "requested_rewrite", "target_new", "str", path=path, index=i)
    true = field(rec, "requested_rewrite", "target_true", "str", path=path, index=i)
    port = []
    p = rec.get("portability")
    if isinstance(p, dict) and p.get("New Question") and p.get("New Answer"):
        port.append((p["New Question"], p["New Answer"]))
    extra = {k: rec[k] for k in ("attribute_prompts", "generation_prompts", "distracting_neighborhood_prompts",
                                 "alternative_subject", "relation_id") if k in rec}
    extra["relation_id"] = rw.get("relation_id")
    return EditRequest.create(
        template.replace("{}", subject) if "{}" in template else template,
        subject, new, true, rec.get("case_id", i),
        paraphrases=[(q, new) for q in rec.get("paraphrase_prompts", [])],
        neighborhood=[(q, true) for q in rec.get("neighborhood_prompts", [])],
        portability=port,
        extra=extra,
    )


def counterfact_compact(rec: dict[str, Any], path: Path | str, i: int) -> EditRequest:
    prompt = field(rec, "prompt", path=path, index=i)
    subject = field(rec, "subject", path=path, index=i)
    new = field(rec, "target_new", path=path, index=i)
    true = rec.get("ground_truth")
    para = [(rec["rephrase_prompt"], new)] if rec.get("rephrase_prompt") else []
    loc = [(rec["locality_prompt"], rec["locality_ground_truth"])] if rec.get("locality_prompt") and rec.get("locality_ground_truth") else []
    return EditRequest.create(prompt, subject, new, true, rec.get("case_id", i), paraphrases=para, neighborhood=loc)
