"""Interval methods against slow references written here (numpy quantiles, per-column loops), and the table."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cxrfair.core import metrics as M
from cxrfair.core import multilabel as ML
from cxrfair.core.bootstrap import patient_counts
from cxrfair.core.groups import combine_groups, component_range, components, pair_components
from cxrfair.core.intervals import (COMPONENT_SPECS, BAND_MIN_GROUPS, INTERVAL_METHODS, METHODS, IntervalMethod, band_columns,
                                    band_interval, bias_corrected, component_band, component_columns, debiased_columns,
                                    fold, interval, interval_method, intervals_by_metric, with_components)


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


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("band", "debiased", "pivot")])  # from other columns: below
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
    spec = IntervalMethod("hull", checked_groups=2)
    assert spec.checked(2) and not spec.checked(4) and spec.checked(None)
    assert interval_method("eqodds").checked(4)  # the band (RESULTS.md "Gaps over 3+ groups")
    assert not IntervalMethod("hull", coverage_checked=False).checked(2) and interval_method("accuracy").checked(5)
    assert interval_method("ece_gap").checked(2) and not interval_method("ece_gap").checked(4)  # RESULTS.md, part 3


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
        want = _reference(reps[:, [src]], est[[src]], methods[j], 0.95, spec.low, spec.high)[:, 0]  # band: hull here
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


# ----------------------------------------------------------------------------- the max-t band of a gap's components


def _slow_band(reps, est, level):
    """Reference: per component sd and per replicate max |t| by loops, np.quantile of the maxima."""
    R, K = reps.shape
    sd = np.array([np.std(reps[:, k], ddof=1) for k in range(K)])
    t = np.zeros(R)
    for r in range(R):
        for k in range(K):
            if sd[k] > 0:
                t[r] = max(t[r], abs(reps[r, k] - est[k]) / sd[k])
    c = np.quantile(t, level)
    return est - c * sd, est + c * sd


def _slow_gap(combine, mags):
    """Reference gap from (B, P, C) magnitudes by loops: abs_difference = the largest pair of the mean over
    bases of the class mean; max_range = the class mean of the largest over bases and pairs."""
    B, P, C = mags.shape
    if combine == "abs_difference":
        return max(sum(np.mean(mags[b, p]) for b in range(B)) / B for p in range(P))
    return np.mean([max(mags[b, p, c] for b in range(B) for p in range(P)) for c in range(C)])


@pytest.mark.parametrize("level", [0.95, 0.8])
def test_component_band_matches_the_loop_reference(level):
    rng = np.random.default_rng(3)
    reps = rng.normal(0.0, [0.02, 0.05, 0.1, 0.03], size=(300, 4)) + [0.1, -0.05, 0.0, 0.2]
    reps[:, 3] = 0.2  # constant: sd 0, left out of the max and a band of width 0
    est = np.array([0.11, -0.04, 0.01, 0.2])
    lo, hi = component_band(reps, est, level)
    want_lo, want_hi = _slow_band(reps, est, level)
    np.testing.assert_allclose(lo, want_lo, atol=1e-12) and np.testing.assert_allclose(hi, want_hi, atol=1e-12)
    # Simultaneous: the critical value exceeds the pointwise one, so the band holds every pointwise interval.
    assert ((hi - lo)[:3] / 2 > 1.6 * reps[:, :3].std(0, ddof=1)).all()


@pytest.mark.parametrize("name", ["eqodds", "eqodds_worst", "dp_gap"])
def test_band_interval_is_the_gap_of_the_band_ends_and_holds_every_gap_inside_the_band(name):
    spec = COMPONENT_SPECS[name][0]
    rng = np.random.default_rng(4)
    G, C, R = 4, 3, 400
    per_group = {b: rng.uniform(0.1, 0.9, size=(G, C)) for b in spec.bases}
    per_group_reps = {b: np.clip(v[:, None, :] + rng.normal(0, 0.05, size=(G, R, C)), 0, 1) for b, v in per_group.items()}
    est = pair_components(spec, per_group)  # (B, P, C)
    reps = np.moveaxis(pair_components(spec, per_group_reps), 2, 0)  # (R, B, P, C)
    assert est.shape == (len(spec.bases), 6, C) and reps.shape == (R, len(spec.bases), 6, C)
    lo, hi = band_interval(spec, reps, est, 0.95, G)
    b_lo, b_hi = _slow_band(reps.reshape(R, -1), est.reshape(-1), 0.95)
    b_lo, b_hi = b_lo.reshape(est.shape), b_hi.reshape(est.shape)
    near = np.where((b_lo <= 0) & (b_hi >= 0), 0.0, np.minimum(abs(b_lo), abs(b_hi)))
    assert float(lo) == pytest.approx(_slow_gap(spec.combine, near), abs=1e-12)
    assert float(hi) == pytest.approx(_slow_gap(spec.combine, np.maximum(abs(b_lo), abs(b_hi))), abs=1e-12)
    # The guarantee: any components inside the band give a gap inside the interval.
    for _ in range(200):
        x = rng.uniform(b_lo, b_hi)
        assert float(lo) - 1e-12 <= _slow_gap(spec.combine, np.abs(x)) <= float(hi) + 1e-12
    # And the plug-in gap lies inside too.
    assert float(lo) <= _slow_gap(spec.combine, np.abs(est)) <= float(hi)


def _bootstrapped(n_groups, seed=5, n=40, R=200):
    rng = np.random.default_rng(seed)
    N = n * n_groups
    y = rng.integers(0, 3, N)
    logits = rng.normal(size=(N, 3))
    logits[np.arange(N), y] += 1.5
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    groups = np.repeat([f"g{i}" for i in range(n_groups)], n)
    attrs = {"grp": (groups, [f"g{i}" for i in range(n_groups)])}
    est = M.evaluate_all(y, p, ["a", "b", "c"], attrs)
    w = patient_counts(np.arange(N), groups, R, np.random.default_rng(seed + 1))
    reps = M.evaluate_all(y, p, ["a", "b", "c"], attrs, weights=w)
    keys = list(est)
    return keys, np.array([float(est[k]) for k in keys]), np.stack([np.asarray(reps[k], float) for k in keys], 1)


@pytest.mark.parametrize("name", ["eqodds", "eqodds_worst", "dp_gap"])
def test_intervals_by_metric_builds_the_band_from_the_per_group_values_it_is_given(name):
    keys, est, reps = _bootstrapped(4)
    where = {k: i for i, k in enumerate(keys)}
    j = where[(name, "grp", "", "")]
    lo, hi, bc, methods = intervals_by_metric(reps, est, keys, 0.95)
    assert methods[j] == "band"
    # Slow reference: the components by hand from the per-group columns (classes a, b, c; pairs of groups).
    spec = COMPONENT_SPECS[name][0]
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    col = lambda base, g, c: where[(base, "grp", f"g{g}", c)]  # noqa: E731
    comp_est = np.array([[[est[col(b, g, c)] - est[col(b, h, c)] for c in "abc"] for g, h in pairs] for b in spec.bases])
    comp_reps = np.stack([[[reps[:, col(b, g, c)] - reps[:, col(b, h, c)] for c in "abc"] for g, h in pairs]
                          for b in spec.bases]).transpose(3, 0, 1, 2)
    b_lo, b_hi = (x.reshape(comp_est.shape) for x in _slow_band(comp_reps.reshape(len(reps), -1), comp_est.reshape(-1), 0.95))
    near = np.where((b_lo <= 0) & (b_hi >= 0), 0.0, np.minimum(abs(b_lo), abs(b_hi)))
    assert lo[j] == pytest.approx(max(0.0, _slow_gap(spec.combine, near)), abs=1e-12)
    basic_hi = 2 * est[j] - np.quantile(reps[:, j], 0.025)
    assert hi[j] == pytest.approx(min(1.0, max(basic_hi, lo[j])), abs=1e-12)
    assert bc[j] == pytest.approx(2 * est[j] - reps[:, j].mean(), abs=1e-12)
    assert band_columns(reps, est, *component_columns((name, "grp", "", ""), where), 0.95)[0] == pytest.approx(lo[j])


def test_band_falls_back_to_the_hull_with_two_groups_or_without_the_per_group_values():
    assert BAND_MIN_GROUPS == 3
    keys, est, reps = _bootstrapped(2)
    j = keys.index(("eqodds", "grp", "", ""))
    lo, hi, _, methods = intervals_by_metric(reps, est, keys, 0.95)
    assert methods[j] == "hull"
    want = interval(reps[:, [j]], est[[j]], "hull", 0.95, 0.0, 1.0)
    assert (lo[j], hi[j]) == pytest.approx((want[0][0], want[1][0]))
    keys, est, reps = _bootstrapped(4)
    j = keys.index(("eqodds", "grp", "", ""))
    lo, hi, _, methods = intervals_by_metric(reps[:, [j]], est[[j]], [keys[j]], 0.95)
    want = interval(reps[:, [j]], est[[j]], "hull", 0.95, 0.0, 1.0)
    assert methods == ["hull"] and (lo[0], hi[0]) == pytest.approx((want[0][0], want[1][0]))
    with pytest.raises(ValueError, match="components"):
        interval(reps[:, [j]], est[[j]], "band")


def test_recentred_band_is_the_band_of_the_bias_corrected_components():
    spec = COMPONENT_SPECS["ece_gap"][0]
    rng = np.random.default_rng(6)
    est = rng.normal(0.0, 0.05, size=(1, 3, 1))  # 3 groups: 3 pairs of one base, no class axis
    reps = est + 0.02 + rng.normal(0, 0.03, size=(300, 1, 3, 1))  # replicates biased by +0.02
    centre = 2 * est - reps.mean(axis=0)
    want = band_interval(spec, reps - est + centre, centre, 0.95, 3)
    got = band_interval(spec, reps, est, 0.95, 3, recentre=True)
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert not np.allclose(got, band_interval(spec, reps, est, 0.95, 3))


# ----------------------------------------------------------------------------- the band of a minimum and of ES-AUC


def _slow_range(spec, lo, hi):
    """Reference: the smallest and largest metric over a grid of each component's ends (and 0 where the
    range holds it), each point's metric through ``combine_groups`` from rebuilt group values; class by
    class (a class's value depends on its own components only), then the class mean."""
    out = []
    for c in range(lo.shape[-1]):
        points = [sorted({a, b} | ({0.0} if a <= 0 <= b else set())) for a, b in zip(lo[:, c], hi[:, c])]
        found = []
        for x in itertools.product(*points):
            x = np.array(x)[:, None]
            if spec.combine == "min":
                found.append(float(combine_groups(spec, {spec.bases[0]: x})))
            else:  # equity: x = (overall, overall - group values)
                found.append(float(combine_groups(spec, {spec.bases[0]: x[0] - x[1:]}, {spec.bases[0]: x[0]})))
        out.append((min(found), max(found)))
    return tuple(np.mean(out, axis=0))


@pytest.mark.parametrize("name", ["worst_group_auc", "es_auc"])
def test_component_range_is_the_range_of_the_metric_over_the_box(name):
    spec = next(s for s in ML.GROUP_METRICS if s.name == name)
    rng = np.random.default_rng(8)
    G, C = 3, 2
    for _ in range(5):
        per = rng.uniform(0.6, 0.95, size=(G, C))
        comp = components(spec, {"auc": per}, {"auc": per.mean(0)})
        assert comp.shape == ((G if name == "worst_group_auc" else G + 1), C)
        # A box of width 0 gives the metric itself (one engine with combine_groups).
        want = combine_groups(spec, {"auc": per}, {"auc": per.mean(0)})
        np.testing.assert_allclose(component_range(spec, comp, comp), (want, want), atol=1e-12)
        half = rng.uniform(0.0, 0.08, size=comp.shape)
        lo, hi = component_range(spec, comp - half, comp + half)
        assert (float(lo), float(hi)) == pytest.approx(_slow_range(spec, comp - half, comp + half), abs=1e-12)


def _bootstrapped_multilabel(n_groups, seed=9, n=50, R=200):
    rng = np.random.default_rng(seed)
    N = n * n_groups
    Y = (rng.random((N, 3)) < 0.35).astype(float)
    P = 1 / (1 + np.exp(-(1.2 * (2 * Y - 1) + rng.normal(0, 1.3, size=Y.shape))))
    groups = np.repeat([f"g{i}" for i in range(n_groups)], n)
    attrs = {"grp": (groups, [f"g{i}" for i in range(n_groups)])}
    thr = np.full(3, 0.5)
    est = ML.evaluate_multilabel(Y, P, ["a", "b", "c"], attrs, thr)
    w = patient_counts(np.arange(N), groups, R, np.random.default_rng(seed + 1))
    reps = ML.evaluate_multilabel(Y, P, ["a", "b", "c"], attrs, thr, weights=w)
    keys = list(est)
    return keys, np.array([float(est[k]) for k in keys]), np.stack([np.asarray(reps[k], float) for k in keys], 1)


@pytest.mark.parametrize("task, name", [("multilabel", "worst_group_auc"), ("multilabel", "es_auc"),
                                        ("multiclass", "es_auc")])
def test_a_minimum_takes_the_band_high_end_and_the_basic_low_end(task, name):
    keys, est, reps = (_bootstrapped_multilabel if task == "multilabel" else _bootstrapped)(4)
    where = {k: i for i, k in enumerate(keys)}
    j = where[(name, "grp", "", "")]
    lo, hi, bc, methods = intervals_by_metric(reps, est, keys, 0.95)
    assert methods[j] == "band"
    # Slow reference by hand from the columns: the per-group values (and the overall one) of each class.
    base, classes = ("auc", "abc") if task == "multilabel" else ("auc_macro", [""])
    grp = [[where[(base, "grp", f"g{g}", c)] for c in classes] for g in range(4)]
    if name == "es_auc":
        whole = [where[(base, "", "", c)] for c in classes]
        cols = [whole] + [[(w, k) for w, k in zip(whole, row)] for row in grp]
        pick = lambda x: np.array([[x[..., c] if isinstance(c, int) else x[..., c[0]] - x[..., c[1]]  # noqa: E731
                                    for c in row] for row in cols])
    else:
        pick = lambda x: np.array([[x[..., c] for c in row] for row in grp])  # noqa: E731
    comp_est, comp_reps = pick(est), np.moveaxis(pick(reps), -1, 0)
    # The pointwise band (IntervalMethod.band_critical): each component ± z_0.975 times its bootstrap sd.
    sd = np.array([[np.std(comp_reps[:, g, c], ddof=1) for c in range(comp_est.shape[1])] for g in range(len(comp_est))])
    b_lo, b_hi = comp_est - 1.959963984540054 * sd, comp_est + 1.959963984540054 * sd
    spec = component_columns((name, "grp", "", ""), where, est)[0]
    assert spec.bases == (base,)
    band_lo, band_hi = _slow_range(spec, b_lo, b_hi)
    basic_lo = 2 * est[j] - np.quantile(reps[:, j], 0.975)
    assert hi[j] == pytest.approx(min(1.0, band_hi), abs=1e-12)
    assert lo[j] == pytest.approx(max(0.0, min(basic_lo, band_hi)), abs=1e-12)
    assert band_lo <= est[j] <= band_hi and bc[j] == pytest.approx(2 * est[j] - reps[:, j].mean(), abs=1e-12)
    # A caller with a few keys gets the component columns (the overall values too) from with_components.
    few = with_components([(name, "grp", "", "")], keys)
    sub = [where[k] for k in few]
    got = intervals_by_metric(reps[:, sub], est[sub], few, 0.95)
    assert got[3][0] == "band" and (got[0][0], got[1][0]) == pytest.approx((lo[j], hi[j]), abs=1e-12)


@pytest.mark.parametrize("name", ["worst_group_auc", "es_auc"])
def test_a_minimum_over_two_groups_keeps_the_hull(name):
    keys, est, reps = _bootstrapped_multilabel(2)
    j = keys.index((name, "grp", "", ""))
    lo, hi, _, methods = intervals_by_metric(reps, est, keys, 0.95)
    want = interval(reps[:, [j]], est[[j]], "hull", 0.95, 0.0, 1.0)
    assert methods[j] == "hull" and (lo[j], hi[j]) == pytest.approx((want[0][0], want[1][0]), abs=1e-12)


def test_band_critical_value_is_the_max_t_quantile_or_the_pointwise_normal_one():
    assert IntervalMethod("band").critical(0.95) is None  # max-t: from the replicates (component_band)
    assert IntervalMethod("band", band_critical="pointwise").critical(0.95) == pytest.approx(1.959964, abs=1e-6)
    assert IntervalMethod("band", band_critical="pointwise").critical(0.8) == pytest.approx(1.281552, abs=1e-6)
    with pytest.raises(ValueError, match="critical"):
        IntervalMethod("band", band_critical="bonferroni")


# ----------------------------------------------------------------------------- the debiased gap (ece_gap)


def _bootstrapped_multilabel_ece(n_groups, seed=8, n=60, R=200):
    rng = np.random.default_rng(seed)
    N = n * n_groups
    Y = (rng.random((N, 3)) < 0.3).astype(float)
    P = 1 / (1 + np.exp(-(1.2 * (2 * Y - 1) + rng.normal(0, 1.5, Y.shape))))
    groups = np.repeat([f"g{i}" for i in range(n_groups)], n)
    attrs = {"grp": (groups, [f"g{i}" for i in range(n_groups)])}
    t = np.full(3, 0.5)
    est = ML.evaluate_multilabel(Y, P, list("abc"), attrs, t)
    reps = ML.evaluate_multilabel(Y, P, list("abc"), attrs, t,
                                  weights=patient_counts(np.arange(N), groups, R, np.random.default_rng(seed + 1)))
    keys = list(est)
    return keys, np.array([float(est[k]) for k in keys]), np.stack([np.asarray(reps[k], float) for k in keys], 1)


def _slow_debiased(reps, est, where, key, classes, n_groups, level=0.95):
    """Reference: the gap of the per-group ece_debiased columns by loops over pairs and classes (the mean over
    classes of |difference|, the largest pair), then the hull of the pivot by np.quantile; with 3+ groups and one
    class the gaps of the ends of the max-t band (``_slow_band``) of the debiased components, deviations from the
    plug-in's."""
    _, attr, _, cls = key
    classes = [cls] if cls else classes

    def gap(x):
        col = lambda g, c: x[..., where[("ece_debiased", attr, f"g{g}", c)]]  # noqa: E731
        pairs = [(g, h) for g in range(n_groups) for h in range(g + 1, n_groups)]
        return np.max([np.mean([np.abs(col(g, c) - col(h, c)) for c in classes], axis=0) for g, h in pairs], axis=0)

    plug, gap_d, reps_d = est[where[key]], gap(est), gap(reps)
    q_lo, q_hi = np.quantile(reps_d - plug, [(1 - level) / 2, (1 + level) / 2])
    lo, hi = min(gap_d - q_hi, gap_d + q_lo), max(gap_d - q_lo, gap_d + q_hi)
    bc = plug + gap_d - reps_d.mean()
    if n_groups >= BAND_MIN_GROUPS and len(classes) == 1:  # the multi-label summary (3 conditions) keeps the hull
        # The band: (P, C) components of the debiased and plug-in values, deviations from the plug-in's.
        pairs = [(g, h) for g in range(n_groups) for h in range(g + 1, n_groups)]
        comp = lambda x, base: np.array([[x[..., where[(base, attr, f"g{g}", c)]] - x[..., where[(base, attr, f"g{h}", c)]]  # noqa: E731
                                          for c in classes] for g, h in pairs])
        comp_d, comp_p, comp_r = comp(est, "ece_debiased"), comp(est, "ece"), comp(reps, "ece_debiased")  # (P, C[, R])
        pivot = np.moveaxis(comp_r, -1, 0) - comp_p + comp_d  # (R, P, C)
        b_lo, b_hi = (x.reshape(comp_d.shape) for x in _slow_band(pivot.reshape(len(reps), -1), comp_d.reshape(-1), level))
        near = np.where((b_lo <= 0) & (b_hi >= 0), 0.0, np.minimum(abs(b_lo), abs(b_hi)))
        lo, hi = _slow_gap("abs_difference", near[None]), _slow_gap("abs_difference", np.maximum(abs(b_lo), abs(b_hi))[None])
    return tuple(float(np.clip(v, 0, 1)) for v in (lo, hi, bc)), gap_d


@pytest.mark.parametrize("task,n_groups", [("multiclass", 2), ("multiclass", 4), ("multilabel", 2), ("multilabel", 3)])
def test_intervals_by_metric_builds_the_debiased_gap_from_the_per_group_debiased_values(task, n_groups):
    if task == "multiclass":
        keys, est, reps = _bootstrapped(n_groups)
        wanted = [("ece_gap", "grp", "", "")]
    else:
        keys, est, reps = _bootstrapped_multilabel_ece(n_groups)
        wanted = [("ece_gap", "grp", "", ""), ("ece_gap", "grp", "", "b")]  # the macro over conditions, one condition
    where = {k: i for i, k in enumerate(keys)}
    lo, hi, bc, methods = intervals_by_metric(reps, est, keys, 0.95)
    for key in wanted:
        j = where[key]
        assert methods[j] == "debiased"
        classes = ["a", "b", "c"] if task == "multilabel" else [""]  # multi-class ECE has no class axis
        (w_lo, w_hi, w_bc), gap_d = _slow_debiased(reps, est, where, key, classes, n_groups)
        assert (lo[j], hi[j], bc[j]) == pytest.approx((w_lo, w_hi, w_bc), abs=1e-12)
        spec, cols, _ = component_columns(key, where, debiased=True)
        assert debiased_columns(reps, est, spec, cols)[0] == pytest.approx(gap_d, abs=1e-12)
        # The debiased gap differs from the plug-in one: the interval is not the plug-in's hull moved by nothing.
        assert gap_d != pytest.approx(est[j], abs=1e-6)


def test_debiased_falls_back_to_the_hull_without_the_debiased_values():
    keys, est, reps = _bootstrapped(2)
    j = keys.index(("ece_gap", "grp", "", ""))
    mine = [i for i, k in enumerate(keys) if k[0] != "ece_debiased"]
    sub = [keys[i] for i in mine]
    lo, hi, bc, methods = intervals_by_metric(reps[:, mine], est[mine], sub, 0.95)
    k = sub.index(keys[j])
    want = interval(reps[:, [j]], est[[j]], "hull", 0.95, 0.0, 1.0)
    assert methods[k] == "hull" and (lo[k], hi[k]) == pytest.approx((want[0][0], want[1][0]))
    with pytest.raises(ValueError, match="components"):
        interval(reps[:, [j]], est[[j]], "debiased")


def test_with_components_adds_the_debiased_values_of_a_debiased_gap():
    keys, _, _ = _bootstrapped(3)
    got = with_components([("ece_gap", "grp", "", "")], keys)
    assert got[0] == ("ece_gap", "grp", "", "")
    assert sorted(got[1:]) == sorted((base, "grp", f"g{i}", "") for base in ("ece", "ece_debiased") for i in range(3))
    assert with_components([("ece", "", "", "")], keys) == [("ece", "", "", ""), ("ece_debiased", "", "", "")]


def test_pivot_interval_of_the_ece_rows_is_built_from_the_debiased_value_and_the_plug_in():
    keys, est, reps = _bootstrapped_multilabel_ece(2)
    where = {k: i for i, k in enumerate(keys)}
    lo, hi, bc, methods = intervals_by_metric(reps, est, keys, 0.95)
    for plugin, debiased, cls, low in (("ece", "ece_debiased", "a", -1), ("ece_macro", "ece_debiased_macro", "", -1)):
        p, d = where[(plugin, "grp", "g1", cls)], where[(debiased, "grp", "g1", cls)]
        pivot = reps[:, d] - est[p]  # slow reference: quantiles of the pivot, reflected and not, about the debiased value
        q_lo, q_hi = np.quantile(pivot, [0.025, 0.975])
        want = np.array([min(est[d] - q_hi, est[d] + q_lo), max(est[d] - q_lo, est[d] + q_hi),
                         est[p] + est[d] - reps[:, d].mean()])
        assert methods[d] == methods[p] == "pivot"
        assert (lo[d], hi[d], bc[d]) == pytest.approx(np.clip(want, low, 1), abs=1e-12)  # the debiased row: may be < 0
        assert (lo[p], hi[p], bc[p]) == pytest.approx(np.clip(want, 0, 1), abs=1e-12)  # the plug-in row: clipped at 0
    # Without its partner a row gets no interval (rather than a wrong one).
    j = where[("ece_debiased", "grp", "g1", "a")]
    lo, hi, bc, _ = intervals_by_metric(reps[:, [j]], est[[j]], [keys[j]], 0.95)
    assert np.isnan([lo[0], hi[0], bc[0]]).all()
    with pytest.raises(ValueError, match="plug-in"):
        IntervalMethod("pivot", plugin="ece")
    with pytest.raises(ValueError, match="plug-in"):
        IntervalMethod("hull", plugin="ece", debiased="ece_debiased")
