"""Points of the curves the report draws: per-group ROC curves and reliability diagrams.

Small pure functions on arrays (``roc_points``, ``roc_on_grid``, ``reliability_bins``) and two
table builders that apply them to the primary runs, group by group (``roc_table``,
``reliability_table``). These only place points on a curve; every number the report states (AUC,
ECE, gaps, intervals) comes from ``metrics`` via ``engine``.

Binning follows ``metrics.ece`` exactly (equal-width bins (lo, hi] of [0, 1]), so a reliability
diagram's bins add up to the ECE the tables show.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrfair.analysis.groups import group_labels
from cxrfair.core.groups import ECE_BINS

FPR_GRID = np.linspace(0.0, 1.0, 101)  # where seed curves are averaged (vertical averaging)
ROC_COLUMNS = ["model", "method", "attribute", "group", "class", "n_runs", "fpr", "tpr"]
RELIABILITY_COLUMNS = ["model", "method", "attribute", "group", "n_runs", "bin", "bin_low", "bin_high",
                       "count", "confidence", "accuracy"]


def roc_points(positive, score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of one score: every distinct threshold, highest first.

    Args:
        positive: (N,) bool, the positive class.
        score: (N,) higher means more likely positive.

    Returns:
        fpr (K+1,), tpr (K+1,), thresholds (K+1,) with K distinct scores; the first point is
        (0, 0) at threshold +inf, as scikit-learn's ``roc_curve(drop_intermediate=False)``.
        fpr (tpr) is NaN throughout without negatives (positives).
    """
    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    order = np.argsort(-score, kind="stable")
    s, pos = score[order], positive[order]
    last = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)  # last index of each tie level
    tps, fps = np.cumsum(pos)[last], np.cumsum(~pos)[last]
    tps, fps = np.r_[0, tps].astype(np.float64), np.r_[0, fps].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tps / tps[-1] if tps[-1] > 0 else np.full_like(tps, np.nan)
        fpr = fps / fps[-1] if fps[-1] > 0 else np.full_like(fps, np.nan)
    return fpr, tpr, np.r_[np.inf, s[last]]


def roc_on_grid(fpr, tpr, grid=FPR_GRID) -> np.ndarray:
    """TPR of a ROC curve read at each false-positive rate of ``grid`` (the highest TPR there).

    Args:
        fpr, tpr: (K,) a curve from ``roc_points`` (fpr non-decreasing).
        grid: (G,) false-positive rates.

    Returns:
        (G,) TPR; NaN if the curve is undefined.
    """
    fpr, tpr = np.asarray(fpr, float), np.asarray(tpr, float)
    if not len(fpr) or np.isnan(fpr).any() or np.isnan(tpr).any():
        return np.full(len(grid), np.nan)
    # Interpolate between the top of each vertical step and the next point, so a step at
    # fpr = f reads as its top (the operating point exists) rather than as its bottom.
    top = np.r_[fpr[1:] != fpr[:-1], True]
    return np.interp(grid, fpr[top], tpr[top])


def bin_index(confidence, n_bins: int = ECE_BINS) -> np.ndarray:
    """(N,) equal-width bin of each confidence, bins (lo, hi] with 0 in the first: as ``metrics.ece``."""
    conf = np.asarray(confidence, dtype=np.float64)
    return np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def reliability_bins(confidence, correct, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Reliability diagram points: per non-empty bin, mean confidence and accuracy.

    Args:
        confidence: (N,) top-label probability. correct: (N,) 1 if the top label is right.
        n_bins: equal-width bins of [0, 1].

    Returns:
        DataFrame with ``bin, bin_low, bin_high, count, confidence, accuracy`` (one row per
        non-empty bin, in bin order). ``sum(count * |accuracy - confidence|) / N`` is the ECE.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    b = bin_index(conf, n_bins)
    count = np.bincount(b, minlength=n_bins)
    used = np.flatnonzero(count)
    mean = lambda x: np.bincount(b, weights=x, minlength=n_bins)[used] / count[used]  # noqa: E731
    return pd.DataFrame({"bin": used, "bin_low": used / n_bins, "bin_high": (used + 1) / n_bins,
                         "count": count[used], "confidence": mean(conf), "accuracy": mean(ok)})


# ----------------------------------------------------------------------------- tables over runs


def _group_rows(runs, split: str, attributes, cross=None) -> list[tuple]:
    """(model, method, attribute, group, targets, probs (n, C), classes, task) per run and group.

    Targets as ``Run.arrays``: multi-class (n,) class indices, multi-label (n, C) in {1, 0, NaN}.
    """
    out = []
    for run in runs:
        rows = run.split(split)
        y, probs = run.arrays(split)
        # The run itself, not its id: group_labels reads the run's declared groups (runs v2).
        for attr, (labels, levels) in group_labels(rows, list(attributes), run, cross=cross).items():
            for g in levels:
                m = labels == g
                out.append((run.model, run.method, attr, g, y[m], probs[m], run.classes, run.task))
    return out


def _class_curve(y: np.ndarray, probs: np.ndarray, j: int, task: str):
    """ROC points of class j: one-vs-rest on indices (multi-class), its own labelled rows (multi-label)."""
    if task == "multilabel":
        keep = ~np.isnan(y[:, j])
        return roc_points(y[keep, j] == 1, probs[keep, j])
    return roc_points(y == j, probs[:, j])


def _calibration_pairs(y: np.ndarray, probs: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, outcome) pairs of a reliability diagram.

    Multi-class: top-label confidence and whether the top label is right (as ``metrics.ece``).
    Multi-label: every labelled (image, condition) cell, p against the label (binary
    calibration, as ``multilabel.ece``, with all conditions pooled).
    """
    if task == "multilabel":
        keep = ~np.isnan(y)
        return probs[keep], y[keep]
    return probs.max(axis=1), probs.argmax(axis=1) == y


def roc_table(runs, split: str, attributes, grid=FPR_GRID, cross=None) -> pd.DataFrame:
    """Per-group one-vs-rest ROC curves, averaged vertically over the runs of a model · method.

    Args:
        runs: the runs to draw (``Run``), typically the primary runs; runs of one model and
            method (seeds, prompt draws) are averaged: TPR at each grid FPR, mean over runs.
        split: the split the report is on. attributes: attribute columns.
        cross: attributes crossed into one more (``analyze.group_labels``; None: the first two).

    Returns:
        Long DataFrame (ROC_COLUMNS): one row per model, method, attribute, group, class and
        grid point.
    """
    curves: dict[tuple, list[np.ndarray]] = {}
    for model, method, attr, g, y, probs, classes, task in _group_rows(runs, split, attributes, cross):
        for j, c in enumerate(classes):
            fpr, tpr, _ = _class_curve(y, probs, j, task)
            curves.setdefault((model, method, attr, g, c), []).append(roc_on_grid(fpr, tpr, grid))
    if not curves:
        return pd.DataFrame(columns=ROC_COLUMNS)
    # One frame from whole columns: a small DataFrame per curve costs more than the curves.
    keys, g = list(curves), len(grid)
    out = {name: np.repeat([k[i] for k in keys], g) for i, name in enumerate(ROC_COLUMNS[:5])}
    out["n_runs"] = np.repeat([len(curves[k]) for k in keys], g)
    out["fpr"] = np.tile(np.asarray(grid, dtype=np.float64), len(keys))
    out["tpr"] = np.concatenate([np.mean(curves[k], axis=0) for k in keys])
    return pd.DataFrame(out)[ROC_COLUMNS]


def reliability_table(runs, split: str, attributes, n_bins: int = ECE_BINS, cross=None) -> pd.DataFrame:
    """Per-group reliability bins, pooling the runs of a model · method (``_calibration_pairs``).

    Returns:
        Long DataFrame (RELIABILITY_COLUMNS): one row per model, method, attribute, group and
        non-empty bin.
    """
    pooled: dict[tuple, list[tuple]] = {}
    for model, method, attr, g, y, probs, _, task in _group_rows(runs, split, attributes, cross):
        pooled.setdefault((model, method, attr, g), []).append(_calibration_pairs(y, probs, task))
    frames = []
    for (model, method, attr, g), parts in pooled.items():
        conf, ok = (np.concatenate(p) for p in zip(*parts))
        frames.append(reliability_bins(conf, ok, n_bins).assign(
            model=model, method=method, attribute=attr, group=g, n_runs=len(parts)))
    if not frames:
        return pd.DataFrame(columns=RELIABILITY_COLUMNS)
    return pd.concat(frames, ignore_index=True)[RELIABILITY_COLUMNS]
