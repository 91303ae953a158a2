"""Utility and fairness metrics: pure NumPy functions ``f(y_true, y_prob, *, weights=None)``.

Every metric takes integer labels ``y_true`` (N,), class probabilities ``y_prob`` (N, C) and
optional sample ``weights`` of shape (N,) or (..., N). A bootstrap replicate is the same data
with weights equal to how often each image was drawn, so passing a (R, N) matrix of resample
counts computes all R replicates at once as arrays (no Python loop over replicates), and the
result gains a leading (R,) axis. ``weights=None`` is the plain metric on the data as given.

Predictions are the arg-max class (ties go to the lower class index, as ``np.argmax``).

NaN rule (the only one, ``groups``): a ratio whose denominator is zero (no samples, no
positives, no negatives, nothing present and nothing predicted) is NaN. Reductions over classes
(macro means, ``var_f1``, the class sums inside gap metrics) skip NaN terms, like scikit-learn's
``zero_division=np.nan``; they are NaN only when every term is. Combinations over groups (gaps,
minima, sums over groups) propagate NaN: a gap involving an undefined group is NaN.

Group fairness uses the engine both tasks share (``groups``: ``by_group``, ``GroupMetric``,
``combine_groups``); this module's spec table is ``GROUP_METRICS``. ``METRIC_DEFINITIONS`` holds
one sentence per metrics.csv name of either task.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from cxrfair.core.calibration import binned_ece, debiased_ece
from cxrfair.core.groups import (ECE_BINS, GroupMetric, as_weights, by_group, combine_groups, nanmean_last, ratio,
                                 stack_groups)
from cxrfair.core.multilabel import MULTILABEL_METRIC_DEFINITIONS


class Counts(NamedTuple):
    """Weighted one-vs-rest confusion counts, each (..., C)."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray


# ----------------------------------------------------------------------------- helpers


def _segment_sum(w: np.ndarray, codes: np.ndarray, k: int, values=None) -> np.ndarray:
    """Sum of ``w * values`` over the samples of each code: (..., N) -> (..., k).

    The same as ``w @ one_hot(codes)`` but without BLAS: these products are tiny, and a
    multi-threaded BLAS spinning on two shared cores made them 8x slower than plain sums.
    """
    x = w if values is None else w * values
    return np.stack([x[..., codes == j].sum(-1) for j in range(k)], axis=-1)


def predicted(y_prob: np.ndarray) -> np.ndarray:
    """(N, C) -> (N,) arg-max class."""
    return np.asarray(y_prob).argmax(axis=1)


# ----------------------------------------------------------------------------- per-sample metrics


def confusion_counts(y_true, y_prob, *, weights=None) -> Counts:
    """One-vs-rest confusion counts of the arg-max prediction, per class.

    Args:
        y_true: (N,) int labels in [0, C).
        y_prob: (N, C) probabilities.
        weights: (N,) or (..., N) sample weights (bootstrap counts).

    Returns:
        Counts of arrays (..., C).
    """
    y_true = np.asarray(y_true)
    n, c = np.shape(y_prob)
    w = as_weights(weights, n)
    pred = predicted(y_prob)
    pos, pp = _segment_sum(w, y_true, c), _segment_sum(w, pred, c)
    # A hit on class c is a sample with y == pred == c; misses get code c (out of range).
    tp = _segment_sum(w, np.where(pred == y_true, y_true, c), c)
    total = w.sum(-1)[..., None]
    return Counts(tp, pp - tp, pos - tp, total - pos - pp + tp)


def accuracy(y_true, y_prob, *, weights=None) -> np.ndarray:
    """Fraction of arg-max predictions equal to the label. Returns (...)."""
    y_true = np.asarray(y_true)
    w = as_weights(weights, len(y_true))
    return ratio((w * (predicted(y_prob) == y_true)).sum(-1), w.sum(-1))


def f1(y_true, y_prob, *, weights=None) -> np.ndarray:
    """One-vs-rest F1 per class, 2TP / (2TP + FP + FN). Returns (..., C)."""
    k = confusion_counts(y_true, y_prob, weights=weights)
    return ratio(2 * k.tp, 2 * k.tp + k.fp + k.fn)


def f1_macro(y_true, y_prob, *, weights=None) -> np.ndarray:
    """Unweighted mean of class F1 (NaN classes skipped). Returns (...)."""
    return nanmean_last(f1(y_true, y_prob, weights=weights))


def var_f1(y_true, y_prob, *, weights=None) -> np.ndarray:
    """Population variance of class F1 over classes, eq. 1 of Sun et al. (ISBI 2025). Returns (...).

    References:
        Sun et al., "Fairness Analysis of CLIP-Based Foundation Models for X-Ray Image
        Classification", ISBI 2025, Var_F1.
    """
    f = f1(y_true, y_prob, weights=weights)
    dev = f - nanmean_last(f)[..., None]
    return nanmean_last(dev * dev)


def tpr(y_true, y_prob, *, weights=None) -> np.ndarray:
    """True-positive rate (recall) per class, TP / (TP + FN). Returns (..., C)."""
    k = confusion_counts(y_true, y_prob, weights=weights)
    return ratio(k.tp, k.tp + k.fn)


def fpr(y_true, y_prob, *, weights=None) -> np.ndarray:
    """False-positive rate per class, FP / (FP + TN). Returns (..., C)."""
    k = confusion_counts(y_true, y_prob, weights=weights)
    return ratio(k.fp, k.fp + k.tn)


def fnr(y_true, y_prob, *, weights=None) -> np.ndarray:
    """False-negative rate (missed diagnosis) per class, FN / (TP + FN). Returns (..., C)."""
    k = confusion_counts(y_true, y_prob, weights=weights)
    return ratio(k.fn, k.tp + k.fn)


def selection_rate(y_true, y_prob, *, weights=None) -> np.ndarray:
    """Fraction of samples predicted as each class (demographic parity's base). Returns (..., C)."""
    k = confusion_counts(y_true, y_prob, weights=weights)
    return ratio(k.tp + k.fp, (k.tp + k.fp + k.fn + k.tn))


def _top_label(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    """(N,) top-label confidence p_i and (N,) 0/1 correctness o_i."""
    y_prob = np.asarray(y_prob, dtype=np.float64)
    return y_prob.max(axis=1), (predicted(y_prob) == np.asarray(y_true)).astype(np.float64)


def _ece_bins(y_true, y_prob, weights, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin (lo, hi] of the top-label probability p: (..., B) Σ w, Σ w (o − p), Σ w (o − p)².

    Σ_i w_i (o_i − p_i) over a bin is n_b (acc_b − conf_b); one segment sum per quantity for all replicates.
    """
    conf, correct = _top_label(y_true, y_prob)
    w = as_weights(weights, len(conf))
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    r = correct - conf
    return _segment_sum(w, bins, n_bins), _segment_sum(w, bins, n_bins, r), _segment_sum(w, bins, n_bins, r * r)


def ece(y_true, y_prob, *, weights=None, n_bins: int = ECE_BINS) -> np.ndarray:
    """Binned top-label expected calibration error. Returns (...).

    ECE = sum_b (n_b / n) |acc_b - conf_b| over ``n_bins`` equal-width confidence bins
    (lo, hi] of [0, 1], with conf the top-label probability and acc whether that label is right.

    References:
        Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
    """
    mass, resid, _ = _ece_bins(y_true, y_prob, weights, n_bins)
    return binned_ece(mass, resid)


def ece_debiased(y_true, y_prob, *, weights=None, n_bins: int = ECE_BINS) -> np.ndarray:
    """The binned top-label ECE with each bin's upward bias estimated and subtracted. Returns (...).

    Same bins as ``ece``; each bin's |acc_b − conf_b| becomes 2|d̂_b| − E|N(d̂_b, σ̂_b²)|
    (``calibration.debiased_ece``). May be below 0 for a well-calibrated model in a small sample.

    References:
        Kumar, Liang & Ma, "Verified Uncertainty Calibration", NeurIPS 2019.
    """
    return debiased_ece(*_ece_bins(y_true, y_prob, weights, n_bins))


def ece_paper(y_true, y_prob, *, weights=None) -> np.ndarray:
    """Unbinned calibration error as written in eq. 4 of Sun et al. (ISBI 2025): (1/N) sum_i |p_i - o_i|.

    p_i is the top-label confidence (the largest class probability of image i) and o_i is 1 if
    that top label is the true label, else 0. Unlike ``ece`` nothing is binned, so it measures
    per-image miscalibration (it is large even for a perfectly calibrated but unsure model).
    Returns (...).
    """
    conf, correct = _top_label(y_true, y_prob)
    w = as_weights(weights, len(conf))
    return ratio((w * np.abs(conf - correct)).sum(-1), w.sum(-1))


def _auc_binary(positive: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUC of one score, ties counted one half.

    Sorting depends only on the scores, so it happens once; each replicate then only needs
    cumulative sums of its weights over tie levels: O(R N) for R replicates.

    Args:
        positive: (N,) bool. score: (N,). w: (..., N) weights.

    Returns:
        (...) AUC, NaN without weighted positives or negatives.
    """
    order = np.argsort(score, kind="stable")
    s, pos = score[order], positive[order]
    ws = w[..., order]
    wp = ws * pos
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first index of each tie level
    if len(starts) < len(s):  # ties: pool each tie level (skipped for continuous scores)
        ws, wp = np.add.reduceat(ws, starts, axis=-1), np.add.reduceat(wp, starts, axis=-1)
    wn = ws - wp
    below = np.cumsum(wn, axis=-1) - wn  # negatives strictly below each level
    u = (wp * (below + 0.5 * wn)).sum(-1)
    return ratio(u, wp.sum(-1) * wn.sum(-1))


def roc_auc(y_true, y_prob, *, weights=None) -> np.ndarray:
    """One-vs-rest ROC AUC per class (class-c probability as the score). Returns (..., C)."""
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob, dtype=np.float64)
    w = as_weights(weights, len(y_true))
    if len(y_true) == 0:
        return np.full(w.shape[:-1] + (y_prob.shape[1],), np.nan)
    return np.stack([_auc_binary(y_true == c, y_prob[:, c], w) for c in range(y_prob.shape[1])], axis=-1)


def auc_macro(y_true, y_prob, *, weights=None) -> np.ndarray:
    """Unweighted mean of one-vs-rest AUC over classes (NaN classes skipped). Returns (...)."""
    return nanmean_last(roc_auc(y_true, y_prob, weights=weights))


# Name -> (function, per_class). The per-image metrics reported overall and per group.
METRICS: dict[str, tuple[Callable, bool]] = {
    "accuracy": (accuracy, False),
    "f1": (f1, True),
    "f1_macro": (f1_macro, False),
    "auc": (roc_auc, True),
    "auc_macro": (auc_macro, False),
    "var_f1": (var_f1, False),
    "ece": (ece, False),
    "ece_paper": (ece_paper, False),
    "ece_debiased": (ece_debiased, False),
    "tpr": (tpr, True),
    "fpr": (fpr, True),
    "fnr": (fnr, True),
    "selection_rate": (selection_rate, True),
}


# ----------------------------------------------------------------------------- groups


GROUP_METRICS: tuple[GroupMetric, ...] = (
    GroupMetric("f1_gap", ("f1",), "difference", "F1_Δ = (1/C) Σ_c (F1_A^c − F1_A'^c), signed (Sun et al. eq. 2)"),
    GroupMetric("f1_gap_abs", ("f1",), "magnitude", "|F1_Δ|: the size of f1_gap whichever group is ahead"),
    GroupMetric("eqodds", ("tpr", "fpr"), "abs_difference",
                "EqOdds = (1/2C) Σ_c (|ΔTPR_c| + |ΔFPR_c|): the average of the TPR and FPR gaps (fairlearn's "
                "equalized_odds_difference with agg='mean', one-vs-rest), mean over classes (Sun et al. eq. 3)"),
    GroupMetric("eqodds_worst", ("tpr", "fpr"), "max_range",
                "(1/C) Σ_c max(|ΔTPR_c|, |ΔFPR_c|): per class the larger of the TPR and FPR gaps "
                "(fairlearn's equalized_odds_difference, one-vs-rest), then the mean over classes"),
    GroupMetric("ece_gap", ("ece",), "abs_difference", "|ECE_A − ECE_A'|, with the binned top-label ECE (15 bins)",
                debiased=("ece_debiased",)),
    GroupMetric("ece_gap_paper", ("ece_paper",), "abs_difference",
                "Sun et al. eq. 4 as written: |mean_A |p−o| − mean_A' |p−o||, p top-label confidence, o correctness"),
    GroupMetric("es_auc", ("auc_macro",), "equity",
                "ES-AUC = AUC / (1 + Σ_g |AUC − AUC_g|), macro AUC scaled down by its spread over groups (FairCLIP)"),
    GroupMetric("fnr_gap", ("fnr",), "difference", "(1/C) Σ_c (FNR_A^c − FNR_A'^c): under-diagnosis of A, signed"),
    GroupMetric("dp_gap", ("selection_rate",), "abs_difference",
                "(1/C) Σ_c |P(ŷ=c | A) − P(ŷ=c | A')|: demographic parity difference"),
    GroupMetric("worst_group_accuracy", ("accuracy",), "min", "min_g accuracy_g: the accuracy of the worst-served group"),
)


# ----------------------------------------------------------------------------- the full set

# Metrics reported on the whole split (issue 7: metrics.csv names), and per group.
OVERALL_METRICS = ("accuracy", "f1", "f1_macro", "auc", "auc_macro", "var_f1", "ece", "ece_debiased")
GROUP_VALUE_METRICS = ("accuracy", "f1", "f1_macro", "auc", "auc_macro", "ece", "ece_paper", "ece_debiased", "tpr", "fpr",
                       "selection_rate")

Key = tuple  # (metric, attribute, group, class); "" where one does not apply


def all_metrics(y_true, y_prob, *, weights=None) -> dict[str, np.ndarray]:
    """Every per-image metric of METRICS from one set of confusion counts and one AUC pass.

    Same values as calling each function of METRICS (tested), but the counts and the AUC
    sorting are shared, which is what makes a thousand replicates of thirty runs cheap.

    Returns:
        {name: (...) or (..., C)}.
    """
    k = confusion_counts(y_true, y_prob, weights=weights)
    f = ratio(2 * k.tp, 2 * k.tp + k.fp + k.fn)
    auc = roc_auc(y_true, y_prob, weights=weights)
    f_mean = nanmean_last(f)
    dev = f - f_mean[..., None]
    mass, resid, resid_sq = _ece_bins(y_true, y_prob, weights, ECE_BINS)
    return {
        "accuracy": ratio(k.tp.sum(-1), (k.tp + k.fn).sum(-1)),
        "f1": f,
        "f1_macro": f_mean,
        "auc": auc,
        "auc_macro": nanmean_last(auc),
        "var_f1": nanmean_last(dev * dev),
        "ece": binned_ece(mass, resid),
        "ece_paper": ece_paper(y_true, y_prob, weights=weights),
        "ece_debiased": debiased_ece(mass, resid, resid_sq),
        "tpr": ratio(k.tp, k.tp + k.fn),
        "fpr": ratio(k.fp, k.fp + k.tn),
        "fnr": ratio(k.fn, k.tp + k.fn),
        "selection_rate": ratio(k.tp + k.fp, k.tp + k.fp + k.fn + k.tn),
    }


def evaluate_all(y_true, y_prob, classes: list[str], attributes: dict[str, tuple[np.ndarray, list[str]]],
                 *, weights=None) -> dict[Key, np.ndarray]:
    """All reported metrics of one set of predictions, keyed for the long metrics table.

    Args:
        y_true: (N,) int labels. y_prob: (N, C). classes: C names.
        attributes: {attribute: ((N,) group label per sample, levels in reference order)}.
        weights: (N,) or (R, N) bootstrap counts; values gain the leading (R,) axis.

    Returns:
        {(metric, attribute, group, class): (...)}; "" for attribute/group/class where none applies.
    """
    out: dict[Key, np.ndarray] = {}
    overall = all_metrics(y_true, y_prob, weights=weights)
    _put(out, overall, OVERALL_METRICS, "", "", classes)
    overall_c = _with_class_axis(overall)
    for attr, (labels, levels) in attributes.items():
        groups = by_group(all_metrics, y_true, y_prob, labels, levels=levels, weights=weights)
        per_group = {g: _with_class_axis(groups[g]) for g in levels}
        for spec in GROUP_METRICS:
            stacked = {b: stack_groups(per_group, b, overall_c[b]) for b in spec.bases}
            out[(spec.name, attr, "", "")] = combine_groups(spec, stacked, overall_c)
        for g in levels:
            _put(out, groups[g], GROUP_VALUE_METRICS, attr, g, classes)
    return out


def _with_class_axis(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Whole-sample metrics (...) as (..., 1), the engine's shape (``groups``); per-class ones as they are."""
    return {name: (v if METRICS[name][1] else v[..., None]) for name, v in values.items()}


_VALUE_DEFINITIONS = {
    "accuracy": "Fraction of images whose arg-max class is the label.",
    "f1": "One-vs-rest F1 of one class, 2TP / (2TP + FP + FN), predictions by arg-max.",
    "f1_macro": "Unweighted mean of the class F1 values.",
    "auc": "One-vs-rest ROC AUC of one class, its probability as the score (ties count one half).",
    "auc_macro": "Unweighted mean of the class AUCs.",
    "var_f1": "Var_F1: population variance of the class F1 values over classes (Sun et al. eq. 1); disease fairness.",
    "ece": "Binned top-label expected calibration error: 15 equal-width confidence bins, Σ_b (n_b/n) |acc_b − conf_b|.",
    "ece_paper": "Unbinned calibration error of Sun et al. eq. 4 as written: mean over images of |p_i − o_i|, "
                 "p_i the top-label confidence, o_i 1 if that label is right.",
    "ece_debiased": "The binned top-label ECE with each bin's small-sample upward bias (Gaussian estimate) subtracted "
                    "(Kumar et al. 2019); nearly unbiased, can be below 0; what ece_gap's interval is built from.",
    "tpr": "True-positive rate (recall) of one class, TP / (TP + FN).",
    "fpr": "False-positive rate of one class, FP / (FP + TN).",
    "fnr": "False-negative rate (missed diagnosis) of one class, FN / (TP + FN).",
    "selection_rate": "Fraction of images predicted as one class.",
}

# One sentence per metric name of metrics.csv, for the report and for readers of the CSV files.
# Group metrics: A is the reference group (M, young; run.json ``attributes``), Δ = A − A'.
MULTICLASS_METRIC_DEFINITIONS: dict[str, str] = {**_VALUE_DEFINITIONS, **{s.name: s.doc for s in GROUP_METRICS}}
# The shortcut test (``cxrfair analyze --shortcut COLUMN --shortcut-class CLASS``), either task.
SHORTCUT_DEFINITIONS: dict[str, str] = {
    "shortcut_auc_with": "AUC of the class on its positives whose shortcut column is 1 plus every negative "
                         "(attribute = the shortcut column, class = the class).",
    "shortcut_auc_without": "AUC of the class on its positives whose shortcut column is 0 plus every negative; "
                            "positives with the column empty are in neither subset.",
    "shortcut_delta": "shortcut_auc_with − shortcut_auc_without on the same resamples: > 0 means the model "
                      "finds the class more easily when the shortcut (e.g. a chest drain) is present.",
}


def metric_definitions(task: str = "multiclass") -> dict[str, str]:
    """{metric name: one sentence} for the metrics.csv of one task (``multiclass`` | ``multilabel``)."""
    own = MULTILABEL_METRIC_DEFINITIONS if task == "multilabel" else MULTICLASS_METRIC_DEFINITIONS
    return {**own, **SHORTCUT_DEFINITIONS}


def _both_tasks() -> dict[str, str]:
    """Every name of either task; a name whose meaning differs by task gets both sentences."""
    mc, ml = metric_definitions("multiclass"), metric_definitions("multilabel")
    out = dict(mc)
    for name, text in ml.items():
        out[name] = text if name not in mc or mc[name] == text else f"Multi-class: {mc[name]} Multi-label: {text}"
    return out


# One sentence per metrics.csv name of either task (the report's glossary).
METRIC_DEFINITIONS: dict[str, str] = _both_tasks()


def _put(out: dict, values: dict[str, np.ndarray], names, attr: str, group: str, classes: list[str]) -> None:
    for name in names:
        v = values[name]
        if METRICS[name][1]:
            for j, c in enumerate(classes):
                out[(name, attr, group, c)] = v[..., j]
        else:
            out[(name, attr, group, "")] = v
