"""core.bootstrap.p_value and holm against plain loops, and the p-value's agreement with the interval."""

from __future__ import annotations

import numpy as np
import pytest

from cxrfair.core.bootstrap import holm, interval, p_value


def _p_loop(column) -> float:
    d = [x for x in column if not np.isnan(x)]
    if not d:
        return np.nan
    below = sum(1 for x in d if x <= 0)
    above = sum(1 for x in d if x >= 0)
    return min(1.0, 2 * (min(below, above) + 1) / (len(d) + 1))


def _holm_loop(p) -> list:
    ok = [i for i in range(len(p)) if np.isfinite(p[i])]
    order = sorted(ok, key=lambda i: p[i])
    out, running = [np.nan] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        out[i] = running
    return out


@pytest.mark.parametrize("seed", range(3))
def test_p_value_matches_a_loop_column_by_column(seed):
    rng = np.random.default_rng(seed)
    reps = rng.normal(loc=rng.normal(size=7) * 0.1, scale=0.05, size=(200, 7))
    reps[rng.random(reps.shape) < 0.1] = np.nan  # undefined replicates are skipped
    reps[:, 3] = np.nan  # a metric undefined everywhere: NaN
    reps[:, 4] = 0.0  # no change at all: p = 1
    reps[:50, 5] = 0.0  # ties at the null count on both sides
    got = p_value(reps)
    want = [_p_loop(reps[:, k]) for k in range(7)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    assert np.isnan(got[3]) and got[4] == 1.0


def test_p_value_never_reaches_zero_and_agrees_with_the_interval():
    reps = np.arange(1, 1000, dtype=float)[:, None] / 1000  # all 999 replicates above 0
    assert p_value(reps)[0] == pytest.approx(2 / 1000)
    rng = np.random.default_rng(0)
    cols = rng.normal(loc=np.linspace(-0.3, 0.3, 41), scale=0.1, size=(4000, 41))
    lo, hi = interval(cols, 0.95)
    excludes = (lo > 0) | (hi < 0)
    p = p_value(cols)
    # The same event up to the discreteness of the tails: they disagree only where p is at the boundary.
    assert np.all(excludes[p < 0.045]) and not np.any(excludes[p > 0.055])


def test_holm_matches_a_plain_loop_with_nan_and_ties():
    rng = np.random.default_rng(1)
    for _ in range(20):
        p = rng.choice([0.001, 0.01, 0.02, 0.04, 0.2, 0.9, np.nan], size=rng.integers(1, 12))
        np.testing.assert_allclose(holm(p), _holm_loop(p), rtol=0, atol=1e-15, equal_nan=True)
    assert holm(np.array([[0.01, 0.04], [np.nan, 0.03]])).shape == (2, 2)
