"""Tokenization of prompt/target pairs, in one place for every method and metric.

A target continues a prompt, so it normally needs a separating space ("... city of" + " Paris").
`encode_pair` decides that once, and tokenizes the joined string so that tokenizers which merge across
the boundary or treat leading spaces specially (SentencePiece) still give the ids the model would see.
"""

from __future__ import annotations

from typing import Any, Sequence


def join_target(prompt: str, target: str) -> str:
    """The continuation string actually appended to `prompt` (with a leading space when needed)."""
    if not prompt or prompt[-1].isspace() or target[:1].isspace():
        return target
    return " " + target


def encode_prompt(tokenizer: Any, prompt: str, prefix: Sequence[int] = ()) -> list[int]:
    """Token ids of `prompt` with the tokenizer's special tokens, after `prefix` (the architecture's
    attention-sink tokens, see `ArchSpec.sink_token`; empty for most models)."""
    return list(prefix) + list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_pair(tokenizer: Any, prompt: str, target: str, prefix: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """Token ids of `prompt` (with the model's special prefix tokens) and of `target` continuing it."""
    cont = join_target(prompt, target)
    p_ids = encode_prompt(tokenizer, prompt, prefix)
    full = encode_prompt(tokenizer, prompt + cont, prefix)
    if len(full) > len(p_ids) and full[: len(p_ids)] == p_ids:
        return p_ids, full[len(p_ids) :]
    # The tokenizer merged across the boundary; fall back to encoding the continuation on its own.
    t_ids = list(tokenizer(cont, add_special_tokens=False)["input_ids"])
    return p_ids, t_ids


def subject_last_index(tokenizer: Any, prompt: str, subject: str, prefix: Sequence[int] = ()) -> int:
    """Index (in `encode_prompt(prompt, prefix)`) of the last token of the last occurrence of `subject`."""
    return len(prefix) + _subject_last_index(tokenizer, prompt, subject)


def _subject_last_index(tokenizer: Any, prompt: str, subject: str) -> int:
    start = prompt.rfind(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} not in prompt {prompt!r}")
    end = start + len(subject)
    enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    offsets = enc.get("offset_mapping") if hasattr(enc, "get") else None
    if offsets:
        last = None
        for i, (a, b) in enumerate(offsets):
            if b > a and a < end:
                last = i
        if last is not None:
            return last
    # Slow tokenizers have no offsets: count the tokens of the prefix ending at the subject.
    return len(encode_prompt(tokenizer, prompt[:end])) - 1
