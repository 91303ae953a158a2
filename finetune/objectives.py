"""Mitigations as loss terms of fine-tuning (issue 13; CONTRACTS "Mitigations").

A mitigation is not a training loop: it changes what a training step back-propagates. Each is one
``Term`` in ``TERMS``, under its name in the mitigation table (``cxrfair.core.mitigations``,
which holds its strength's range and default), naming what it plugs into the three seams of
``train.train_step``:

- per-row weights the sampler gives every step (``reweight``: ``row_weights``);
- per-example multipliers computed from the global batch's losses (``groupdro``: ``GroupDRO``;
  its per-cell loss sums are all-reduced, since a process sees only its slice of the batch);
- extra terms beside the per-example task loss (``adversarial``: an adversary behind a gradient
  reversal on the encoder output; ``fairot``: a Sinkhorn divergence between the batch's
  true-class scores and each group's).

``erm`` (and ``reweight``, weights only) has no objective at all (``make_objective`` returns
None), so plain training runs the code it ran before this module existed.

Cells: (group, class) for multi-class, the group for multi-label (CONTRACTS). Group ids are the
index of a row's value in the sensitive attribute's declared groups.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import nn

from cxrfair.errors import CxrfairError
from cxrfair.finetune import sinkhorn

ADVERSARY_HIDDEN = 64  # CONTRACTS: an MLP with one hidden layer of 64


# ---------------------------------------------------------------------------------------------
# Groups and cells (numpy; checked before any work)


def group_ids(table, sensitive: str, groups: list[str], train_rows: np.ndarray, cohort_name: str) -> np.ndarray:
    """(N,) int64 index of each row's group in ``groups`` (-1 where empty or undeclared).

    CxrfairError when a training row has no declared group, or a group has no training rows.
    """
    values = table[sensitive].astype(str).to_numpy()
    index = {g: i for i, g in enumerate(groups)}
    ids = np.array([index.get(v, -1) for v in values], dtype=np.int64)
    bad = train_rows[ids[train_rows] < 0]
    if len(bad):
        shown = sorted({values[i] for i in bad})[:3]
        raise CxrfairError(
            f"cohort {cohort_name}: column '{sensitive}' is empty or undeclared ({shown}) in {len(bad)} training "
            f"row(s); --sensitive {sensitive} needs one of {groups} in every training row; rebuild the cohort"
        )
    counts = np.bincount(ids[train_rows], minlength=len(groups))
    empty = [g for g, n in zip(groups, counts) if n == 0]
    if empty:
        raise CxrfairError(
            f"cohort {cohort_name}: group(s) {empty} of --sensitive {sensitive} have no training rows; "
            "choose another attribute or rebuild the cohort with those groups in train"
        )
    return ids


def cell_ids(groups: np.ndarray, labels: np.ndarray, n_groups: int, n_classes: int, multilabel: bool
             ) -> tuple[np.ndarray, int]:
    """(N,) cell of each row (-1 without a group) and the number of cells: group x class
    (multi-class; ``labels`` (N,) class indices) or group (multi-label)."""
    if multilabel:
        return groups.copy(), n_groups
    return np.where(groups >= 0, groups * n_classes + labels, -1), n_groups * n_classes


def train_cell_counts(cells: np.ndarray, train_rows: np.ndarray, n_cells: int) -> np.ndarray:
    """(n_cells,) int64 training rows per cell (training rows always have a group: ``group_ids``)."""
    return np.bincount(cells[train_rows], minlength=n_cells)


def reweight_weights(cells: np.ndarray, train_rows: np.ndarray, strength: float, n_cells: int) -> np.ndarray:
    """(N,) float32 row weights ``n_cell ** -strength`` normalised to mean 1 over the training rows.

    Rows outside train get weight 1 (they are never sampled for training).
    """
    counts = train_cell_counts(cells, train_rows, n_cells).astype(np.float64)
    w = np.ones(len(cells), dtype=np.float64)
    w[train_rows] = counts[cells[train_rows]] ** -strength
    w[train_rows] /= w[train_rows].mean()
    return w.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Task scores (for fairot)


def true_scores(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's probability of each example's true label.

    Returns:
        scores (B, K), mask (B, K) bool: K = 1 (multi-class: p of the true class) or C
        (multi-label: per condition, p of the observed label; masked where unobserved).
    """
    if not multilabel:
        p = torch.softmax(logits, dim=1).gather(1, y[:, None])
        return p, torch.ones_like(p, dtype=torch.bool)
    mask = ~torch.isnan(y)
    p = torch.sigmoid(logits)
    return torch.where(torch.nan_to_num(y) > 0.5, p, 1 - p), mask


def fairot_term(scores: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``sum_g S_eps(batch scores, group g's scores)``, averaged over the K score columns.

    Args:
        scores: (B, K) true-label scores of the global batch; mask: (B, K) observed; groups: (B,)
            group ids (-1: not a row of the batch).
        Groups with fewer than 2 rows in a column are skipped; a column with none left adds 0.
    """
    pairs, owner = [], []
    for k in range(scores.shape[1]):
        seen = mask[:, k] & (groups >= 0)
        batch = scores[seen, k]
        for g in range(n_groups):
            part = scores[seen & (groups == g), k]
            if len(part) >= 2:
                pairs.append((batch, part))
                owner.append(k)
    if not pairs:
        return scores.sum() * 0.0
    return sinkhorn.divergences(pairs).sum() / scores.shape[1]


# ---------------------------------------------------------------------------------------------
# Gradient reversal (adversarial)


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; the gradient flowing back is multiplied by ``-scale`` (Ganin & Lempitsky)."""
    return _Reverse.apply(x, float(scale))


def grl_schedule(progress: float) -> float:
    """Ganin & Lempitsky's ramp ``2 / (1 + e^(-10 p)) - 1`` for training progress p in [0, 1]."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def base_classifier(model: nn.Module) -> nn.Module:
    """The ``model.Classifier`` inside a peft wrapper (LoRA layers are injected into it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Trainee(nn.Module):
    """Classifier + adversary in one module (so DDP sees both): (B,3,S,S) -> (B, C + G) logits.

    Columns ``[:C]`` are the classifier's logits, ``[C:]`` the adversary's on the reversed
    encoder output. ``scale`` (λ × schedule) is set before each step.
    """

    def __init__(self, model: nn.Module, adversary: nn.Module):
        super().__init__()
        self.model, self.adversary = model, adversary
        self.scale = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clf = base_classifier(self.model)
        features = clf.encoder(x)
        logits = clf.head(features)
        return torch.cat([logits, self.adversary(grad_reverse(features, self.scale)).to(logits.dtype)], dim=1)


def make_adversary(embed_dim: int, n_groups: int, seed: int) -> nn.Module:
    """MLP D -> 64 -> G, initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.SeedSequence([seed, 13]).generate_state(1)[0]))
        return nn.Sequential(nn.Linear(embed_dim, ADVERSARY_HIDDEN), nn.ReLU(), nn.Linear(ADVERSARY_HIDDEN, n_groups))


# ---------------------------------------------------------------------------------------------
# Objectives


class Objective:
    """What a mitigation adds to a training step. Subclasses override the hooks they need.

    ``cells`` / ``groups`` passed to the hooks are the chunk's (b,) int64 tensors.
    """

    name = "erm"
    batch_statistics = False  # needs the whole step's losses before any backward (groupdro)

    def __init__(self, strength: float, n_groups: int, n_cells: int, n_classes: int, multilabel: bool, dist,
                 embed_dim: int = 0, seed: int = 0, cell_counts: np.ndarray | None = None):
        self.strength, self.n_groups, self.n_cells, self.n_classes = float(strength), n_groups, n_cells, n_classes
        self.multilabel, self.dist = multilabel, dist
        self.embed_dim, self.seed = embed_dim, seed  # the encoder output's width; the run's seed
        self.cell_counts = cell_counts  # (n_cells,) training rows per cell (``train_cell_counts``)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls (the model itself unless the objective adds one)."""
        return model

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters beside the model's (they join the optimizer and the checkpoint)."""
        return []

    def begin_step(self, progress: float) -> None:
        """Called before a step's first forward; ``progress`` = steps done / all steps."""

    def step_statistics(self, losses: torch.Tensor, cells: torch.Tensor, w: torch.Tensor) -> None:
        """The step's per-example losses (detached, this process's whole share) before the backward."""

    def chunk_loss(self, out: torch.Tensor, losses: torch.Tensor, y: torch.Tensor, cells: torch.Tensor,
                   groups: torch.Tensor, w: torch.Tensor, denominator: float, step) -> torch.Tensor:
        """The scalar a chunk back-propagates (plain: the weighted mean share)."""
        return (losses * w).sum() / denominator

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over processes (itself in one process)."""
        if self.dist is not None and self.dist.active:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t


class GroupDRO(Objective):
    """Online group DRO (Sagawa et al. 2020): q_c <- q_c exp(η L_c) over the cells in the batch,
    renormalised; loss = sum_c q_c L_c with L_c the cell's mean per-example loss in the global batch.

    As per-example multipliers: row i of cell c weighs q_c / n_c (n_c its rows in the global batch).
    q starts uniform over the cells with training rows (``groupdro_init``), as the probe's does.
    """

    name = "groupdro"
    batch_statistics = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.cell_counts is None or len(self.cell_counts) != self.n_cells:
            raise ValueError(f"GroupDRO needs cell_counts of length n_cells={self.n_cells} (train_cell_counts)")
        self.q = groupdro_init(self.cell_counts)
        self.multiplier: torch.Tensor | None = None  # (n_cells,) q_c / n_c of the current step

    def step_statistics(self, losses, cells, w):
        real = (w > 0) & (cells >= 0)
        c = cells[real]
        sums = torch.zeros(2, self.n_cells, dtype=torch.float64, device=losses.device)
        sums[0].index_add_(0, c, losses[real].double())
        sums[1].index_add_(0, c, torch.ones_like(c, dtype=torch.float64))
        sums = self.all_reduce(sums).cpu()
        self.q, self.multiplier = groupdro_update(self.q, sums[0], sums[1], self.strength)

    def chunk_loss(self, out, losses, y, cells, groups, w, denominator, step):
        m = self.multiplier.to(losses.device, torch.float32)[cells.clamp(min=0)]
        return (losses * w * m * (cells >= 0)).sum()

    def state_dict(self):
        return {"q": self.q.clone()}

    def load_state_dict(self, state):
        self.q = state["q"].clone().double()


def groupdro_init(cell_counts: np.ndarray) -> torch.Tensor:
    """q (n_cells,) float64: uniform over the cells that have training rows, 0 on empty ones.

    An empty cell never appears in a batch, so its q would only renormalise the others; starting
    it at 0 keeps the live cells' q what the probe's ``groupdro_init`` gives for the same counts.
    """
    live = torch.as_tensor(np.asarray(cell_counts) > 0, dtype=torch.float64)
    return live / live.sum()


def groupdro_update(q: torch.Tensor, loss_sums: torch.Tensor, counts: torch.Tensor, eta: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One GroupDRO step over the cells present (counts > 0). Returns the new q (K,) and q_c / n_c (K,)."""
    present = counts > 0
    mean = torch.where(present, loss_sums / counts.clamp(min=1), 0.0)
    # Absent cells keep q_c (exponent 0). Shifting every exponent by the largest one keeps exp from
    # overflowing for large η·L and leaves the normalised q unchanged.
    expo = torch.where(present, eta * mean, 0.0)
    new = q * torch.exp(expo - expo.max())
    new = new / new.sum()
    multiplier = torch.where(present, new / counts.clamp(min=1), 0.0)
    return new, multiplier


class Adversarial(Objective):
    """An adversary predicts the group from the encoder output through a gradient reversal layer.

    Per example the loss is task + adversary cross-entropy; the adversary descends on it, the
    encoder receives the adversary's gradient × -λ·(2/(1+e^(-10p))-1) (CONTRACTS schedule).
    """

    name = "adversarial"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.adversary = make_adversary(self.embed_dim, self.n_groups, self.seed)
        self.trainee: Trainee | None = None

    def wrap(self, model):
        self.adversary.to(next(model.parameters()).device)
        self.trainee = Trainee(model, self.adversary)
        return self.trainee

    def parameters(self):
        return list(self.adversary.parameters())

    def begin_step(self, progress):
        self.trainee.scale = self.strength * grl_schedule(progress)

    def chunk_loss(self, out, losses, y, cells, groups, w, denominator, step):
        adv = nn.functional.cross_entropy(out[:, self.n_classes:].float(), groups.clamp(min=0), reduction="none")
        adv = adv * (groups >= 0)
        return ((losses + adv) * w).sum() / denominator

    def state_dict(self):
        return {"adversary": {k: v.detach().cpu().clone() for k, v in self.adversary.state_dict().items()}}

    def load_state_dict(self, state):
        self.adversary.load_state_dict(state["adversary"])


class FairOT(Objective):
    """FairCLIP's optimal-transport term, done right (CONTRACTS): λ · Σ_g S_ε(batch, group g) on the
    model's probability of the true label, both samples on the same scale, the whole global batch.

    Under DDP each process gathers the others' scores (detached) and keeps its own with gradient,
    so the summed gradients equal one process's; the term needs a process's share in one forward.
    """

    name = "fairot"

    def chunk_loss(self, out, losses, y, cells, groups, w, denominator, step):
        if len(step.chunks) > 1:
            raise CxrfairError("--mitigation fairot needs each process's share of a batch in one forward pass "
                               "(the term compares the whole batch's scores); drop --micro-batch or raise it")
        scores, mask = true_scores(out, y, self.multilabel)
        groups = torch.where(w > 0, groups, -1)
        scores, mask, groups = self.gather(scores, mask, groups, step)
        term = fairot_term(scores, mask, groups, self.n_groups)
        return (losses * w).sum() / denominator + self.strength * term

    def gather(self, scores, mask, groups, step):
        """The global batch's scores: this process's with gradient, the others' detached, rank order."""
        if self.dist is None or not self.dist.active:
            return scores, mask, groups
        import torch.distributed as dist

        width = math.ceil(step.global_size / self.dist.world) + 1
        pad = width - len(scores)
        packed = torch.cat([scores.detach(), mask.to(scores.dtype), groups[:, None].to(scores.dtype)], dim=1)
        packed = nn.functional.pad(packed, (0, 0, 0, pad), value=-1.0)
        parts = [torch.empty_like(packed) for _ in range(self.dist.world)]
        dist.all_gather(parts, packed.contiguous())
        k = scores.shape[1]
        rows = []
        for r, part in enumerate(parts):
            if r == self.dist.rank:
                rows.append((scores, mask, groups))
                continue
            keep = part[:, 2 * k] >= 0
            part = part[keep]
            rows.append((part[:, :k], part[:, k:2 * k] > 0.5, part[:, 2 * k].long()))
        return tuple(torch.cat([r[i] for r in rows]) for i in range(3))


# ---------------------------------------------------------------------------------------------
# The terms


class Term(NamedTuple):
    """One fine-tuning mitigation: what it plugs into a training step (None: that seam is untouched).

    row_weights(cells, train_rows, strength, n_cells) -> (N,) float32 sampler weights per cohort
    row. objective: an ``Objective`` subclass, built as ``objective(strength, n_groups, n_cells,
    n_classes, multilabel, dist, embed_dim=, seed=, cell_counts=)``. one_forward: it needs a process's share of
    a batch in one forward pass (no --micro-batch below it).
    """

    row_weights: Callable | None = None
    objective: type[Objective] | None = None
    one_forward: bool = False


TERMS: dict[str, Term] = {
    "erm": Term(),
    "reweight": Term(row_weights=reweight_weights),
    "groupdro": Term(objective=GroupDRO),
    "adversarial": Term(objective=Adversarial),
    "fairot": Term(objective=FairOT, one_forward=True),
}


def make_objective(mitigation: str, strength: float | None, n_groups: int, n_cells: int, n_classes: int,
                   multilabel: bool, dist, embed_dim: int, seed: int, cell_counts: np.ndarray | None = None
                   ) -> Objective | None:
    """The step-time objective of a mitigation; None when its term has none (``erm``, ``reweight``: weights only).

    cell_counts: (n_cells,) training rows per cell (``train_cell_counts``); GroupDRO's q starts on them.
    """
    objective = TERMS[mitigation].objective
    if objective is None:
        return None
    return objective(strength, n_groups, n_cells, n_classes, multilabel, dist, embed_dim=embed_dim, seed=seed,
                     cell_counts=cell_counts)
