"""The seed-variance widening of a seed mean's interval (``replicates.seed_widened``) against slow references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import t as t_dist

from cxrfair.analysis.replicates import seed_widened, t_quantile


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
