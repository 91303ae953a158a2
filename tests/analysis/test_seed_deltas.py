"""Deltas between seed means (``replicates.seed_variance``, ``delta_interval``): by hand, against the slow
reference of ``delta_reference``, and their coverage by simulation against a known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from scipy.stats import t as t_dist

from cxrfair.analysis.replicates import delta_interval, seed_variance, t_cdf, t_quantile
from cxrfair.core.bootstrap import patient_counts

from .delta_reference import widened_delta


@pytest.mark.parametrize("df", [0.5, 1, 2, 3.7, 12, 300, 5000])
def test_t_cdf_matches_scipy(df):
    t = np.array([-40.0, -3.1, -1.0, -1e-3, 0.0, 0.2, 1.96, 4.3, 12.7, 1e4])
    np.testing.assert_allclose(t_cdf(t, df), t_dist.cdf(t, df), rtol=1e-10, atol=1e-13)


def test_t_quantile_takes_arrays():
    q, df = np.array([0.975, 0.95, 0.995, 0.9]), np.array([1.0, 2.5, 40.0, 3.0])
    np.testing.assert_allclose(t_quantile(q, df), t_dist.ppf(q, df), rtol=1e-7)
    assert isinstance(t_quantile(0.975, 3), float)


def test_seed_variance_by_hand():
    a = np.array([[0.80, 0.5, 0.5], [0.84, 0.6, 0.5], [0.82, np.nan, 0.5]])  # (3 runs, 3 keys)
    b = np.array([[0.70, np.nan, 0.25], [0.76, np.nan, 0.25]])  # (2 runs, 3 keys)
    v, df, known = seed_variance([a, b])
    # Key 0: sd_a² = (0.02² + 0.02²) / 2 = 0.0004 over 3 runs, sd_b² = (0.03² + 0.03²) / 1 = 0.0018 over 2.
    va, vb = 0.0004 / 3, 0.0018 / 2
    assert v[0] == pytest.approx(va + vb) and df[0] == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 1))
    # Key 1: arm a has 2 defined runs (sd² = 0.005, /2), arm b none: its variance unknown, the t of arm a alone.
    assert v[1] == pytest.approx(0.005 / 2) and df[1] == pytest.approx(1.0)
    # Key 2: every seed agrees: no seed term.
    assert v[2] == 0 and np.isnan(df[2])
    assert known.tolist() == [True, False, True]
    one = seed_variance([a[:, :1]])  # one arm: the one-sample t, n − 1 degrees of freedom
    assert one[0][0] == pytest.approx(0.0004 / 3) and one[1][0] == pytest.approx(2.0)


def _random_columns(rng, K=16, R=199):
    """(K,) deltas, (R, K) replicates (some NaN), two arms of (3, K) and (2, K) runs; some columns without a
    seed term, one delta exactly 0, negative and positive deltas, near and far from 0."""
    delta = rng.normal(0.0, 0.05, K)
    delta[3] = 0.0
    reps = delta + rng.normal(0.0, rng.uniform(0.005, 0.04, K), (R, K))
    reps[rng.random((R, K)) < 0.03] = np.nan
    spread = rng.uniform(0.0, 0.05, K)
    spread[:2] = 0.0  # seeds that agree: no seed term
    a = rng.normal(0.0, 1.0, (3, K)) * spread
    b = rng.normal(0.0, 1.0, (2, K)) * spread
    return delta, reps, a, b


@pytest.mark.parametrize("level", [0.9, 0.95])
def test_delta_interval_matches_the_slow_reference(level):
    delta, reps, a, b = _random_columns(np.random.default_rng(7))
    v, df, _ = seed_variance([a, b])
    lo, hi, p = delta_interval(delta, reps, v, df, level)
    for k in range(len(delta)):
        want = widened_delta(delta[k], reps[:, k], [a[:, k], b[:, k]], level)
        assert (lo[k], hi[k], p[k]) == pytest.approx(want, abs=1e-9), k


def test_p_value_and_interval_agree():
    """p < 1 − level only where the interval excludes 0. An interval that excludes 0 has p ≤ 1 − level + 4 / (n + 1)
    (n defined replicates): its patients-only end is past 0, so at most (1 − level) / 2 · (n − 1) + 1 replicates
    are on the other side, and the bootstrap p counts the observed statistic once more."""
    rng = np.random.default_rng(11)
    R = 199
    for _ in range(20):
        delta, reps, a, b = _random_columns(rng, K=40, R=R)
        v, df, _ = seed_variance([a, b])
        for level in (0.9, 0.95, 0.99):
            lo, hi, p = delta_interval(delta, reps, v, df, level)
            excludes = (lo > 0) | (hi < 0)
            assert not np.any((p < 1 - level) & ~excludes)
            n = (~np.isnan(reps)).sum(axis=0)
            assert np.all(p[excludes] <= 1 - level + 4 / (n[excludes] + 1))


def test_without_a_seed_term_the_interval_is_the_patients_percentile_and_p_the_bootstrap_p():
    delta, reps, _, _ = _random_columns(np.random.default_rng(3))
    zero = np.zeros(len(delta))
    lo, hi, p = delta_interval(delta, reps, zero, np.full(len(delta), np.nan), 0.95)
    np.testing.assert_allclose(lo, np.nanpercentile(reps, 2.5, axis=0), atol=1e-12)
    np.testing.assert_allclose(hi, np.nanpercentile(reps, 97.5, axis=0), atol=1e-12)
    for k in range(len(delta)):
        d = reps[~np.isnan(reps[:, k]), k]
        assert p[k] == pytest.approx(min(1.0, 2 * (min((d <= 0).sum(), (d >= 0).sum()) + 1) / (len(d) + 1)))


@pytest.mark.parametrize("S", [2, 3])
def test_delta_of_two_arms_covers_zero_as_often_as_it_says(S):
    """(~1 s each.) Two methods with the same seed-expected accuracy μ (the model of ``test_seed_interval``:
    patient i is right for seed s when a_i + e_si + τ z_s > −c, a_i shared by every model), S independent seeds
    each, seed spread τ = 0.3 well above the patient noise of the paired delta. The true delta is 0; 300
    simulated studies of 400 patients, 200 resamples each. The widened interval must cover 0 within
    [0.90 − 2.33 se, 0.99 + 2.33 se], and the p-value must reject at 5% at most 0.05 + 2.33 se of the time."""
    n_sims, N, R, tau, noise, mu = 300, 400, 200, 0.3, 0.5, 0.75
    rng = np.random.default_rng(99)
    c = norm.ppf(mu) * np.sqrt(1 + noise ** 2 + tau ** 2)
    hits = rejections = 0
    for _ in range(n_sims):
        a = rng.normal(size=N)
        w = patient_counts(np.arange(N), np.zeros(N), R, rng)
        arms, reps = [], []
        for _arm in range(2):
            z = rng.normal(size=S)
            correct = (a[None, :] + noise * rng.normal(size=(S, N)) + tau * z[:, None] > -c).astype(float)  # (S, N)
            arms.append(correct.mean(axis=1)[:, None])  # (S, 1) each seed's accuracy
            reps.append((w @ correct.T / w.sum(1, keepdims=True)).mean(axis=1))  # (R,) the seed mean per resample
        delta = arms[1].mean(axis=0) - arms[0].mean(axis=0)
        lo, hi, p = delta_interval(delta, (reps[1] - reps[0])[:, None], *seed_variance(arms)[:2], 0.95)
        hits += lo[0] <= 0 <= hi[0]
        rejections += p[0] < 0.05
    cover, se = hits / n_sims, math.sqrt(0.05 * 0.95 / n_sims)
    assert 0.90 - 2.33 * math.sqrt(0.9 * 0.1 / n_sims) <= cover <= min(1.0, 0.99 + 2.33 * math.sqrt(0.99 * 0.01 / n_sims))
    assert rejections / n_sims <= 0.05 + 2.33 * se
