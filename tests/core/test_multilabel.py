"""Multi-label metrics against scikit-learn / fairlearn and against slow references written here.

Inputs are drawn by hypothesis with scores on a coarse grid (ties), masked labels (NaN),
conditions without positives or negatives, and groups of one sample or none.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import MetricFrame, equalized_odds_difference, false_positive_rate, true_positive_rate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, precision_recall_curve, roc_auc_score

from cxrfair.core import multilabel as ML
from cxrfair.core.groups import by_group
from cxrfair.core.bootstrap import interval, resample_counts

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(SETTINGS, max_examples=10)  # references that call fairlearn / sklearn per group and pair
LEVELS = ["a", "b", "c"]


@st.composite
def data(draw, max_n=30, max_c=3):
    """(Y (N, C) in {0, 1, NaN}, P (N, C) on a grid of 5 points (ties) or 10^6 (mostly none), groups (N,) in a/b/c)."""
    c = draw(st.integers(1, max_c))
    n = draw(st.integers(1, max_n))
    grid = draw(st.sampled_from([4, 10**6]))
    y = np.array(draw(st.lists(st.sampled_from([0.0, 1.0, 1.0, np.nan]), min_size=n * c, max_size=n * c))).reshape(n, c)
    p = np.array(draw(st.lists(st.integers(0, grid), min_size=n * c, max_size=n * c)), dtype=float).reshape(n, c) / grid
    g = np.array(draw(st.lists(st.sampled_from(LEVELS), min_size=n, max_size=n)))
    return y, p, g


def _names(c):
    return [f"k{i}" for i in range(c)]


# ----------------------------------------------------------------------------- slow references


def _ece_loop(y, p, n_bins=15):
    """Binned binary ECE, bin by bin on boolean masks."""
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        m = (p > lo) & (p <= hi) if b else (p <= hi)
        if m.any():
            total += m.sum() / len(y) * abs(y[m].mean() - p[m].mean())
    return total


def _sk_condition(y, p, t):
    """Every per-condition metric of one column with scikit-learn on the labelled samples."""
    m = ~np.isnan(y)
    y, p = y[m].astype(int), p[m]
    both = 0 < y.sum() < len(y)
    pos = y.sum() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ap = average_precision_score(y, p) if pos else np.nan
    out = {"auc": roc_auc_score(y, p) if both else np.nan, "ap": ap,
           "prevalence": y.mean() if len(y) else np.nan, "ece": _ece_loop(y, p) if len(y) else np.nan}
    # Sourget et al.'s adjusted_auprc, written out.
    out["adjusted_auprc"] = 1 - np.log(ap) / np.log(y.sum() / len(y)) if both else np.nan
    if np.isnan(t):
        return out | {k: np.nan for k in ("f1", "tpr", "fpr", "fnr")}
    pred = (p >= t).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel() if len(y) else (0, 0, 0, 0)
    nan = float("nan")
    out["f1"] = f1_score(y, pred, zero_division=np.nan) if len(y) else nan
    out["tpr"] = tp / (tp + fn) if tp + fn else nan
    out["fpr"] = fp / (fp + tn) if fp + tn else nan
    out["fnr"] = fn / (tp + fn) if tp + fn else nan
    return out


def _check_against_sklearn(got, Y, P, t):
    for c in range(Y.shape[1]):
        ref = _sk_condition(Y[:, c], P[:, c], t[c])
        for name, v in ref.items():
            np.testing.assert_allclose(got[name][c], v, rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=f"{name} k{c}")
    for name in ML.MACRO_METRICS:
        v = got[name]
        expect = np.nan if np.isnan(v).all() else np.nanmean(v)
        np.testing.assert_allclose(got[f"{name}_macro"], expect, rtol=1e-12, equal_nan=True)


def _thresholds_reference(y, p):
    """Try every distinct validation score as a threshold on boolean masks; ties -> highest."""
    m = ~np.isnan(y)
    y, p = y[m] == 1, p[m]
    if not y.any():
        return np.nan
    cands = np.unique(p)[::-1]
    f1s = np.array([2 * (y & (p >= t)).sum() / (y.sum() + (p >= t).sum()) for t in cands])
    return cands[np.flatnonzero(f1s >= f1s.max() - 1e-12)[0]]


# ----------------------------------------------------------------------------- one condition / per condition


@SETTINGS
@given(data(max_c=1))
def test_binary_functions_match_sklearn(d):
    Y, P, _ = d
    y, p = Y[:, 0], P[:, 0]
    ref = _sk_condition(y, p, np.nan)
    for name, fn in (("auc", ML.auc), ("ap", ML.average_precision), ("adjusted_auprc", ML.adjusted_auprc), ("ece", ML.ece)):
        np.testing.assert_allclose(fn(y, p), ref[name], rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=name)


@SETTINGS
@given(data(), st.integers(0, 4))
def test_condition_metrics_match_sklearn(d, k):
    Y, P, _ = d
    t = np.full(Y.shape[1], k / 4)  # on the coarse score grid: thresholds tie with scores
    _check_against_sklearn(ML.condition_metrics(Y, P, thresholds=t), Y, P, t)


@SETTINGS
@given(data())
def test_thresholds_are_max_f1_on_validation(d):
    Y, P, _ = d
    t = ML.choose_thresholds(Y, P)
    for c in range(Y.shape[1]):
        y, p = Y[:, c], P[:, c]
        ref = _thresholds_reference(y, p)
        np.testing.assert_equal(t[c], ref)
        if not np.isnan(ref):  # scikit-learn: the best F1 over precision_recall_curve's thresholds
            m = ~np.isnan(y)
            prec, rec, thr = precision_recall_curve(y[m], p[m])
            with np.errstate(invalid="ignore"):
                f = np.nan_to_num(2 * prec * rec / (prec + rec))[:-1]
            assert t[c] in thr and f[thr == t[c]][0] == pytest.approx(f.max())
            assert f1_score(y[m], p[m] >= t[c]) == pytest.approx(f.max())


def test_threshold_tie_goes_to_highest_and_rule_is_recorded():
    # p >= 0.8 and p >= 0.2 both give F1 = 2/3 (TP 1 of 2 positives, FP 0 / TP 2, FP 2).
    y = np.array([[1], [1], [0], [0]], dtype=float)
    p = np.array([[0.8], [0.2], [0.5], [0.5]])
    f = [f1_score(y[:, 0], p[:, 0] >= t) for t in (0.8, 0.5, 0.2)]
    assert f[0] == pytest.approx(f[2]) and f[0] > f[1]
    assert ML.choose_thresholds(y, p)[0] == 0.8
    assert "highest" in ML.THRESHOLD_RULE and "validation" in ML.THRESHOLD_RULE


# ----------------------------------------------------------------------------- groups


@FEW
@given(data())
def test_group_values_match_sklearn_on_masks(d):
    Y, P, g = d
    t = ML.choose_thresholds(Y, P)
    groups = by_group(ML.condition_metrics, Y, P, g, levels=LEVELS, thresholds=t)
    for a in LEVELS:
        m = g == a
        _check_against_sklearn(groups[a], Y[m], P[m], t)


@FEW
@given(data())
def test_rates_and_eqodds_worst_match_fairlearn(d):
    Y, P, g = d
    t = np.full(Y.shape[1], 0.5)
    groups = by_group(ML.condition_metrics, Y, P, g, levels=LEVELS, thresholds=t)
    eq_max = ML.equalized_odds(Y, P, g, LEVELS, t, form="worst")
    for c in range(Y.shape[1]):
        m = ~np.isnan(Y[:, c])
        yc, pred, gc = Y[m, c].astype(int), (P[m, c] >= 0.5).astype(int), g[m]
        if len(yc) < 2:  # fairlearn squeezes a single sample into a 0-d array and fails
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mf = MetricFrame(metrics={"tpr": true_positive_rate, "fpr": false_positive_rate},
                             y_true=yc, y_pred=pred, sensitive_features=pd.Series(gc, name="g"))
            eod = equalized_odds_difference(yc, pred, sensitive_features=gc)
        for a, row in mf.by_group.iterrows():
            has_pos, has_neg = (yc[gc == a] == 1).any(), (yc[gc == a] == 0).any()
            # fairlearn gives 0 for 0/0, our rule NaN: compare where defined.
            np.testing.assert_allclose(groups[a]["tpr"][c], row["tpr"] if has_pos else np.nan, equal_nan=True)
            np.testing.assert_allclose(groups[a]["fpr"][c], row["fpr"] if has_neg else np.nan, equal_nan=True)
        defined = all((yc[gc == a] == 1).any() and (yc[gc == a] == 0).any() for a in LEVELS)
        if defined:
            assert eq_max[c] == pytest.approx(eod)
        else:
            assert np.isnan(eq_max[c])


def _group_reference(Y, P, g, levels, t):
    """Every GROUP_METRICS metric, per condition and macro, from per-group sklearn values, pair by pair."""
    per = {}
    for a in levels:
        conds = [_sk_condition(Y[g == a, c], P[g == a, c], t[c]) for c in range(Y.shape[1])]
        per[a] = {k: np.array([m[k] for m in conds]) for k in ("auc", "tpr", "fpr", "fnr", "ece")}
    overall = np.array([_sk_condition(Y[:, c], P[:, c], t[c])["auc"] for c in range(Y.shape[1])])
    pairs = list(itertools.permutations(levels, 2))

    def gap(bases, absolute):
        def one(a, b):
            ds = [per[a][k] - per[b][k] for k in bases]
            return [np.abs(x) if absolute else x for x in ds]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            cond = [sum(one(a, b)) / len(bases) for a, b in pairs]
            macro = [sum(np.nanmean(x) for x in one(a, b)) / len(bases) for a, b in pairs]
        # Max over pairs with NaN propagating (np.max), as the rule says.
        return (cond[0], macro[0]) if len(levels) == 2 else (np.max(cond, axis=0), np.max(macro))

    def macro(x):
        return np.nan if np.isnan(x).all() else np.nanmean(x)

    aucs = np.array([per[a]["auc"] for a in levels])
    worst = aucs.min(0)
    es = overall / (1 + np.abs(aucs - overall).sum(0))
    rng_ = np.maximum(*(np.array([per[a][k] for a in levels]).max(0) - np.array([per[a][k] for a in levels]).min(0)
                        for k in ("tpr", "fpr")))
    return {"auc_gap": gap(["auc"], False), "worst_group_auc": (worst, macro(worst)), "es_auc": (es, macro(es)),
            "eqodds": gap(["tpr", "fpr"], True), "eqodds_worst": (rng_, macro(rng_)),
            "fnr_gap": gap(["fnr"], False), "ece_gap": gap(["ece"], True)}


@FEW
@given(data(), st.sampled_from([2, 3]))
def test_group_metrics_match_pairwise_reference(d, n_groups):
    Y, P, g = d
    levels = LEVELS[:n_groups]
    keep = np.isin(g, levels)
    Y, P, g = Y[keep], P[keep], g[keep]
    if not len(g):
        return
    t = ML.choose_thresholds(Y, P)
    out = ML.evaluate_multilabel(Y, P, _names(Y.shape[1]), {"g": (g, levels)}, t)
    ref = _group_reference(Y, P, g, levels, t)
    for name, (cond, macro) in ref.items():
        for c in range(Y.shape[1]):
            np.testing.assert_allclose(out[(name, "g", "", f"k{c}")], cond[c], rtol=1e-12, atol=1e-12, equal_nan=True,
                                       err_msg=f"{name} k{c}")
        np.testing.assert_allclose(out[(name, "g", "", "")], macro, rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=name)
        per_c, mac = ML.group_metric(name, Y, P, g, levels, thresholds=t)  # the public entry point too
        np.testing.assert_allclose(per_c, cond, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_group_metrics_by_hand():
    # Perfect ranking on M, inverted on F; one condition, threshold 0.5.
    Y = np.array([[1], [0], [1], [0], [1], [0], [1], [0]], dtype=float)
    P = np.array([[.9], [.1], [.8], [.2], [.3], [.7], [.4], [.6]])
    sex = np.array(["M"] * 4 + ["F"] * 4)
    t = np.array([0.5])
    out = ML.evaluate_multilabel(Y, P, ["x"], {"sex": (sex, ["M", "F"])}, t)
    auc = roc_auc_score(Y[:, 0], P[:, 0])
    assert out[("auc", "sex", "M", "x")] == 1.0 and out[("auc", "sex", "F", "x")] == 0.0
    assert out[("auc_gap", "sex", "", "x")] == 1.0  # reference (M) minus F: signed
    assert out[("fnr_gap", "sex", "", "x")] == -1.0  # F misses every case
    assert out[("eqodds", "sex", "", "x")] == 1.0 and out[("eqodds_worst", "sex", "", "x")] == 1.0
    assert out[("worst_group_auc", "sex", "", "x")] == 0.0
    assert out[("es_auc", "sex", "", "x")] == pytest.approx(auc / (1 + abs(1 - auc) + abs(0 - auc)))
    assert out[("es_auc", "sex", "", "")] == out[("es_auc", "sex", "", "x")]
    # Reversed level order flips the signed gaps.
    rev = ML.evaluate_multilabel(Y, P, ["x"], {"sex": (sex, ["F", "M"])}, t)
    assert rev[("auc_gap", "sex", "", "x")] == -1.0


@FEW
@given(data(), st.integers(0, 2**32 - 1))
def test_planned_group_values_equal_by_group_exactly(d, seed):
    """evaluate_multilabel's one planned pass over all groups = groups.by_group of condition_metrics, bit for bit."""
    Y, P, g = d
    t = ML.choose_thresholds(Y, P)
    w = np.random.default_rng(seed).integers(0, 3, (3, len(Y))).astype(float)
    levels = LEVELS + ["none"]
    out = ML.evaluate_multilabel(Y, P, _names(Y.shape[1]), {"g": (g, levels)}, t, weights=w)
    for a, values in by_group(ML.condition_metrics, Y, P, g, levels=levels, thresholds=t, weights=w).items():
        for name in ML.OVERALL_METRICS:
            for c in range(Y.shape[1]):
                np.testing.assert_array_equal(out[(name, "g", a, f"k{c}")], values[name][..., c], err_msg=f"{a} {name}")
        for name in ML.MACRO_METRICS:
            np.testing.assert_array_equal(out[(f"{name}_macro", "g", a, "")], values[f"{name}_macro"])


def test_five_groups_gap_is_max_minus_min():
    rng = np.random.default_rng(3)
    n = 400
    age = np.array(["18-25", "25-50", "50-65", "65-80", "80+"])[rng.integers(0, 5, n)]
    Y = rng.integers(0, 2, (n, 2)).astype(float)
    P = np.clip(Y * 0.3 + rng.random((n, 2)) * 0.7, 0, 1)
    levels = sorted(set(age))
    aucs = ML.auc_by_group(Y, P, age, levels)
    stacked = np.stack([aucs[a] for a in levels])
    np.testing.assert_allclose(ML.auc_gap(Y, P, age, levels), stacked.max(0) - stacked.min(0))
    np.testing.assert_allclose(ML.worst_group_auc(Y, P, age, levels), stacked.min(0))


# ----------------------------------------------------------------------------- bootstrap replicates


@SETTINGS
@given(data(max_n=20), st.integers(0, 2**32 - 1))
def test_each_replicate_equals_plain_metrics_on_its_resample(d, seed):
    Y, P, g = d
    names = _names(Y.shape[1])
    idx = np.random.default_rng(seed).integers(0, len(Y), size=(3, len(Y)))
    w = resample_counts(idx, len(Y))
    t = ML.choose_thresholds(Y, P)
    batched = ML.evaluate_multilabel(Y, P, names, {"g": (g, LEVELS)}, t, weights=w)
    chunked = ML.evaluate_multilabel(Y, P, names, {"g": (g, LEVELS)}, t, weights=w, chunk_bytes=1)  # one row each
    # Weights over 255 take the float64 path instead of the byte/integer one; every metric is a ratio.
    scaled = ML.evaluate_multilabel(Y, P, names, {"g": (g, LEVELS)}, t, weights=300 * w)
    one = {fn: fn(Y[:, 0], P[:, 0], weights=w) for fn in (ML.auc, ML.average_precision, ML.adjusted_auprc, ML.ece)}
    for r in range(len(w)):
        rep = np.repeat(np.arange(len(Y)), w[r].astype(int))  # the resample written out
        plain = ML.evaluate_multilabel(Y[rep], P[rep], names, {"g": (g[rep], LEVELS)}, t)
        assert plain.keys() == batched.keys()
        for key, v in plain.items():
            np.testing.assert_allclose(batched[key][r], v, rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=str(key))
            np.testing.assert_allclose(chunked[key][r], batched[key][r], rtol=1e-12, atol=1e-15, equal_nan=True,
                                       err_msg=str(key))  # sums in another order: last-bit differences
            if not key[0].startswith("ece_debiased"):  # weights are frequencies there, not a ratio's (test_calibration)
                np.testing.assert_allclose(scaled[key][r], batched[key][r], rtol=1e-9, atol=1e-12, equal_nan=True,
                                           err_msg=str(key))
        for fn, reps in one.items():  # the one-condition functions too
            np.testing.assert_allclose(reps[r], fn(Y[rep, 0], P[rep, 0]), rtol=1e-9, atol=1e-12, equal_nan=True)


@SETTINGS
@given(data(max_c=1), st.integers(0, 2**32 - 1))
def test_fractional_weights_match_sklearn_sample_weight(d, seed):
    Y, P, _ = d
    y, p = Y[:, 0], P[:, 0]
    w = np.random.default_rng(seed).uniform(0.1, 2.0, len(y))
    m = ~np.isnan(y)
    yk, pk, wk = y[m].astype(int), p[m], w[m]
    both = 0 < yk.sum() < len(yk)
    np.testing.assert_allclose(ML.auc(y, p, weights=w), roc_auc_score(yk, pk, sample_weight=wk) if both else np.nan,
                               rtol=1e-9, equal_nan=True)
    ap = average_precision_score(yk, pk, sample_weight=wk) if yk.sum() else np.nan
    np.testing.assert_allclose(ML.average_precision(y, p, weights=w), ap, rtol=1e-9, equal_nan=True)


def test_weights_broadcast_over_leading_axes():
    rng = np.random.default_rng(0)
    Y, P = rng.integers(0, 2, (12, 2)).astype(float), rng.random((12, 2))
    g = np.array(list("ab") * 6)
    w = rng.integers(0, 3, (2, 3, 12)).astype(float)
    t = np.array([0.5, 0.5])
    out = ML.evaluate_multilabel(Y, P, ["x", "z"], {"g": (g, ["a", "b"])}, t, weights=w, chunk_bytes=8 * 12 * 2)
    one = ML.evaluate_multilabel(Y, P, ["x", "z"], {"g": (g, ["a", "b"])}, t, weights=w[1, 2])
    for k, v in out.items():
        assert v.shape == (2, 3), k
        np.testing.assert_allclose(v[1, 2], one[k], equal_nan=True, err_msg=str(k))
    assert ML.auc(Y[:, 0], P[:, 0], weights=w).shape == (2, 3)


def test_replicates_without_positives_are_nan_and_skipped_by_interval():
    Y = np.array([[1], [0], [0], [0]], dtype=float)
    P = np.array([[.9], [.1], [.4], [.3]])
    w = np.array([[1, 1, 1, 1], [0, 2, 1, 1], [2, 1, 1, 0]], dtype=float)  # replicate 1 has no positive
    reps = ML.auc_per_condition(Y, P, weights=w)[:, 0]
    assert reps[0] == 1.0 and np.isnan(reps[1]) and reps[2] == 1.0
    lo, hi = interval(reps)
    assert lo == 1.0 and hi == 1.0
    ap = ML.condition_metrics(Y, P, weights=w)["adjusted_auprc"][:, 0]
    assert np.isnan(ap[1]) and ap[0] == 1.0


# ----------------------------------------------------------------------------- edge cases, bad input


def test_edge_cases_follow_the_nan_rule():
    Y = np.array([[1, np.nan, 0], [0, np.nan, 0], [1, np.nan, 0], [0, np.nan, 1]])
    P = np.array([[.9, .5, .2], [.2, .5, .1], [.7, .5, .3], [.1, .5, .8]])
    g = np.array(["a", "a", "b", "b"])
    t = ML.choose_thresholds(Y, P)
    assert np.isnan(t[1])  # all masked: no threshold
    m = ML.condition_metrics(Y, P, thresholds=t)
    assert all(np.isnan(m[k][1]) for k in ML.OVERALL_METRICS)  # all masked: every metric NaN
    assert m["auc_macro"] == pytest.approx(np.mean([m["auc"][0], m["auc"][2]]))  # NaN condition skipped
    # Group "a" has no positive of condition 2: its AUC is NaN and so is every group combination.
    out = ML.evaluate_multilabel(Y, P, ["x", "y", "z"], {"g": (g, ["a", "b"])}, t)
    assert np.isnan(out[("auc", "g", "a", "z")])
    for name in ("auc_gap", "worst_group_auc", "es_auc"):
        assert np.isnan(out[(name, "g", "", "z")]), name
    # An empty group level: everything over groups NaN, per condition and macro.
    out = ML.evaluate_multilabel(Y, P, ["x", "y", "z"], {"g": (g, ["a", "b", "none"])}, t)
    for spec in ML.GROUP_METRICS:
        assert np.isnan(out[(spec.name, "g", "", "x")]), spec.name
    # scikit-learn returns AP 0 without positives; our rule says NaN.
    assert np.isnan(ML.average_precision(np.zeros(3), np.array([.1, .2, .3])))
    # Only positives: AUC and adjusted AUPRC undefined, AP 1.
    assert np.isnan(ML.auc(np.ones(3), np.array([.1, .2, .3])))
    assert ML.average_precision(np.ones(3), np.array([.1, .2, .3])) == 1.0
    assert np.isnan(ML.adjusted_auprc(np.ones(3), np.array([.1, .2, .3])))
    # All scores tied: AUC one half, AP = prevalence, adjusted AUPRC 0.
    y = np.array([1.0, 0, 0, 1, 0])
    assert ML.auc(y, np.full(5, .5)) == 0.5
    assert ML.average_precision(y, np.full(5, .5)) == pytest.approx(0.4)
    assert ML.adjusted_auprc(y, np.full(5, .5)) == pytest.approx(0.0)


def test_no_samples_at_all():
    Y, P = np.zeros((0, 2)), np.zeros((0, 2))
    m = ML.condition_metrics(Y, P, thresholds=np.array([.5, .5]), weights=np.zeros((3, 0)))
    assert all(np.isnan(v).all() and v.shape[0] == 3 for v in m.values())
    assert np.isnan(ML.choose_thresholds(Y, P)).all()


@pytest.mark.parametrize("call, match", [
    (lambda: ML.auc(np.array([0, 2.0]), np.array([.1, .2])), "1, 0 or NaN"),
    (lambda: ML.auc(np.array([0, 1.0]), np.array([.1, np.nan])), "finite"),
    (lambda: ML.condition_metrics(np.zeros((3, 2)), np.zeros((3, 1))), r"\(N, C\)"),
    (lambda: ML.condition_metrics(np.zeros((3, 2)), np.zeros((3, 2)), thresholds=[.5]), "one per condition"),
    (lambda: by_group(ML.condition_metrics, np.zeros((3, 2)), np.zeros((3, 2)), ["a"], levels=["a"]), "one per sample"),
    (lambda: ML.evaluate_multilabel(np.zeros((3, 2)), np.zeros((3, 2)), ["x"], {}, [.5, .5]), "condition names"),
    (lambda: ML.group_metric("eqodds", np.zeros((3, 1)), np.zeros((3, 1)), np.array(list("aab")), ["a", "b"]),
     "thresholds"),
    (lambda: ML.group_metric("auc_diff", np.zeros((3, 1)), np.zeros((3, 1)), np.array(list("aab")), ["a", "b"]),
     "unknown group metric"),
    (lambda: ML.equalized_odds(np.zeros((3, 1)), np.zeros((3, 1)), np.array(list("aab")), ["a", "b"], [.5], form="avg"),
     "form"),
    (lambda: ML.auc(np.array([0, 1.0]), np.array([.1, .2]), weights=np.ones(3)), "columns"),
])
def test_bad_input_is_one_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_every_reported_metric_is_defined():
    Y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=float)
    P = np.array([[.9, .2], [.2, .8], [.6, .7], [.3, .1]])
    out = ML.evaluate_multilabel(Y, P, ["x", "z"], {"g": (np.array(list("aabb")), ["a", "b"])}, [.5, .5])
    names = {k[0] for k in out}
    assert names == set(ML.MULTILABEL_METRIC_DEFINITIONS)
    # The long-table shape of metrics.evaluate_all: string keys, one number per key.
    assert all(len(k) == 4 and all(isinstance(x, str) for x in k) and np.ndim(v) == 0 for k, v in out.items())
    assert out[("auc", "g", "a", "x")] == 1.0 and ("auc_macro", "", "", "") in out and ("eqodds", "g", "", "z") in out
    assert all(ML.MULTILABEL_METRIC_DEFINITIONS[n].endswith(".") for n in names)
