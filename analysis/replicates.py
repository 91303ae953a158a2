"""An evaluated run and the arithmetic on its bootstrap replicates, shared by every table.

All runs on the same test images share one (R, N) matrix of bootstrap counts (``engine``), so an
``Evaluated`` run's replicate r of any metric is that metric on resample r. Hence a paired
difference is a subtraction of replicate arrays (``replicate_matrix``).

Seeds are a second source of variance: a mean over S seeds (or zero-shot prompt draws) is an
estimate of the mean over all seeds one could have trained, and its interval must say so. A seed
mean's interval (seeds.csv, the trade-off points) is its patients-only interval widened by the
seed variance, ``seed_widened`` (t_{S−1} · sd / √S in quadrature, each side): the two-level
bootstrap below, drawing S seeds from only S values, covered 0.77–0.85 with 2–3 seeds
(benchmarks/RESULTS.md, "Seed means"). The two-level bootstrap (``seed_resampled``: for each
replicate r, S seeds with replacement, averaging *their* replicate r on the shared patient
resample) still makes the baseline comparisons' and mitigation deltas' replicates (``engine``,
``mitigation``), whose seed draws come from ``seed_rng(seed, name)`` and so depend on the
analysis seed and the group's name only. With S = 1 the seed variance is unknown and the interval
is the patients-only one (the tables say ``n_seeds`` = 1).
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass

import numpy as np

from cxrfair.core.bootstrap import stratified_counts
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


def seed_rng(seed: int, name: str) -> np.random.Generator:
    """The generator of one group's seed draws: from the analysis ``seed`` and the group's ``name``
    (e.g. ``"seeds|m1|linear|best"``) alone, so adding other runs to an analysis leaves it unchanged."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def seed_resampled(stack: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """Two-level bootstrap replicates of the mean over seeds: seeds with replacement, then patients.

    Replicate r is the NaN-skipping mean of ``stack[s, r]`` over S seeds drawn with replacement
    for that replicate (a seed drawn twice counts twice; one where the metric is undefined is
    skipped, as in the point estimate). All in one weighted sum: an (R, S) matrix of seed counts.

    Args:
        stack: (S, R, K) each seed's replicates on the shared patient resamples.
        rng: the seed draws' generator (``seed_rng``); None: no seed resampling, the plain mean over
            the S seeds per replicate (the patients-only interval of the mean).

    Returns:
        (R, K) replicates; NaN where every drawn seed is NaN. With S = 1, ``stack[0]``.
    """
    S, R = stack.shape[:2]
    if rng is None or S == 1:
        return nanmean0(stack)
    counts = stratified_counts(np.zeros(S), R, rng).astype(np.float64)  # (R, S): S draws of S seeds per replicate
    defined = ~np.isnan(stack)
    total = np.einsum("rs,srk->rk", counts, np.where(defined, stack, 0.0))
    n = np.einsum("rs,srk->rk", counts, defined.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / n, np.nan)


def t_quantile(q: float, df: float) -> float:
    """The q-quantile (q > 0.5) of Student's t with ``df`` > 0 degrees of freedom, numpy only.

    Bisection on the CDF, ``1/2 + ∫_0^t pdf`` by Simpson's rule on 2,001 points (error < 1e-7
    against scipy for df ≥ 1, tested); analysis does not depend on scipy.
    """
    if not 0.5 < q < 1 or not df > 0:
        raise ValueError(f"t_quantile needs 0.5 < q < 1 and df > 0, got q={q}, df={df}")
    const = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(t: float) -> float:
        x = np.linspace(0.0, t, 2001)
        y = const * (1 + x * x / df) ** (-(df + 1) / 2)
        h = t / 2000
        return 0.5 + h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def seed_widened(means, low, high, per_run, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """A seed mean's patients-only interval widened by the seed variance, one side at a time.

    Each side's distance from the mean is combined in quadrature with ``t_{S−1} · sd / √S`` (sd of
    the S defined per-run values, ddof 1): the patient resampling cannot see how much seeds
    disagree when S is 2 or 3, and the seeds-then-patients bootstrap (``seed_resampled``) draws
    from only S values, so with few seeds it under-covers (RESULTS.md, "Seed means").

    Args:
        means: (K,) seed means. low, high: (K,) their patients-only interval (each metric's method).
        per_run: (S, K) each run's value (NaN where undefined). level: nominal coverage.

    Returns:
        (low, high), each (K,); unchanged where fewer than two runs are defined.
    """
    means, low, high = (np.asarray(x, dtype=np.float64) for x in (means, low, high))
    per_run = np.asarray(per_run, dtype=np.float64)
    n = (~np.isnan(per_run)).sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fewer than two defined runs: no widening
        sd = np.nanstd(per_run, axis=0, ddof=1)
    t = np.array([t_quantile((1 + level) / 2, k - 1) if k > 1 else np.nan for k in n])
    half = np.where(n > 1, t * sd / np.sqrt(np.maximum(n, 1)), 0.0)
    return means - np.hypot(means - low, half), means + np.hypot(high - means, half)


def average(evs: list[Evaluated], keys: list | None = None,
            rng: np.random.Generator | None = None) -> tuple[list, np.ndarray, np.ndarray, np.ndarray | None]:
    """Mean over runs of every metric's value and, when they share one test set, its replicates.

    The mean of replicate r over runs is the seed mean on resample r, so percentiles of these
    means are the interval of the seed mean (not a mean of intervals); with ``rng``, the runs are
    also drawn with replacement per replicate (``seed_resampled``), so the interval carries the
    seed variance too.

    Args:
        evs: the runs. keys: the metric keys (default: the first run's).
        rng: the seed draws' generator (``seed_rng``); None: patients only.

    Returns:
        (keys, (runs, K) values per run, (K,) means, (R, K) mean replicates or None without
        bootstrap or when test sets differ).
    """
    keys = list(evs[0].values) if keys is None else keys
    per_run = np.array([[e.values.get(k, np.nan) for k in keys] for e in evs], dtype=np.float64)
    if evs[0].replicates is None or any(e.key != evs[0].key for e in evs):
        return keys, per_run, nanmean0(per_run), None
    reps = seed_resampled(np.stack([replicate_matrix(e, keys) for e in evs]), rng)
    return keys, per_run, nanmean0(per_run), reps
