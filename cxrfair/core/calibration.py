"""The binned calibration error from per-bin sums, plug-in and debiased, for both tasks. NumPy only.

Both tasks bin a confidence (multi-class: the top-label probability; multi-label: each
condition's score) into ``groups.ECE_BINS`` equal-width bins and sum, per bin, the weights
``n_b``, the residuals ``s_b = Σ w (o − p)`` and their squares ``q_b = Σ w (o − p)²`` (o the
outcome: top label right, or the condition present). From these:

- ``binned_ece``: the plug-in ECE, ``Σ_b |s_b| / n`` (Guo et al.): what metrics.csv reports as ``ece``.
- ``debiased_ece``: the same with each bin's ``|d̂_b|`` (``d̂_b = s_b / n_b``) replaced by
  ``2|d̂_b| − E|N(d̂_b, σ̂_b²)|``: the plug-in minus a Gaussian estimate of its own upward bias
  (Kumar, Liang & Ma 2019, the debiased estimator of the ℓ1 calibration error), with
  ``σ̂_b² = v̂_b / (n_b − 1)`` the squared standard error of the bin's mean residual. It is still
  biased upward for a bin whose true mean residual is 0 (by about 0.47 σ_b there, against
  0.80 σ_b for the plug-in: no unbiased estimator of |d| exists), but far less, and the bias
  left depends less on how well calibrated a group is, which is what an ECE gap between two
  groups of different calibration needs (``core.intervals``, ``ece_gap``).

Shapes: per-bin arrays ``(..., B)``, results ``(...)``.
"""

from __future__ import annotations

import math

import numpy as np

from cxrfair.core.groups import ratio

# erfc(x) for x ≥ 0 by the Chebyshev fit of Numerical Recipes (erfcc), numpy only: relative error < 6e-7
# (largest near 0, where its coefficients sum to 5.4e-7 instead of 0; tests/core/test_calibration.py).
_ERFC = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398, 1.48851638,
         -0.82215223, 0.17087277)


def normal_cdf(x) -> np.ndarray:
    """Φ(x) of the standard normal, elementwise (relative error < 6e-7): (...) -> (...)."""
    x = np.asarray(x, dtype=np.float64)
    z = np.abs(x) / math.sqrt(2)
    t = 1 / (1 + 0.5 * z)
    poly = np.zeros_like(t)
    for c in _ERFC[::-1]:
        poly = poly * t + c
    tail = 0.5 * t * np.exp(-z * z + poly)  # Φ(−|x|) = erfc(|x| / √2) / 2
    return np.where(x >= 0, 1 - tail, tail)


def expected_abs(mean, sd) -> np.ndarray:
    """E|X| for X ~ N(mean, sd²), elementwise; |mean| where sd is 0: (...), (...) -> (...)."""
    mean, sd = np.broadcast_arrays(np.asarray(mean, dtype=np.float64), np.asarray(sd, dtype=np.float64))
    ok = sd > 0
    s = np.where(ok, sd, 1.0)
    z = np.clip(mean / s, -40.0, 40.0)  # beyond ±40 the tail terms are 0 in float64 anyway
    folded = s * math.sqrt(2 / math.pi) * np.exp(-0.5 * z * z) + mean * (1 - 2 * normal_cdf(-z))
    return np.where(ok, folded, np.abs(mean))


def binned_ece(mass, resid) -> np.ndarray:
    """Plug-in ECE ``Σ_b |s_b| / Σ_b n_b``: (..., B), (..., B) -> (...); NaN without weight."""
    mass, resid = np.asarray(mass, dtype=np.float64), np.asarray(resid, dtype=np.float64)
    return ratio(np.abs(resid).sum(-1), mass.sum(-1))


def debiased_ece(mass, resid, resid_sq) -> np.ndarray:
    """Debiased binned ECE ``Σ_b n_b (2|d̂_b| − E|N(d̂_b, σ̂_b²)|) / Σ_b n_b`` (see the module docstring).

    A bin of total weight ≤ 1 has no variance estimate and keeps its plug-in term.

    Args:
        mass: (..., B) weights n_b per bin. resid: (..., B) Σ w (o − p). resid_sq: (..., B) Σ w (o − p)².

    Returns:
        (...); NaN without weight. Can be below 0 (a calibrated model in a small sample).

    References:
        Kumar, Liang & Ma, "Verified Uncertainty Calibration", NeurIPS 2019 (debiased estimator).
    """
    n = np.asarray(mass, dtype=np.float64)
    s, q = np.asarray(resid, dtype=np.float64), np.asarray(resid_sq, dtype=np.float64)
    d = np.divide(s, n, out=np.zeros_like(s), where=n > 0)
    # Within-bin variance of the residual (weights as frequencies), then the squared standard error of its mean.
    var = np.maximum(np.divide(q, n, out=np.zeros_like(q), where=n > 0) - d * d, 0.0)
    se = np.sqrt(np.divide(var, n - 1, out=np.zeros_like(var), where=n > 1))
    return ratio((n * (2 * np.abs(d) - expected_abs(d, se))).sum(-1), n.sum(-1))
