"""The debiased binned ECE against slow references written here (math.erf, numeric integration, per-bin loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxrfair.core import metrics as M
from cxrfair.core import multilabel as ML
from cxrfair.core.calibration import binned_ece, debiased_ece, expected_abs, normal_cdf


def test_normal_cdf_matches_math_erf():
    x = np.r_[np.linspace(-9, 9, 721), -40.0, 40.0, 0.0]
    want = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in x])
    # The fit's relative error on erfc is < 6e-7 (5.4e-7 at 0, where its coefficients sum to 5.4e-7): so on
    # Φ(x) for x ≤ 0, deep tails included, and absolute (< 6e-7 · 0.5) on Φ(x) = 1 − Φ(−x) for x > 0.
    neg = x <= 0
    np.testing.assert_allclose(normal_cdf(x[neg]), want[neg], rtol=6e-7, atol=0)
    np.testing.assert_allclose(normal_cdf(x[~neg]), want[~neg], rtol=0, atol=3e-7)


def _expected_abs_integral(mu, sd):
    """E|X| by the trapezoid rule on ±12 sd around the mean (the density beyond is < 1e-31)."""
    x = np.linspace(mu - 12 * sd, mu + 12 * sd, 200_001)
    f = np.abs(x) * np.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    return float(np.sum((f[1:] + f[:-1]) * np.diff(x)) / 2)


@pytest.mark.parametrize("mu,sd", [(0.0, 1.0), (0.3, 0.1), (-0.05, 0.2), (2.0, 0.5), (-1e-3, 3e-3)])
def test_expected_abs_matches_numeric_integration(mu, sd):
    # The trapezoid rule's error at 200,001 points is ~1e-10 of the scale; the cdf fit's 1.2e-7 relative.
    assert expected_abs(mu, sd) == pytest.approx(_expected_abs_integral(mu, sd), rel=1e-6, abs=1e-12)


def test_expected_abs_is_abs_mean_without_spread():
    np.testing.assert_array_equal(expected_abs(np.array([-0.2, 0.0, 0.4]), 0.0), [0.2, 0.0, 0.4])


def _debiased_loop(conf, resid, n_bins=15):
    """Per-bin loop: mean residual d, its standard error from the sample variance (ddof 1), 2|d| − E|N(d, se²)|
    by numeric integration; a bin of one sample keeps |d|."""
    total = 0.0
    for b in range(n_bins):
        m = (conf > b / n_bins) & (conf <= (b + 1) / n_bins) if b else (conf <= 1 / n_bins)
        k = int(m.sum())
        if not k:
            continue
        d = resid[m].mean()
        se = math.sqrt(resid[m].var(ddof=1) / k) if k > 1 else 0.0
        total += k * (2 * abs(d) - (_expected_abs_integral(d, se) if se > 0 else abs(d)))
    return total / len(conf)


def _multiclass(seed, n=150):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.2
    return y, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_debiased_ece_matches_the_per_bin_loop(seed):
    y, p = _multiclass(seed)
    conf, correct = p.max(1), (p.argmax(1) == y).astype(float)
    assert M.ece_debiased(y, p) == pytest.approx(_debiased_loop(conf, correct - conf), abs=1e-6)
    assert M.all_metrics(y, p)["ece_debiased"] == M.ece_debiased(y, p)
    assert M.all_metrics(y, p)["ece"] == pytest.approx(M.ece(y, p), abs=1e-15)


@pytest.mark.parametrize("seed", [0, 1])
def test_multilabel_debiased_ece_matches_the_per_bin_loop(seed):
    rng = np.random.default_rng(seed)
    Y = (rng.random((200, 2)) < 0.3).astype(float)
    Y[rng.random((200, 2)) < 0.1] = np.nan  # masked labels are left out
    P = 1 / (1 + np.exp(-(1.5 * (2 * np.nan_to_num(Y) - 1) + rng.normal(0, 1.5, Y.shape))))
    got = ML.condition_metrics(Y, P)["ece_debiased"]
    for c in range(2):
        keep = ~np.isnan(Y[:, c])
        assert got[c] == pytest.approx(_debiased_loop(P[keep, c], Y[keep, c] - P[keep, c]), abs=1e-6)
        assert ML.ece_debiased(Y[:, c], P[:, c]) == pytest.approx(got[c], abs=1e-15)


def test_bootstrap_counts_equal_repeating_the_images():
    y, p = _multiclass(3, n=60)
    counts = np.random.default_rng(4).multinomial(60, np.full(60, 1 / 60), size=3)
    for r, w in enumerate(counts):
        rows = np.repeat(np.arange(60), w)
        assert M.ece_debiased(y, p, weights=counts)[r] == pytest.approx(M.ece_debiased(y[rows], p[rows]), abs=1e-12)
        Y = (y == 0).astype(float)[:, None]
        assert ML.condition_metrics(Y, p[:, :1], weights=counts)["ece_debiased"][r, 0] == pytest.approx(
            ML.condition_metrics(Y[rows], p[rows, :1])["ece_debiased"][0], abs=1e-12)


def test_weights_are_frequencies_on_both_paths_of_the_multilabel_kernel():
    """Counts ≤ 255 take the byte/integer path, larger weights the float64 one: both equal the per-bin loop with
    frequency weights (mean Σ w r / Σ w, variance Σ w (r − d)² / (Σ w − 1)). Scaling the weights is not neutral
    here, unlike a ratio metric: 300 copies of every image make every bin's standard error smaller."""
    rng = np.random.default_rng(5)
    y = (rng.random(80) < 0.4).astype(float)
    p = rng.uniform(0.02, 0.98, 80)
    for w in (rng.integers(0, 4, 80).astype(float), 300.0 * rng.integers(1, 3, 80)):
        rows = np.repeat(np.arange(80), w.astype(int))
        want = _debiased_loop(p[rows], y[rows] - p[rows])
        assert ML.ece_debiased(y, p, weights=w) == pytest.approx(want, abs=1e-6)


def test_debiasing_removes_most_of_the_plug_in_bias_of_a_calibrated_model():
    """A calibrated binary model (y ~ Bernoulli(p)): true ECE 0. Over 400 samples of 100 images the plug-in's
    mean is ~0.8 σ per bin; the debiased one's at most ~0.47 σ (its bias at a calibrated bin), so less than
    0.65 of the plug-in's. Monte Carlo error of either mean: < 2% of it (seeded)."""
    rng = np.random.default_rng(0)
    plug, deb = [], []
    for _ in range(400):
        p = rng.uniform(0.05, 0.95, 100)
        y = (rng.random(100) < p).astype(float)
        plug.append(float(ML.ece(y, p)))
        deb.append(float(ML.ece_debiased(y, p)))
    assert np.mean(plug) > 0.05  # the plug-in's bias at this size is large
    assert abs(np.mean(deb)) < 0.65 * np.mean(plug)


def test_per_bin_sums_give_both_estimates():
    mass = np.array([[10.0, 0.0, 1.0]])
    resid = np.array([[2.0, 0.0, -0.5]])
    sq = np.array([[1.0, 0.0, 0.25]])
    assert binned_ece(mass, resid)[0] == pytest.approx(2.5 / 11)
    d, se = 0.2, math.sqrt((0.1 - 0.04) / 9)
    want = (10 * (2 * d - _expected_abs_integral(d, se)) + 1 * 0.5) / 11  # the bin of weight 1 keeps |d|
    assert debiased_ece(mass, resid, sq)[0] == pytest.approx(want, abs=1e-9)
    assert np.isnan(debiased_ece(np.zeros((1, 3)), np.zeros((1, 3)), np.zeros((1, 3)))[0])
