"""Bootstrap resampling as weight matrices: all replicates of every metric in one pass.

A replicate is represented by how often each test image was drawn, a row of an (R, N) count
matrix; the metrics in ``metrics`` accept it as ``weights``. Resampling is stratified and by
patient (``patient_counts``): patients are redrawn with replacement within their stratum (the
sex × age cell by default; strata of fewer than a few patients pooled, ``merge_small_strata``),
and every image of a drawn patient comes with it. Images of one patient are
correlated, so redrawing them one by one (``stratified_indices`` on images) would make intervals
too narrow whenever a patient has several test images. Each replicate keeps the number of
patients per stratum, as the cohort design fixes them.
"""

from __future__ import annotations

import numpy as np


def stratified_indices(strata, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Draw bootstrap samples with replacement within each stratum.

    Args:
        strata: (N,) stratum label of each sample.
        n_boot: R, the number of replicates.
        rng: numpy Generator (the caller seeds it).

    Returns:
        (R, N) int indices into the samples; replicate r is the data ``x[idx[r]]``.
    """
    strata = np.asarray(strata)
    idx = np.empty((n_boot, len(strata)), dtype=np.int64)
    # Strata in sorted order so the draw depends only on the data and the seed.
    for s in sorted(set(strata.tolist())):
        members = np.flatnonzero(strata == s)
        idx[:, members] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
    return idx


def patient_strata(patients, strata) -> tuple[np.ndarray, np.ndarray]:
    """Number the patients and give each one stratum.

    A patient whose images fall in several strata (the age band changes between visits) belongs
    to the stratum of their first image in the given order (analyze passes images sorted by
    ``image_id``, which for NIH ids ``<patient>_<visit>.png`` is the first visit).

    Args:
        patients: (N,) patient id of each image.
        strata: (N,) stratum label of each image.

    Returns:
        code: (N,) int patient index in [0, P), numbered by first appearance (so with one image
            per patient, patient i is image i and the draws equal an image bootstrap's).
        patient_stratum: (P,) stratum of each patient.
    """
    patients, strata = np.asarray(patients), np.asarray(strata)
    _, first, inverse = np.unique(patients, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)], strata[np.sort(first)]


def merge_small_strata(patients, strata, min_patients: int) -> tuple[np.ndarray, list[str]]:
    """Pool the strata that hold fewer than ``min_patients`` patients.

    Within a stratum of n patients the bootstrap variance is (n − 1)/n of the plain one (none at
    all for n = 1), so tiny cells of a fine cross (sex × five age bins × race) would make the
    intervals too narrow. Rule: every stratum with fewer than ``min_patients`` patients (each
    patient counted in the stratum of its first image, as ``patient_strata``) joins one pooled
    stratum; if the pool itself has fewer than ``min_patients`` patients, it joins the smallest
    remaining stratum (fewest patients, then first by name). With no stratum left, everything is
    one stratum.

    Args:
        patients: (N,) patient id of each image. strata: (N,) stratum label of each image.
        min_patients: the smallest stratum kept as it is.

    Returns:
        ((N,) stratum labels after pooling (a pooled stratum is named by its members joined
        with "+"), the sorted names of the strata that were pooled; empty if none).
    """
    strata = np.asarray(strata).astype(str)
    _, patient_stratum = patient_strata(patients, strata)
    names, sizes = np.unique(patient_stratum, return_counts=True)
    small = [str(n) for n, k in zip(names, sizes) if k < min_patients]
    if not small:
        return strata, []
    big = {str(n): int(k) for n, k in zip(names, sizes) if k >= min_patients}
    pooled = set(small)
    if sum(int(k) for n, k in zip(names, sizes) if str(n) in pooled) < min_patients and big:
        pooled.add(min(big, key=lambda n: (big[n], n)))
    label = "+".join(sorted(pooled))
    return np.where(np.isin(strata, sorted(pooled)), label, strata), sorted(pooled)


def patient_counts(patients, strata, n_boot: int, rng: np.random.Generator, dtype=np.float64) -> np.ndarray:
    """Stratified patient (cluster) bootstrap as an (R, N) matrix of image counts.

    Patients are drawn with replacement within their stratum (``patient_strata``); an image's
    count in a replicate is its patient's count, so all of a patient's images move together.

    Args:
        patients: (N,) patient id of each image.
        strata: (N,) stratum label of each image.
        n_boot: R, the number of replicates.
        rng: numpy Generator (the caller seeds it).
        dtype: of the result; None = the smallest unsigned integer type that holds the counts
            (uint8 in practice: 1,000 x 40,000 counts take 40 MB instead of 320 MB as float64).

    Returns:
        (R, N) counts, usable as ``weights`` by every metric.
    """
    code, patient_stratum = patient_strata(patients, strata)
    per_patient = stratified_counts(patient_stratum, n_boot, rng)  # (R, P)
    if dtype is None:
        dtype = np.min_scalar_type(int(per_patient.max(initial=0)))
    return per_patient.astype(dtype)[:, code]


def stratified_counts(strata, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``resample_counts(stratified_indices(strata, n_boot, rng), N)`` (the same draws, bit for bit)
    without the (R, N) int64 index matrix: one stratum's draws at a time.

    Returns:
        (R, N) int32 counts.
    """
    strata = np.asarray(strata)
    counts = np.zeros((n_boot, len(strata)), dtype=np.int32)
    for s in sorted(set(strata.tolist())):  # the order and calls of ``stratified_indices``
        members = np.flatnonzero(strata == s)
        draws = rng.integers(0, len(members), size=(n_boot, len(members)))
        counts[:, members] = np.bincount((draws + len(members) * np.arange(n_boot)[:, None]).ravel(),
                                         minlength=n_boot * len(members)).reshape(n_boot, len(members))
    return counts


def resample_counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(R, M) indices -> (R, n) float counts: how often each sample appears in each replicate.

    One bincount over indices offset by ``r * n``, instead of one bincount per replicate.
    """
    r = idx.shape[0]
    flat = (idx + n * np.arange(r)[:, None]).ravel()
    return np.bincount(flat, minlength=r * n).reshape(r, n).astype(np.float64)


def interval(replicates, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the replicate axis, ignoring NaN replicates.

    The same numbers as ``np.nanquantile(replicates, [a, 1 - a], axis=0)`` (linear
    interpolation), but for every column at once: one sort of the (R, K) block instead of a
    Python-level loop per column, which for thousands of metric values was most of the time of
    ``compute``.

    Args:
        replicates: (R, ...) replicate values.
        level: coverage, e.g. 0.95 for the 2.5th and 97.5th percentiles.

    Returns:
        (low, high), each (...); NaN where every replicate is NaN.
    """
    reps = np.asarray(replicates, dtype=np.float64)
    shape = reps.shape[1:]
    x = np.sort(reps.reshape(len(reps), -1), axis=0)  # NaN sort last
    n = (~np.isnan(x)).sum(axis=0)  # (K,) defined replicates per column
    alpha = (1 - level) / 2
    return tuple(quantile_sorted(x, n, q).reshape(shape) for q in (alpha, 1 - alpha))


def quantile_sorted(x: np.ndarray, n: np.ndarray, q) -> np.ndarray:
    """(R, K) columns sorted with NaN last, (K,) counts of numbers, q (scalar or (K,)) -> (K,) q-quantiles
    (numpy's linear method)."""
    virtual = q * (n - 1)
    below = np.floor(virtual)
    gamma = virtual - below
    lo = np.clip(below, 0, None).astype(np.int64)
    hi = np.minimum(lo + 1, np.maximum(n - 1, 0))
    cols = np.arange(x.shape[1])
    a, b = x[np.minimum(lo, len(x) - 1), cols], x[np.minimum(hi, len(x) - 1), cols]
    diff = b - a
    # numpy's _lerp: from b downwards when gamma >= 0.5, so the two ends are exact.
    out = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
    return np.where(n > 0, out, np.nan)


def p_value(replicates, null: float = 0.0) -> np.ndarray:
    """Two-sided bootstrap p-value of "the statistic equals ``null``", per column, ignoring NaN replicates.

    With k₋ of the n defined replicates at or below ``null`` and k₊ at or above it,
    p = min(1, 2 · min(k₋ + 1, k₊ + 1) / (n + 1)): twice the smaller tail, counting the observed
    statistic as one more replicate so that p is never 0 from a finite number of replicates
    (the smallest p of R replicates is 2 / (R + 1)). It agrees with the percentile ``interval``:
    a 95% interval excludes ``null`` about when p < 0.05. A statistic whose replicates all equal
    ``null`` (no change at all) has p = 1.

    Args:
        replicates: (R, ...) replicate values of the statistic (e.g. paired differences).
        null: the value tested.

    Returns:
        (...) p-values; NaN where no replicate is defined.
    """
    reps = np.asarray(replicates, dtype=np.float64)
    n = (~np.isnan(reps)).sum(axis=0)
    below = (reps <= null).sum(axis=0)  # NaN compares False: not counted
    above = (reps >= null).sum(axis=0)
    p = np.minimum(1.0, 2.0 * (np.minimum(below, above) + 1) / (n + 1))
    return np.where(n > 0, p, np.nan)


def holm(p) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values over all finite entries (NaN entries ignored and kept NaN).

    Sorted ascending, the i-th of m p-values (0-based) becomes max over j <= i of min(1, (m − j) p₍ⱼ₎);
    rejecting where the adjusted p is below α controls the family-wise error rate at α for any
    dependence between the tests.

    Args:
        p: (...) p-values.

    Returns:
        (...) adjusted p-values, same shape.
    """
    p = np.asarray(p, dtype=np.float64)
    flat = p.reshape(-1)
    out = np.full(flat.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(flat))
    order = ok[np.argsort(flat[ok], kind="stable")]
    m = len(order)
    out[order] = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * flat[order]))
    return out.reshape(p.shape)
