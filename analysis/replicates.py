"""An evaluated run and the arithmetic on its bootstrap replicates, shared by every table.

All runs on the same test images share one (R, N) matrix of bootstrap counts (``engine``), so an
``Evaluated`` run's replicate r of any metric is that metric on resample r. Hence a paired
difference is a subtraction of replicate arrays (``replicate_matrix``).

Seeds are a second source of variance: a mean over S seeds (or zero-shot prompt draws) is an
estimate of the mean over all seeds one could have trained, and its interval must say so. A seed
mean's interval (seeds.csv, the trade-off points) is its patients-only interval widened by the
seed variance, ``seed_widened`` (t_{S−1} · sd / √S in quadrature, each side). A delta between
seed means (comparisons.csv, mitigation.csv) is paired on the patients (one resample, both arms)
and widened the same way by both arms' seed variances, Welch–Satterthwaite (``seed_variance``,
``delta_interval``); its p-value inverts that interval. The two-level bootstrap
(``seed_resampled``: per replicate, S seeds drawn with replacement), which these tables used
before, draws from only S values: it covered 0.77–0.85 for seed means with 2–3 seeds
(benchmarks/RESULTS.md, "Seed means") and under-covered the deltas too ("Interval coverage,
part 3"); it stays for the benchmark's comparison. With one run in an arm its seed variance is
unknown: it adds nothing, and the tables say so (``n_seeds`` = 1, ``seed_var_known``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.special import stdtr, stdtrit

from cxrfair.core.bootstrap import interval, p_value, quantile_sorted, stratified_counts
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


def seed_resampled(stack: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """Two-level bootstrap replicates of the mean over seeds: seeds with replacement, then patients.

    Replicate r is the NaN-skipping mean of ``stack[s, r]`` over S seeds drawn with replacement
    for that replicate (a seed drawn twice counts twice; one where the metric is undefined is
    skipped, as in the point estimate). All in one weighted sum: an (R, S) matrix of seed counts.

    Args:
        stack: (S, R, K) each seed's replicates on the shared patient resamples.
        rng: the seed draws' generator; None: no seed resampling, the plain mean over the S seeds
            per replicate (the patients-only interval of the mean).

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


def t_cdf(t, df) -> np.ndarray:
    """P(T ≤ t) for Student's t with ``df`` > 0 degrees of freedom, elementwise (``scipy.special.stdtr``)."""
    return stdtr(np.asarray(df, dtype=np.float64), np.asarray(t, dtype=np.float64))


def t_quantile(q, df):
    """The q-quantile (q > 0.5) of Student's t with ``df`` > 0 degrees of freedom, elementwise
    (``scipy.special.stdtrit``). Scalars in, a float out; arrays in, an array out."""
    q_arr, df_arr = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (q, df)))
    if not (np.all((0.5 < q_arr) & (q_arr < 1)) and np.all(df_arr > 0)):
        raise ValueError(f"t_quantile needs 0.5 < q < 1 and df > 0, got q={q}, df={df}")
    out = stdtrit(df_arr, q_arr)
    return float(out) if out.ndim == 0 else out


def widened(centre, low, high, half) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) with each side's distance from ``centre`` combined in quadrature with ``half``.

    Args:
        centre, low, high: (K,) an estimate and its patients-only interval. half: (K,) the seed
            term's half-width (0: unchanged).
    """
    centre, low, high, half = (np.asarray(x, dtype=np.float64) for x in (centre, low, high, half))
    return centre - np.hypot(centre - low, half), centre + np.hypot(high - centre, half)


def seed_variance(arms: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seed variance of a sum or difference of independent seed means, with its Welch–Satterthwaite df.

    Each arm is a mean over its n_i defined runs, so its seed variance is sd_i² / n_i (sd over its
    runs' values on the one test set, ddof 1); the arms are independent trainings, so the variance
    of their difference is the sum v = Σ sd_i² / n_i, and v / E[v] is approximately χ²_ν / ν with
    ν = v² / Σ (sd_i² / n_i)² / (n_i − 1). One arm: ν = n − 1, the one-sample t. An arm with
    fewer than two defined runs has an unknown seed variance: it adds nothing and ``known`` is false.

    Args:
        arms: [(S_i, K) each run's value per arm (NaN where undefined)]; a pairing by seed is one
            arm of the per-pair differences.

    Returns:
        ((K,) v, (K,) ν (NaN where v = 0: no seed term), (K,) bool known: every arm has 2+ defined runs).

    References: Welch (1947), Biometrika 34: 28–35; Satterthwaite (1946), Biometrics Bulletin 2: 110–114.
    """
    parts, known = [], None
    for arm in arms:
        arm = np.asarray(arm, dtype=np.float64)
        n = (~np.isnan(arm)).sum(axis=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # fewer than two defined runs: no term
            part = np.where(n > 1, np.nanvar(arm, axis=0, ddof=1) / np.maximum(n, 1), 0.0)
        parts.append((part, n))
        known = n > 1 if known is None else known & (n > 1)
    v = sum(p for p, _ in parts)
    with np.errstate(invalid="ignore", divide="ignore"):
        df = v ** 2 / sum(np.where(n > 1, p ** 2 / np.maximum(n - 1, 1), 0.0) for p, n in parts)
    return v, np.where(v > 0, df, np.nan), known


def seed_half(v: np.ndarray, df: np.ndarray, level: float) -> np.ndarray:
    """(K,) the seed term's half-width t_ν · √v at ``level`` (0 where there is no seed term)."""
    ok = v > 0
    t = np.zeros(v.shape)
    if ok.any():
        t[ok] = t_quantile(np.full(int(ok.sum()), (1 + level) / 2), df[ok])
    return np.where(ok, t * np.sqrt(np.where(ok, v, 0.0)), 0.0)


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
    v, df, _ = seed_variance([per_run])
    return widened(means, low, high, seed_half(v, df, level))


def delta_interval(delta, replicates, v, df, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The interval and p-value of a delta between seed means, paired on the test patients.

    The patients-only percentile interval of ``replicates`` (each arm's plain mean over its seeds
    on the shared resample r, subtracted), each side widened in quadrature by the seed term
    t_ν · √v (``seed_variance`` of the arms: Welch–Satterthwaite, as ``seed_widened`` for one
    mean). The two-level bootstrap (``seed_resampled``), drawing each arm's S seeds from only S
    values and reading normal rather than t tails, under-covered such deltas with 2–3 seeds
    (benchmarks/RESULTS.md, "Interval coverage, part 3").

    The p-value inverts that interval: the α at which the 1 − α interval's end nearest zero
    reaches zero (``_inverted_p``), never below the patients-only bootstrap p
    (``bootstrap.p_value``), which it equals where there is no seed term (v = 0). So p < 1 − level
    only where the interval excludes zero: the verdict and the test never disagree that way.

    Args:
        delta: (K,) the point estimates. replicates: (R, K) their patients-only replicates.
        v, df: (K,) the seed variance and its degrees of freedom (``seed_variance``; v = 0: none).
        level: nominal coverage.

    Returns:
        ((K,) low, (K,) high, (K,) p-value).
    """
    delta = np.asarray(delta, dtype=np.float64)
    reps = np.asarray(replicates, dtype=np.float64)
    v, df = np.asarray(v, dtype=np.float64), np.asarray(df, dtype=np.float64)
    lo, hi = widened(delta, *interval(reps, level), seed_half(v, df, level))
    return lo, hi, np.maximum(p_value(reps), _inverted_p(delta, reps, v, df))


def _inverted_p(delta: np.ndarray, reps: np.ndarray, v: np.ndarray, df: np.ndarray) -> np.ndarray:
    """(K,) the α at which the widened 1 − α interval's end nearest zero touches zero; 0 without a seed term.

    For Δ > 0 the low end at α is Δ − hypot(Δ − Q(α/2), t_{ν, 1−α/2} √v), Q the replicates'
    quantile (``interval``'s); it rises as α grows. Bisection on u = t_{ν, 1−α/2} ∈ [0, |Δ| / √v]
    (α = 2 P(T > u)), so only the t CDF is needed; Δ < 0 mirrors it on the high end.
    """
    n = (~np.isnan(reps)).sum(axis=0)
    active = (v > 0) & np.isfinite(delta) & (delta != 0) & (n > 0)
    out = np.where((v > 0) & (delta == 0), 1.0, 0.0)  # Δ = 0 with a seed term: never excluded
    if not active.any():
        return out
    x, n, d = np.sort(reps[:, active], axis=0), n[active], delta[active]  # NaN sort last
    s, dfa = np.sqrt(v[active]), df[active]
    lo, hi = np.zeros(len(d)), np.abs(d) / s

    def alpha(u):
        return 2 * (1 - t_cdf(u, dfa))

    def holds_zero(u):  # the 1 − α(u) interval, on the side towards zero, reaches zero
        a = np.clip(alpha(u), 0.0, 1.0)
        near = quantile_sorted(x, n, np.where(d > 0, a / 2, 1 - a / 2))
        return np.hypot(d - near, u * s) >= np.abs(d)

    for _ in range(50):  # u to |Δ| / √v · 2⁻⁵⁰
        mid = (lo + hi) / 2
        h = holds_zero(mid)
        lo, hi = np.where(h, lo, mid), np.where(h, mid, hi)
    out[active] = np.where(holds_zero(np.zeros(len(d))), 1.0, alpha(lo))  # lo: still excluded, the safe side
    return out


def average(evs: list[Evaluated], keys: list | None = None) -> tuple[list, np.ndarray, np.ndarray, np.ndarray | None]:
    """Mean over runs of every metric's value and, when they share one test set, its replicates.

    The mean of replicate r over runs is the seed mean on resample r, so percentiles of these
    means are the patients-only interval of the seed mean (not a mean of intervals); the seed
    variance enters through ``seed_widened`` / ``delta_interval``.

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
    return keys, per_run, nanmean0(per_run), nanmean0(np.stack([replicate_matrix(e, keys) for e in evs]))
