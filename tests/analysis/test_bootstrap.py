"""Stratified resampling, count matrices and percentile intervals."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cxrfair.analysis.bootstrap import interval, resample_counts, stratified_indices


def test_stratified_indices_stay_in_stratum_and_keep_sizes():
    strata = np.array(list("aaabbbbbc"))
    idx = stratified_indices(strata, 200, np.random.default_rng(0))
    assert idx.shape == (200, 9)
    np.testing.assert_array_equal(strata[idx], np.broadcast_to(strata, idx.shape))  # sizes kept per row
    assert (idx[:, 8] == 8).all()  # a stratum of one is always itself
    assert len(np.unique(idx[:, :3])) == 3  # with replacement, all members come up
    again = stratified_indices(strata, 200, np.random.default_rng(0))
    np.testing.assert_array_equal(idx, again)


def test_resample_counts_equal_per_row_bincount():
    idx = np.random.default_rng(1).integers(0, 7, size=(50, 7))
    w = resample_counts(idx, 7)
    assert w.shape == (50, 7) and (w.sum(1) == 7).all()
    for r in range(50):
        np.testing.assert_array_equal(w[r], np.bincount(idx[r], minlength=7))


def test_interval_is_the_percentile_interval_and_skips_nan():
    reps = np.random.default_rng(2).normal(size=(1000, 3))
    reps[:10, 1] = np.nan
    reps[:, 2] = np.nan
    lo, hi = interval(reps, 0.9)
    assert lo[0] == pytest.approx(np.percentile(reps[:, 0], 5)) and hi[0] == pytest.approx(np.percentile(reps[:, 0], 95))
    assert lo[1] == pytest.approx(np.percentile(reps[10:, 1], 5))
    assert np.isnan(lo[2]) and np.isnan(hi[2])


def test_package_import_is_light():
    code = ("import sys, cxrfair.analysis, cxrfair.analysis.cli\n"
            "print(*(m in sys.modules for m in ('torch', 'jax', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]
