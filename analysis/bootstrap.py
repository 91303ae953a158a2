"""Bootstrap resampling as weight matrices: all replicates of every metric in one pass.

A replicate is represented by how often each test image was drawn, a row of an (R, N) count
matrix; the metrics in ``metrics`` accept it as ``weights``. Resampling is stratified: images
are redrawn within their stratum (the sex × age cell), so every replicate keeps the group sizes
of the test set, as the cohort design fixes them.
"""

from __future__ import annotations

import warnings

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


def resample_counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(R, M) indices -> (R, n) float counts: how often each sample appears in each replicate.

    One bincount over indices offset by ``r * n``, instead of one bincount per replicate.
    """
    r = idx.shape[0]
    flat = (idx + n * np.arange(r)[:, None]).ravel()
    return np.bincount(flat, minlength=r * n).reshape(r, n).astype(np.float64)


def interval(replicates, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the replicate axis, ignoring NaN replicates.

    Args:
        replicates: (R, ...) replicate values.
        level: coverage, e.g. 0.95 for the 2.5th and 97.5th percentiles.

    Returns:
        (low, high), each (...); NaN where every replicate is NaN.
    """
    reps = np.asarray(replicates, dtype=np.float64)
    alpha = (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN, by the NaN rule
        lo, hi = np.nanquantile(reps, [alpha, 1 - alpha], axis=0)
    return lo, hi
