"""Metrics of multi-label (and binary) tasks, all bootstrap replicates at once.

A multi-label task is C independent binary tasks ("conditions"): labels ``Y`` (N, C) in
{1, 0, NaN} (NaN = masked: uncertain or unknown, left out of that condition's metrics) and
scores ``P`` (N, C), each column a probability of its own (no sum-to-one rule). A binary task is
C = 1. Conventions follow ``metrics``: optional ``weights`` (N,) or (..., N) are sample weights;
an (R, N) matrix of bootstrap counts computes all R replicates at once (no Python loop over
replicates) and every result gains the leading (R,) axis.

How: the part that does not depend on the weights is planned once (``_plan``): per condition
and per group, the labelled positives and negatives sorted by descending score, and from
``searchsorted`` every index the metrics need. A block of replicates then costs one gather of
its weights in that order and one cumulative sum, for positives and negatives apart; ROC-AUC,
average precision, the counts at a threshold and the calibration bins are all read off those
cumulative sums (ties handled exactly, as scikit-learn does). Bootstrap counts are gathered as
bytes and summed as integers (exact); other weights as float64.

NaN rule (the project's, ``groups``): a ratio with a zero denominator is NaN -- a
condition with no (weighted) positives or no negatives in a sample, a group or a replicate has
NaN AUC, AP, adjusted AUPRC, TPR, FNR (and FPR without negatives). Averages over conditions
(``*_macro``) skip NaN and are NaN only when every condition is. Anything combined over groups
(gaps, worst group, ES-AUC, equalized odds) is NaN if any group is. A bootstrap replicate in
which a condition has no positives therefore gives NaN for that replicate, and
``bootstrap.interval`` ignores NaN replicates: this is Sourget et al.'s "resamples without
positives are skipped", per metric.

Group metrics: this task's spec table ``GROUP_METRICS``, applied by the engine both tasks share
(``groups.combine_groups``); ``evaluate_multilabel`` computes every group's values in one planned
pass, equal to ``groups.by_group`` of ``condition_metrics`` (tested).

Differences from scikit-learn, on purpose: ``average_precision`` is NaN without positives
(scikit-learn returns 0 with a warning); everything else equals scikit-learn (tested).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cxrfair.core.calibration import debiased_ece
from cxrfair.core.groups import (ECE_BINS, GroupMetric, as_weights, by_group, combine_groups, nanmean_last, ratio,
                                 stack_groups)

THRESHOLD_RULE = (
    "per condition, the threshold t among the distinct validation scores (masked labels left "
    "out) that maximises F1 = 2TP / (2TP + FP + FN) of the prediction p >= t; ties go to the "
    "highest such t; NaN (no prediction) when the condition has no validation positives"
)

# Replicates go through in blocks of CHUNK_BYTES // (8 N) rows (16 MiB of float64 weights): the
# peak memory is then a small multiple of that whatever R is (measured in benchmarks/RESULTS.md).
CHUNK_BYTES = 16 * 2**20

# Per-condition metrics (overall and per group); each also gets "<name>_macro" but prevalence.
CONDITION_METRICS = ("auc", "ap", "adjusted_auprc", "prevalence", "ece", "ece_debiased")
THRESHOLD_METRICS = ("f1", "tpr", "fpr", "fnr")
MACRO_METRICS = ("auc", "ap", "adjusted_auprc", "ece", "ece_debiased", "f1", "tpr", "fpr", "fnr")
_TINY = np.finfo(np.float64).tiny  # 0 / max(0, tiny) = 0: the precision of a positive of weight 0 is never used


# ----------------------------------------------------------------------------- inputs


def _check_values(Y: np.ndarray, P: np.ndarray) -> None:
    if not np.isin(Y[~np.isnan(Y)], (0.0, 1.0)).all():
        raise ValueError("labels must be 1, 0 or NaN (masked)")
    if not np.isfinite(P).all():
        raise ValueError("scores must be finite numbers")


def _binary_inputs(y, score) -> tuple[np.ndarray, np.ndarray]:
    """(N,) labels and scores as (N, 1) arrays."""
    y, score = np.asarray(y, dtype=np.float64), np.asarray(score, dtype=np.float64)
    if y.ndim != 1 or score.shape != y.shape:
        raise ValueError(f"labels {y.shape} and scores {score.shape} must both be (N,)")
    return _multilabel_inputs(y[:, None], score[:, None])


def _multilabel_inputs(Y, P) -> tuple[np.ndarray, np.ndarray]:
    Y, P = np.asarray(Y, dtype=np.float64), np.asarray(P, dtype=np.float64)
    if Y.ndim != 2 or P.shape != Y.shape:
        raise ValueError(f"labels {Y.shape} and probabilities {P.shape} must both be (N, C)")
    _check_values(Y, P)
    return Y, P


def _thresholds(thresholds, c: int):
    if thresholds is None:
        return None
    t = np.asarray(thresholds, dtype=np.float64)
    if t.shape != (c,):
        raise ValueError(f"thresholds {t.shape} must be one per condition ({c},)")
    return t


def _group_labels(labels, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"group labels {labels.shape} must be one per sample ({n},)")
    return labels


# ----------------------------------------------------------------------------- plan (no weights)


class _Unit(NamedTuple):
    """One condition on one set of samples: every index that does not depend on the weights.

    Positives and negatives are kept apart, each by descending score. Their cumulative weights
    cp, cn (column k = the first k) give everything: the negatives with exactly k positives
    above them are a run [runs[k], runs[k+1]) of the negatives, so the Mann-Whitney sum needs
    only O(positives) columns of cn, and the precision at a positive only two columns.
    """

    pos: np.ndarray  # (Mp,) sample indices of the positives, by descending score
    neg: np.ndarray  # (Mn,) of the negatives
    runs_above: np.ndarray  # (Mp+2,) [k]: negatives with fewer than k positives strictly above, k = 0..Mp+1
    runs_upto: np.ndarray  # (Mp+2,) the same counting positives at or above (ties); = runs_above without ties
    tp_at: np.ndarray  # (Mp,) positives at or above each positive's score
    fp_at: np.ndarray  # (Mp,) negatives at or above each positive's score
    resid_pos: np.ndarray  # (Mp,) 1 - p: a positive's part of its ECE bin's sum of (y - p)
    score_neg: np.ndarray  # (Mn,) p: a negative's part, subtracted
    sq_pos: np.ndarray  # (Mp,) (1 - p)²: a positive's part of its bin's sum of (y - p)² (the debiased ECE)
    sq_neg: np.ndarray  # (Mn,) p²: a negative's
    bins_pos: np.ndarray  # (B+1,) ECE bin b (top bin first) holds the positives [bins[b], bins[b+1])
    bins_neg: np.ndarray  # (B+1,) and these negatives
    k: tuple[int, int] | None  # positives, negatives at or above the threshold; (-1, -1): NaN threshold


def _descending(score: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Indices of the samples where ``keep``, by descending score (stable)."""
    idx = np.flatnonzero(keep)
    return idx[np.argsort(-score[idx], kind="stable")]


def _bounds(s: np.ndarray, n_bins: int) -> np.ndarray:
    """(n_bins + 1,) segment bounds of the bins (lo, hi] of descending scores s, top bin first."""
    bins = np.clip(np.ceil(s * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    return np.r_[0, np.searchsorted(-bins, -np.arange(n_bins - 1, -1, -1), side="right")]


def _unit(score: np.ndarray, pos: np.ndarray, neg: np.ndarray, threshold, n_bins: int) -> _Unit:
    """Plan one unit from the condition's scores (N,) and its positives and negatives (descending)."""
    sp, sn = score[pos], score[neg]
    asc_p, asc_n = -sp, -sn  # ascending, for searchsorted
    ks = np.arange(len(sp) + 2)
    runs_above = np.searchsorted(np.searchsorted(asc_p, -sn, side="left"), ks, side="left")
    runs_upto = np.searchsorted(np.searchsorted(asc_p, -sn, side="right"), ks, side="left")
    k = None
    if threshold is not None:
        k = (-1, -1) if np.isnan(threshold) else (int(np.searchsorted(asc_p, -threshold, side="right")),
                                                  int(np.searchsorted(asc_n, -threshold, side="right")))
    return _Unit(pos, neg, runs_above, runs_upto, np.searchsorted(asc_p, -sp, side="right"),
                 np.searchsorted(asc_n, -sp, side="right"), 1 - sp, sn, (1 - sp) ** 2, sn ** 2, _bounds(sp, n_bins),
                 _bounds(sn, n_bins), k)


def _plan(Y, P, thresholds, groups: dict, n_bins: int = ECE_BINS) -> list[dict]:
    """Per condition {(attribute, group): _Unit}; ("", "") is every labelled sample.

    Each condition is sorted once; a group's positives and negatives are subsequences of that order.
    """
    plan = []
    for c in range(Y.shape[1]):
        pos, neg = _descending(P[:, c], Y[:, c] == 1), _descending(P[:, c], Y[:, c] == 0)
        t = None if thresholds is None else thresholds[c]
        units = {("", ""): _unit(P[:, c], pos, neg, t, n_bins)}
        for attr, (labels, levels) in groups.items():
            lp, ln = labels[pos], labels[neg]
            units.update({(attr, g): _unit(P[:, c], pos[lp == g], neg[ln == g], t, n_bins) for g in levels})
        plan.append(units)
    return plan


# ----------------------------------------------------------------------------- kernel (weights)


def _cumsum0(g: np.ndarray, dtype) -> np.ndarray:
    """(r, m) -> (r, m + 1) cumulative sums with a leading 0: column k sums the first k."""
    out = np.zeros((g.shape[0], g.shape[1] + 1), dtype=dtype)
    np.cumsum(g, axis=1, out=out[:, 1:], dtype=dtype)
    return out


def _bin_dots(g: np.ndarray, v: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """(r, m) weights, (m,) values -> (r, B) sums of g * v over [bounds[b], bounds[b + 1])."""
    out = np.zeros((g.shape[0], len(bounds) - 1))
    for b in np.flatnonzero(bounds[1:] > bounds[:-1]):  # one pass, no (r, m) temporary
        lo, hi = bounds[b], bounds[b + 1]
        out[:, b] = np.einsum("rl,l->r", g[:, lo:hi], v[lo:hi])
    return out


def _unit_metrics(u: _Unit, w2: np.ndarray, counts: np.ndarray | None) -> dict[str, np.ndarray]:
    """Every per-condition metric of one unit for a block of weight rows.

    Args:
        u: the plan. w2: (r, N) weights. counts: the same as uint8 (``_as_counts``) or None.

    Returns:
        {name: (r,)}.
    """
    source, dtype = (w2, np.float64) if counts is None else (counts, np.int64)
    gp, gn = np.take(source, u.pos, axis=1), np.take(source, u.neg, axis=1)
    cp, cn = _cumsum0(gp, dtype), _cumsum0(gn, dtype)
    p, n = cp[:, -1], cn[:, -1]
    # Mann-Whitney: each negative scores the positives strictly above it plus half of those it
    # ties, i.e. the mean of the two counts; the negatives of one count are summed as a run of cn.
    runs = np.diff(np.take(cn, u.runs_above, axis=1), axis=1)
    if not np.array_equal(u.runs_above, u.runs_upto):
        runs = 0.5 * (runs + np.diff(np.take(cn, u.runs_upto, axis=1), axis=1))
    auc = ratio(np.einsum("rk,rk->r", cp, runs), p * n)
    # Step-wise AP: each positive weighs the precision at the lowest score tied with it.
    tp = np.take(cp, u.tp_at, axis=1)
    ap = ratio(np.einsum("rl,rl->r", gp, tp / np.maximum(tp + np.take(cn, u.fp_at, axis=1), _TINY)), p)
    prevalence = ratio(p, p + n)
    gap = _bin_dots(gp, u.resid_pos, u.bins_pos) - _bin_dots(gn, u.score_neg, u.bins_neg)
    # A bin's weight is a difference of the cumulative sums at its bounds (the samples are sorted by score).
    mass = np.diff(np.take(cp, u.bins_pos, axis=1), axis=1) + np.diff(np.take(cn, u.bins_neg, axis=1), axis=1)
    sq = _bin_dots(gp, u.sq_pos, u.bins_pos) + _bin_dots(gn, u.sq_neg, u.bins_neg)
    out = {"auc": auc, "ap": ap, "adjusted_auprc": _adjusted(ap, prevalence), "prevalence": prevalence,
           "ece": ratio(np.abs(gap).sum(1), p + n), "ece_debiased": debiased_ece(mass, gap, sq)}
    if u.k is not None:
        out.update(_at_threshold(u.k, cp, cn))
    return out


def _adjusted(ap: np.ndarray, prevalence: np.ndarray) -> np.ndarray:
    """1 - log(AP) / log(prevalence): 0 for a random ranking, 1 for a perfect one (Sourget et al.)."""
    ok = (prevalence > 0) & (prevalence < 1) & (ap > 0)
    return np.where(ok, 1 - np.log(np.where(ok, ap, 1.0)) / np.log(np.where(ok, prevalence, 0.5)), np.nan)


def _at_threshold(k: tuple[int, int], cp: np.ndarray, cn: np.ndarray) -> dict[str, np.ndarray]:
    """F1, TPR, FPR, FNR of predicting p >= t, with k the counts at or above t ((-1, -1): NaN)."""
    p, n = cp[:, -1], cn[:, -1]
    if k[0] < 0:
        nan = np.full(p.shape, np.nan)
        return {"f1": nan, "tpr": nan, "fpr": nan, "fnr": nan}
    tp, fp = cp[:, k[0]], cn[:, k[1]]
    return {"f1": ratio(2 * tp, p + tp + fp), "tpr": ratio(tp, p), "fpr": ratio(fp, n), "fnr": ratio(p - tp, p)}


def _rows(plan: list[dict], w2: np.ndarray) -> dict[tuple, dict[str, np.ndarray]]:
    """{(attribute, group): {name: (r, C)}} for a block of weight rows (r, N)."""
    counts = _as_counts(w2)
    per: dict[tuple, list] = {key: [] for key in plan[0]}
    for units in plan:
        for key, unit in units.items():
            per[key].append(_unit_metrics(unit, w2, counts))
    return {key: {name: np.stack([m[name] for m in ms], axis=-1) for name in ms[0]} for key, ms in per.items()}


def _as_counts(w2: np.ndarray) -> np.ndarray | None:
    """uint8 copy of weights that are whole numbers in [0, 255] (bootstrap counts), else None.

    Counts are then gathered as bytes (a random gather of float64 rows was ~3x slower here) and
    summed as int64 (an integer cumsum ~2.5x faster than a float one), exactly.
    """
    if not w2.size or w2.min() < 0 or w2.max() > 255:
        return None
    small = w2.astype(np.uint8)
    return small if np.array_equal(small, w2) else None


def _values(plan: list[dict], weights, n: int, chunk_bytes: int = CHUNK_BYTES) -> dict[tuple, dict[str, np.ndarray]]:
    """``_rows`` over blocks of replicates (bounded memory), reshaped to the weights' leading axes, + macros.

    Returns:
        {(attribute, group): {name: (..., C), name_macro: (...)}}.
    """
    w = as_weights(weights, n)
    lead = w.shape[:-1]
    w2 = w.reshape(int(np.prod(lead)), n)
    rows = max(1, chunk_bytes // (8 * max(n, 1)))
    parts = [_rows(plan, w2[i:i + rows]) for i in range(0, len(w2), rows)]
    out = {}
    for key, vals in parts[0].items():
        v = {name: np.concatenate([p[key][name] for p in parts]).reshape(lead + x.shape[1:]) for name, x in vals.items()}
        v.update({f"{name}_macro": nanmean_last(v[name]) for name in MACRO_METRICS if name in v})
        out[key] = v
    return out


# ----------------------------------------------------------------------------- one condition


def _one(name: str, y, score, weights) -> np.ndarray:
    Y, P = _binary_inputs(y, score)
    return _values(_plan(Y, P, None, {}), weights, len(Y))[("", "")][name][..., 0]


def auc(y, score, *, weights=None) -> np.ndarray:
    """ROC-AUC of one binary task, ties counted one half (= scikit-learn's trapezoid).

    Args:
        y: (N,) labels 1 / 0 / NaN (masked). score: (N,). weights: (N,) or (..., N).

    Returns:
        (...) AUC; NaN without (weighted) positives or negatives.
    """
    return _one("auc", y, score, weights)


def average_precision(y, score, *, weights=None) -> np.ndarray:
    """Average precision as scikit-learn's ``average_precision_score``. Returns (...).

    Step-wise, no interpolation: AP = sum_k (R_k - R_{k-1}) P_k over the distinct scores in
    descending order, tied scores entering together as one threshold. NaN without positives.
    """
    return _one("ap", y, score, weights)


def adjusted_auprc(y, score, *, weights=None) -> np.ndarray:
    """1 - log(AP) / log(prevalence) with the sample's own prevalence. Returns (...).

    NaN without positives or without negatives (prevalence 1: log 0).

    References:
        Sourget et al., "Fairness and Robustness of CLIP-Based Models for Chest X-rays",
        FAIMI 2025 (``adjusted_auprc``).
    """
    return _one("adjusted_auprc", y, score, weights)


def ece(y, score, *, weights=None) -> np.ndarray:
    """Binary calibration error: over 15 equal-width bins of p, sum of (bin mass) |mean p - positive rate|.

    Returns:
        (...); NaN without labelled samples.

    References:
        Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
    """
    return _one("ece", y, score, weights)


def ece_debiased(y, score, *, weights=None) -> np.ndarray:
    """``ece`` with each bin's small-sample upward bias estimated and subtracted (``calibration.debiased_ece``).

    Returns:
        (...); NaN without labelled samples; may be below 0.

    References:
        Kumar, Liang & Ma, "Verified Uncertainty Calibration", NeurIPS 2019.
    """
    return _one("ece_debiased", y, score, weights)


# ----------------------------------------------------------------------------- (N, C) arrays


def condition_metrics(Y, P, *, thresholds=None, weights=None) -> dict[str, np.ndarray]:
    """Every per-condition metric and its macro average.

    Args:
        Y: (N, C) labels 1 / 0 / NaN. P: (N, C) probabilities.
        thresholds: (C,) from ``choose_thresholds`` on validation; None leaves out f1/tpr/fpr/fnr.
        weights: (N,) or (..., N).

    Returns:
        {name: (..., C)} for CONDITION_METRICS (+ THRESHOLD_METRICS) and {name_macro: (...)}.
    """
    Y, P = _multilabel_inputs(Y, P)
    plan = _plan(Y, P, _thresholds(thresholds, Y.shape[1]), {})
    return _values(plan, weights, len(Y))[("", "")]


def auc_per_condition(Y, P, *, weights=None) -> np.ndarray:
    """ROC-AUC per condition, masked labels left out. Returns (..., C)."""
    return condition_metrics(Y, P, weights=weights)["auc"]


def auc_macro(Y, P, *, weights=None) -> np.ndarray:
    """Mean ROC-AUC over conditions, NaN conditions skipped. Returns (...)."""
    return condition_metrics(Y, P, weights=weights)["auc_macro"]


def _group_values(Y, P, labels, levels, thresholds, weights) -> dict[tuple, dict[str, np.ndarray]]:
    Y, P = _multilabel_inputs(Y, P)
    groups = {"group": (_group_labels(labels, len(Y)), list(levels))}
    return _values(_plan(Y, P, _thresholds(thresholds, Y.shape[1]), groups), weights, len(Y))


def auc_by_group(Y, P, labels, levels, *, weights=None) -> dict[str, np.ndarray]:
    """ROC-AUC per condition in each group: {group: (..., C)} (``groups.by_group`` of ``condition_metrics``)."""
    return {g: m["auc"] for g, m in by_group(condition_metrics, Y, P, labels, levels=levels, weights=weights).items()}


# ----------------------------------------------------------------------------- over groups


# This task's spec table, in the vocabulary of ``groups.COMBINES`` (as ``metrics.GROUP_METRICS``).
# Every metric is reported per condition (class = the condition) and as a macro (class ""): for the
# differences the same gap of the condition-mean differences, otherwise the mean over conditions.
GROUP_METRICS: tuple[GroupMetric, ...] = (
    GroupMetric("auc_gap", ("auc",), "difference",
                "AUC of the reference group minus the other's (signed); with 3+ groups max − min. Macro: the same gap "
                "of condition-mean differences."),
    GroupMetric("worst_group_auc", ("auc",), "min", "Smallest group AUC; macro: its mean over conditions."),
    GroupMetric("es_auc", ("auc",), "equity",
                "ES-AUC = AUC / (1 + Σ_g |AUC_g − AUC|) per condition (FairCLIP); macro: its mean over conditions."),
    GroupMetric("eqodds", ("tpr", "fpr"), "abs_difference",
                "Equalized odds, paper form: (|ΔTPR| + |ΔFPR|) / 2 between groups at the chosen threshold (3+ groups: "
                "largest pair); macro for two groups = Sun et al. eq. 3, (1/2C) Σ_c (|ΔTPR_c| + |ΔFPR_c|)."),
    GroupMetric("eqodds_worst", ("tpr", "fpr"), "max_range",
                "Equalized odds, worst-case form (fairlearn): max(TPR range, FPR range) over groups; macro: its mean "
                "over conditions."),
    GroupMetric("fnr_gap", ("fnr",), "difference",
                "Under-diagnosis gap: FNR of the reference group minus the other's (signed; > 0: reference missed "
                "more); with 3+ groups max − min."),
    GroupMetric("ece_gap", ("ece",), "abs_difference", "|ECE_A − ECE_A'| of the binned binary ECE; with 3+ groups max − min.",
                debiased=("ece_debiased",)),
)
_BY_NAME = {s.name: s for s in GROUP_METRICS}
# The range of a single group is 0 here (multi-class: NaN), as this task has always reported it.
_MIN_RANGE_GROUPS = 1


def _combine(spec: GroupMetric, per_group: dict, overall: dict) -> tuple[np.ndarray, np.ndarray]:
    """One spec over {group: {name: (..., C)}}: (per condition (..., C), macro (...))."""
    stacked = {b: stack_groups(per_group, b, overall[b]) for b in spec.bases}
    return combine_groups(spec, stacked, overall, per_class=True, min_range_groups=_MIN_RANGE_GROUPS)


def group_metric(name: str, Y, P, labels, levels, *, thresholds=None, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """One metric of GROUP_METRICS for one attribute.

    Args:
        name: a GROUP_METRICS name. Y, P: (N, C). labels: (N,). levels: groups, reference first.
        thresholds: (C,), needed by eqodds, eqodds_worst and fnr_gap. weights: (N,) or (..., N).

    Returns:
        (per condition (..., C), macro (...)).
    """
    if name not in _BY_NAME:
        raise ValueError(f"unknown group metric {name!r}; choose among {', '.join(_BY_NAME)}")
    spec = _BY_NAME[name]
    if thresholds is None and set(spec.bases) & set(THRESHOLD_METRICS):
        raise ValueError(f"{name} needs thresholds: one per condition, from choose_thresholds on validation")
    values = _group_values(Y, P, labels, levels, thresholds, weights)
    return _combine(spec, {g: values[("group", g)] for g in levels}, values[("", "")])


def auc_gap(Y, P, labels, levels, *, weights=None) -> np.ndarray:
    """AUC of the reference group minus the other's per condition (max − min for 3+ groups). (..., C)."""
    return group_metric("auc_gap", Y, P, labels, levels, weights=weights)[0]


def worst_group_auc(Y, P, labels, levels, *, weights=None) -> np.ndarray:
    """Smallest group AUC per condition. Returns (..., C)."""
    return group_metric("worst_group_auc", Y, P, labels, levels, weights=weights)[0]


def es_auc(Y, P, labels, levels, *, weights=None) -> np.ndarray:
    """Equity-scaled AUC per condition, AUC / (1 + sum_g |AUC_g − AUC|). Returns (..., C).

    References:
        Luo et al., "FairCLIP", CVPR 2024 (ES-AUC).
    """
    return group_metric("es_auc", Y, P, labels, levels, weights=weights)[0]


def equalized_odds(Y, P, labels, levels, thresholds, *, form: str = "mean", weights=None) -> np.ndarray:
    """Equalized-odds difference per condition at the given thresholds. Returns (..., C).

    form "mean": (|ΔTPR| + |ΔFPR|) / 2, the paper's eq. 3 per condition (``eqodds``); "worst": the
    larger of the TPR and FPR ranges over groups (``eqodds_worst``, fairlearn's
    ``equalized_odds_difference``).
    """
    if form not in ("mean", "worst"):
        raise ValueError(f"form {form!r}: choose mean (paper) or worst (worst case)")
    name = "eqodds" if form == "mean" else "eqodds_worst"
    return group_metric(name, Y, P, labels, levels, thresholds=thresholds, weights=weights)[0]


def fnr_gap(Y, P, labels, levels, thresholds, *, weights=None) -> np.ndarray:
    """Under-diagnosis gap: FNR of the reference group minus the other's (max − min for 3+). (..., C)."""
    return group_metric("fnr_gap", Y, P, labels, levels, thresholds=thresholds, weights=weights)[0]


def ece_gap(Y, P, labels, levels, *, weights=None) -> np.ndarray:
    """|ECE_A − ECE_A'| per condition (max − min for 3+ groups). Returns (..., C)."""
    return group_metric("ece_gap", Y, P, labels, levels, weights=weights)[0]


# ----------------------------------------------------------------------------- thresholds


def choose_thresholds(Y_val, P_val) -> np.ndarray:
    """Max-F1 threshold per condition on the validation split (THRESHOLD_RULE).

    Args:
        Y_val: (N, C) validation labels 1 / 0 / NaN. P_val: (N, C) validation probabilities.

    Returns:
        (C,) thresholds; predict positive when p >= t. NaN for a condition without positives.
    """
    Y, P = _multilabel_inputs(Y_val, P_val)
    out = np.full(Y.shape[1], np.nan)
    for c in range(Y.shape[1]):
        y, p = Y[:, c], P[:, c]
        cand = np.unique(p[~np.isnan(y)])[::-1]  # descending
        pos, neg = np.sort(-p[y == 1]), np.sort(-p[y == 0])  # negated scores, ascending
        if len(pos):
            tp = np.searchsorted(pos, -cand, side="right")  # positives at or above each candidate
            fp = np.searchsorted(neg, -cand, side="right")
            # Integer counts: equal F1 values are equal floats, so argmax's first hit is the
            # highest threshold among the best.
            out[c] = cand[np.argmax(2 * tp / (len(pos) + tp + fp))]
    return out


# ----------------------------------------------------------------------------- the full set

Key = tuple  # (metric, attribute, group, class); "" where one does not apply, as metrics.Key

OVERALL_METRICS = CONDITION_METRICS + THRESHOLD_METRICS
MULTILABEL_METRIC_DEFINITIONS: dict[str, str] = {
    "auc": "ROC-AUC of the condition (positive vs negative, masked labels left out; ties count one half).",
    "ap": "Average precision of the condition, step-wise as scikit-learn's average_precision_score.",
    "adjusted_auprc": "1 − log(AP) / log(prevalence) within the same images: 0 for a random ranking, 1 perfect (Sourget et al.).",
    "prevalence": "Share of positives among the labelled images of the condition (the AP of a random ranking).",
    "ece": "Binary calibration error of p: Σ over 15 equal-width bins of (bin mass) × |mean p − positive rate|.",
    "ece_debiased": "The binary binned ECE with each bin's small-sample upward bias (Gaussian estimate) subtracted "
                    "(Kumar et al. 2019); nearly unbiased, can be below 0; what ece_gap's interval is built from.",
    "f1": "F1 of p ≥ t with t the condition's max-F1 threshold chosen on validation.",
    "tpr": "True-positive rate (sensitivity) at the validation-chosen threshold.",
    "fpr": "False-positive rate at the validation-chosen threshold.",
    "fnr": "False-negative rate (missed diagnosis) at the validation-chosen threshold.",
    **{f"{m}_macro": f"Mean over conditions of {m} (conditions where it is undefined skipped)." for m in MACRO_METRICS},
    **{s.name: s.doc for s in GROUP_METRICS},
}


def evaluate_multilabel(Y, P, conditions: list[str], groups: dict[str, tuple[np.ndarray, list[str]]], thresholds,
                        *, weights=None, chunk_bytes: int = CHUNK_BYTES) -> dict[Key, np.ndarray]:
    """All reported multi-label metrics, keyed for the long metrics table like ``metrics.evaluate_all``.

    Args:
        Y: (N, C) labels 1 / 0 / NaN. P: (N, C) probabilities. conditions: C names.
        groups: {attribute: ((N,) group label per sample, levels with the reference first)}.
        thresholds: (C,) from ``choose_thresholds`` on the validation split.
        weights: (N,) or (..., N) bootstrap counts; values gain the leading axes. Replicates are
            processed in blocks of ``chunk_bytes // (8 N)`` rows, which bounds the memory.

    Returns:
        {(metric, attribute, group, class): (...)}: per-condition values under class = the
        condition, macros ("*_macro", and every GROUP_METRICS metric) under class "".
    """
    Y, P = _multilabel_inputs(Y, P)
    if len(conditions) != Y.shape[1]:
        raise ValueError(f"{len(conditions)} condition names for {Y.shape[1]} columns")
    if "" in groups:
        raise ValueError('an attribute needs a name ("" is the key of the overall values)')
    groups = {a: (_group_labels(lab, len(Y)), list(lev)) for a, (lab, lev) in groups.items()}
    plan = _plan(Y, P, _thresholds(thresholds, Y.shape[1]), groups)
    values = _values(plan, weights, len(Y), chunk_bytes)
    out: dict[Key, np.ndarray] = {}
    overall = values[("", "")]
    _put(out, overall, "", "", conditions)
    for attr, (_, levels) in groups.items():
        per_group = {g: values[(attr, g)] for g in levels}
        for spec in GROUP_METRICS:
            per, macro = _combine(spec, per_group, overall)
            out[(spec.name, attr, "", "")] = macro
            for j, c in enumerate(conditions):
                out[(spec.name, attr, "", c)] = per[..., j]
        for g in levels:
            _put(out, per_group[g], attr, g, conditions)
    return out


def _put(out: dict, values: dict[str, np.ndarray], attr: str, group: str, conditions: list[str]) -> None:
    for name in OVERALL_METRICS:
        for j, c in enumerate(conditions):
            out[(name, attr, group, c)] = values[name][..., j]
    for name in MACRO_METRICS:
        out[(f"{name}_macro", attr, group, "")] = values[f"{name}_macro"]
