"""Post-processing (``thresholds``): searches against brute force, planted-bias behaviour, fairlearn,
the written run, and bad input through the CLI.

The brute-force references here loop in plain Python over every candidate (threshold pairs,
offset values) and score each with the analysis' own metrics, so they share no code with the
fast searches beyond those metrics (which are themselves tested against scikit-learn/fairlearn).
"""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cxrfair.core import groups as G
from cxrfair.core import metrics as M
from cxrfair.core import multilabel as ML
from cxrfair.analysis import postprocess as PP
from cxrfair.core import runs as R
from cxrfair.cli import main
from cxrfair.errors import CxrfairError

from .synth import CLASSES, meta_for



# ----------------------------------------------------------------------------- references


def _ref_rates(y, pred, groups, levels):
    """Per-group (TPR, FPR) of binary predictions, by counting (NaN where undefined)."""
    out = []
    for g in levels:
        m = groups == g
        pos, neg = (y[m] == 1).sum(), (y[m] == 0).sum()
        tp, fp = (pred[m] & (y[m] == 1)).sum(), (pred[m] & (y[m] == 0)).sum()
        out.append((tp / pos if pos else np.nan, fp / neg if neg else np.nan))
    return out


def _ref_gap(rates, constraint):
    """Largest pairwise gap of the constraint, looping over pairs."""
    best = 0.0
    for (t1, f1), (t2, f2) in itertools.combinations(rates, 2):
        d = {"tpr": abs(t1 - t2), "fpr": abs(f1 - f2), "equalized_odds": (abs(t1 - t2) + abs(f1 - f2)) / 2}[constraint]
        best = max(best, d)
    return best


def _ref_f1(y, pred):
    tp, fp, fn = (pred & (y == 1)).sum(), (pred & (y == 0)).sum(), (~pred & (y == 1)).sum()
    return 2 * tp / (2 * tp + fp + fn)


def _ref_best(points):
    """Lexicographic best of [(gap, -f1), ...]: smallest gap, then highest F1 (values only)."""
    gap = min(p[0] for p in points)
    return gap, max(-p[1] for p in points if p[0] <= gap + 1e-12)


def _binary_data(seed, n=40, grid=8, shift=0.25):
    """(y, p, groups) with ties (scores on a grid), group 1's scores shifted down."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(float)
    g = rng.integers(0, 2, n)
    p = np.clip(np.round((0.3 + 0.35 * y + 0.25 * rng.normal(size=n) - shift * g) * grid) / grid, 0, 1)
    return y, p, g


# ----------------------------------------------------------------------------- shared helpers


def test_rate_gap_is_the_largest_pairwise_gap():
    rng = np.random.default_rng(0)
    for g in (1, 2, 3, 5):
        tpr, fpr = rng.random((4, g)), rng.random((4, g))
        for constraint in PP.CONSTRAINTS:
            want = [_ref_gap(list(zip(tpr[i], fpr[i])), constraint) for i in range(4)]
            np.testing.assert_allclose(PP.rate_gap(tpr, fpr, constraint), want, atol=1e-15)


def test_rate_gap_equalized_odds_matches_the_analysis_metric():
    y, p, g = _binary_data(3, n=60)
    t = np.array([0.5])
    want = ML.equalized_odds(y[:, None], p[:, None], g, [0, 1], t)[0]
    rates = _ref_rates(y, p >= 0.5, g, [0, 1])
    got = PP.rate_gap(np.array([r[0] for r in rates]), np.array([r[1] for r in rates]), "equalized_odds")
    assert got == pytest.approx(want, abs=1e-15)


def test_best_index_order():
    feasible = np.array([True, True, True, False, True])
    gap = np.array([0.2, 0.1, 0.1, 0.0, np.nan])
    util = np.array([0.9, 0.5, 0.7, 1.0, 1.0])
    dist = np.array([0.0, 0.0, 0.3, 0.0, 0.0])
    assert PP.best_index(feasible, gap, util, dist) == 2  # smallest feasible gap, then the higher utility
    util[1] = 0.7
    assert PP.best_index(feasible, gap, util, dist) == 1  # then the least distance
    assert PP.best_index(np.zeros(5, bool), gap, util, dist) == -1


# ----------------------------------------------------------------------------- multi-label search


@pytest.mark.parametrize("constraint", PP.CONSTRAINTS)
@pytest.mark.parametrize("seed", range(4))
def test_two_group_thresholds_equal_brute_force(constraint, seed):
    """Every pair of thresholds (each group's distinct validation scores and the source's), scored by counting."""
    y, p, g = _binary_data(seed)
    strength = 0.05
    t, t_star, summary, notes = PP.fit_condition(y, p, g, 2, constraint, strength)
    assert not notes
    f1_star = _ref_f1(y, p >= t_star)
    points = []
    cands = [np.union1d(p[g == k], [t_star]) for k in (0, 1)]
    for ta, tb in itertools.product(*cands):
        pred = np.where(g == 0, p >= ta, p >= tb)
        f1 = _ref_f1(y, pred)
        if f1 >= f1_star - strength - 1e-12:
            points.append((_ref_gap(_ref_rates(y, pred, g, [0, 1]), constraint), -f1))
    want_gap, want_f1 = _ref_best(points)
    pred = np.where(g == 0, p >= t[0], p >= t[1])
    got_gap, got_f1 = _ref_gap(_ref_rates(y, pred, g, [0, 1]), constraint), _ref_f1(y, pred)
    assert got_gap == pytest.approx(want_gap, abs=1e-12)
    assert got_f1 == pytest.approx(want_f1, abs=1e-12)
    assert summary["after"] == pytest.approx((got_gap, got_f1), abs=1e-12)
    assert summary["before"][1] == pytest.approx(f1_star, abs=1e-12)


def test_two_group_search_stays_exact_when_candidates_are_subsampled():
    """With fewer candidates than distinct scores the optimum can only get worse, never infeasible."""
    y, p, g = _binary_data(0, n=200, grid=10**6)
    full = PP.fit_condition(y, p, g, 2, "equalized_odds", 0.02)[2]["after"]
    few = PP.fit_condition(y, p, g, 2, "equalized_odds", 0.02, max_candidates=8)[2]
    assert few["after"][0] >= full[0] - 1e-12
    assert few["after"][1] >= few["before"][1] - 0.02 - 1e-12


@pytest.mark.parametrize("constraint", PP.CONSTRAINTS)
def test_three_group_search_is_coordinatewise_optimal(constraint):
    """No single group's threshold can be moved to a better feasible (gap, F1) than the returned one."""
    rng = np.random.default_rng(7)
    n = 60
    y = (rng.random(n) < 0.4).astype(float)
    g = rng.integers(0, 3, n)
    p = np.clip(np.round((0.3 + 0.3 * y + 0.25 * rng.normal(size=n) - 0.15 * g) * 10) / 10, 0, 1)
    strength = 0.03
    t, t_star, summary, _ = PP.fit_condition(y, p, g, 3, constraint, strength)
    f1_star = _ref_f1(y, p >= t_star)

    def score(th):
        pred = p >= th[g]
        return _ref_gap(_ref_rates(y, pred, g, [0, 1, 2]), constraint), _ref_f1(y, pred)

    gap, f1 = score(t)
    assert f1 >= f1_star - strength - 1e-12
    assert gap <= summary["before"][0] + 1e-12
    for k in range(3):
        for v in np.union1d(p[g == k], [t_star]):
            trial = t.copy()
            trial[k] = v
            gk, fk = score(trial)
            if fk >= f1_star - strength - 1e-12:
                assert not (gk < gap - 1e-12 or (abs(gk - gap) <= 1e-12 and fk > f1 + 1e-12)), (k, v)


def test_fallbacks_for_groups_without_positives_and_conditions_without_positives():
    y = np.array([1, 0, 1, 0, 0, 0, 1, 0], dtype=float)
    p = np.array([0.9, 0.2, 0.7, 0.4, 0.6, 0.3, 0.8, 0.1])
    g = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    t, t_star, _, notes = PP.fit_condition(y, p, g, 3, "equalized_odds", 0.02, group_names=["a", "b", "c"])
    assert t[1] == t_star and any("group b: no validation positives" in n for n in notes)
    t, t_star, _, notes = PP.fit_condition(y, p, g, 3, "fpr", 0.02)
    assert not notes  # FPR needs negatives only: every group has them
    t, t_star, summary, notes = PP.fit_condition(np.zeros(8), p, g, 3, "tpr", 0.02)
    assert np.isnan(t_star) and np.isnan(t).all() and "no validation positives" in notes[0]
    masked = y.copy()
    masked[g == 2] = np.nan  # group c only masked rows: no rates at all
    t, t_star, _, notes = PP.fit_condition(masked, p, g, 3, "tpr", 0.02, group_names=["a", "b", "c"])
    assert t[1] == t[2] == t_star


# ----------------------------------------------------------------------------- the score map


def test_rescale_keeps_each_group_decision_at_the_common_threshold():
    rng = np.random.default_rng(1)
    for t, T in [(0.3, 0.6), (0.7, 0.2), (0.0, 0.4), (1.0, 0.4), (0.5, 1.0), (0.25, 0.25)]:
        p = np.r_[rng.random(500), 0.0, 1.0, t, np.nextafter(t, 0), np.nextafter(t, 1)]
        p = np.clip(p, 0, 1)
        q = PP.rescale(p, t, T)
        np.testing.assert_array_equal(q >= T, p >= t)
        assert ((q >= 0) & (q <= 1)).all()
        order = np.argsort(p, kind="stable")
        assert (np.diff(q[order]) >= 0).all()  # monotone: each group's AUC is unchanged
    p = rng.random(50)
    assert PP.rescale(p, 0.3, 0.3) is p  # unchanged groups keep their scores bit for bit


def test_apply_thresholds_reproduces_group_decisions_and_within_group_auc():
    rng = np.random.default_rng(2)
    n = 300
    Y = (rng.random((n, 2)) < 0.3).astype(float)
    Y[:10, 1] = np.nan
    g = rng.integers(0, 2, n)
    P = 1 / (1 + np.exp(-(rng.normal(size=(n, 2)) + 1.5 * np.nan_to_num(Y) - 0.6 * g[:, None])))
    fit = PP.fit_thresholds(Y, P, g, 2, "equalized_odds", 0.02)
    Q = PP.apply_thresholds(P, g, fit)
    for c in range(2):
        np.testing.assert_array_equal(Q[:, c] >= fit.decision[c], P[:, c] >= fit.params[g, c])
    np.testing.assert_allclose(np.stack(list(ML.auc_by_group(Y, Q, g, [0, 1]).values())),
                               np.stack(list(ML.auc_by_group(Y, P, g, [0, 1]).values())), atol=1e-12)


def _planted_multilabel(seed, n, shift=0.8):
    """Two conditions; group 1's scores shifted down by ``shift`` logits (planted under-diagnosis)."""
    rng = np.random.default_rng(seed)
    Y = (rng.random((n, 2)) < 0.3).astype(float)
    g = rng.integers(0, 2, n)
    P = 1 / (1 + np.exp(-(rng.normal(size=(n, 2)) + 2.0 * Y - 1.0 - shift * g[:, None])))
    return Y, P, g


def _ml_scores(Y, P, g, thresholds):
    eo = ML.equalized_odds(Y, P, g, [0, 1], thresholds)
    f1 = ML.condition_metrics(Y, P, thresholds=thresholds)["f1"]
    tpr = G.by_group(ML.condition_metrics, Y, P, g, levels=[0, 1], thresholds=thresholds)
    return eo, f1, np.abs(tpr[0]["tpr"] - tpr[1]["tpr"])


def test_planted_bias_multilabel_gap_shrinks_on_val_and_test():
    """Behaviour: on held-out test data the TPR/FPR gaps shrink a lot and F1 drops little."""
    Yv, Pv, gv = _planted_multilabel(0, 3000)
    Yt, Pt, gt = _planted_multilabel(1, 3000)
    fit = PP.fit_thresholds(Yv, Pv, gv, 2, "equalized_odds", 0.02)
    t_src = ML.choose_thresholds(Yv, Pv)
    np.testing.assert_array_equal(fit.decision, t_src)  # read at the source's own threshold
    for Y, P, g in ((Yv, Pv, gv), (Yt, Pt, gt)):
        eo0, f10, tgap0 = _ml_scores(Y, P, g, t_src)
        eo1, f11, tgap1 = _ml_scores(Y, PP.apply_thresholds(P, g, fit), g, fit.decision)
        assert (eo0 > 0.1).all()  # the planted bias is there
        assert (eo1 < 0.35 * eo0).all() and (tgap1 < 0.35 * tgap0).all()
        assert (f11 > f10 - 0.04).all()


# ----------------------------------------------------------------------------- multi-class search


def _mc_data(seed, n, n_classes=3, shift=1.0, skill=1.2):
    """(y, P, groups): group 1's logits of class 0 lowered by ``shift`` (planted under-diagnosis)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    g = rng.integers(0, 2, n)
    z = rng.normal(size=(n, n_classes))
    z[np.arange(n), y] += skill
    z[g == 1, 0] -= shift
    P = np.exp(z)
    return y, P / P.sum(1, keepdims=True), g


def _ref_mc_state(y, P, g, offsets, constraint, classes, full=True):
    """(gap, accuracy): through the analysis' ``evaluate_all`` (eqodds, ``full``) or per-group rates."""
    Q = PP.apply_offsets(P, g, offsets)
    if constraint == "equalized_odds" and full:
        gap = M.evaluate_all(y, Q, classes, {"a": (g, [0, 1])})[("eqodds", "a", "", "")]
    else:
        d = {r: np.nanmean(np.abs(np.subtract(*M.by_group(getattr(M, r), y, Q, g, levels=[0, 1]).values())))
             for r in ("tpr", "fpr")}
        gap = (d["tpr"] + d["fpr"]) / 2 if constraint == "equalized_odds" else d[constraint]
    return float(gap), float(M.accuracy(y, Q))


@pytest.mark.parametrize("constraint", PP.CONSTRAINTS)
def test_line_search_equals_brute_force_over_one_offset(constraint):
    y, P, g = _mc_data(3, 60)
    classes = ["a", "b", "c"]
    logp = np.log(P)
    rng = np.random.default_rng(4)
    offsets = rng.normal(scale=0.3, size=(2, 3))
    floor = _ref_mc_state(y, P, g, offsets, constraint, classes)[1] - 0.05
    for gr, c in [(0, 0), (1, 0), (1, 2)]:
        value, gap, acc = PP.line_search(logp, y, g, offsets, gr, c, floor, constraint)
        # Reference breakpoints: per row of the group, where class c takes over its arg-max.
        betas = []
        for i in np.flatnonzero(g == gr):
            s = logp[i] + offsets[gr]
            betas.append(max(s[k] for k in range(3) if k != c) - logp[i, c])
        u = sorted(set(betas))
        values = [u[0] - 1, *[(a + b) / 2 for a, b in zip(u, u[1:])], u[-1] + 1]
        points = []
        for v in values:
            trial = offsets.copy()
            trial[gr, c] = v
            gv, av = _ref_mc_state(y, P, g, trial, constraint, classes)
            if av >= floor - 1e-12:
                points.append((gv, -av))
        want = _ref_best(points)
        assert (gap, acc) == pytest.approx(want, abs=1e-12)
        trial = offsets.copy()
        trial[gr, c] = value
        assert _ref_mc_state(y, P, g, trial, constraint, classes) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("constraint", PP.CONSTRAINTS)
def test_offsets_are_coordinatewise_optimal_and_within_budget(constraint):
    y, P, g = _mc_data(5, 90)
    classes = ["a", "b", "c"]
    strength = 0.03
    fit = PP.fit_offsets(y, P, g, 2, constraint, strength)
    gap0, acc0 = _ref_mc_state(y, P, g, np.zeros((2, 3)), constraint, classes)
    gap, acc = _ref_mc_state(y, P, g, fit.params, constraint, classes)
    assert (fit.before["gap"], fit.before["utility"]) == pytest.approx((gap0, acc0), abs=1e-12)
    assert (fit.after["gap"], fit.after["utility"]) == pytest.approx((gap, acc), abs=1e-12)
    assert acc >= acc0 - strength - 1e-12 and gap < gap0
    # Dense grid of single moves around the optimum: none is feasible and strictly better.
    for gr, c in np.ndindex(2, 3):
        for v in fit.params[gr, c] + np.linspace(-4, 4, 121):
            trial = fit.params.copy()
            trial[gr, c] = v
            gv, av = _ref_mc_state(y, P, g, trial, constraint, classes, full=False)
            if av >= acc0 - strength - 1e-12:
                assert not (gv < gap - 1e-12 or (abs(gv - gap) <= 1e-12 and av > acc + 1e-12)), (gr, c, v)


def test_offsets_give_probabilities_and_zero_offsets_change_nothing():
    y, P, g = _mc_data(6, 40)
    np.testing.assert_allclose(PP.apply_offsets(P, g, np.zeros((2, 3))), P, atol=1e-15)
    Q = PP.apply_offsets(P, g, np.array([[0.0, 1.0, -2.0], [3.0, 0.0, 0.0]]))
    np.testing.assert_allclose(Q.sum(1), 1, atol=1e-12)
    Z = P.copy()
    Z[0] = [1.0, 0.0, 0.0]
    assert np.isfinite(PP.apply_offsets(Z, g, np.ones((2, 3)))).all()


# ----------------------------------------------------------------------------- fairlearn


def _score_estimator():
    """A prefit sklearn 'estimator' whose prediction is the score in column 0 (for fairlearn)."""
    from sklearn.base import BaseEstimator

    class Scores(BaseEstimator):
        def fit(self, X, y):
            self.fitted_ = True
            return self

        def predict(self, X):
            return np.asarray(X)[:, 0]

    return Scores().fit(None, None)


def test_binary_gap_is_as_small_as_fairlearns_threshold_optimizer():
    """fairlearn randomises between thresholds; our deterministic group thresholds reach as small a
    validation equalized-odds difference (fairlearn's own metric), at no worse F1 budget."""
    from fairlearn.metrics import equalized_odds_difference
    from fairlearn.postprocessing import ThresholdOptimizer

    Y, P, g = _planted_multilabel(0, 2000)
    y, p = Y[:, 0], P[:, 0]
    opt = ThresholdOptimizer(estimator=_score_estimator(), constraints="equalized_odds", objective="accuracy_score",
                             prefit=True, predict_method="predict")
    opt.fit(p[:, None], y, sensitive_features=g)
    fl = opt.predict(p[:, None], sensitive_features=g, random_state=0)
    t0 = ML.choose_thresholds(Y[:, :1], P[:, :1])[0]
    fit = PP.fit_thresholds(Y[:, :1], P[:, :1], g, 2, "equalized_odds", 0.02)
    ours = (p >= fit.params[g, 0]).astype(int)
    src = equalized_odds_difference(y, (p >= t0).astype(int), sensitive_features=g)
    fl_gap = equalized_odds_difference(y, fl, sensitive_features=g)
    ours_gap = equalized_odds_difference(y, ours, sensitive_features=g)
    assert src > 0.2 and fl_gap < src / 3
    assert ours_gap <= fl_gap + 0.01
    assert _ref_f1(y, ours.astype(bool)) >= _ref_f1(y, p >= t0) - 0.02 - 1e-12


# ----------------------------------------------------------------------------- runs


def _mc_rows(n_val, n_test, seed=0, shift=1.5):
    """Cohort-like rows with planted bias: F's logits of the first class lowered; (rows, probs)."""
    rng = np.random.default_rng(seed)
    n = n_val + n_test
    y = rng.integers(0, len(CLASSES), n)
    sex = np.where(rng.random(n) < 0.5, "M", "F")
    rows = pd.DataFrame({
        "image_id": [f"{i:08d}_000.png" for i in range(n)], "path": "x", "patient_id": np.arange(n),
        "label": [CLASSES[k] for k in y], "sex": sex, "age": 50,
        "age_group": np.where(rng.random(n) < 0.5, "young", "old"),
        "split": ["val"] * n_val + ["test"] * n_test,
    })
    z = rng.normal(size=(n, len(CLASSES)))
    z[np.arange(n), y] += 1.5
    z[sex == "F", 0] -= shift
    P = np.exp(z)
    return rows, P / P.sum(1, keepdims=True)


def _write_mc(runs_dir, rows, probs, **extra):
    meta = meta_for("m", "linear", 0) | {"notes": "a probe"} | extra
    return R.write_run(runs_dir, meta, R.make_predictions(rows, probs, CLASSES))


def _eqodds(run, split, attr="sex"):
    y, P = run.arrays(split)
    rows = run.split(split)
    levels = R.run_attributes(run)[attr]["groups"]
    out = M.evaluate_all(y, P, run.classes, {attr: (rows[attr].to_numpy(), levels)})
    return float(out[("eqodds", attr, "", "")]), float(out[("accuracy", "", "", "")])


@pytest.fixture(scope="module")
def mc_pair(tmp_path_factory):
    """A multi-class source run with planted bias and its post-processed run (one folder)."""
    d = tmp_path_factory.mktemp("mc")
    rows, probs = _mc_rows(1000, 4000)  # a large test split: its gap is close to the population's
    src = _write_mc(d, rows, probs)
    new = PP.postprocess(PP.PostprocessConfig(run=src, sensitive="sex"))
    return R.read_run(src), R.read_run(new)


def test_multiclass_run_gap_shrinks_on_val_and_test(mc_pair):
    src, new = mc_pair
    for split in ("val", "test"):
        (eo0, acc0), (eo1, acc1) = _eqodds(src, split), _eqodds(new, split)
        assert eo0 > 0.05
        assert eo1 < 0.5 * eo0, split
        assert acc1 > acc0 - 0.03, split
    assert new.meta["postprocess"]["notes"] == []  # 1000 validation images: no small cells


def test_small_validation_cells_earn_a_note(small_run):
    new = R.read_run(PP.postprocess(PP.PostprocessConfig(run=small_run, sensitive="sex")))
    assert any("validation positive(s) (< 25)" in n for n in new.meta["postprocess"]["notes"])


def test_new_run_identity_and_metadata(mc_pair):
    src, new = mc_pair
    key = R.parse_run_id(new.run_id)
    assert key == R.RunKey("m", "linear", "best", 0, mitigation="thresholds", sensitive="sex")
    assert new.path.parent == src.path.parent
    m = new.meta
    assert (m["mitigation"], m["sensitive"], m["strength"], m["source_run"]) == ("thresholds", "sex", 0.02, src.run_id)
    assert m["constraint"] == "equalized_odds" and m["selection"] == PP.SELECTION_RULE
    assert set(m["fitted"]["offsets"]) == {"M", "F"} and list(m["fitted"]["offsets"]["F"]) == CLASSES
    for k in ("model", "method", "seed", "classes", "cohort_hash", "hyperparameters", "selected_epoch",
              "trainable_params"):
        assert m[k] == src.meta[k], k
    assert "postprocess" in m["timings"] and m["timings"]["fit"] == src.meta["timings"]["fit"]
    assert m["postprocess"]["validation_after"]["gap"] < m["postprocess"]["validation_before"]["gap"]
    assert "a probe" in m["notes"]
    json.loads((new.path / R.META_FILE).read_text())  # strict JSON (no NaN)
    # Only the probabilities differ; they are the offsets' softmax.
    pcols = R.prob_columns(CLASSES)
    pd.testing.assert_frame_equal(new.predictions.drop(columns=pcols), src.predictions.drop(columns=pcols))
    offsets = np.array([[m["fitted"]["offsets"][g][c] for c in CLASSES] for g in ("M", "F")])
    codes = (src.predictions["sex"] == "F").to_numpy().astype(int)
    want = PP.apply_offsets(src.predictions[pcols].to_numpy(), codes, offsets)
    np.testing.assert_allclose(new.predictions[pcols].to_numpy(), want, atol=1e-12)


def test_analysis_reads_the_new_run_beside_its_source(mc_pair, tmp_path):
    from cxrfair.analysis.config import AnalyzeConfig
    from cxrfair.analysis.engine import compute

    src, new = mc_pair
    res = compute(R.read_runs(src.path.parent), AnalyzeConfig(src.path.parent, tmp_path / "r", n_boot=0, figures=False))
    m = res.metrics
    eo = m[(m["metric"] == "eqodds") & (m["attribute"] == "sex")].set_index("run_id")["value"]
    assert eo[new.run_id] < 0.5 * eo[src.run_id]
    assert eo[new.run_id] == pytest.approx(_eqodds(new, "test")[0], abs=1e-12)


def test_test_rows_never_influence_the_fit(tmp_path):
    rows, probs = _mc_rows(200, 200, seed=3)
    a = _write_mc(tmp_path / "a", rows, probs)
    test = (rows["split"] == "test").to_numpy()
    rng = np.random.default_rng(0)
    probs2 = probs.copy()
    probs2[test] = rng.dirichlet(np.ones(len(CLASSES)), test.sum())
    rows2 = rows.copy()
    rows2.loc[test, "label"] = rng.choice(CLASSES, test.sum())
    rows2.loc[test, "sex"] = rng.choice(["M", "F"], test.sum())
    b = _write_mc(tmp_path / "b", rows2, probs2)
    fa = R.read_run(PP.postprocess(PP.PostprocessConfig(run=a, sensitive="sex")))
    fb = R.read_run(PP.postprocess(PP.PostprocessConfig(run=b, sensitive="sex")))
    assert fa.meta["fitted"] == fb.meta["fitted"]


def test_other_constraints_and_attributes(mc_pair, tmp_path):
    src, _ = mc_pair
    for constraint in ("tpr", "fpr"):
        out = tmp_path / constraint
        new = R.read_run(PP.postprocess(PP.PostprocessConfig(run=src.path, sensitive="age_group",
                                                             constraint=constraint, out=out)))
        assert new.run_id == "m__linear+thresholds-age_group__best__s0" and new.meta["constraint"] == constraint
        after = new.meta["postprocess"]["validation_after"]
        before = new.meta["postprocess"]["validation_before"]
        assert after["gap"] <= before["gap"] and after["utility"] >= before["utility"] - 0.02 - 1e-12


# ----------------------------------------------------------------------------- multi-label runs


def _write_ml_run(runs_dir, Y, P, g, splits, run_id="m__lora__best__s1", attrs=None):
    """A multi-label run folder written by hand from the contract (Runs v2)."""
    conditions = [f"C{j}" for j in range(Y.shape[1])]
    df = pd.DataFrame({"image_id": [f"i{k:05d}" for k in range(len(Y))], "patient_id": np.arange(len(Y)),
                       "split": splits, "sex": np.where(g == 0, "M", "F"), "age": 40, "age_group": "young"})
    for j, c in enumerate(conditions):
        df[f"y_{c}"] = pd.array(np.where(np.isnan(Y[:, j]), pd.NA, Y[:, j]), dtype="Int64")
    for j, c in enumerate(conditions):
        df[f"p_{c}"] = P[:, j]
    key = R.parse_run_id(run_id)
    meta = {"run_id": run_id, "model": key.model, "method": key.method, "seed": key.seed, "classes": conditions,
            "cohort_hash": "h", "hyperparameters": {}, "selected_epoch": 3, "trainable_params": 10,
            "timings": {}, "task": "multilabel",
            "attributes": attrs or {"sex": {"groups": ["M", "F"], "reference": "M"},
                                    "age_group": {"groups": ["young", "old"], "reference": "young"}}}
    d = runs_dir / run_id
    d.mkdir(parents=True)
    df.to_csv(d / R.PREDICTIONS_FILE, index=False)
    (d / R.META_FILE).write_text(json.dumps(meta))
    return d


def test_multilabel_run_end_to_end(tmp_path):
    Yv, Pv, gv = _planted_multilabel(0, 1500)
    Yt, Pt, gt = _planted_multilabel(1, 1500)
    Yv[:20, 1] = np.nan
    src = _write_ml_run(tmp_path, np.r_[Yv, Yt], np.r_[Pv, Pt], np.r_[gv, gt], ["val"] * 1500 + ["test"] * 1500)
    new = R.read_run(PP.postprocess(PP.PostprocessConfig(run=src, sensitive="sex")))
    assert new.run_id == "m__lora+thresholds-sex__best__s1" and new.meta["task"] == "multilabel"
    T = np.array([new.meta["decision_thresholds"][c] for c in new.classes])
    np.testing.assert_array_equal(T, ML.choose_thresholds(Yv, Pv))
    assert new.meta["fitted"]["decision_thresholds"] == new.meta["decision_thresholds"]
    Y, Q = new.arrays("test")
    _, P = R.read_run(src).arrays("test")
    eo0, f10, _ = _ml_scores(Y, P, gt, T)
    eo1, f11, _ = _ml_scores(Y, Q, gt, T)
    assert (eo1 < 0.35 * eo0).all() and (f11 > f10 - 0.04).all()
    th = new.meta["fitted"]["thresholds"]
    for c_idx, c in enumerate(new.classes):
        np.testing.assert_array_equal(Q[:, c_idx] >= T[c_idx], P[:, c_idx] >= np.where(gt == 0, th["M"][c], th["F"][c]))
    # The analysis thresholds the new run at its recorded decision thresholds (a fresh max-F1
    # choice on the rescaled scores would undo the group thresholds), and sees the gap shrink.
    from cxrfair.analysis.config import AnalyzeConfig
    from cxrfair.analysis.engine import compute

    res = compute(R.read_runs(tmp_path), AnalyzeConfig(tmp_path, tmp_path / "r", n_boot=0, figures=False))
    used = res.thresholds.set_index(["run_id", "class"])["threshold"]
    for c_idx, c in enumerate(new.classes):
        assert used[(new.run_id, c)] == T[c_idx]
    eo = res.metrics.query("metric == 'eqodds' and attribute == 'sex' and `class` == ''").set_index("run_id")["value"]
    assert eo[new.run_id] < 0.5 * eo[src.name]


def test_multilabel_condition_without_validation_positives_is_left_alone(tmp_path):
    Y, P, g = _planted_multilabel(2, 400)
    splits = np.array(["val"] * 200 + ["test"] * 200)
    Y[splits == "val", 1] = 0
    src = _write_ml_run(tmp_path, Y, P, g, splits)
    new = R.read_run(PP.postprocess(PP.PostprocessConfig(run=src, sensitive="sex")))
    assert new.meta["decision_thresholds"]["C1"] is None
    np.testing.assert_array_equal(new.predictions["p_C1"], R.read_run(src).predictions["p_C1"])
    assert any("C1: no validation positives" in n for n in new.meta["postprocess"]["notes"])


# ----------------------------------------------------------------------------- CLI and bad input


def _invoke(*args):
    return CliRunner().invoke(main, ["postprocess", *map(str, args)])


def _one_line_error(result, pattern):
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    assert re.search(pattern, result.output), result.output


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture()
def small_run(tmp_path):
    rows, probs = _mc_rows(60, 60, seed=9)
    return _write_mc(tmp_path / "runs", rows, probs)


def test_cli_writes_the_run(small_run):
    result = _invoke(small_run, "--sensitive", "sex", "--constraint", "tpr", "--strength", "0.05")
    assert result.exit_code == 0, result.output
    path = small_run.parent / "m__linear+thresholds-sex__best__s0"
    assert result.output.strip() == str(path)
    assert R.read_run(path).meta["strength"] == 0.05


@pytest.mark.parametrize("args, pattern", [
    (["--sensitive", "race"], r"--sensitive 'race' is not one of its attributes \(sex, age_group"),
    (["--sensitive", "sex", "--constraint", "demographic_parity"], r"--constraint 'demographic_parity' is unknown"),
    (["--sensitive", "sex", "--strength", "1.5"], r"--strength 1.5: .* in \[0, 1\]"),
    (["--sensitive", "sex", "--strength", "-0.1"], r"--strength -0.1"),
])
def test_cli_bad_options(small_run, args, pattern):
    before = _listing(small_run.parent)
    _one_line_error(_invoke(small_run, *args), pattern)
    assert _listing(small_run.parent) == before


def test_cli_not_a_run(tmp_path):
    _one_line_error(_invoke(tmp_path / "nope", "--sensitive", "sex", "--out", tmp_path / "o"), r"not a run folder")
    assert not (tmp_path / "o").exists()


def test_cli_group_without_validation_rows(tmp_path):
    rows, probs = _mc_rows(60, 60, seed=9)
    rows.loc[(rows["split"] == "val") & (rows["sex"] == "F"), "split"] = "test"
    src = _write_mc(tmp_path, rows, probs)
    before = _listing(tmp_path)
    _one_line_error(_invoke(src, "--sensitive", "sex"), r"group\(s\) \['F'\] of sex have no validation rows")
    assert _listing(tmp_path) == before


def test_cli_one_group_present_and_absent_declared_groups(tmp_path):
    rows, probs = _mc_rows(60, 60, seed=9)
    rows["age_group"] = "old"
    src = _write_mc(tmp_path / "one", rows, probs)
    _one_line_error(_invoke(src, "--sensitive", "age_group"), r"age_group has 1 group\(s\) among the run's images")
    # A declared group with no images at all is left out of the fit, not an error.
    rows["race"] = np.where(np.arange(len(rows)) % 2, "a", "c")
    attrs = {**R.V1_ATTRIBUTES, "race": {"groups": ["a", "b", "c"], "reference": "a"}}
    src = _write_mc(tmp_path / "abc", rows, probs, attributes=attrs)
    new = R.read_run(PP.postprocess(PP.PostprocessConfig(run=src, sensitive="race")))
    assert list(new.meta["fitted"]["offsets"]) == ["a", "c"]


def test_cli_undeclared_group_value(tmp_path):
    rows, probs = _mc_rows(60, 60, seed=9)
    rows.loc[rows.index[:3], "age_group"] = "middle"
    src = _write_mc(tmp_path, rows, probs)
    _one_line_error(_invoke(src, "--sensitive", "age_group"), r"column age_group has value\(s\) \['middle'\] outside")


@pytest.mark.parametrize("damage, pattern", [
    ("blank", r"column race is empty"),
    ("drop", r"has no column race|lacks column\(s\) race"),
])
def test_cli_empty_or_missing_attribute_column(tmp_path, damage, pattern):
    rows, probs = _mc_rows(60, 60, seed=9)
    rows["race"] = np.where(np.arange(len(rows)) % 2, "a", "b")
    attrs = {**R.V1_ATTRIBUTES, "race": {"groups": ["a", "b"], "reference": "a"}}
    src = _write_mc(tmp_path, rows, probs, attributes=attrs)
    df = pd.read_csv(src / R.PREDICTIONS_FILE)  # damaged by hand: a valid run cannot be written so
    if damage == "blank":
        df.loc[0, "race"] = None
    else:
        df = df.drop(columns="race")
    df.to_csv(src / R.PREDICTIONS_FILE, index=False)
    before = _listing(tmp_path)
    _one_line_error(_invoke(src, "--sensitive", "race"), pattern)
    assert _listing(tmp_path) == before


def test_cli_refuses_a_mitigated_source_and_an_existing_run(small_run):
    assert _invoke(small_run, "--sensitive", "sex").exit_code == 0
    new = small_run.parent / "m__linear+thresholds-sex__best__s0"
    _one_line_error(_invoke(new, "--sensitive", "sex"), r"already has mitigation thresholds-sex")
    before = (new / R.META_FILE).read_text()
    result = _invoke(small_run, "--sensitive", "sex", "--constraint", "fpr")
    assert result.exit_code == 1 and "--force" in result.output and "Traceback" not in result.output
    assert (new / R.META_FILE).read_text() == before
    assert _invoke(small_run, "--sensitive", "sex", "--constraint", "fpr", "--force").exit_code == 0
    assert json.loads((new / R.META_FILE).read_text())["constraint"] == "fpr"


def test_library_raises_cxrfair_error(small_run):
    with pytest.raises(CxrfairError, match="--constraint"):
        PP.postprocess(PP.PostprocessConfig(run=small_run, sensitive="sex", constraint="eo"))
