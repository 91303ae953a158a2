"""An evaluated run and the arithmetic on its bootstrap replicates, shared by every table.

All runs on the same test images share one (R, N) matrix of bootstrap counts (``engine``), so an
``Evaluated`` run's replicate r of any metric is that metric on resample r. Hence a paired
difference is a subtraction of replicate arrays (``replicate_matrix``), and the interval of a
mean over seeds is the percentile interval of the mean of their replicates (``average``). The
seed summaries and baseline comparisons (``engine``) and the mitigation deltas (``mitigation``)
are all built from these.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from cxrfair.core.runs import Run


@dataclass
class Evaluated:
    """One run's metric values on the analysed split and, with bootstrap, their replicates (``engine``)."""

    run: Run
    key: tuple  # test-set key: image ids, patient ids and strata (all that the resamples depend on)
    values: dict  # {(metric, attribute, group, class): float}
    replicates: dict | None  # same keys: (R,) replicate values; None without bootstrap
    levels: dict  # {attribute: levels in reference order}, crossed attribute included
    thresholds: np.ndarray | None = None  # (C,) multi-label thresholds chosen on validation
    threshold_counts: np.ndarray | None = None  # (2, C) validation positives and negatives per condition
    shortcut: dict | None = None  # the shortcut test's image counts (``shortcut_subsets``)


def nanmean0(x: np.ndarray) -> np.ndarray:
    """Mean over axis 0 skipping NaN (a seed where a metric is undefined); NaN if all are."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=0)


def replicate_matrix(ev: Evaluated, keys: list) -> np.ndarray:
    """(R, K) replicates of ``keys`` (a NaN column for a key the run lacks)."""
    missing = np.full(next(iter(ev.replicates.values())).shape, np.nan)
    return np.stack([ev.replicates.get(k, missing) for k in keys], axis=1)


def average(evs: list[Evaluated], keys: list | None = None) -> tuple[list, np.ndarray, np.ndarray, np.ndarray | None]:
    """Mean over runs of every metric's value and, when they share one test set, of its replicates.

    The mean of replicate r over runs is the seed mean on resample r, so percentiles of these
    means are the interval of the seed mean (not a mean of intervals).

    Args:
        evs: the runs. keys: the metric keys (default: the first run's).

    Returns:
        (keys, (runs, K) values per run, (K,) means, (R, K) mean replicates or None without
        bootstrap or when test sets differ).
    """
    keys = list(evs[0].values) if keys is None else keys
    per_run = np.array([[e.values.get(k, np.nan) for k in keys] for e in evs], dtype=np.float64)
    if evs[0].replicates is None or any(e.key != evs[0].key for e in evs):
        return keys, per_run, nanmean0(per_run), None
    reps = nanmean0(np.stack([replicate_matrix(e, keys) for e in evs]))
    return keys, per_run, nanmean0(per_run), reps
