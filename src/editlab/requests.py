"""`EditRequest`: one fact to edit plus optional evaluation probes. Built only through validation.

`EditRequest.create` checks everything that does not need a model (types, empty strings, NUL
characters, a hard length cap, the subject inside the prompt, target_new != target_true). Whether a
prompt fits a model's context can only be checked where the model is known: `check_fits(requests, lm)`
does that (the CLI calls it before editing) and raises `PromptTooLongError`; prompts over
`LONG_PROMPT_TOKENS` tokens pass with a warning, since each one slows every edit and evaluation.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

from .errors import EditRequestError, PromptTooLongError

Probe = tuple[str, str]  # (prompt, expected answer)

_PROBE_FIELDS = ("paraphrases", "neighborhood", "portability", "locality")
_MAX_LEN = 10_000
LONG_PROMPT_TOKENS = 256  # above this a prompt is accepted with a warning (slow to edit and score)


def _clean(name: str, value: Any, *, allow_empty: bool = False) -> str:
    if isinstance(value, float) and math.isnan(value):  # pandas' missing value in a data file
        raise EditRequestError(f"{name} is missing (NaN)")
    if not isinstance(value, str):
        raise EditRequestError(f"{name} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise EditRequestError(f"{name} contains a NUL character")
    if len(value) > _MAX_LEN:
        raise EditRequestError(f"{name} is {len(value)} characters long (limit {_MAX_LEN})")
    if not allow_empty and not value.strip():
        raise EditRequestError(f"{name} is empty or whitespace")
    return value


def _probes(name: str, items: Iterable[Any] | None) -> tuple[Probe, ...]:
    if items is None:
        return ()
    out = []
    for i, item in enumerate(items):
        if isinstance(item, (list, tuple)) and len(item) == 2:
            out.append((_clean(f"{name}[{i}].prompt", item[0]), _clean(f"{name}[{i}].answer", item[1])))
        else:
            raise EditRequestError(f"{name}[{i}] must be a (prompt, answer) pair, got {item!r:.80}")
    return tuple(out)


@dataclass(frozen=True)
class EditRequest:
    """A requested rewrite: after editing, `prompt` should continue with `target_new`.

    Build with `EditRequest.create(...)` (or `make_request`), which validates every field:
    `subject` must occur in `prompt`, targets must be non-empty and `target_new` must differ from
    `target_true`. Probe fields hold `(prompt, answer)` pairs used only by evaluation:
    `paraphrases` and `portability` expect the new answer (or a consequence of it), `neighborhood`
    and `locality` expect their own, unchanged answers.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: str | None = None
    paraphrases: tuple[Probe, ...] = ()
    neighborhood: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    locality: tuple[Probe, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def create(
        cls,
        prompt: str,
        subject: str,
        target_new: str,
        target_true: str | None = None,
        case_id: str | int | None = None,
        *,
        paraphrases: Sequence[Any] | None = None,
        neighborhood: Sequence[Any] | None = None,
        portability: Sequence[Any] | None = None,
        locality: Sequence[Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> "EditRequest":
        prompt = _clean("prompt", prompt)
        subject = _clean("subject", subject)
        if "{}" in prompt:
            prompt = prompt.replace("{}", subject)
        if subject not in prompt:
            raise EditRequestError(f"subject {subject!r} does not occur in prompt {prompt!r}")
        target_new = _clean("target_new", target_new)
        if target_true is not None:
            target_true = _clean("target_true", target_true)
            if target_true.strip().casefold() == target_new.strip().casefold():
                raise EditRequestError(
                    f"target_new {target_new!r} equals target_true: the edit would change nothing"
                )
        return cls(
            prompt=prompt,
            subject=subject,
            target_new=target_new.strip(),
            target_true=target_true.strip() if target_true is not None else None,
            case_id=None if case_id is None else str(case_id),
            paraphrases=_probes("paraphrases", paraphrases),
            neighborhood=_probes("neighborhood", neighborhood),
            portability=_probes("portability", portability),
            locality=_probes("locality", locality),
            extra=dict(extra or {}),
        )

    def __post_init__(self) -> None:
        # The dataclass constructor is public; refuse what `create` would refuse if it is bypassed.
        for name in ("prompt", "subject", "target_new"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise EditRequestError(f"{name} must be a non-empty string; build requests with EditRequest.create")

    def with_probes(self, **probes: Sequence[Any]) -> "EditRequest":
        unknown = set(probes) - set(_PROBE_FIELDS)
        if unknown:
            raise EditRequestError(f"unknown probe field(s): {sorted(unknown)}")
        return replace(self, **{k: _probes(k, v) for k, v in probes.items()})

    def without_probes(self) -> "EditRequest":
        """The edit alone: the same request with every probe field empty."""
        return self.with_probes(**{k: [] for k in _PROBE_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "case_id": self.case_id,
        }
        for k in _PROBE_FIELDS:
            d[k] = [list(p) for p in getattr(self, k)]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditRequest":
        try:
            return cls.create(
                d["prompt"],
                d["subject"],
                d["target_new"],
                d.get("target_true"),
                d.get("case_id"),
                **{k: d.get(k) for k in _PROBE_FIELDS},
            )
        except KeyError as e:
            raise EditRequestError(f"missing field {e.args[0]!r}") from None


make_request = EditRequest.create


def _context_limit(lm: Any) -> int | None:
    cfg = getattr(lm, "config", None) or getattr(getattr(lm, "model", None), "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_fits(requests: "EditRequest | Sequence[EditRequest]", lm: Any, reserve: int = 0) -> None:
    """Refuse (`PromptTooLongError`) a request whose prompt plus target does not fit `lm`'s context
    window (with `reserve` tokens left over, e.g. for generation); warn about prompts longer than
    `LONG_PROMPT_TOKENS`. Needs the model's tokenizer, hence not part of `EditRequest.create`."""
    reqs = [requests] if isinstance(requests, EditRequest) else list(requests)
    base = getattr(lm, "base", lm)  # an edited system (a view) stands for its LM
    limit = _context_limit(base)
    for i, r in enumerate(reqs):
        prompt_ids, target_ids = base.encode_pair(r.prompt, r.target_new)
        n_prompt, n_target = len(prompt_ids), len(target_ids)
        where = f"request {i}" + (f" (case {r.case_id})" if r.case_id is not None else "")
        if limit is not None and n_prompt + n_target + reserve > limit:
            raise PromptTooLongError(
                f"{where}: prompt ({n_prompt} tokens) plus target ({n_target}){f' plus {reserve} to generate' if reserve else ''} "
                f"exceeds the model's context of {limit} tokens; shorten the prompt"
            )
        if n_prompt > LONG_PROMPT_TOKENS:
            warnings.warn(f"{where}: the prompt is {n_prompt} tokens long (over {LONG_PROMPT_TOKENS}); editing and "
                          "evaluating it will be slow", stacklevel=2)
