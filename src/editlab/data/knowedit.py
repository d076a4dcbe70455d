"""KnowEdit loaders (ZsRE, WikiData counterfact / recent: prompt, subject, target_new, ground_truth,
rephrase_prompt, locality{kind: [...]}, portability{kind: [...]}; WikiBio: text, labels, concept)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..requests import EditRequest
from .io import field, first_str, text_field


def _probe_list(block: Any) -> list[tuple[str, str]]:
    out = []
    if isinstance(block, dict):
        for items in block.values():
            for it in items if isinstance(items, list) else []:
                if isinstance(it, dict):
                    prompt, ans = first_str(it.get("prompt")), first_str(it.get("ground_truth"))
                    if prompt and ans and prompt.strip() and ans.strip():
                        out.append((prompt, ans))
    return out


def knowedit(rec: dict[str, Any], path: Path | str, i: int) -> EditRequest:
    prompt = field(rec, "prompt", path=path, index=i)
    subject = field(rec, "subject", path=path, index=i)
    new = field(rec, "target_new", path=path, index=i)
    true = first_str(rec.get("ground_truth"))
    if true is not None and (not true.strip() or true.strip().casefold() == str(new).strip().casefold()):
        true = None
    return EditRequest.create(
        prompt, subject, new, true, rec.get("case_id", i),
        paraphrases=[(rec["rephrase_prompt"], new)] if rec.get("rephrase_prompt") else [],
        locality=_probe_list(rec.get("locality")),
        portability=_probe_list(rec.get("portability")),
    )


def wikibio(rec: dict[str, Any], path: Path | str, i: int) -> EditRequest:
    text = text_field(rec, "text", path=path, index=i)
    labels = text_field(rec, "labels", path=path, index=i)
    concept = text_field(rec, "concept", path=path, index=i)
    subject = concept if concept in text else next((w for w in [concept.title()] if w in text), concept)
    return EditRequest.create(text, subject, labels, None, rec.get("case_id", i), locality=_probe_list(rec.get("locality")))
