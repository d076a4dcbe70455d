"""Hyper-parameters of FT-L and FT-M, torch-free so that the CLI checks `--set` before torch is imported
(`ft.py` re-exports them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import HparamsError
from .hparams import Hparams

if TYPE_CHECKING:
    from ..models.lm import LM


OBJECTIVES = ("prompt_last", "target_new")


@dataclass
class FTHparams(Hparams):
    """FT-L by default. Paper presets: ROME's `hparams/FT/*_constr.json` (GPT-2 XL, GPT-J: the FT-L
    runs of the ROME paper) and EasyEdit's `hparams/FT/llama-7b.yaml` (its survey's FT-L on Llama-2)."""

    layer: int = 5
    objective: str = "prompt_last"
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float = 5e-4  # L∞ radius around the original weights; 0 disables it
    batch_size: int = 128  # requests per optimizer step (ROME's default)
    # The references select parameters by module-name substring, so on GPT-2/GPT-J the projection's
    # bias is trained too; on for those paper presets, off elsewhere (Llama-family layers have none).
    update_bias: bool = False
    stop_nll: float = 0.01

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # paper values: kmeng01/rome hparams/FT/gpt2-xl_constr.json
        "gpt2-xl": {"layer": 0, "steps": 25, "lr": 5e-4, "norm_constraint": 5e-4, "update_bias": True},
        # paper values: kmeng01/rome hparams/FT/EleutherAI_gpt-j-6B_constr.json (EasyEdit's current
        # gpt-j-6B.yaml instead trains layer 21 without a constraint)
        "gpt-j-6b": {"layer": 0, "steps": 25, "lr": 5e-4, "norm_constraint": 5e-5, "update_bias": True},
        # paper values: zjunlp/EasyEdit hparams/FT/llama-7b.yaml (llama-2-7b): no L∞ constraint there
        "llama-2-7b": {"layer": 21, "steps": 25, "lr": 5e-4, "norm_constraint": 0.0, "batch_size": 1},
        # SmolLM2-135M, chosen on counterfact-train records 0-7 (never a reported split). The paper
        # radius 5e-4 is inert here: efficacy 0.125, every metric equal to the unedited model's. The
        # FT-L definition is kept and only the radius widened (layer 4, lr and steps as the paper):
        # efficacy / paraphrase / neighborhood = 0.625 / 0.50 / 0.875 at 5e-3 and 0.875 / 0.625 /
        # 0.875 at 1e-2 (unedited 0.125 / 0.25 / 0.875). Locality is expected to suffer for this
        # baseline on more records.
        "smollm2-135m": {"layer": 4, "steps": 25, "lr": 5e-4, "norm_constraint": 1e-2},
    }

    @classmethod
    def defaults_for(cls, lm: LM) -> dict[str, Any]:
        return {"layer": max(0, round(lm.n_layers * 0.15))}

    def validate(self, lm: LM) -> None:
        self._check_layer("layer", self.layer, lm)
        if self.objective not in OBJECTIVES:
            raise HparamsError(f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        self._check_positive("steps", self.steps)
        self._check_positive("lr", self.lr)
        self._check_positive("batch_size", self.batch_size)
        self._check_positive("norm_constraint", self.norm_constraint, allow_zero=True)
        self._check_positive("stop_nll", self.stop_nll, allow_zero=True)


@dataclass
class FTMHparams(FTHparams):
    """FT-M: EasyEdit's FT hparams files run with `objective_optimization: target_new`."""

    objective: str = "target_new"
    norm_constraint: float = 0.0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # paper values: zjunlp/EasyEdit hparams/FT/*.yaml, objective target_new (its survey's FT-M).
        # EasyEdit's gpt2-xl.yaml keeps its L∞ radius of 5e-4 under target_new as well.
        "gpt2-xl": {"layer": 0, "steps": 25, "lr": 5e-4, "norm_constraint": 5e-4, "batch_size": 3,
                    "update_bias": True},
        "gpt-j-6b": {"layer": 21, "steps": 25, "lr": 5e-4, "norm_constraint": 0.0, "batch_size": 1,
                     "update_bias": True},
        "llama-2-7b": {"layer": 21, "steps": 25, "lr": 5e-4, "norm_constraint": 0.0, "batch_size": 1},
        # SmolLM2-135M: the FT-L layer with EasyEdit's lr and steps, checked on counterfact-train
        # records 0-7: efficacy / paraphrase / neighborhood 1.0 / 0.625 / 0.75 (unedited 0.125 /
        # 0.25 / 0.875)
        "smollm2-135m": {"layer": 4, "steps": 25, "lr": 5e-4},
    }
