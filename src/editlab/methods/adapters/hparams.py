"""Hyper-parameters of the adapter methods (GRACE, T-Patcher, CaliNET, WISE, MELO), torch-free so that the
CLI checks `--set` before torch is imported. Each method module re-exports its class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import HparamsError
from ..hparams import Hparams
from ..locate.hparams import parse_template_groups

if TYPE_CHECKING:
    from ...models.lm import LM


@dataclass
class GRACEHparams(Hparams):
    layer: int = 0  # the MLP whose output projection is wrapped; default n_layers - 5
    module: str = "mlp_out"  # mlp_out (down_proj / c_proj) or mlp_in (up_proj / c_fc)
    eps: float = 0.1  # initial radius: a fraction of the key's norm (eps_unit key_norm) or L2 units (absolute)
    eps_unit: str = "key_norm"
    steps: int = 100  # Adam steps on the value
    lr: float = 1.0
    stop_loss: float = 0.01  # stop once the mean target NLL is below this (0: always run every step)
    val_init: str = "warm"  # warm: f(q); cold: U[0, 1) as in the paper
    seed: int = 0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # GRACE config/editor/grace.yaml: eps 1.0 in raw L2 units, 100 Adam steps at lr 1.0, cold values,
        # a fixed number of steps
        "paper": {"eps": 1.0, "eps_unit": "absolute", "steps": 100, "lr": 1.0, "stop_loss": 0.0, "val_init": "cold"},
    }

    @classmethod
    def defaults_for(cls, lm: LM) -> dict[str, Any]:
        return {"layer": max(0, lm.n_layers - 5)}

    def validate(self, lm: LM) -> None:
        self._check_layer("layer", self.layer, lm)
        self._check_choice("module", self.module, ("mlp_out", "mlp_in"))
        self._check_choice("eps_unit", self.eps_unit, ("key_norm", "absolute"))
        if not self.eps > 0:
            raise HparamsError(f"eps (the deferral radius) must be > 0, got {self.eps}")
        if self.steps < 1:
            raise HparamsError("steps must be at least 1")
        self._check_positive("lr", self.lr)
        self._check_positive("stop_loss", self.stop_loss, allow_zero=True)
        self._check_choice("val_init", self.val_init, ("warm", "cold"))

    def path(self, lm: LM) -> str:
        return lm.arch.mlp_out_path(self.layer) if self.module == "mlp_out" else lm.arch.mlp_in_path(self.layer)


@dataclass
class TPatcherHparams(Hparams):
    """Defaults: the paper's (`Transformer-Patcher src/utils.py`, zsRE) except ReLU units; the layer is
    the last MLP of the model. Up to `max_add_neuron_num` units per edit, one per target token the model
    gets wrong (the paper's one neuron per mistake); 1 was the default before 2026-12-06."""

    layer: int = 0
    activation: str = "relu"
    lr: float = 1e-2
    steps: int = 2000  # max_edit_step
    act_loss_thd: float = 0.1
    act_margin: float = 0.0
    alc: float = 1.0
    mlc: float = 10.0
    margin1: float = 3.0  # memory activations at least this far below the query's
    margin2: float = -3.0  # ... and below this absolute level
    memory_top_k: int = 1000
    memory_size: int = 40_000  # memory rows (tokens of generic text); 0 disables the memory loss
    amplify: float = 10.0  # norm of the initial value vector
    max_add_neuron_num: int = 5  # one unit per mistaken target token, at most this many (paper, card)
    corpus: str = "wikipedia"  # generic text for the memory (see stats.corpus.get_corpus)
    # a dataset (name or file) whose probes' inputs are the memory instead of generic text (the reference
    # builds it from the task's training examples); use a split disjoint from the records scored
    memory_data: str = ""
    # earlier T-Patcher edits' inputs join the memory (the reference's update_memory=1); False: generic text only
    memorize_edits: bool = True

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # paper values (zsRE setting): up to 5 units per edit; the layer stays the model's last MLP
        "paper": {"lr": 1e-2, "steps": 2000, "act_loss_thd": 0.1, "alc": 1.0, "mlc": 10.0, "margin1": 3.0,
                  "margin2": -3.0, "memory_top_k": 1000, "memory_size": 40_000, "amplify": 10.0,
                  "max_add_neuron_num": 5},
    }

    @classmethod
    def defaults_for(cls, lm: LM) -> dict[str, Any]:
        return {"layer": lm.n_layers - 1}

    def validate(self, lm: LM) -> None:
        self._check_layer("layer", self.layer, lm)
        if self.activation not in ("relu", "silu"):
            raise HparamsError(f"activation must be 'relu' or 'silu' for T-Patcher units, got {self.activation!r}")
        self._check_positive("lr", self.lr)
        self._check_positive("steps", self.steps)
        self._check_positive("act_loss_thd", self.act_loss_thd)
        self._check_positive("alc", self.alc, allow_zero=True)
        self._check_positive("mlc", self.mlc, allow_zero=True)
        self._check_positive("amplify", self.amplify)
        self._check_dataset("memory_data", self.memory_data, "T-Patcher's memory_data")
        self._check_positive("max_add_neuron_num", self.max_add_neuron_num)
        self._check_positive("memory_top_k", self.memory_top_k)
        self._check_positive("memory_size", self.memory_size, allow_zero=True)
        if self.margin1 < 0:
            raise HparamsError(f"margin1 must be >= 0 (memory activations below the query's), got {self.margin1}")
        if self.margin2 > 0:
            raise HparamsError(f"margin2 must be <= 0 (memory inputs kept below zero, where a ReLU unit is "
                               f"silent), got {self.margin2}")


ACTIVATIONS = ("relu", "silu", "gated")


@dataclass
class CaliNETHparams(Hparams):
    """Defaults for Llama-style models (gated slots, a late layer, KL on); `paper` holds the values
    of CaliNet's `t5_train_kb_f.sh` that carry over (64 ReLU slots, lr 1e-2, a fixed 5,000 steps, no KL);
    its layer stays the late default (the reference's is the last decoder block: `--set layer=N-1`)."""

    layer: int = 0
    slots: int = 64
    activation: str = "gated"
    lr: float = 1e-2
    steps: int = 300
    stop_nll: float = 0.1
    kl_weight: float = 1.0
    kl_texts: int = 8  # generic-text paragraphs for the KL term
    kl_tokens: int = 24  # tokens of each
    train_on_paraphrases: bool = False
    corpus: str = "wikipedia"
    seed: int = 0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # the reference trains a fixed max_steps 5000 (no early stop): stop_nll 0 never stops before it
        "paper": {"slots": 64, "activation": "relu", "lr": 1e-2, "steps": 5000, "stop_nll": 0.0, "kl_weight": 0.0},
    }

    @classmethod
    def defaults_for(cls, lm: LM) -> dict[str, Any]:
        # a late layer: 24 of SmolLM2's 30 (the card's 20-27 range), 3 of a 4-layer toy model
        return {"layer": max(0, lm.n_layers - 1 - lm.n_layers // 6)}

    def validate(self, lm: LM) -> None:
        self._check_layer("layer", self.layer, lm)
        if self.activation not in ACTIVATIONS:
            raise HparamsError(f"activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}")
        self._check_positive("slots", self.slots)
        self._check_positive("lr", self.lr)
        self._check_positive("steps", self.steps)
        self._check_positive("stop_nll", self.stop_nll, allow_zero=True)
        self._check_positive("kl_weight", self.kl_weight, allow_zero=True)
        self._check_positive("kl_texts", self.kl_texts, allow_zero=True)
        self._check_positive("kl_tokens", self.kl_tokens)


@dataclass
class WISEHparams(Hparams):
    layer: int = 0
    mask_ratio: float = 0.2  # fraction of the projection's entries a shard may change
    edit_lr: float = 1.0  # SGD learning rate on the masked entries
    n_iter: int = 70
    norm_constraint: float = 1.0  # element-wise clip: W_v' within W_v ± c
    act_margin: list[float] = field(default_factory=lambda: [0.05, 0.2, 0.1])  # α, β, γ
    margin_scale: str = "relative"  # "relative": fractions of median ‖W_v a(x)‖; "absolute": raw norms
    act_ratio: float = 0.88  # ε = act_ratio · smallest edit activation of the shard
    save_freq: int = 500  # edits per shard
    # TIES merging (retrieve=True): every merge_freq edits (a multiple of save_freq) the shards opened
    # since the last merge become one side memory; 0 keeps every shard a memory of its own
    merge_freq: int = 0
    merge_density: float = 0.53  # TIES keep ratio per shard, over all entries of its delta (the reference's)
    retrieve: bool = True  # keep shards as separate side memories and route to the most active one
    # editlab's addition, not the paper's: each new edit of a shard is trained together with the shard's
    # earlier edits (their CE and activation margins) and the shard's threshold is re-measured on all of
    # them; on SmolLM2 it lowered retention (docs/methods.md, WISE), so it is off everywhere
    shard_rehearsal: bool = False
    # after the paper's Appendix B.3 replay: each new memory is kept below α at the other memories' edits'
    # last prompt tokens and must beat, by γ, any other memory firing at its own edit tokens (wise.py, "Replay")
    replay: bool = False
    irr_tokens: int = 256  # at most this many irrelevant tokens per edit
    # where x_irr comes from: "" = each request's own neighbourhood / locality probes (what locality then
    # scores: an upper bound), or a dataset name / file whose records' probes form a pool that edits draw
    # from (the reference's protocol: a training split, e.g. counterfact-train, disjoint from what is scored)
    irr_data: str = ""
    irr_texts: int = 16  # texts drawn from the irr_data pool per request
    # random prefixes the edit is also trained under, as [length, count] groups sampled from the model
    # (ROME-style; the reference's "context templates"); [] trains on the bare prompt only
    context_templates: list = field(default_factory=list)
    seed: int = 0  # shard masks

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # EasyEdit hparams/WISE/llama-7b.yaml (save_freq 500 means 200-edit sequences never open a second
        # shard, so the merge every 1000 edits never happens in them); the context prefixes are hard-coded in
        # the reference's wise_main.py (get_context_templates(..., [[5, 5], [10, 5]])), not in the yaml
        "paper": {"mask_ratio": 0.2, "edit_lr": 1.0, "n_iter": 70, "norm_constraint": 1.0,
                  "context_templates": [[5, 5], [10, 5]],
                  "act_margin": [5.0, 20.0, 10.0], "margin_scale": "absolute", "act_ratio": 0.88,
                  "save_freq": 500, "merge_freq": 1000, "merge_density": 0.53, "retrieve": True,
                  "shard_rehearsal": False, "replay": False},
        # tuned on counterfact-train (tuning split, not results; docs/methods.md, WISE): lr 1.0 saturates the
        # ±1 clip in one step (Δ ≈ 150 vs ‖W_v a‖ ≈ 85), so lr 0.3 (records 0-19). A shard of several edits
        # cannot hold them on this model (40 edits of records 100-139: 5-edit shards keep 0.71 rewrite
        # accuracy even with perfect routing), one edit per memory keeps 0.88, and with replay WISE's routing
        # scores what perfect routing of the same memories scores (rewrite 0.871, efficacy 0.975);
        # act_ratio 0.95 keeps other memories off neighbourhood prompts (locality 0.90 -> 0.95, held-out
        # 0.897 -> 0.919 on the same 40 edits), confirmed by the 200-edit run in docs/benchmarks.md
        "smollm2-135m": {"edit_lr": 0.3, "save_freq": 1, "replay": True, "act_ratio": 0.95},
    }

    @classmethod
    def defaults_for(cls, lm: LM) -> dict[str, Any]:
        return {"layer": max(lm.n_layers // 2, lm.n_layers - 5)}

    def validate(self, lm: LM) -> None:
        self._check_layer("layer", self.layer, lm)
        if not 0 < self.mask_ratio <= 1:
            raise HparamsError(f"mask_ratio must be in (0, 1], got {self.mask_ratio}")
        self._check_positive("edit_lr", self.edit_lr)
        self._check_positive("norm_constraint", self.norm_constraint)
        if self.n_iter < 1:
            raise HparamsError(f"n_iter must be >= 1, got {self.n_iter}")
        if len(self.act_margin) != 3 or not all(isinstance(m, (int, float)) for m in self.act_margin):
            raise HparamsError(f"act_margin must be three numbers [alpha, beta, gamma], got {self.act_margin}")
        for name, m in zip(("alpha", "beta", "gamma"), self.act_margin):
            self._check_positive(f"act_margin {name}", float(m), allow_zero=True)
        if self.margin_scale not in ("relative", "absolute"):
            raise HparamsError(f"margin_scale must be 'relative' or 'absolute', got {self.margin_scale!r}")
        if not 0 < self.act_ratio <= 1:
            raise HparamsError(f"act_ratio must be in (0, 1], got {self.act_ratio}")
        if self.save_freq < 1:
            raise HparamsError(f"save_freq must be >= 1, got {self.save_freq}")
        if self.merge_freq < 0 or self.merge_freq % self.save_freq:
            raise HparamsError(f"merge_freq must be 0 (no merging) or a positive multiple of save_freq "
                               f"({self.save_freq}), got {self.merge_freq} (the paper preset merges every 1000 edits)")
        if self.merge_freq and self.replay:
            raise HparamsError("replay with merge_freq is not implemented (replay would train a new shard against "
                               "the shards it is about to be merged with): set replay=false to merge (the "
                               "smollm2-135m preset turns replay on), or merge_freq=0")
        if self.merge_freq and not self.retrieve:
            raise HparamsError("merge_freq with retrieve=False (shards merged into the one side memory) is not "
                               "implemented; use retrieve=True, or merge_freq=0 for one unmerged memory")
        if not 0 < self.merge_density <= 1:
            raise HparamsError(f"merge_density must be in (0, 1], got {self.merge_density}")
        parse_template_groups(self.context_templates)
        if self.irr_tokens < 1:
            raise HparamsError(f"irr_tokens must be >= 1, got {self.irr_tokens}")
        if self.irr_texts < 1:
            raise HparamsError(f"irr_texts must be >= 1, got {self.irr_texts}")
        self._check_dataset("irr_data", self.irr_data, "WISE's irr_data (x_irr)")
        module = lm.base_module(lm.arch.mlp_out_path(self.layer))
        if getattr(module, "weight", None) is None or module.weight.dim() != 2:
            raise HparamsError(f"WISE needs a linear output projection at layer {self.layer}; "
                               f"{type(module).__name__} has no 2-d weight")


@dataclass
class MELOHparams(Hparams):
    # Defaults (rank 4, scale 4, Adam 1e-2, radius 0.1 of the key norm) reached the target within 50
    # steps on every one of SmolLM2's counterfact-train records 0-49 and on the tiny test model; the
    # radius is the calibration in the module docstring. No model-specific preset.
    layers: list[int] = field(default_factory=lambda: [0])  # MLPs wrapped; default [n_layers - 5]
    module: str = "mlp_in"  # mlp_in (up_proj / c_fc, the paper's choice) or mlp_out (down_proj / c_proj)
    block_rank: int = 4  # LoRA rank of one block
    lora_scale: float = 4.0  # multiplier of B(Ax)
    init_radius: float = 0.1  # new clusters' radius: fraction of the key's norm (key_norm) or L2 units (absolute)
    radius_unit: str = "key_norm"
    edits_per_block: int = 4  # requests trained together in one block (0: the whole batch in one block)
    steps: int = 50  # Adam steps per block
    lr: float = 1e-2
    lr_step: int = 20  # StepLR: multiply the rate by lr_gamma every lr_step steps
    lr_gamma: float = 0.5
    key_tokens: str = "prompt"  # prompt: key at the last prompt token; target: also at each target position
    stop_loss: float = 0.01  # stop once the mean target NLL is below this (0: always run every step)
    seed: int = 0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # EasyEdit hparams/MELO/gpt2-xl.yaml: num_rank_per_block 2, 350 blocks with r = α = 700; its dynamic
        # LoRA multiplies A and B by √(R/r) each (peft tuners/melo.py `dynamic`), so the block multiplier of
        # B(Ax) is (α/R)·(R/r) = 350 (√350 before 2026-12-05), num_edit_per_block 4, init_radius 0.5 in raw L2 units, 50 Adam
        # steps at 1e-3 with StepLR(20, 0.5), LoRA on two consecutive c_fc (layers 36-37 of 48)
        "paper": {"block_rank": 2, "lora_scale": 350.0, "init_radius": 0.5, "radius_unit": "absolute",
                  "edits_per_block": 4, "steps": 50, "lr": 1e-3, "lr_step": 20, "lr_gamma": 0.5, "stop_loss": 0.0,
                  "module": "mlp_in"},
    }

    @classmethod
    def defaults_for(cls, lm: LM) -> dict[str, Any]:
        return {"layers": [max(0, lm.n_layers - 5)]}

    def validate(self, lm: LM) -> None:
        self._check_layers("layers", list(self.layers), lm)
        self._check_choice("module", self.module, ("mlp_in", "mlp_out"))
        self._check_choice("radius_unit", self.radius_unit, ("key_norm", "absolute"))
        if not self.init_radius > 0:
            raise HparamsError(f"init_radius (a cluster's initial radius) must be > 0, got {self.init_radius}")
        if self.block_rank < 1:
            raise HparamsError("block_rank must be at least 1")
        if not self.lora_scale > 0:
            raise HparamsError(f"lora_scale must be > 0, got {self.lora_scale}")
        if self.steps < 1:
            raise HparamsError("steps must be at least 1")
        if self.lr_step < 1:
            raise HparamsError("lr_step must be at least 1")
        if not 0 < self.lr_gamma <= 1:
            raise HparamsError(f"lr_gamma must be in (0, 1], got {self.lr_gamma}")
        if self.key_tokens not in ("prompt", "target"):
            raise HparamsError(f"key_tokens must be 'prompt' or 'target', got {self.key_tokens!r}")
        if self.edits_per_block < 0:
            raise HparamsError("edits_per_block must be >= 0 (0: one block for the whole batch)")
        self._check_positive("lr", self.lr)
        self._check_positive("stop_loss", self.stop_loss, allow_zero=True)

    def paths(self, lm: LM) -> list[str]:
        where = lm.arch.mlp_in_path if self.module == "mlp_in" else lm.arch.mlp_out_path
        return [where(layer) for layer in self.layers]
