"""The two-level bootstrap (``replicates.seed_resampled``): against a loop, and its coverage by simulation.

Truth known by construction: each seed s has accuracy p_s = μ + τ·z_s on the patient population,
the test set is N patients, the analysis sees S seeds on that one test set. The target is μ, the
accuracy expected of the method over seeds and patients. A patients-only interval of the seed mean
ignores the seed term τ²/S and undercovers; the two-level one must cover μ about as often as it says.
"""

from __future__ import annotations

import numpy as np
import pytest

from cxrfair.analysis.replicates import seed_resampled
from cxrfair.core.bootstrap import interval, patient_counts


def test_seed_resampled_matches_a_loop_over_drawn_seeds_with_nan():
    rng = np.random.default_rng(0)
    stack = rng.normal(size=(3, 50, 4))
    stack[1, :, 2] = np.nan  # a metric undefined for one seed: skipped when drawn
    stack[:, 7, 3] = np.nan  # undefined for every seed on one replicate: NaN
    got = seed_resampled(stack, np.random.default_rng(1))
    draws = np.random.default_rng(1).integers(0, 3, size=(50, 3))
    for r in range(50):
        for k in range(4):
            vals = [stack[s, r, k] for s in draws[r] if not np.isnan(stack[s, r, k])]
            want = np.mean(vals) if vals else np.nan
            assert np.isclose(got[r, k], want, rtol=0, atol=1e-12, equal_nan=True), (r, k)
    np.testing.assert_array_equal(seed_resampled(stack[:1], np.random.default_rng(1)), stack[0])  # one seed: patients only


def _coverage(n_sims: int, S: int, tau: float, noise: float = 0.5, N: int = 400, R: int = 200, mu: float = 0.75):
    """(two-level, patients-only) coverage of μ by 95% intervals of the mean of S seeds.

    Patient i is classified correctly by seed s when a_i + e_si + τ z_s > −c: a_i ~ N(0, 1) the patient's
    easiness (shared by all seeds, as real models share their features), e_si ~ N(0, noise²) the seed's
    own mistakes on that patient, z_s ~ N(0, 1) the seed's overall luck. Then μ = Φ(c / √(1 + noise² + τ²)),
    so c is set to make μ the given accuracy.
    """
    from scipy.stats import norm

    rng = np.random.default_rng(123)
    c = norm.ppf(mu) * np.sqrt(1 + noise**2 + tau**2)
    hits = np.zeros(2)
    strata = np.zeros(N)
    for sim in range(n_sims):
        a, z = rng.normal(size=N), rng.normal(size=S)
        correct = (a[None, :] + noise * rng.normal(size=(S, N)) + tau * z[:, None] > -c).astype(float)  # (S, N)
        w = patient_counts(np.arange(N), strata, R, rng)  # (R, N)
        stack = (w @ correct.T / w.sum(1, keepdims=True)).T[:, :, None]  # (S, R, 1) per-seed replicates
        for j, seeds in enumerate((np.random.default_rng([sim, 1]), None)):
            lo, hi = interval(seed_resampled(stack, seeds), 0.95)
            hits[j] += lo[0] <= mu <= hi[0]
    return hits / n_sims


@pytest.mark.slow
def test_two_level_interval_covers_the_seed_expected_accuracy_and_patients_only_does_not():
    """(~15 s.) Measured: S = 5: 0.92 two-level vs 0.74 patients-only; S = 3: 0.86 vs 0.63; S = 2: 0.76 vs 0.56;
    S = 10: 0.91 vs 0.79; τ = 0 (no seed variance): 0.95 vs 0.93 (the two-level interval does not overcover)."""
    # τ = 0.2: seeds' accuracies differ by sd ≈ 0.06 (LoRA's 0.05 in the issue); S = 5 seeds.
    two_level, patients_only = _coverage(n_sims=300, S=5, tau=0.2)
    assert patients_only < 0.8
    assert 0.88 <= two_level <= 0.99  # the percentile bootstrap of 5 seeds is a little short of 0.95, not far
