"""Hidden states at chosen token positions, for adapter methods (written once, shared by the family).

Adapters decide per token: a wrapper looks at its input at every position and acts where that input is
in its scope (GRACE: within a key's radius; T-Patcher / CaliNET: where a unit fires). The decision
depends on the position's hidden state only, never on a "query position" kept in the module, so it is
the same under teacher forcing, in a batch with padding, and while generating with a KV cache (the
reference implementations keep a query index in the module and never reset it after an edit).

What an edit needs is the input of the wrapped module at the *last prompt token* of each of its
prompts: the position whose output predicts the first target token. `last_prompt_inputs` reads it from
a right-padded batch (each row's own length, so padding never shifts it) and stops the forward pass at
the wrapped module.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...hooks import capture
from ...models.lm import LM


def _inputs(lm: LM, path: str, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input of module `path` [len(seqs), width, d_in], attention mask) for right-padded `seqs`; the
    forward pass stops at the module."""
    ids, mask = lm.pad_right(seqs)
    got: list[torch.Tensor] = []
    capture(lm.model, lambda: lm.backbone_forward(ids, mask), inputs={path: got.append}, stop_after=path)
    return got[0], mask


@torch.no_grad()
def last_prompt_inputs(lm: LM, path: str, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Input of module `path` at the last token of each prompt: [len(prompts), d_in] (float32)."""
    out: list[torch.Tensor] = []
    encoded = [lm.encode_prompt(p) for p in prompts]
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        h, _ = _inputs(lm, path, chunk)
        last = torch.tensor([len(s) - 1 for s in chunk], device=h.device)
        out.append(h[torch.arange(len(chunk), device=last.device), last].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def prompt_inputs(lm: LM, path: str, prompt: str) -> torch.Tensor:
    """Input of module `path` at every position of `prompt` (sink prefix included): [len, d_in] (float32).
    The last row is `last_prompt_inputs(lm, path, [prompt])[0]`."""
    h, _ = _inputs(lm, path, [lm.encode_prompt(prompt)])
    return h[0].float().cpu()


@torch.no_grad()
def token_inputs(lm: LM, path: str, texts: Sequence[str], max_tokens: int, skip_prefix: bool = True,
                 batch_size: int = 16) -> torch.Tensor:
    """Inputs of module `path` at every real token of `texts` (padding excluded; the sink prefix
    excluded when `skip_prefix`), up to `max_tokens` rows: [n, d_in] (float32). Used for memories of
    what the module sees on unrelated text (T-Patcher's memory loss, radius calibration)."""
    return sequence_inputs(lm, path, [lm.encode_prompt(t) for t in texts], max_tokens, skip_prefix, batch_size)


@torch.no_grad()
def sequence_inputs(lm: LM, path: str, encoded: Sequence[Sequence[int]], max_tokens: int, skip_prefix: bool = True,
                    batch_size: int = 16) -> torch.Tensor:
    """`token_inputs` of token sequences already encoded as the model reads them (each starting with the
    sink prefix, as `encode_prompt` and `encode_pair` give them)."""
    rows: list[torch.Tensor] = []
    n = 0
    skip = len(lm.prefix_ids) if skip_prefix else 0
    for start in range(0, len(encoded), batch_size):
        chunk = [list(s) for s in encoded[start : start + batch_size]]
        h, mask = _inputs(lm, path, chunk)
        keep = mask.bool().clone()
        keep[:, :skip] = False
        sel = h[keep.to(h.device)].float().cpu()
        rows.append(sel[: max_tokens - n])
        n += rows[-1].shape[0]
        if n >= max_tokens:
            break
    return torch.cat(rows) if rows else torch.zeros(0)
