"""Metrics against scikit-learn / fairlearn and against slow references written here.

Inputs are drawn by hypothesis with coarse probabilities, so ties in scores and in the arg-max,
classes absent from a group and groups of one sample all come up.
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
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

from cxrfair.core import metrics as M
from cxrfair.core.bootstrap import resample_counts
from cxrfair.core.groups import by_group
from cxrfair.core.multilabel import MULTILABEL_METRIC_DEFINITIONS

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def data(draw, max_n=30):
    """(y (N,), probs (N, C), groups (N,)) with coarse probabilities (ties) and small groups."""
    c = draw(st.integers(2, 4))
    n = draw(st.integers(1, max_n))
    y = np.array(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    grid = np.array(draw(st.lists(st.integers(0, 3), min_size=n * c, max_size=n * c)), dtype=float).reshape(n, c) + 0.5
    probs = grid / grid.sum(1, keepdims=True)
    groups = np.array(draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=n, max_size=n)))
    return y, probs, groups


def _sk_f1(y, pred, c):
    return f1_score(y, pred, labels=list(range(c)), average=None, zero_division=np.nan)


@SETTINGS
@given(data())
def test_confusion_counts_match_sklearn(d):
    y, p, _ = d
    c = p.shape[1]
    cm = confusion_matrix(y, p.argmax(1), labels=list(range(c)))
    k = M.confusion_counts(y, p)
    np.testing.assert_array_equal(k.tp, np.diag(cm))
    np.testing.assert_array_equal(k.fp, cm.sum(0) - np.diag(cm))
    np.testing.assert_array_equal(k.fn, cm.sum(1) - np.diag(cm))
    np.testing.assert_array_equal(k.tn, len(y) - cm.sum(0) - cm.sum(1) + np.diag(cm))


@SETTINGS
@given(data())
def test_accuracy_f1_var_match_sklearn(d):
    y, p, _ = d
    c, pred = p.shape[1], p.argmax(1)
    assert M.accuracy(y, p) == pytest.approx(accuracy_score(y, pred))
    ref = _sk_f1(y, pred, c)
    np.testing.assert_allclose(M.f1(y, p), ref, equal_nan=True)
    if np.isnan(ref).all():
        assert np.isnan(M.f1_macro(y, p))
    else:
        assert M.f1_macro(y, p) == pytest.approx(f1_score(y, pred, labels=list(range(c)), average="macro", zero_division=np.nan))
        assert M.var_f1(y, p) == pytest.approx(np.nanvar(ref), abs=1e-12)


@SETTINGS
@given(data())
def test_auc_matches_sklearn_with_ties(d):
    y, p, _ = d
    got = M.roc_auc(y, p)
    for c in range(p.shape[1]):
        if 0 < (y == c).sum() < len(y):
            assert got[c] == pytest.approx(roc_auc_score(y == c, p[:, c]))
        else:  # one class only: undefined
            assert np.isnan(got[c])


@SETTINGS
@given(data())
def test_tpr_fpr_by_group_match_fairlearn(d):
    y, p, g = d
    pred = p.argmax(1)
    tprs = by_group(M.tpr, y, p, g)
    fprs = by_group(M.fpr, y, p, g)
    for c in range(p.shape[1]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mf = MetricFrame(metrics={"tpr": true_positive_rate, "fpr": false_positive_rate},
                             y_true=(y == c).astype(int), y_pred=(pred == c).astype(int), sensitive_features=pd.Series(g, name="g"))
        for grp, row in mf.by_group.iterrows():
            m = g == grp
            # fairlearn gives 0 for 0/0; our NaN rule gives NaN: compare where defined.
            if (y[m] == c).any():
                assert tprs[grp][c] == pytest.approx(row["tpr"])
            else:
                assert np.isnan(tprs[grp][c])
            if (y[m] != c).any():
                assert fprs[grp][c] == pytest.approx(row["fpr"])
            else:
                assert np.isnan(fprs[grp][c])


def _ece_loop(y, p, n_bins=15):
    conf, pred = p.max(1), p.argmax(1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.sum() / len(y) * abs((pred[m] == y[m]).mean() - conf[m].mean())
    return total


@SETTINGS
@given(data())
def test_ece_matches_loop_and_paper_formula(d):
    y, p, _ = d
    assert M.ece(y, p) == pytest.approx(_ece_loop(y, p), abs=1e-12)
    assert M.ece_paper(y, p) == pytest.approx(np.mean(np.abs(p.max(1) - (p.argmax(1) == y))))


def _levels(g):
    return sorted(set(g.tolist()))


def _gap_reference(y, p, g, levels):
    """The group metrics recomputed on boolean masks with scikit-learn, pair by pair."""
    c, pred = p.shape[1], p.argmax(1)
    f1s = {a: _sk_f1(y[g == a], pred[g == a], c) if (g == a).any() else np.full(c, np.nan) for a in levels}

    def rate(a, truth):  # TPR (truth) or FPR (not truth) per class, NaN when 0/0
        m = g == a
        out = []
        for k in range(c):
            base = (y[m] == k) if truth else (y[m] != k)
            out.append((pred[m][base] == k).mean() if base.any() else np.nan)
        return np.array(out)

    def pair(a, b):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            f1_gap = np.nanmean(f1s[a] - f1s[b])
            eq = 0.5 * (np.nanmean(np.abs(rate(a, True) - rate(b, True))) + np.nanmean(np.abs(rate(a, False) - rate(b, False))))
        return f1_gap, eq

    pairs = [pair(a, b) for a, b in itertools.permutations(levels, 2)]
    if len(levels) == 2:
        return pairs[0]
    return tuple(np.max([q[i] for q in pairs]) for i in range(2))


@SETTINGS
@given(data())
def test_gap_metrics_match_masked_reference(d):
    y, p, g = d
    levels = _levels(g)
    if len(levels) < 2:
        levels = levels + ["zz"]  # an empty group: every gap is NaN by the rule
    out = M.evaluate_all(y, p, [f"k{i}" for i in range(p.shape[1])], {"g": (g, levels)})
    f1_gap, eq = _gap_reference(y, p, g, levels)
    np.testing.assert_allclose(out[("f1_gap", "g", "", "")], f1_gap, equal_nan=True, atol=1e-12)
    np.testing.assert_allclose(out[("eqodds", "g", "", "")], eq, equal_nan=True, atol=1e-12)
    np.testing.assert_allclose(out[("f1_gap_abs", "g", "", "")], abs(f1_gap), equal_nan=True, atol=1e-12)
    acc = [accuracy_score(y[g == a], p[g == a].argmax(1)) if (g == a).any() else np.nan for a in levels]
    np.testing.assert_allclose(out[("worst_group_accuracy", "g", "", "")], np.min(acc), equal_nan=True)


def _fairlearn_per_class(y, p, g, agg):
    """fairlearn's equalized_odds_difference of each class one-vs-rest; NaN where a group lacks
    positives or negatives of the class (fairlearn scores 0/0 rates as 0, our rule makes them NaN)."""
    pred, out = p.argmax(1), []
    for c in range(p.shape[1]):
        defined = all(((y[g == a] == c).any() and (y[g == a] != c).any()) for a in set(g.tolist()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v = equalized_odds_difference((y == c).astype(int), (pred == c).astype(int), sensitive_features=g, agg=agg)
        out.append(v if defined else np.nan)
    return np.array(out)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # fairlearn is slow
@given(data(max_n=20))
def test_eqodds_worst_is_fairlearns_equalized_odds_difference_per_class(d):
    y, p, g = d
    levels = _levels(g)
    out = M.evaluate_all(y, p, [f"k{i}" for i in range(p.shape[1])], {"g": (g, levels)})
    got = out[("eqodds_worst", "g", "", "")]
    if len(levels) < 2:
        assert np.isnan(got)
        return
    ref = _fairlearn_per_class(y, p, g, "worst_case")
    np.testing.assert_allclose(got, np.nanmean(ref) if (~np.isnan(ref)).any() else np.nan, equal_nan=True, atol=1e-12)
    # The paper's eqodds is fairlearn's agg="mean" per class (two groups, every class defined).
    if len(levels) == 2 and not np.isnan(ref).any():
        mean_ref = _fairlearn_per_class(y, p, g, "mean")
        assert out[("eqodds", "g", "", "")] == pytest.approx(mean_ref.mean(), abs=1e-12)


def test_eqodds_worst_and_f1_gap_abs_by_hand():
    # Class 0: TPR 1 vs 0.5 (gap .5), FPR 0 vs 0 -> worst .5; class 1: TPR 1 vs 1, FPR 0 vs .5 -> .5.
    y = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    pred = np.array([0, 0, 1, 1, 0, 1, 1, 1])
    p = np.eye(2)[pred] * 0.8 + 0.1
    g = np.array(["M"] * 4 + ["F"] * 4)
    out = M.evaluate_all(y, p, ["a", "b"], {"sex": (g, ["F", "M"])})  # F as the reference this time
    assert out[("eqodds_worst", "sex", "", "")] == pytest.approx(0.5)
    assert out[("eqodds", "sex", "", "")] == pytest.approx(0.25)  # (1/2C) Σ (|ΔTPR| + |ΔFPR|) = (.5 + .5) / 4
    assert out[("eqodds_worst", "sex", "", "")] == pytest.approx(_fairlearn_per_class(y, p, g, "worst_case").mean())
    assert out[("eqodds", "sex", "", "")] == pytest.approx(_fairlearn_per_class(y, p, g, "mean").mean())
    f1_m, f1_f = 1.0, np.mean([2 / 3, 0.8])  # F's F1: class a 2/3, class b 0.8
    assert out[("f1_gap", "sex", "", "")] == pytest.approx(f1_f - f1_m)  # signed F − M: negative
    assert out[("f1_gap_abs", "sex", "", "")] == pytest.approx(f1_m - f1_f)


def test_every_metric_has_a_definition():
    names = set(M.METRICS) | {s.name for s in M.GROUP_METRICS}
    assert set(M.metric_definitions("multiclass")) == names | set(M.SHORTCUT_DEFINITIONS)
    assert set(M.METRIC_DEFINITIONS) == names | set(MULTILABEL_METRIC_DEFINITIONS) | set(M.SHORTCUT_DEFINITIONS)
    assert all(isinstance(v, str) and len(v) > 10 for v in M.METRIC_DEFINITIONS.values())
    assert "fairlearn" in M.METRIC_DEFINITIONS["eqodds_worst"] and "eq. 3" in M.METRIC_DEFINITIONS["eqodds"]


def test_es_auc_and_binary_signs_by_hand():
    # Two groups; the classifier is perfect on A (= "M") and useless on A'.
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    p = np.array([[.9, .1], [.1, .9], [.8, .2], [.2, .8], [.4, .6], [.6, .4], [.3, .7], [.7, .3]])
    g = np.array(["M"] * 4 + ["F"] * 4)
    out = M.evaluate_all(y, p, ["x", "z"], {"sex": (g, ["M", "F"])})
    assert out[("f1_gap", "sex", "", "")] == pytest.approx(1.0)  # F1 1 on M, 0 on F: A − A' > 0
    assert out[("fnr_gap", "sex", "", "")] == pytest.approx(-1.0)  # F misses every case
    assert out[("eqodds", "sex", "", "")] == pytest.approx(1.0)
    auc = roc_auc_score(y, p[:, 1])
    assert out[("es_auc", "sex", "", "")] == pytest.approx(auc / (1 + abs(auc - 1) + abs(auc - 0)))
    assert out[("worst_group_accuracy", "sex", "", "")] == 0.0
    assert out[("accuracy", "sex", "M", "")] == 1.0


def test_edge_cases_follow_the_nan_rule():
    p = np.array([[.7, .2, .1], [.2, .7, .1], [.6, .3, .1]])
    y = np.array([0, 1, 0])  # class 2 never present nor predicted
    f = M.f1(y, p)
    assert np.isnan(f[2]) and M.f1_macro(y, p) == pytest.approx(1.0)
    assert np.isnan(M.roc_auc(y, p)[2])
    one = by_group(M.all_metrics, y, p, np.array(["a", "b", "b"]))["a"]  # a group of one sample
    assert one["accuracy"] == 1.0 and np.isnan(one["auc"]).all() and np.isnan(one["tpr"][1])
    empty = M.all_metrics(y[:0], p[:0])
    assert all(np.isnan(v).all() for v in empty.values())
    ties = np.full((4, 2), 0.5)
    assert M.roc_auc(np.array([0, 1, 0, 1]), ties)[1] == 0.5


@SETTINGS
@given(data(max_n=20), st.integers(0, 2**32 - 1))
def test_each_replicate_equals_plain_metric_on_its_resample(d, seed):
    y, p, g = d
    idx = np.random.default_rng(seed).integers(0, len(y), size=(5, len(y)))
    w = resample_counts(idx, len(y))
    classes = [f"k{i}" for i in range(p.shape[1])]
    levels = _levels(g)
    batched = M.evaluate_all(y, p, classes, {"g": (g, levels)}, weights=w)
    for r in range(len(idx)):
        yr, pr, gr = y[idx[r]], p[idx[r]], g[idx[r]]
        plain = M.evaluate_all(yr, pr, classes, {"g": (gr, levels)})
        for key, v in plain.items():
            np.testing.assert_allclose(batched[key][r], v, rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=str(key))
        for name, (fn, _) in M.METRICS.items():  # the public one-metric functions too
            np.testing.assert_allclose(fn(yr, pr), M.all_metrics(y, p, weights=w)[name][r], rtol=1e-9, atol=1e-12, equal_nan=True)


def test_weights_broadcast_over_leading_axes():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 3, 12), rng.dirichlet(np.ones(3), 12)
    w = rng.integers(0, 3, (2, 4, 12)).astype(float)
    for name, (fn, per_class) in M.METRICS.items():
        out = fn(y, p, weights=w)
        assert out.shape == (2, 4) + ((3,) if per_class else ()), name
        np.testing.assert_allclose(out[1, 2], fn(y, p, weights=w[1, 2]), equal_nan=True)
