"""Hyper-parameters of the meta-learned editors (MEND, MALMEN, KE), torch-free so that the CLI checks
`--set` before torch is imported. Each method module re-exports its class.

Every field is part of the trained editor's cache key (with the base model's fingerprint and the training
data's hash): changing a training field and editing again asks for another `editlab train` run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import HparamsError
from ..hparams import Hparams

if TYPE_CHECKING:
    from ...models.lm import LM

# Symbolic names of the per-block matrices an editor can learn to change; resolved through ArchSpec
# (`mlp_gate` only exists on gated MLPs such as Llama's SwiGLU).
MATRICES = ("mlp_gate", "mlp_in", "mlp_out")
# MEND's editor-block layouts (nets.FactorNet)
BLOCKS = ("paper", "residual")


def _last_layers(lm: LM, n: int) -> list[int]:
    return list(range(max(0, lm.n_layers - n), lm.n_layers))


@dataclass
class MetaHparams(Hparams):
    """What every learned editor shares: which matrices it edits and how it is trained (`train/meta.py`).

    `TRAINING_FIELDS` only shape training: an edit uses the newest checkpoint whose other fields (the
    network's) equal its own, whatever schedule trained it; `fit` still caches per full set."""

    TRAINING_FIELDS: ClassVar[frozenset[str]] = frozenset({
        "steps", "edits_per_step", "accumulate", "lr", "grad_clip", "cedit", "cloc", "val_records", "val_every",
        "patience", "max_tokens", "seed", "lr_lr", "edit_lr", "init_lambda", "margin_kl", "lr_alpha",
        "objective", "label_smoothing", "ema"})

    # editors train for up to hundreds of thousands of steps (KE's paper: 200k updates)
    COUNT_BOUNDS: ClassVar[tuple[tuple[str, int], ...]] = tuple(
        (name, 10_000_000 if name == "steps" else bound) for name, bound in Hparams.COUNT_BOUNDS)

    layers: list[int] = field(default_factory=list)
    matrices: list[str] = field(default_factory=lambda: ["mlp_out"])
    # training (MetaTrainer)
    steps: int = 1000  # optimizer steps (each over `accumulate` micro-batches of `edits_per_step` edits)
    edits_per_step: int = 1  # edits made at once in one micro-batch (MEND trains with 1)
    accumulate: int = 10  # micro-batches per optimizer step
    lr: float = 1e-6  # Adam on the editor network
    grad_clip: float = 100.0
    cedit: float = 0.1  # weight of the edit loss
    cloc: float = 1.0  # weight of the locality KL
    val_records: int = 50  # held out of the training data (its last records) for validation
    val_every: int = 100  # optimizer steps between validations (and resumable checkpoints)
    patience: int = 5  # validations without improvement before early stopping; 0 never stops early
    max_tokens: int = 48  # training texts are cut to this many tokens (prompt + answer)
    seed: int = 0
    # editlab's option (0 = off, as in the papers): validate and keep an exponential moving average of the
    # editor's parameters with this per-step decay (train/meta.py)
    ema: float = 0.0

    @classmethod
    def defaults_for(cls, lm: LM) -> dict[str, Any]:
        return {"layers": _last_layers(lm, 3)}

    def check_counts(self, names: Any = None) -> None:
        """Also the model-free choices (matrices), so that the CLI refuses them before the model loads."""
        super().check_counts(names)
        self._check_matrices()
        self._check_ema()

    def _check_ema(self) -> None:
        if not 0 <= self.ema < 1:
            raise HparamsError(f"ema must be in [0, 1) (0 = off), got {self.ema}")

    def _check_matrices(self) -> None:
        if not self.matrices:
            raise HparamsError("matrices must name at least one of " + ", ".join(MATRICES))
        for m in self.matrices:
            self._check_choice("matrices", m, MATRICES)
        if len(set(self.matrices)) != len(self.matrices):
            raise HparamsError(f"matrices lists a matrix twice: {self.matrices}")

    def validate(self, lm: LM) -> None:
        self._check_layers("layers", self.layers, lm)
        self._check_matrices()
        for name in ("steps", "edits_per_step", "accumulate", "lr", "val_every", "max_tokens"):
            self._check_positive(name, getattr(self, name))
        for name in ("grad_clip", "cedit", "cloc", "val_records", "patience"):
            self._check_positive(name, getattr(self, name), allow_zero=True)
        self._check_ema()
        if self.max_tokens < 4:
            raise HparamsError(f"max_tokens must be at least 4, got {self.max_tokens}")


@dataclass
class MENDHparams(MetaHparams):
    """MEND (Mitchell et al. 2022). Paper values: eric-mitchell/mend `config/alg/mend.yaml` (also
    EasyEdit's): gate/up/down of the last 3 blocks, rank 1920, lr 1e-6, edit_lr 1e-4, lr_lr 1e-4,
    cedit 0.1, cloc 1.0, accumulate 10, grad_clip 100, up to 100k steps with early stopping."""

    matrices: list[str] = field(default_factory=lambda: ["mlp_gate", "mlp_in", "mlp_out"])
    rank: int = 1920  # hidden width of each residual block (min(rank, d_in + d_out))
    n_blocks: int = 2
    # "paper": z + clamp(s (U V z + b) + o, 0), V ~ N(0, 1) (MEND's paper and code); "residual": editlab's
    # earlier z + s U relu(V z + b) + o, V ~ N(0, 1/D) (nets.FactorNet)
    block: str = "paper"
    edit_lr: float = 1e-4  # initial per-module step size alpha
    lr_lr: float = 1e-4  # Adam lr of the step sizes
    steps: int = 100_000

    ABSENT_MEANS: ClassVar[dict[str, Any]] = {"block": "residual"}  # every checkpoint before the field

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # SmolLM2-135M on this project's 2-core CPU budget (≤ 45 min of training): the paper's matrices
        # (gate, up and down projections of the last 3 blocks), rank 256, a larger editor lr so that a few
        # thousand steps move the editor; the moving average (ema) removes the swing that lr causes and
        # cloc 3 holds locality. 3,200 steps x 4 edits on all of counterfact-train (9,960 training
        # records) is 1.3 passes: the validation edit accuracy jumps early in the second pass (0.74 at step
        # 2,500, 0.84-0.89 from step 2,700) while the KL stays at 0.02-0.04; 3,200 steps are what fit in
        # 45 min since the edited pass skips the blocks below the edited ones (44.8 min). patience 0: no
        # early stop, the best validation (by loss) is kept. Chosen on counterfact-train (validation = its
        # last 40 training records), never on a reported split: best validation 0.85 edit / 0.95 locality
        # accuracy, against 0.74 / 0.925 at 2,500 steps and 0.66 / 0.925 with down_proj alone
        # (docs/benchmarks.md).
        "smollm2-135m": {"layers": [27, 28, 29], "matrices": ["mlp_gate", "mlp_in", "mlp_out"], "rank": 256,
                         "block": "residual", "lr": 1e-4,
                         "steps": 3200, "edits_per_step": 4, "accumulate": 1, "edit_lr": 1e-4, "lr_lr": 1e-4,
                         "val_every": 100, "val_records": 40, "cloc": 3.0, "ema": 0.99, "patience": 0},
    }

    @classmethod
    def defaults_for(cls, lm: LM) -> dict[str, Any]:
        gated = _has_gate(lm)
        return {"layers": _last_layers(lm, 3),
                "matrices": ["mlp_gate", "mlp_in", "mlp_out"] if gated else ["mlp_in", "mlp_out"]}

    def check_counts(self, names: Any = None) -> None:
        super().check_counts(names)
        self._check_choice("block", self.block, BLOCKS)

    def validate(self, lm: LM) -> None:
        super().validate(lm)
        for name in ("rank", "n_blocks", "edit_lr", "lr_lr"):
            self._check_positive(name, getattr(self, name))
        self._check_choice("block", self.block, BLOCKS)


@dataclass
class MALMENHparams(MetaHparams):
    """MALMEN (Tan, Zhang, Fu 2024). Paper values: ChenmienTan/malmen `config/editor/malmen.yaml`,
    `config/data/zsre.yaml`: down_proj (GPT-J fc_out 22-27), rank 1920, 2 blocks, initial step size 1e-6,
    meta_lr 1e-5, loc_coef 1, max_grad_norm 1, one epoch, 512 edits per step, keys at answer tokens."""

    matrices: list[str] = field(default_factory=lambda: ["mlp_out"])
    rank: int = 1920
    n_blocks: int = 2
    edit_lr: float = 1e-6  # initial eta (per module, learned)
    init_lambda: float = 0.0  # initial log ridge strength lambda (per module, learned)
    lr: float = 1e-5  # meta_lr
    grad_clip: float = 1.0
    cedit: float = 1.0
    cloc: float = 1.0  # loc_coef
    edits_per_step: int = 512  # n_edits
    accumulate: int = 1
    steps: int = 20

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # SmolLM2-135M on the CPU budget: down_proj of layers 22-27 (method card), rank 256, 32 edits per
        # step; chosen on counterfact-train only (docs/methods.md "MALMEN").
        "smollm2-135m": {"layers": [22, 23, 24, 25, 26, 27], "rank": 256, "edits_per_step": 32,
                         "lr": 1e-4, "edit_lr": 1e-4, "steps": 80, "val_every": 20, "val_records": 32},
    }

    @classmethod
    def defaults_for(cls, lm: LM) -> dict[str, Any]:
        return {"layers": _last_layers(lm, 6)}

    def validate(self, lm: LM) -> None:
        super().validate(lm)
        for name in ("rank", "n_blocks", "edit_lr"):
            self._check_positive(name, getattr(self, name))


@dataclass
class KEHparams(MetaHparams):
    """KnowledgeEditor (De Cao, Aziz, Titov 2021) as ported by MEND/EasyEdit for decoder LMs: the last 3
    MLP blocks, outer lr 1e-5, cedit 0.1, cloc 1.0, accumulate 10, grad_clip 100. The conditioner is a
    BiLSTM (128 per direction) over the frozen, copied token embeddings of "old >> new || prompt"."""

    matrices: list[str] = field(default_factory=lambda: ["mlp_out"])
    lr: float = 1e-5
    hidden: int = 128  # LSTM width per direction
    cond_dim: int = 1024
    head_dim: int = 128
    max_scale: float = 1.0
    margin_kl: float = 1e-3  # initial KL budget mu (lowered x0.8 after good validations, floor 1e-5)
    lr_alpha: float = 0.1  # gradient-ascent rate of the Lagrange multiplier
    # "lagrangian": the paper's CE + alpha (KL - mu) with alpha >= 0 raised by gradient ascent;
    # "weighted": the MEND/EasyEdit port's cedit * NLL + cloc * KL
    objective: str = "lagrangian"
    label_smoothing: float = 0.1  # of the edit loss while training (paper)
    steps: int = 200_000

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # SmolLM2-135M on the CPU budget: down_proj of layers 27-29, larger lr; counterfact-train only.
        "smollm2-135m": {"layers": [27, 28, 29], "lr": 1e-4, "steps": 600, "edits_per_step": 4, "accumulate": 1,
                         "val_every": 100, "val_records": 40},
    }

    def validate(self, lm: LM) -> None:
        super().validate(lm)
        for name in ("hidden", "cond_dim", "head_dim", "max_scale", "margin_kl", "lr_alpha"):
            self._check_positive(name, getattr(self, name))
        self._check_choice("objective", self.objective, ("lagrangian", "weighted"))
        if not 0 <= self.label_smoothing < 1:
            raise HparamsError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


def _has_gate(lm: LM) -> bool:
    try:
        lm.module(lm.arch.mlp_in_path(0).replace("up_proj", "gate_proj"))
    except AttributeError:
        return False
    return "up_proj" in lm.arch.mlp_in
