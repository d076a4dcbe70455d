"""How an in-context method's text meets the model (IKE, SERAC's counterfactual model).

Plain (default): the context (stated facts, demonstrations; it ends with "Prompt: ") and then the prompt,
as one text the model continues. Chat (`chat=True`, for instruction models whose tokenizer has a chat
template, such as SmolLM2-Instruct): the context without its trailing "Prompt: " is the user's message,
formatted by the model's own template with the assistant's turn opened, and the prompt begins the
assistant's reply — so the continuation is scored and generated as the assistant's answer. A prompt with
no context (out of scope) is passed as it is in both modes: the base model answers it unchanged.
"""

from __future__ import annotations

from typing import Any

from ...errors import HparamsError

QUERY_MARK = "Prompt: "


def check_chat(lm: Any, chat: Any) -> None:
    """`chat` must be a bool, and True only for a tokenizer with a chat template."""
    if not isinstance(chat, bool):
        raise HparamsError(f"chat must be true or false, got {chat!r}")
    if chat and not getattr(getattr(lm, "tokenizer", None), "chat_template", None):
        raise HparamsError(f"chat=True needs a model whose tokenizer has a chat template; {getattr(lm, 'name', 'this model')} "
                           "has none (use chat=False)")


def join(tokenizer: Any, context: str, prompt: str, chat: bool) -> str:
    """The text the model reads: `context + prompt`, or in chat mode the context as the user's turn and
    `prompt` opening the assistant's."""
    if not chat or not context:
        return context + prompt
    user = context.removesuffix(QUERY_MARK).rstrip("\n")
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True) + prompt
