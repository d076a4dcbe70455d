"""`ArchSpec`: where each architecture keeps the modules editing methods touch.

Chosen from `config.model_type` only. Paths are attribute paths from the `*ForCausalLM` root; per-block
paths are relative to one block. Adding an architecture is one entry in `ARCHS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UnsupportedArchitectureError


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

    def n_layers(self, config: Any) -> int:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if getattr(config, key, None) is not None:
                return int(getattr(config, key))
        raise UnsupportedArchitectureError(f"cannot read the layer count of {self.model_type}")

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


def _llama_like(model_type: str) -> ArchSpec:
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
    )


ARCHS: dict[str, ArchSpec] = {
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
    "gemma3_text": _llama_like("gemma3_text"),
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
ARCHS["gemma3"] = ARCHS["gemma3_text"]


def supported_architectures() -> list[str]:
    return sorted(ARCHS)


def arch_for(config: Any) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHS:
        return ARCHS[model_type]
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported; supported: {', '.join(supported_architectures())}"
    )
