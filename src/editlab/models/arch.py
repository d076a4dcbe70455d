"""`ArchSpec`: where each architecture keeps the modules editing methods touch.

Chosen from `config.model_type` only. Paths are attribute paths from the `*ForCausalLM` root; per-block
paths are relative to one block. Adding an architecture is one entry in `_SPECS` (registered in `ARCHS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UnsupportedArchitectureError
from ..registry import Registry


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    backbone: str  # module whose output is the final (normed) hidden state
    layers: str  # ModuleList of blocks
    mlp_in: str  # per block: first MLP projection (up / c_fc)
    mlp_out: str  # per block: MLP output projection (the "value" matrix edited by ROME/MEMIT)
    attn: str  # per block
    attn_out: str  # per block
    embed: str
    final_norm: str
    lm_head: str
    transposed: bool = False  # weights stored (in, out) as in GPT-2's Conv1D
    # Token put before every text when the tokenizer adds no BOS of its own, so that position 0 (an
    # attention sink with a huge residual norm in such models) is never a subject token. None: no prefix.
    sink_token: str | None = None
    # Norm applied to the MLP output before it joins the residual (Gemma 3's post_feedforward_layernorm):
    # breaks the linear key -> residual algebra that ROME/MEMIT rely on.
    mlp_post_norm: str | None = None

    def n_layers(self, config: Any) -> int:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if getattr(config, key, None) is not None:
                return int(getattr(config, key))
        raise UnsupportedArchitectureError(f"cannot read the layer count of {self.model_type}")

    def sink_prefix_ids(self, tokenizer: Any) -> list[int]:
        """Ids to put before every text: [] when no sink token is set, the tokenizer does not know it,
        or the tokenizer already starts every text with a special token (a BOS)."""
        if not self.sink_token:
            return []
        tid = tokenizer.convert_tokens_to_ids(self.sink_token)
        if tid is None or tid == getattr(tokenizer, "unk_token_id", None) and self.sink_token != tokenizer.unk_token:
            return []
        probe = tokenizer("x", add_special_tokens=True)["input_ids"]
        if probe and probe[0] in set(getattr(tokenizer, "all_special_ids", []) or []):
            return []
        return [int(tid)]

    def block_path(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def mlp_out_path(self, layer: int) -> str:
        return f"{self.layers}.{layer}.{self.mlp_out}"

    def mlp_in_path(self, layer: int) -> str:
        return f"{self.layers}.{layer}.{self.mlp_in}"

    @staticmethod
    def module(model: torch.nn.Module, path: str) -> torch.nn.Module:
        return model.get_submodule(path)

    def as_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """View of a projection weight as (out_features, in_features)."""
        return weight.T if self.transposed else weight

    def from_matrix(self, delta: torch.Tensor) -> torch.Tensor:
        """Inverse of `as_matrix` for an update computed as (out, in)."""
        return delta.T.contiguous() if self.transposed else delta


def _llama_like(model_type: str, **extra: Any) -> ArchSpec:
    return ArchSpec(
        model_type=model_type,
        backbone="model",
        layers="model.layers",
        mlp_in="mlp.up_proj",
        mlp_out="mlp.down_proj",
        attn="self_attn",
        attn_out="self_attn.o_proj",
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        **extra,
    )


_SPECS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        model_type="gpt2",
        backbone="transformer",
        layers="transformer.h",
        mlp_in="mlp.c_fc",
        mlp_out="mlp.c_proj",
        attn="attn",
        attn_out="attn.c_proj",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        transposed=True,
    ),
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    # Gemma 3 normalizes the MLP output (post_feedforward_layernorm) before adding it to the residual
    "gemma3_text": _llama_like("gemma3_text", mlp_post_norm="post_feedforward_layernorm"),
    "gpt_neox": ArchSpec(
        model_type="gpt_neox",
        backbone="gpt_neox",
        layers="gpt_neox.layers",
        mlp_in="mlp.dense_h_to_4h",
        mlp_out="mlp.dense_4h_to_h",
        attn="attention",
        attn_out="attention.dense",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
    ),
    "gptj": ArchSpec(
        model_type="gptj",
        backbone="transformer",
        layers="transformer.h",
        mlp_in="mlp.fc_in",
        mlp_out="mlp.fc_out",
        attn="attn",
        attn_out="attn.out_proj",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
    ),
}
# Gemma 3 checkpoints ship as "gemma3" (multimodal wrapper) or "gemma3_text"; both load as the text model.
_SPECS["gemma3"] = _SPECS["gemma3_text"]


_DESCRIPTIONS = {
    "gpt2": "GPT-2 family (Conv1D weights stored transposed)",
    "llama": "Llama, SmolLM2 and other Llama-style models (SwiGLU MLP)",
    "mistral": "Mistral-style models",
    "qwen2": "Qwen2 models",
    "gemma3_text": "Gemma 3 text models",
    "gemma3": "Gemma 3 checkpoints (multimodal wrapper; the text model is used)",
    "gpt_neox": "GPT-NeoX / Pythia models",
    "gptj": "GPT-J models",
}

ARCHS: Registry[ArchSpec] = Registry("architecture", UnsupportedArchitectureError, case_sensitive=True)
for _name, _spec in _SPECS.items():
    ARCHS.register(_name, _DESCRIPTIONS[_name], (lambda s=_spec: s))


def supported_architectures() -> list[str]:
    return sorted(ARCHS.names())


def arch_for(config: Any) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type in ARCHS:
        return ARCHS.get(model_type)
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported; supported: {', '.join(supported_architectures())}"
    )
