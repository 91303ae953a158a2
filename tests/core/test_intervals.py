"""Interval methods against slow references written here (numpy quantiles, per-column loops), and the table."""

from __future__ import annotations

import numpy as np
import pytest

from cxrfair.core import metrics as M
from cxrfair.core import multilabel as ML
from cxrfair.core.intervals import (INTERVAL_METHODS, METHODS, IntervalMethod, bias_corrected, fold, interval,
                                    interval_method, intervals_by_metric)


def _reps(seed=0, shape=(500, 4)):
    r = np.random.default_rng(seed).gamma(2.0, 0.05, size=shape)  # skewed, like a gap's replicates
    r[:7, 1] = np.nan
    r[:, 3] = np.nan
    return r


def _reference(reps, est, method, level, low=-np.inf, high=np.inf):
    """One column at a time with np.nanquantile / np.nanmean."""
    a = (1 - level) / 2
    out = []
    for j in range(reps.shape[1]):
        col = reps[:, j][~np.isnan(reps[:, j])]
        if not len(col) or np.isnan(est[j]):
            out.append((np.nan, np.nan, est[j] if method == "percentile" else np.nan))  # percentile: bc = value
            continue
        q_lo, q_hi = np.quantile(col, [a, 1 - a])
        if method == "percentile":
            lo, hi, bc = q_lo, q_hi, est[j]
        elif method == "basic":
            lo, hi, bc = 2 * est[j] - q_hi, 2 * est[j] - q_lo, 2 * est[j] - col.mean()
        elif method in ("hull", "folded"):
            lo, hi, bc = min(q_lo, 2 * est[j] - q_hi), max(q_hi, 2 * est[j] - q_lo), 2 * est[j] - col.mean()
            if method == "folded":
                lo, hi = (0.0, max(abs(lo), abs(hi))) if lo <= 0 <= hi else (min(abs(lo), abs(hi)), max(abs(lo), abs(hi)))
                bc = abs(bc)
        else:  # shifted
            b = col.mean() - est[j]
            lo, hi, bc = q_lo - 2 * b, q_hi - 2 * b, est[j] - b
        out.append(tuple(float(np.clip(x, low, high)) for x in (lo, hi, bc)))
    return np.array(out).T


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("level", [0.95, 0.8])
def test_each_method_matches_the_per_column_reference(method, level):
    reps = _reps() - (0.1 if method == "folded" else 0.0)  # a signed statistic around 0 for the fold
    est = np.array([0.15, 0.02, np.nan, 0.1]) - (0.1 if method == "folded" else 0.0)
    est[2] = np.nan
    low, high = (0.0, 1.0) if method != "folded" else (0.0, np.inf)
    lo, hi = interval(reps, est, method, level, low, high)
    bc = bias_corrected(reps, est, method, low, high)
    want = _reference(reps, est, method, level, low, high)
    np.testing.assert_allclose(np.stack([lo, hi, bc]), want, atol=1e-12)
    assert np.isnan(lo[2:]).all() and np.isnan(hi[2:]).all()  # NaN estimate; all-NaN replicates


def test_basic_is_clipped_at_zero_and_may_exclude_a_biased_plug_in():
    # A plug-in 0.10 whose replicates sit near 0.16 (bootstrap bias +0.06): centred on 0.04, excludes 0.10.
    reps = np.random.default_rng(1).normal(0.16, 0.02, size=(2000, 1))
    lo, hi = interval(reps, [0.10], "basic", 0.95, 0.0, 1.0)
    assert hi[0] < 0.10 and lo[0] == 0.0
    assert bias_corrected(reps, [0.10], "basic", 0.0, 1.0)[0] == pytest.approx(0.04, abs=0.003)
    # The hull holds both the basic and the percentile interval.
    p_lo, p_hi = interval(reps, [0.10], "percentile", 0.95, 0.0, 1.0)
    h_lo, h_hi = interval(reps, [0.10], "hull", 0.95, 0.0, 1.0)
    assert h_lo[0] == lo[0] and h_hi[0] == p_hi[0]


def test_checked_groups_limits_the_coverage_flag():
    spec = interval_method("eqodds")
    assert spec.checked(2) and not spec.checked(4) and spec.checked(None)
    assert not interval_method("ece_gap").checked(2) and interval_method("accuracy").checked(5)


def test_fold_is_the_image_under_abs():
    lo, hi = fold([-0.2, 0.1, -0.3], [0.05, 0.3, -0.1])
    np.testing.assert_allclose(lo, [0.0, 0.1, 0.1]) and np.testing.assert_allclose(hi, [0.2, 0.3, 0.3])
    # A point of the interval maps inside the folded one.
    for a, b in ((-0.2, 0.05), (0.1, 0.3), (-0.3, -0.1)):
        (fl,), (fh,) = fold([a], [b])
        assert all(fl <= abs(x) <= fh for x in np.linspace(a, b, 11))


def test_intervals_by_metric_routes_each_column_by_the_table():
    reps = _reps(2, (400, 4))
    reps[:, 2] = reps[:, 1] - 0.05  # signed f1_gap
    keys = [("accuracy", "", "", ""), ("eqodds", "sex", "", ""), ("f1_gap", "sex", "", ""), ("f1_gap_abs", "sex", "", "")]
    est = np.array([0.8, 0.05, 0.01, 0.01])
    reps[:, 3] = np.abs(reps[:, 2])
    lo, hi, bc, methods = intervals_by_metric(reps, est, keys, 0.95)
    assert methods == ["percentile", "hull", "hull", "folded"]
    for j, (k, *_) in enumerate(keys):
        spec = interval_method(k)
        src = 2 if spec.method == "folded" else j
        want = _reference(reps[:, [src]], est[[src]], spec.method, 0.95, spec.low, spec.high)[:, 0]
        np.testing.assert_allclose([lo[j], hi[j], bc[j]], want, atol=1e-12, equal_nan=True)
    # A folded metric without its signed partner gets no interval (rather than a wrong one).
    lo, hi, bc, _ = intervals_by_metric(reps[:, [3]], est[[3]], [keys[3]], 0.95)
    assert np.isnan([lo[0], hi[0], bc[0]]).all()


def test_the_table_covers_every_group_metric_and_names_real_metrics():
    group_names = {s.name for s in M.GROUP_METRICS} | {s.name for s in ML.GROUP_METRICS}
    known = set(M.metric_definitions("multiclass")) | set(M.metric_definitions("multilabel"))
    assert set(INTERVAL_METHODS) <= known
    assert group_names <= set(INTERVAL_METHODS)  # every combine over groups was given a method on purpose
    for name, spec in INTERVAL_METHODS.items():
        assert spec.why, name
        if spec.signed:
            assert spec.signed in known and interval_method(spec.signed).method == "hull"
    assert interval_method("accuracy").method == "percentile"
    with pytest.raises(ValueError):
        IntervalMethod("bca")
    with pytest.raises(ValueError):
        IntervalMethod("folded")
