"""The method catalogue: every editing method's name, description, family, editor class and
hyper-parameter class (both as lazy "module:attr" targets), whether it edits a batch, and the settings
its contract tests use on the tiny models.

Torch-free on purpose: the CLI resolves a method name, checks `--mode batch` and checks `--set` against
the hyper-parameter class (each family keeps those in a torch-free `hparams` module) before torch is
imported, so a mistake is answered in a fraction of a second. `tests/test_catalogue.py` checks that each
entry agrees with its editor class."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import UnknownMethodError
from ..registry import Registry, lazy

if TYPE_CHECKING:
    from .base import Editor
    from .hparams import Hparams


METHODS: Registry[type[Editor]] = Registry("method", UnknownMethodError)
METHODS.register("ft", "FT-L: fine-tuning of one MLP layer within an L-inf ball (ROME paper's baseline)",
                 lazy("editlab.methods.ft:FTEditor"),
                 hparams="editlab.methods.ft_hparams:FTHparams", batch=True, aliases=("ft-l",), family="fine-tuning",
                 tiny_hparams={"layer": 1, "steps": 40, "lr": 1e-2, "norm_constraint": 0.05})
METHODS.register("ft-m", "FT-M: fine-tuning of one MLP layer, loss on the target tokens only (EasyEdit)",
                 lazy("editlab.methods.ft:FTMEditor"),
                 hparams="editlab.methods.ft_hparams:FTMHparams", batch=True, family="fine-tuning",
                 tiny_hparams={"layer": 1, "steps": 40, "lr": 1e-2})
METHODS.register("rome", "ROME (r-ROME keys by default): rank-one update of one MLP output projection",
                 lazy("editlab.methods.locate.rome:ROMEEditor"),
                 hparams="editlab.methods.locate.hparams:ROMEHparams", batch=False, aliases=("r-rome",), family="locate-and-edit",
                 tiny_hparams={"layer": 1, "context_templates": [[4, 2]], "v_steps": 25, "v_lr": 0.5,
                               "clamp_norm_factor": 10.0, "mom2_n_tokens": 300}, tiny_min_gain=None)
METHODS.register("memit", "MEMIT: batch edits spread over several MLP layers by least squares",
                 lazy("editlab.methods.locate.memit:MEMITEditor"),
                 hparams="editlab.methods.locate.hparams:MEMITHparams", batch=True, family="locate-and-edit",
                 tiny_hparams={"layers": [1, 2], "context_templates": [[4, 2]], "v_steps": 25, "v_lr": 0.5,
                               "clamp_norm_factor": 10.0, "mom2_update_weight": 10.0, "mom2_n_tokens": 300},
                 tiny_min_gain=None)
METHODS.register("emmet", "EMMET: batched equality-constrained ROME, spread over MLP layers like MEMIT",
                 lazy("editlab.methods.locate.emmet:EMMETEditor"),
                 hparams="editlab.methods.locate.hparams:EMMETHparams", batch=True, family="locate-and-edit",
                 tiny_hparams={"layers": [1, 2], "context_templates": [[4, 2]], "v_steps": 25, "v_lr": 0.5,
                               "clamp_norm_factor": 10.0, "mom2_update_weight": 10.0, "mom2_n_tokens": 300},
                 tiny_min_gain=None)
METHODS.register("pmet", "PMET: attention and MLP targets optimised jointly; only the MLP part is written",
                 lazy("editlab.methods.locate.pmet:PMETEditor"),
                 hparams="editlab.methods.locate.hparams:PMETHparams", batch=True, family="locate-and-edit",
                 tiny_hparams={"layers": [1, 2], "context_templates": [[4, 2]], "v_steps": 25, "v_lr": 0.5,
                               "clamp_norm_factor": 10.0, "mom2_update_weight": 10.0, "mom2_n_tokens": 300},
                 tiny_min_gain=None)
METHODS.register("alphaedit", "AlphaEdit: MEMIT-style update projected onto the preserved keys' null space",
                 lazy("editlab.methods.locate.alphaedit:AlphaEditEditor"),
                 hparams="editlab.methods.locate.hparams:AlphaEditHparams", batch=True, family="locate-and-edit",
                 tiny_hparams={"layers": [1, 2], "context_templates": [[4, 2]], "v_steps": 25, "v_lr": 0.5,
                               "clamp_norm_factor": 10.0, "null_space": "energy", "null_space_energy": 0.9,
                               "l2": 0.1, "l2_mode": "relative", "mom2_n_tokens": 300},
                 tiny_min_gain=None)
METHODS.register("kn", "KN: knowledge neurons by integrated gradients; shifts their value vectors",
                 lazy("editlab.methods.locate.kn:KNEditor"),
                 hparams="editlab.methods.locate.hparams:KNHparams", batch=False, family="locate-and-edit",
                 tiny_hparams={"layers": [0, 1, 2, 3], "ig_steps": 20, "batch_size": 160}, tiny_min_gain=None)

# Added parameters around a kept base layer (methods/adapters/): one shared wrapper per module path,
# extended edit by edit (`on=`) through table updates.
METHODS.register("grace", "GRACE: codebook of (key, value, radius) at one layer; inputs within a radius get the value",
                 lazy("editlab.methods.adapters.grace:GRACEEditor"),
                 hparams="editlab.methods.adapters.hparams:GRACEHparams", batch=False, family="adapter",
                 tiny_hparams={"layer": 2, "steps": 40, "lr": 1.0})
METHODS.register("t-patcher", "T-Patcher: trained ReLU patch units beside the last MLP, one per mistaken target token",
                 lazy("editlab.methods.adapters.t_patcher:TPatcherEditor"),
                 hparams="editlab.methods.adapters.hparams:TPatcherHparams", batch=True, aliases=("tpatcher",), family="adapter",
                 tiny_hparams={"steps": 40, "memory_size": 2000, "memory_top_k": 100})
METHODS.register("calinet", "CaliNET: calibration memory slots (a small parallel FFN) trained on the facts",
                 lazy("editlab.methods.adapters.calinet:CaliNETEditor"),
                 hparams="editlab.methods.adapters.hparams:CaliNETHparams", batch=True, family="adapter",
                 tiny_hparams={"slots": 16, "steps": 40, "kl_texts": 4})
METHODS.register("wise", "WISE: side copy of one MLP output projection, edited in random shards, routed by activation",
                 lazy("editlab.methods.adapters.wise:WISEEditor"),
                 hparams="editlab.methods.adapters.hparams:WISEHparams", batch=True, family="adapter",
                 tiny_hparams={"layer": 2, "n_iter": 50})
METHODS.register("melo", "MELO: LoRA blocks chosen per input by a vector database of edit clusters",
                 lazy("editlab.methods.adapters.melo:MELOEditor"),
                 hparams="editlab.methods.adapters.hparams:MELOHparams", batch=True, family="adapter",
                 tiny_hparams={"layers": [2], "steps": 30, "lr": 1e-2, "lora_scale": 4.0})


# In-context editing (methods/memory/): an LM view puts retrieved demonstrations and the new fact(s) before
# each prompt; weights untouched. The toy model copies a stated fact only sometimes, so the contract asks
# it to move the prediction (fact-level behaviour: tests/test_ike.py, SmolLM2 test marked slow there).
METHODS.register("ike", "IKE: in-context editing with demonstrations retrieved from a training pool (LM view)",
                 lazy("editlab.methods.memory.ike:IKEEditor"),
                 hparams="editlab.methods.memory.hparams:IKEHparams", batch=True, family="in-context",
                 tiny_hparams={"pool": "builtin", "n_demos": 2}, tiny_min_gain=None)
# SERAC: edit memory + scope classifier; in-scope prompts answered by the base model with the edit in context.
METHODS.register("serac", "SERAC: a scope classifier over an edit memory routes in-scope prompts to a counterfactual model",
                 lazy("editlab.methods.memory.serac:SERACEditor"),
                 hparams="editlab.methods.memory.hparams:SERACHparams", batch=True, family="memory",
                 tiny_hparams={"train_data": ["builtin"], "train_records": 0, "train_group": 20}, tiny_min_gain=None)
# Multi-hop memory methods (methods/memory/multihop.py): MeLLo and DeepEdit, each with an oracle/symbolic mode
# for models too small to decompose questions (reported under its own name).
METHODS.register("mello", "MeLLo: multi-hop questions decomposed by the LM, each sub-answer checked against retrieved edits",
                 lazy("editlab.methods.memory.mello:MeLLoEditor"),
                 hparams="editlab.methods.memory.hparams:MeLLoHparams", batch=True, family="memory",
                 tiny_hparams={}, tiny_min_gain=None)
METHODS.register("mello-oracle", "MeLLo with oracle decomposition: the question's relation chain, each hop from memory or the LM",
                 lazy("editlab.methods.memory.mello:MeLLoOracleEditor"),
                 hparams="editlab.methods.memory.hparams:MeLLoOracleHparams", batch=True, family="memory",
                 tiny_hparams={}, tiny_min_gain=None)
METHODS.register("deepedit", "DeepEdit: depth-first search over reasoning steps constrained by retrieved edits, judged by the LM",
                 lazy("editlab.methods.memory.deepedit:DeepEditEditor"),
                 hparams="editlab.methods.memory.hparams:DeepEditHparams", batch=True, family="memory",
                 tiny_hparams={}, tiny_min_gain=None)
METHODS.register("deepedit-symbolic", "DeepEdit with deterministic constraints: string-matched entities, relation-keyed conflicts",
                 lazy("editlab.methods.memory.deepedit:DeepEditSymbolicEditor"),
                 hparams="editlab.methods.memory.hparams:DeepEditSymbolicHparams", batch=True, family="memory",
                 tiny_hparams={}, tiny_min_gain=None)


# Meta-learned editors (methods/meta/): a network trained once per base model (`editlab train`, cached in
# the user cache) turns an edit's gradient into a weight delta. `tiny_train` is the training the contract
# tests run first on the toy model (builtin facts, a few seconds).
METHODS.register("mend", "MEND: a trained network rewrites the edit's rank-one gradient factors into a weight delta",
                 lazy("editlab.methods.meta.mend:MENDEditor"),
                 hparams="editlab.methods.meta.hparams:MENDHparams", batch=True, family="meta-learning",
                 trained=True,
                 tiny_hparams={"layers": [2, 3], "matrices": ["mlp_out"], "rank": 32, "steps": 40, "accumulate": 1,
                               "edits_per_step": 2, "lr": 1e-3, "edit_lr": 1e-2, "lr_lr": 1e-3, "val_records": 0,
                               "val_every": 20})
METHODS.register("malmen", "MALMEN: MEND-style factor network whose edits are combined by least squares (massive batches)",
                 lazy("editlab.methods.meta.malmen:MALMENEditor"),
                 hparams="editlab.methods.meta.hparams:MALMENHparams", batch=True, family="meta-learning",
                 trained=True,
                 tiny_hparams={"layers": [2, 3], "rank": 32, "steps": 40, "edits_per_step": 4, "lr": 1e-3,
                               "edit_lr": 1e-2, "val_records": 0, "val_every": 20})
METHODS.register("ke", "KE: KnowledgeEditor, a hypernetwork conditioned on the edit text rescales the edit's gradient",
                 lazy("editlab.methods.meta.ke:KEEditor"),
                 hparams="editlab.methods.meta.hparams:KEHparams", batch=True, family="meta-learning",
                 trained=True,
                 tiny_hparams={"layers": [2, 3], "hidden": 16, "cond_dim": 32, "head_dim": 16, "steps": 40,
                               "edits_per_step": 2, "accumulate": 1, "lr": 3e-3, "val_records": 0, "val_every": 20})

def available_methods() -> dict[str, str]:
    """Registered method names and their one-line descriptions."""
    return METHODS.describe()


def hparams_class(name: str) -> type[Hparams]:
    """The hyper-parameter class of method `name` (UnknownMethodError for an unknown name), imported
    without torch."""
    module, _, attr = METHODS.entry(name).meta["hparams"].partition(":")
    return getattr(importlib.import_module(module), attr)


def can_batch(name: str) -> bool:
    """Whether method `name` edits several requests in one call."""
    return bool(METHODS.entry(name).meta["batch"])
