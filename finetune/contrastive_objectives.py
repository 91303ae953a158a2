"""The losses of contrastive (image-text) fine-tuning and its mitigation terms (issue 28).

Why a module of its own rather than more rows in ``finetune.objectives``: a classifier's terms
act on a row's class probabilities, these on the batch's image-text similarity matrix, whose
rows are coupled (every image is scored against every text of the global batch). The pieces that
do not depend on that are reused from there: ``reweight_weights`` (sampler weights),
``GroupDRO`` (cell weights q from per-example losses), ``grad_reverse`` / ``grl_schedule`` /
``make_adversary`` (the adversary), and ``finetune.sinkhorn`` (the debiased divergence).

Shapes: a global batch of n real rows (padding dropped), image and text embeddings L2-normalised
(n, D); the batch's distinct texts (U, D); ``pos`` (n,) each row's text among them.

- ``contrastive_losses``: CLIP's symmetric InfoNCE per example, with the model's own (fixed)
  logit scale. Rows sharing a text (label sentences) share one candidate: image -> text is a
  softmax over the U distinct texts, text -> image a softmax over the n images in the column of
  the row's text, each positive scored alone (UniCL's multi-positive form). With distinct texts
  this is exactly CLIP's ``(CE(L, arange) + CE(L^T, arange)) / 2`` averaged over rows.
- ``fairclip_term``: FairCLIP (Luo et al. 2024) done right: the matched similarities
  (1 + cos(image_i, text_i)) / 2 (the diagonal, both samples on one scale, [0, 1]) of each group
  against the whole batch's, debiased Sinkhorn divergence S(a,b) - S(a,a)/2 - S(b,b)/2, summed
  over groups with >= 2 rows, x λ.
- adversarial: an MLP on the image embedding predicts the group through a gradient reversal
  (λ × DANN ramp 2/(1+e^(-10p)) - 1); the adversary has its own AdamW.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import nn

from cxrfair.core.mitigations import SINKHORN, SinkhornSchedule
from cxrfair.finetune import objectives, sinkhorn

ADVERSARY_LR = 1e-3  # the adversary head is fresh: it learns at a head's rate, not the encoder's


def contrastive_losses(img: torch.Tensor, txt: torch.Tensor, pos: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-example symmetric InfoNCE.

    Args:
        img: (n, D) normalised image embeddings; txt: (U, D) normalised distinct texts; pos: (n,)
            int64 index of each row's text in ``txt``; scale: the logit scale (exponentiated, e.g. 100).

    Returns:
        (n,) float: (image->text CE + text->image CE) / 2 per row.
    """
    logits = scale * img.float() @ txt.float().T  # (n, U)
    i2t = nn.functional.cross_entropy(logits, pos, reduction="none")
    t2i = -torch.log_softmax(logits, dim=0).gather(1, pos[:, None])[:, 0]
    return 0.5 * (i2t + t2i)


def matched_similarity(img: torch.Tensor, txt: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(n,) each image's similarity with its own text (the similarity matrix's diagonal) on [0, 1]:
    (1 + cosine) / 2, the scale the fairot term's eps = 0.01 is set for (scores in [0, 1])."""
    return 0.5 * (1.0 + (img * txt[pos]).sum(-1))


def fairclip_term(sims: torch.Tensor, groups: torch.Tensor, n_groups: int,
                  schedule: SinkhornSchedule = SINKHORN) -> torch.Tensor:
    """``sum_g S_eps(batch sims, group g's sims)``; groups with < 2 rows are skipped (0 when none is left).

    Args:
        sims: (n,) matched similarities of the global batch; groups: (n,) int64 group ids (-1: none).
        schedule: the entropic blur and how it is solved (the fairot term's, ``core.mitigations.SINKHORN``).
    """
    pairs = []
    for g in range(n_groups):
        part = sims[groups == g]
        if len(part) >= 2:
            pairs.append((sims[groups >= 0], part))
    if not pairs:
        return sims.sum() * 0.0
    return sinkhorn.divergences(pairs, schedule).sum()


class Batch(NamedTuple):
    """The global batch a term sees (every process sees the same one)."""

    losses: torch.Tensor  # (n,) per-example contrastive loss
    weights: torch.Tensor  # (n,) sampler weights (> 0)
    cells: torch.Tensor  # (n,) int64 (group, class) or group cell, -1 without a group
    groups: torch.Tensor  # (n,) int64 group, -1 without one
    sims: torch.Tensor  # (n,) matched similarities
    adversary: torch.Tensor | None  # (n, G) adversary logits on the reversed image embedding
    denominator: float  # the global batch's total weight


class ContrastiveObjective:
    """The step loss of a mitigation (plain: the weighted mean of the per-example losses)."""

    adversary = False  # the model carries an adversary head (``DualEncoder.adversary``)

    def __init__(self, strength: float | None, n_groups: int, n_cells: int, n_classes: int, multilabel: bool,
                 seed: int = 0, cell_counts: np.ndarray | None = None):
        self.strength = 0.0 if strength is None else float(strength)
        self.n_groups, self.n_cells, self.n_classes, self.multilabel = n_groups, n_cells, n_classes, multilabel
        self.seed, self.cell_counts = seed, cell_counts

    def begin_step(self, progress: float, model) -> None:
        """Before a step's forward; ``progress`` = steps done / all steps."""

    def loss(self, b: Batch) -> torch.Tensor:
        return (b.losses * b.weights).sum() / b.denominator

    def attach(self, model) -> None:
        """After the model is built (and before DDP): the adversary's optimiser, for one."""

    def after_backward(self) -> None:
        """After the step's backward (the adversary's own optimiser steps here)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class GroupDRO(ContrastiveObjective):
    """Online group DRO on the per-example contrastive losses (``objectives.GroupDRO``'s update).

    Every process computes the global batch's losses, so the cell sums need no all-reduce here.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dro = objectives.GroupDRO(self.strength, self.n_groups, self.n_cells, self.n_classes, self.multilabel,
                                       None, cell_counts=self.cell_counts)

    def loss(self, b: Batch) -> torch.Tensor:
        self.dro.step_statistics(b.losses.detach(), b.cells, b.weights)
        return self.dro.chunk_loss(None, b.losses, None, b.cells, b.groups, b.weights, b.denominator, None)

    def state_dict(self):
        return self.dro.state_dict()

    def load_state_dict(self, state):
        self.dro.load_state_dict(state)


class FairCLIP(ContrastiveObjective):
    """Weighted mean contrastive loss + λ · ``fairclip_term`` on the global batch."""

    def loss(self, b: Batch) -> torch.Tensor:
        real = b.groups >= 0
        return super().loss(b) + self.strength * fairclip_term(b.sims[real], b.groups[real], self.n_groups)


class Adversarial(ContrastiveObjective):
    """Weighted mean contrastive loss + the adversary's cross-entropy; the encoder sees the latter
    through ``objectives.grad_reverse`` × λ · ramp(progress). The adversary has its own AdamW."""

    adversary = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.optimizer: torch.optim.Optimizer | None = None

    def attach(self, model) -> None:
        self.optimizer = torch.optim.AdamW(model.adversary.parameters(), lr=ADVERSARY_LR)

    def begin_step(self, progress, model):
        self.optimizer.zero_grad(set_to_none=True)
        model.scale = self.strength * objectives.grl_schedule(progress)

    def loss(self, b: Batch) -> torch.Tensor:
        ce = nn.functional.cross_entropy(b.adversary.float(), b.groups.clamp(min=0), reduction="none")
        return super().loss(b) + (ce * (b.groups >= 0) * b.weights).sum() / b.denominator

    def after_backward(self):
        self.optimizer.step()

    def state_dict(self):
        return {"adversary_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["adversary_optimizer"])


class Term(NamedTuple):
    """One contrastive mitigation: sampler weights and the step loss (CONTRACTS "Mitigations")."""

    row_weights: Callable | None = None  # as ``objectives.Term.row_weights``
    objective: type[ContrastiveObjective] = ContrastiveObjective


TERMS: dict[str, Term] = {
    "erm": Term(),
    "reweight": Term(row_weights=objectives.reweight_weights),
    "groupdro": Term(objective=GroupDRO),
    "adversarial": Term(objective=Adversarial),
    "fairot": Term(objective=FairCLIP),
}
