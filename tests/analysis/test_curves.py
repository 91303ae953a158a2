"""Curve points against scikit-learn: ROC (roc_curve) and reliability bins (calibration_curve)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import auc, roc_curve

from cxrfair.analysis import curves as C
from cxrfair.core.metrics import ece, roc_auc
from cxrfair.core.runs import Run, make_predictions

from .synth import CLASSES, cohort_rows, probs_for


@pytest.mark.parametrize("seed, ties", [(0, False), (1, True), (2, True)])
def test_roc_points_match_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60).astype(bool)
    score = rng.normal(size=60) + y
    if ties:
        score = np.round(score, 0)  # many tied scores, pos and neg together
    fpr, tpr, thr = C.roc_points(y, score)
    ref_fpr, ref_tpr, ref_thr = roc_curve(y, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    np.testing.assert_allclose(thr[1:], ref_thr[1:])
    assert np.isinf(thr[0])
    assert auc(fpr, tpr) == pytest.approx(roc_auc(y.astype(int), np.c_[-score, score])[1])


def test_roc_points_without_negatives_is_nan():
    fpr, tpr, _ = C.roc_points(np.ones(5, bool), np.arange(5.0))
    assert np.isnan(fpr).all() and np.allclose(tpr, np.linspace(0, 1, 6))
    assert np.isnan(C.roc_on_grid(fpr, tpr)).all()


def test_roc_on_grid_reads_the_top_of_each_step():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200).astype(bool)
    score = rng.normal(size=200) + 1.5 * y
    fpr, tpr, _ = roc_curve(y, score, drop_intermediate=False)
    grid = C.roc_on_grid(*C.roc_points(y, score)[:2])
    # At each grid FPR, the best TPR reachable at that FPR or below (the step function), and
    # never below it; between points it is linear, so at most one step above.
    best = np.array([tpr[fpr <= g + 1e-12].max() for g in C.FPR_GRID])
    assert (grid >= best - 1e-12).all()
    assert grid[0] == pytest.approx(tpr[fpr == 0].max()) and grid[-1] == 1.0
    assert np.all(np.diff(grid) >= -1e-12)


@pytest.mark.parametrize("n_bins", [5, 15])
def test_reliability_bins_match_sklearn_and_add_up_to_ece(n_bins):
    rows = cohort_rows(60)
    y = rows["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    probs = probs_for(rows, skill=1.2, seed=4)
    conf, correct = probs.max(1), (probs.argmax(1) == y).astype(float)
    b = C.reliability_bins(conf, correct, n_bins)
    prob_true, prob_pred = calibration_curve(correct, conf, n_bins=n_bins, strategy="uniform")
    np.testing.assert_allclose(b["accuracy"], prob_true)
    np.testing.assert_allclose(b["confidence"], prob_pred)
    assert b["count"].sum() == len(y)
    gap = (b["count"] * (b["accuracy"] - b["confidence"]).abs()).sum() / len(y)
    assert gap == pytest.approx(float(ece(y, probs, n_bins=n_bins)), abs=1e-12)


def test_bin_index_agrees_with_ece_on_bin_edges():
    """Confidences exactly on edges (0.2, 1/3, 1.0) land where metrics.ece puts them: (lo, hi]."""
    conf = np.array([0.0, 0.2, 1 / 3, 0.5, 1.0])
    assert C.bin_index(conf, 15).tolist() == [0, 2, 4, 7, 14]
    # Three classes so every top-label confidence above (0.6, 0.7, 0.8, 1.0) is the given one.
    top = np.array([0.6, 0.7, 0.8, 1.0, 2 / 3])
    probs = np.c_[top, (1 - top) / 2, (1 - top) / 2]
    y = np.array([0, 1, 0, 0, 2])
    b = C.reliability_bins(probs.max(1), (probs.argmax(1) == y).astype(float), 15)
    gap = (b["count"] * (b["accuracy"] - b["confidence"]).abs()).sum() / len(y)
    assert gap == pytest.approx(float(ece(y, probs)), abs=1e-12)


def _run(model, method, seed, probs, rows):
    meta = {"run_id": f"{model}__{method}__best__s{seed}", "model": model, "method": method, "seed": seed,
            "classes": CLASSES}
    return Run(meta, make_predictions(rows, probs, CLASSES), None)


def test_roc_table_averages_seeds_vertically():
    rows = cohort_rows(40)
    p0, p1 = probs_for(rows, skill=1.0, seed=1), probs_for(rows, skill=2.0, seed=2)
    runs = [_run("m", "linear", 0, p0, rows), _run("m", "linear", 1, p1, rows)]
    t = C.roc_table(runs, "test", ("sex", "age_group"))
    assert set(t["attribute"]) == {"sex", "age_group", "sex×age"} and set(t["n_runs"]) == {2}
    test = rows[rows["split"] == "test"]
    m = (test["sex"] == "F").to_numpy()
    y = test["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()[m]
    j = CLASSES.index("Effusion")
    p_test = [p[(rows["split"] == "test").to_numpy()][m] for p in (p0, p1)]
    expected = np.mean([C.roc_on_grid(*roc_curve(y == j, p[:, j], drop_intermediate=False)[:2]) for p in p_test], axis=0)
    got = t[(t["attribute"] == "sex") & (t["group"] == "F") & (t["class"] == "Effusion")]["tpr"].to_numpy()
    np.testing.assert_allclose(got, expected)


def test_reliability_table_pools_seeds():
    rows = cohort_rows(40)
    p0, p1 = probs_for(rows, skill=1.0, seed=1), probs_for(rows, skill=2.0, seed=2)
    runs = [_run("m", "lora", 0, p0, rows), _run("m", "lora", 1, p1, rows)]
    t = C.reliability_table(runs, "test", ("sex",))
    got = t[(t["group"] == "M")].reset_index(drop=True)
    test = (rows["split"] == "test").to_numpy() & (rows["sex"] == "M").to_numpy()
    y = rows["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()[test]
    conf = np.r_[p0[test].max(1), p1[test].max(1)]
    ok = np.r_[p0[test].argmax(1) == y, p1[test].argmax(1) == y]
    pd.testing.assert_frame_equal(got[["bin", "count", "confidence", "accuracy"]],
                                  C.reliability_bins(conf, ok)[["bin", "count", "confidence", "accuracy"]])
    assert set(got["n_runs"]) == {2}


def test_tables_of_no_runs_are_empty_with_columns():
    assert list(C.roc_table([], "test", ("sex",)).columns) == C.ROC_COLUMNS
    assert list(C.reliability_table([], "test", ("sex",)).columns) == C.RELIABILITY_COLUMNS
