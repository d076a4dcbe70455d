"""What MEND, MALMEN and KE share beyond the gradient factors: the training/validation losses of an
editor network (`GradientEditorNet.losses`) and the `LearnedEditor` that trains it with the one trainer
(`train/meta.py`), caches it (`train/checkpoints.py`) and turns its output into weight-delta patches.

Losses (MEND's, card §1): `cedit * NLL(new answer | edit prompt and paraphrases, edited model) +
cloc * KL(unedited ‖ edited)` at the positions that predict the answers of unrelated texts. One forward /
backward of the unedited model on [edit texts; unrelated texts; paraphrases] gives the gradient factors,
the unedited distributions and every text's input to the lowest edited block; the forward of the edited
model on [equivalent texts; unrelated texts] then runs only from that block up (`LM.starting_at_block`:
the blocks below are the same before and after the edit), about a third less time per training step."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ...errors import CheckpointError
from ...models.lm import LM
from ...requests import EditRequest
from ...train.meta import Example, examples_from_requests, train_editor
from ..base import Editor
from ..patches import LowRank, WeightDelta
from .factors import Factors, Scored, added_outputs, answer_logprobs, capture, capture_factors, edited_modules, encode_pairs, grouped_fn, matrix_shape, token_nll

class StaleEditorWarning(UserWarning):
    """A learned editor edits a model that already carries edits, which its training never showed it."""


class GradientEditorNet(nn.Module):
    """Base of the editor networks: maps the gradient factors of an edit to per-module weight deltas."""

    tokens: ClassVar[str] = "nonzero"  # which tokens' factors the net sees (see capture_factors)
    joint: ClassVar[bool] = False  # training edits: all examples of a micro-batch as one edit (MALMEN)
    label_smoothing: float = 0.0  # of the training edit loss (KE: 0.1); reported NLLs are plain

    def __init__(self, lm: LM, hp: Any) -> None:
        super().__init__()
        self.paths = edited_modules(lm, hp.layers, hp.matrices)
        self.shapes = {p: matrix_shape(lm, p) for p in self.paths}

    # -- what a method defines
    def deltas(self, lm: LM, examples: Sequence[Example], factors: dict[str, Factors], *, rows: Sequence[int],
               training: bool) -> dict[str, Any]:
        """Per module path: the weight delta (out, in layout, dense or (left, right) factors) of ONE edit
        made of `examples` together, from their gradient factors; example j's tokens have batch row
        `rows[j]` in the factors."""
        raise NotImplementedError

    def param_groups(self, hp: Any) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": hp.lr}]

    def after_validation(self, metrics: dict[str, float]) -> None:
        """Hook for schedules driven by validation (KE's KL margin)."""

    def update_statistics(self, factors: dict[str, Factors]) -> None:
        """Hook for running statistics (updated on training edits only)."""

    def combine(self, edit_nll: torch.Tensor, loc_kl: torch.Tensor, hp: Any, training: bool) -> torch.Tensor:
        return hp.cedit * edit_nll + hp.cloc * loc_kl

    # -- shared
    def factors(self, lm: LM, examples: Sequence[Example], hp: Any) -> tuple[dict[str, Factors], torch.Tensor, Scored]:
        """Gradient factors of the edits in `examples` (row i = example i) on the unedited model, texts
        uncut (an edit request's prompt was checked against the context; training uses `losses`)."""
        pairs = [ex.edit for ex in examples]
        scored = encode_pairs(lm, pairs, 1_000_000)
        facts, hidden = capture_factors(lm, self.paths, scored, n_edit_rows=len(pairs), tokens=self.tokens)
        return facts, hidden, scored

    def losses(self, lm: LM, examples: Sequence[Example], hp: Any, *, training: bool) -> dict[str, torch.Tensor]:
        """Meta-training losses. Joint editors (`joint = True`, MALMEN) make one edit of all `examples`;
        the others make one independent edit per example, batched: every text only sees its own edit."""
        groups = [list(range(len(examples)))] if self.joint else [[i] for i in range(len(examples))]
        loc, loc_owner, equiv, eq_owner = [], [], [], []
        for g, members in enumerate(groups):
            for i in members:
                loc += examples[i].loc
                loc_owner += [g] * len(examples[i].loc)
                equiv += examples[i].equiv
                eq_owner += [g] * len(examples[i].equiv)
        # one unedited pass over the edits, the unrelated texts and the paraphrases (rows in that order)
        # gives the factors, the unedited distributions and every text's input to the lowest edited
        # block, so that the edited pass below runs only the edited blocks and those above them
        edits = [ex.edit for ex in examples]
        seen = set(edits)
        texts = edits + loc + [q for q in dict.fromkeys(equiv) if q not in seen]
        scored = encode_pairs(lm, texts, hp.max_tokens)
        lowest = min(hp.layers)
        got = capture(lm, self.paths, scored, n_edit_rows=len(edits), tokens=self.tokens, keep_input_of=lowest)
        facts = got.factors
        if training:
            self.update_statistics(facts)
        n_edit = len(examples)
        base_logp = answer_logprobs(lm, got.hidden, scored.subset(n_edit, n_edit + len(loc))).detach()
        owner = torch.tensor(eq_owner + loc_owner)
        owners = [torch.nonzero(owner == g)[:, 0] for g in range(len(groups))]
        with torch.set_grad_enabled(training):
            per_group = [self.deltas(lm, [examples[i] for i in members],
                                     {p: f.of_rows(members) for p, f in facts.items()}, rows=members, training=training)
                         for members in groups]
            fns = {p: grouped_fn([d[p] for d in per_group], owners if len(groups) > 1 else [None], self.shapes[p][0])
                   for p in self.paths}
            batch = encode_pairs(lm, equiv + loc, hp.max_tokens)
            row = {t: i for i, t in reversed(list(enumerate(texts)))}
            kept = got.block_input[[row[t] for t in equiv + loc]][:, :batch.ids.shape[1]]
            with added_outputs(lm, fns), lm.starting_at_block(lowest, kept):
                hid = lm.hidden_states(batch.ids, batch.mask)
            eq = batch.subset(0, len(equiv))
            lo = batch.subset(len(equiv), len(equiv) + len(loc))
            eq_logp = answer_logprobs(lm, hid, eq)
            lo_logp = answer_logprobs(lm, hid, lo)
            nll = token_nll(eq_logp, eq)
            edit_nll = eq.per_text_mean(nll).mean()
            loc_kl = (base_logp.exp() * (base_logp - lo_logp)).sum(-1).mean()
            smooth = self.label_smoothing if training else 0.0
            fit_nll = eq.per_text_mean((1 - smooth) * nll - smooth * eq_logp.mean(-1)).mean() if smooth else edit_nll
            loss = self.combine(fit_nll, loc_kl, hp, training)
        with torch.no_grad():
            hit = (eq_logp.argmax(-1) == eq.targets.to(eq_logp.device)).float()
            edit_acc = (eq.per_text_mean(hit) == 1).float().mean()
            loc_acc = (lo_logp.argmax(-1) == base_logp.argmax(-1)).float().mean()
        return {"loss": loss, "edit_nll": edit_nll.detach(), "loc_kl": loc_kl.detach(),
                "edit_acc": edit_acc, "loc_acc": loc_acc}


class LearnedEditor(Editor):
    """An editor whose network is trained once per (base model, hyper-parameters, training data) and
    then edits in one forward/backward pass. Subclasses set `net_cls`."""

    requires_training = True
    supports_batch = True
    net_cls: ClassVar[type[GradientEditorNet]]

    def build_net(self, lm: LM, hp: Any) -> GradientEditorNet:
        return self.net_cls(lm, hp).to(lm.device)

    def train(self, lm: LM, requests: list[EditRequest], hp: Any, *, progress: bool = True,
              workdir: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        examples = examples_from_requests(requests)
        net = self.build_net(lm, hp)
        flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
        try:  # the LM is frozen: gradients reach the editor network only
            for p in lm.model.parameters():
                p.requires_grad_(False)
            result = train_editor(net, lm, examples, hp, workdir=workdir, progress=progress, name=self.name)
        finally:
            for n, p in lm.model.named_parameters():
                p.requires_grad_(flags.get(n, p.requires_grad))
                p.grad = None
        return result.state, result.meta

    def load_net(self, lm: LM, hp: Any) -> GradientEditorNet:
        ckpt = self.current_checkpoint
        net = self.build_net(lm, hp)
        try:
            net.load_state_dict(ckpt.tensors())
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {ckpt.path} does not fit the {self.name} editor for these "
                                  f"hyper-parameters ({str(e).splitlines()[0]}); train again with --force") from None
        return net.eval()

    def compute_patches(self, lm: LM, requests: list[EditRequest], hp: Any, on: Any) -> tuple[list[Any], dict[str, Any]]:
        if lm.active_edits:
            warnings.warn(f"{self.name} edits a model that already carries edits: its network "
                          "was trained to edit the unedited model, so stacked edits leave what it learned (on "
                          "SmolLM2-135M the model breaks within 10-20 of them; docs/pitfalls.md, sequential "
                          "collapse). Edit in one batch, or restore between edits", StaleEditorWarning, stacklevel=3)
        net = self.load_net(lm, hp)
        examples = [Example((r.prompt, r.target_new), ((r.prompt, r.target_new),), (), r.subject, r.target_true)
                    for r in requests]
        facts, _, _ = net.factors(lm, examples, hp)
        with torch.no_grad():
            deltas = net.deltas(lm, examples, facts, rows=list(range(len(examples))), training=False)
        patches = []
        for path, d in deltas.items():
            name = lm.param_name(path)
            if isinstance(d, tuple):
                left, right = (t.detach().float() for t in d)
                delta: Any = LowRank.from_matrix_factors(left, right, lm.arch.transposed)
            else:
                delta = lm.arch.from_matrix(d.detach().float())
            patches.append(WeightDelta(name, delta))
        return patches, {"modules": list(deltas), "tokens": {p: int(f.u.shape[0]) for p, f in facts.items()}}
