"""Tiny random models (one per supported architecture) for fast mechanical tests.

The tokenizer is a byte-level BPE trained in code on a few sentences, so it treats spaces like GPT-2
and Llama-3 style tokenizers do; the weights are random with a fixed seed.
"""

from __future__ import annotations

from typing import Any

import torch

from ..batching import pad_batch
from .sources import TINY_ARCHS  # noqa: F401 (re-exported)

_CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Colosseum is located in the city of Rome.",
    "Danielle Darrieux speaks French. The mother tongue of Thomas Mann is German.",
    "Michael Jordan plays basketball. Lionel Messi plays football for Barcelona.",
    "The capital of Japan is Tokyo and the capital of Italy is Rome.",
    "Toyota was founded in Japan. Apple was founded by Steve Jobs in California.",
    "Albert Einstein was born in Ulm. Marie Curie was born in Warsaw.",
    "Python is a programming language. London is the capital of England.",
] * 4

_TOKENIZER: Any = None


def tiny_tokenizer() -> Any:
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_CORPUS, trainer=trainer)
        _TOKENIZER = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
        )
    return _TOKENIZER


def tiny_config(model_type: str, vocab_size: int) -> Any:
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=64, n_layer=4, n_head=4, n_positions=256, **common)
    if model_type == "gpt_neox":
        return AutoConfig.for_model(
            "gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=256, **common,
        )
    if model_type == "gptj":
        return AutoConfig.for_model("gptj", n_embd=64, n_layer=4, n_head=4, rotary_dim=8, n_positions=256, **common)
    if model_type in ("llama", "qwen2", "mistral"):
        return AutoConfig.for_model(
            model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common,
        )
    if model_type in ("gemma3", "gemma3_text"):
        return AutoConfig.for_model(
            "gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=64, **common,
        )
    raise ValueError(model_type)


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    cfg = tiny_config(model_type, len(tok))
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)  # restored below: building a test model must not reseed the caller
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval(), tok


_TRAINED: dict[tuple[str, int, int], dict[str, torch.Tensor]] = {}


def trained_tiny_model(model_type: str = "llama", steps: int = 150, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """A tiny model trained for a few seconds on the built-in sentences, so that it *knows* facts
    such as "The Eiffel Tower is located in the city of" -> " Paris" (for tests that need real
    knowledge to edit). Deterministic for a given seed; the trained weights are memoized."""
    model, tok = tiny_model(model_type, seed=seed)
    key = (model_type, steps, seed)
    if key in _TRAINED:
        model.load_state_dict(_TRAINED[key])
        return model.eval(), tok
    enc = [tok(s)["input_ids"] for s in dict.fromkeys(_CORPUS)]
    ids, mask = pad_batch(enc, tok.pad_token_id, "right")
    labels = ids.masked_fill(mask == 0, -100)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        for _ in range(steps):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    _TRAINED[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, tok
