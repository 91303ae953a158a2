"""Stratified resampling, count matrices and percentile intervals."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cxrfair.core.bootstrap import (
    interval,
    merge_small_strata,
    patient_counts,
    patient_strata,
    resample_counts,
    stratified_counts,
    stratified_indices,
)


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


def _clustered(seed=0, n_patients=40):
    """(N,) patient ids (1-4 images each, ids not in image order) and (N,) strata, in image order."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n_patients)
    ids = rng.permutation(1000)[:n_patients]
    patients = np.repeat(ids, sizes)
    strata = np.repeat(rng.choice(["M×young", "F×young", "M×old", "F×old"], n_patients), sizes)
    order = rng.permutation(len(patients))  # a patient's images are not contiguous
    return patients[order], strata[order]


def test_a_patients_images_are_drawn_together():
    patients, strata = _clustered()
    w = patient_counts(patients, strata, 300, np.random.default_rng(1))
    assert w.shape == (300, len(patients))
    for pid in np.unique(patients):
        cols = w[:, patients == pid]
        np.testing.assert_array_equal(cols, np.repeat(cols[:, :1], cols.shape[1], axis=1))
    # The number of patients drawn per stratum is the number there is, in every replicate.
    first = {pid: i for i, pid in reversed(list(enumerate(patients)))}
    for s in np.unique(strata):
        members = [i for pid, i in first.items() if strata[i] == s]
        assert (w[:, members].sum(1) == len(members)).all()
    assert (w > 1).any() and (w == 0).any()  # it does resample


def test_one_image_per_patient_is_the_image_bootstrap():
    """With distinct patients the draws are exactly the stratified image bootstrap's, whatever the ids."""
    strata = np.array(list("aabbbbcccccd") * 3)
    patients = np.random.default_rng(0).permutation(10_000)[:len(strata)]
    got = patient_counts(patients, strata, 500, np.random.default_rng(7))
    want = resample_counts(stratified_indices(strata, 500, np.random.default_rng(7)), len(strata))
    np.testing.assert_array_equal(got, want)


def test_a_patient_in_several_strata_belongs_to_its_first_images():
    patients = np.array(["p2", "p1", "p2", "p3", "p1"])
    strata = np.array(["young", "old", "old", "old", "young"])  # p2 and p1 change age band
    code, stratum = patient_strata(patients, strata)
    np.testing.assert_array_equal(code, [0, 1, 0, 2, 1])  # numbered by first appearance
    np.testing.assert_array_equal(stratum, ["young", "old", "old"])
    w = patient_counts(patients, strata, 200, np.random.default_rng(0))
    assert (w[:, 0] == 1).all()  # p2 is alone in "young": always drawn once
    assert (w[:, 1] + w[:, 3] == 2).all()  # p1 and p3 share "old": two draws between them


def _strata_of(sizes: dict) -> tuple[np.ndarray, np.ndarray]:
    """One image per patient: (patients, strata) with ``sizes[name]`` patients in each stratum."""
    strata = np.array([name for name, k in sizes.items() for _ in range(k)])
    return np.arange(len(strata)).astype(str), strata


@pytest.mark.parametrize("sizes, pooled", [
    ({"A": 10, "B": 6, "C": 2, "D": 1}, ["B", "C", "D"]),  # pool of 3 < 5: joins B, the smallest big stratum
    ({"A": 10, "C": 3, "D": 3}, ["C", "D"]),  # pool of 6 stands alone
    ({"A": 2, "B": 1}, ["A", "B"]),  # all small: one stratum
    ({"A": 5, "B": 5}, []),  # nothing to pool
    ({"B": 6, "A": 6, "C": 4}, ["A", "C"]),  # A and B tie at 6 patients: the first by name takes the pool
])
def test_merge_small_strata_rule(sizes, pooled):
    patients, strata = _strata_of(sizes)
    merged, names = merge_small_strata(patients, strata, 5)
    assert names == pooled
    want = np.where(np.isin(strata, pooled), "+".join(pooled), strata)
    np.testing.assert_array_equal(merged, want)


def test_merge_counts_patients_in_their_first_images_stratum():
    # p0's first image is in A, its four others in B: A holds one patient, B six (p1-p6), C five.
    patients = np.array(["p0"] * 5 + [f"p{i}" for i in range(1, 7)] + [f"q{i}" for i in range(5)])
    strata = np.array(["A"] + ["B"] * 10 + ["C"] * 5)
    merged, names = merge_small_strata(patients, strata, 5)
    assert names == ["A", "C"]  # A alone is still small: it joins C, smaller than B
    np.testing.assert_array_equal(merged, ["A+C"] + ["B"] * 10 + ["A+C"] * 5)


def test_package_import_is_light():
    code = ("import sys, cxrfair.analysis, cxrfair.analysis.cli\n"
            "print(*(m in sys.modules for m in ('torch', 'jax', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]


@pytest.mark.parametrize("level", [0.95, 0.9, 0.5])
def test_interval_equals_nanquantile_column_by_column(level):
    rng = np.random.default_rng(4)
    reps = rng.normal(size=(101, 40, 3))
    reps[rng.random(reps.shape) < 0.2] = np.nan  # scattered NaN replicates
    reps[:, 0, 0] = np.nan  # a column with none defined
    reps[1:, 1, 0] = np.nan  # one defined
    reps[:, 2, 0] = 0.25  # all equal
    lo, hi = interval(reps, level)
    assert lo.shape == hi.shape == (40, 3)
    a = (1 - level) / 2
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        want_lo, want_hi = np.nanquantile(reps, [a, 1 - a], axis=0)
    np.testing.assert_array_equal(lo, want_lo)  # bit for bit
    np.testing.assert_array_equal(hi, want_hi)
    assert np.isnan(lo[0, 0]) and lo[1, 0] == hi[1, 0] == reps[0, 1, 0] and lo[2, 0] == 0.25


def test_stratified_counts_are_the_counts_of_stratified_indices():
    """The lean path (one stratum's draws at a time) makes the same draws as the index matrix."""
    strata = np.random.default_rng(3).choice(list("abcde"), 300, p=[0.5, 0.2, 0.2, 0.09, 0.01])
    got = stratified_counts(strata, 250, np.random.default_rng(11))
    want = resample_counts(stratified_indices(strata, 250, np.random.default_rng(11)), len(strata))
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32


def test_compact_patient_counts_equal_the_float_counts():
    patients = np.random.default_rng(0).integers(0, 40, 120)
    strata = patients % 3
    want = patient_counts(patients, strata, 300, np.random.default_rng(5))
    got = patient_counts(patients, strata, 300, np.random.default_rng(5), dtype=None)
    assert want.dtype == np.float64 and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
