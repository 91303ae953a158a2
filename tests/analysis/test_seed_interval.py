"""The seed-variance widening of a seed mean's interval (``replicates.seed_widened``) against slow references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from scipy.stats import t as t_dist

from cxrfair.analysis.replicates import seed_resampled, seed_widened, t_quantile
from cxrfair.core.bootstrap import interval, patient_counts


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7.5, 30, 200])
@pytest.mark.parametrize("q", [0.975, 0.95, 0.995])
def test_t_quantile_matches_scipy(df, q):
    assert t_quantile(q, df) == pytest.approx(t_dist.ppf(q, df), rel=1e-7)


def test_t_quantile_refuses_what_it_cannot_compute():
    for q, df in ((0.5, 3), (1.0, 3), (0.975, 0)):
        with pytest.raises(ValueError):
            t_quantile(q, df)


def test_seed_widened_by_hand():
    per_run = np.array([[0.80, 0.10, 0.5, np.nan], [0.84, 0.16, np.nan, np.nan], [0.82, 0.13, np.nan, 0.2]])
    means = np.array([0.82, 0.13, 0.5, 0.2])
    low, high = means - [0.02, 0.03, 0.01, 0.05], means + [0.03, 0.02, 0.01, 0.05]
    lo, hi = seed_widened(means, low, high, per_run, 0.95)
    for k in range(2):  # three defined runs: widened by t_2 · sd / √3, each side in quadrature
        col = per_run[:, k]
        half = t_dist.ppf(0.975, 2) * col.std(ddof=1) / math.sqrt(3)
        assert lo[k] == pytest.approx(means[k] - math.hypot(means[k] - low[k], half), abs=1e-9)
        assert hi[k] == pytest.approx(means[k] + math.hypot(high[k] - means[k], half), abs=1e-9)
        assert lo[k] < low[k] and hi[k] > high[k]
    # One defined run: the seed variance is unknown and the interval stays the patients-only one.
    np.testing.assert_allclose([lo[2], hi[2], lo[3], hi[3]], [low[2], high[2], low[3], high[3]])


@pytest.mark.parametrize("S", [3, 5])
def test_widened_interval_covers_the_seed_expected_accuracy(S):
    """(~1 s each.) The model of ``test_seed_variance``: patient i is right for seed s when
    a_i + e_si + τ z_s > −c (a_i shared easiness, e_si the seed's own mistakes, z_s its luck), so the
    seed-expected accuracy is μ = Φ(c / √(1 + noise² + τ²)). 300 simulated studies of S seeds on 400
    patients, 200 patient resamples each; the widened 95% interval must cover μ within
    [0.90 − 2.33 se, 0.99 + 2.33 se] (se of a share at 300 draws: 0.017 at 0.90, 0.006 at 0.99).
    Measured: 0.973 (S = 3), 0.960 (S = 5); the two-level interval 0.86 and 0.92 in the same model."""
    n_sims, N, R, tau, noise, mu = 300, 400, 200, 0.2, 0.5, 0.75
    rng = np.random.default_rng(321)
    c = norm.ppf(mu) * np.sqrt(1 + noise**2 + tau**2)
    hits = 0
    for _ in range(n_sims):
        a, z = rng.normal(size=N), rng.normal(size=S)
        correct = (a[None, :] + noise * rng.normal(size=(S, N)) + tau * z[:, None] > -c).astype(float)  # (S, N)
        w = patient_counts(np.arange(N), np.zeros(N), R, rng)
        stack = (w @ correct.T / w.sum(1, keepdims=True)).T[:, :, None]  # (S, R, 1)
        per_run = correct.mean(axis=1)[:, None]  # (S, 1)
        mean = per_run.mean(axis=0)
        lo, hi = seed_widened(mean, *interval(seed_resampled(stack, None), 0.95), per_run, 0.95)
        hits += lo[0] <= mu <= hi[0]
    cover = hits / n_sims
    assert 0.90 - 2.33 * math.sqrt(0.9 * 0.1 / n_sims) <= cover <= min(1.0, 0.99 + 2.33 * math.sqrt(0.99 * 0.01 / n_sims))


def test_t_quantile_against_printed_tables():
    # Student's t table (two-sided 95%): the values a reader checks the seed widening with.
    for df, want in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(want, abs=1e-4)
