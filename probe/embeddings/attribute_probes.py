"""The three attribute probes of the leakage analysis, behind one result type.

- linear and MLP: the probe stage's compiled sweep (``cxrfair.probe.sweep.run_sweep``) with the
  attribute's groups as classes; the configuration is chosen there, on validation loss.
  ``sweep_fit`` is the only call into it.
- k-nearest neighbours: NumPy, vectorised over k (one sort of the distances, then cumulative
  votes); k and the metric are chosen on validation AUC.

All three take features already standardised with the training split's statistics
(``standardize``), so distances and learning rates mean the same for every model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxrfair.core.metrics import auc_macro, roc_auc
from cxrfair.probe.sweep import SweepConfig, run_sweep

KNN_METRICS = ("cosine", "euclidean")


@dataclass(frozen=True)
class ProbeFit:
    """One fitted probe.

    Attributes:
        val_probs: (Nv, G) group probabilities on the validation split.
        test_probs: (Nt, G) on the test split.
        selected: the configuration chosen on validation, as ``key=value`` words.
    """

    val_probs: np.ndarray
    test_probs: np.ndarray
    selected: str


@dataclass(frozen=True)
class SweepGrid:
    """The grid a linear or MLP leakage probe sweeps: the probe stage's default solver (full-batch
    L-BFGS over an L2 grid, which reaches a tuned logistic regression), or its AdamW recipe."""

    solver: str = "lbfgs"  # "lbfgs" or "adamw" (the probe stage's two solvers)
    l2s: tuple | None = None  # L-BFGS: L2 penalties; None: the probe stage's default grid for the method
    hiddens: tuple = (256,)  # MLP hidden widths (ignored by the linear probe)
    lrs: tuple = (1e-3, 1e-2)  # AdamW: peak learning rates
    weight_decays: tuple = (0.0, 0.1, 1.0)  # AdamW: decoupled weight decay
    epochs: int = 40  # AdamW: the epoch of lowest validation loss is kept
    batch_size: int = 64  # AdamW


LINEAR_GRID = SweepGrid()
# Every MLP lane is as wide as the widest, so the MLP grid keeps one width.
MLP_GRID = SweepGrid(hiddens=(256,))


def standardize(x: dict) -> dict:
    """z-score every split with the training split's mean and sd (a constant feature: sd 1).

    Args:
        x: split -> (N_split, D).
    """
    mean = x["train"].mean(0, dtype=np.float64)
    sd = x["train"].std(0, dtype=np.float64)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return {k: ((v - mean) / sd).astype(np.float32) for k, v in x.items()}


def leakage_auc(y, probs, *, weights=None) -> np.ndarray:
    """Test ROC-AUC of a group probe: the second group's score for two groups (scikit-learn's
    binary convention), the one-vs-rest macro mean for more. Returns (...) for weights (..., N)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape[1] == 2:
        return roc_auc(y, probs, weights=weights)[..., 1]
    return auc_macro(y, probs, weights=weights)


# ---------------------------------------------------------------- linear / MLP


def sweep_fit(x: dict, y: dict, n_classes: int, method: str, grid: SweepGrid, seed: int) -> ProbeFit:
    """Sweep ``grid`` with the probe stage's machinery and keep the configuration it selects.

    The only call into ``run_sweep``. Features arrive standardised (``standardize``), so the sweep
    does not standardise again.

    Args:
        x: split -> (N_split, D) standardised features ("train", "val", "test").
        y: split -> (N_split,) int group codes ("train", "val").
        method: "linear" or "mlp".
    """
    # The leakage MLP stays the plain one-hidden-layer MLP (the studies it reproduces use one); the
    # probe stage's default MLP has a linear skip connection (cxrfair.probe.sweep.ARCHITECTURES).
    cfg = SweepConfig(method=method, architecture="plain", solver=grid.solver, standardize=False, l2s=grid.l2s, lrs=tuple(grid.lrs),
                      weight_decays=tuple(grid.weight_decays), hiddens=tuple(grid.hiddens), seeds=(int(seed),),
                      epochs=grid.epochs, batch_size=grid.batch_size)
    result = run_sweep(x, y, n_classes, cfg)
    k, best = result.selected, result.best_config
    steps = int(result.best_epoch[0, k])
    if grid.solver == "lbfgs":
        words = [f"l2={best['l2']:g}"]
    else:
        words = [f"lr={best['lr']:g}", f"weight_decay={best['weight_decay']:g}"]
    words += [f"hidden={best['hidden']}"] if method == "mlp" else []
    words += [f"iterations={steps}"] if grid.solver == "lbfgs" else [f"epoch={steps + 1}"]
    return ProbeFit(result.val_probs[0, k], result.test_probs[0, k], " ".join(words))


# ---------------------------------------------------------------- k-nearest neighbours


def neighbours(train: np.ndarray, query: np.ndarray, k_max: int, metric: str, chunk: int = 1024) -> np.ndarray:
    """Indices of the ``k_max`` nearest training rows of each query row, nearest first.

    Equal distances keep training order (a stable sort). Cosine distance is 1 - cos; euclidean
    is computed from the squared expansion in float64.

    Args:
        train: (Nt, D). query: (Nq, D).
        metric: "cosine" or "euclidean".
        chunk: query rows per distance block (bounds memory at chunk x Nt).

    Returns:
        (Nq, k_max) int64.
    """
    t, q = np.asarray(train, np.float64), np.asarray(query, np.float64)
    if metric == "cosine":
        t, q = _unit(t), _unit(q)
    t_sq = (t * t).sum(1)
    out = []
    for s in range(0, len(q), chunk):
        block = q[s:s + chunk]
        if metric == "cosine":
            d = 1.0 - block @ t.T
        else:
            d = (block * block).sum(1)[:, None] + t_sq[None, :] - 2.0 * block @ t.T
        out.append(np.argsort(d, axis=1, kind="stable")[:, :k_max])
    return np.concatenate(out) if out else np.zeros((0, k_max), np.int64)


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def knn_probs(neighbour_labels: np.ndarray, n_classes: int, ks) -> np.ndarray:
    """Vote fractions for every k at once: (Nq, k_max) labels of the nearest -> (K, Nq, C).

    Entry [i, n, c] is the share of class c among the ks[i] nearest neighbours of query n
    (scikit-learn's ``predict_proba`` with uniform weights).
    """
    votes = np.cumsum(neighbour_labels[..., None] == np.arange(n_classes), axis=1)  # (Nq, k_max, C)
    ks = np.asarray(ks)
    return np.moveaxis(votes[:, ks - 1, :] / ks[:, None], 1, 0)


@dataclass(frozen=True)
class KnnIndex:
    """Neighbours of the validation and test rows, per metric, computed once per attribute and
    reused by every labelling (the permutation baseline relabels, it does not re-search)."""

    ks: tuple
    val: dict  # metric -> (Nv, k_max) int
    test: dict  # metric -> (Nt, k_max) int


def knn_index(x: dict, ks, metrics=KNN_METRICS) -> KnnIndex:
    """Neighbour lists for the k in ``ks`` that the training split can supply."""
    ks = tuple(int(k) for k in ks if k <= len(x["train"]))
    k_max = max(ks)
    return KnnIndex(ks, {m: neighbours(x["train"], x["val"], k_max, m) for m in metrics},
                    {m: neighbours(x["train"], x["test"], k_max, m) for m in metrics})


def knn_fit(index: KnnIndex, y: dict, n_classes: int) -> ProbeFit:
    """Choose (metric, k) by validation AUC (first of ties, metrics then k in order) and return
    the chosen probe's probabilities."""
    best = None  # (validation AUC, metric, index into ks, validation probabilities)
    for metric, nbrs in index.val.items():
        val = knn_probs(y["train"][nbrs], n_classes, index.ks)  # (K, Nv, C)
        for i in range(len(index.ks)):
            score = np.nan_to_num(float(leakage_auc(y["val"], val[i])), nan=-np.inf)
            if best is None or score > best[0]:
                best = (score, metric, i, val[i])
    _, metric, i, val_probs = best
    test = knn_probs(y["train"][index.test[metric]], n_classes, index.ks[i:i + 1])[0]
    return ProbeFit(val_probs, test, f"k={index.ks[i]} metric={metric}")
