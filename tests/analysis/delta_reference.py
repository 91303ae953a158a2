"""A slow reference of a paired delta's seed-widened interval and p-value (``replicates.delta_interval``).

One column at a time with scipy: the patients-only percentile interval, each side widened in
quadrature by t_ν · √v (v = Σ sd_i² / n_i over the arms with 2+ runs, ν by Welch–Satterthwaite),
and the p-value as the root in α (scipy's brentq) of "the 1 − α interval's end nearest zero is at
zero", never below the patients-only bootstrap p.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.stats import t as t_dist


def welch(arms: list) -> tuple[float, float]:
    """(v, ν) of one column: arms are 1-D arrays of run values (NaN skipped); (0, NaN) without a seed term."""
    parts = []
    for arm in arms:
        x = [float(a) for a in arm if not math.isnan(a)]
        if len(x) >= 2:
            parts.append((float(np.var(x, ddof=1)) / len(x), len(x)))
    v = sum(p for p, _ in parts)
    if v == 0:
        return 0.0, math.nan
    return v, v ** 2 / sum(p ** 2 / (n - 1) for p, n in parts)


def bootstrap_p(reps) -> float:
    """Twice the smaller tail of the replicates at 0, the observed one counted in."""
    d = [x for x in reps if not math.isnan(x)]
    below, above = sum(x <= 0 for x in d), sum(x >= 0 for x in d)
    return min(1.0, 2 * (min(below, above) + 1) / (len(d) + 1))


def widened_delta(delta: float, reps, arms: list, level: float = 0.95) -> tuple[float, float, float]:
    """(low, high, p) of one column by the rule of ``delta_interval``."""
    reps = np.asarray([x for x in reps if not math.isnan(x)])
    v, df = welch(arms)

    def ends(alpha):
        lo_p, hi_p = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
        half = t_dist.ppf(1 - alpha / 2, df) * math.sqrt(v) if v > 0 else 0.0
        return delta - math.hypot(delta - lo_p, half), delta + math.hypot(hi_p - delta, half)

    lo, hi = ends(1 - level)
    p = bootstrap_p(reps)
    if v > 0 and delta != 0:
        def near(alpha):  # > 0: the 1 − alpha interval excludes zero
            lo_a, hi_a = ends(alpha)
            return lo_a if delta > 0 else -hi_a
        top, bottom = 1 - 1e-12, 1e-12  # below 1e-12 the bootstrap p (≥ 2 / (R + 1)) decides anyway
        if near(top) <= 0:
            p_inv = 1.0
        else:
            p_inv = bottom if near(bottom) > 0 else brentq(near, bottom, top, xtol=1e-15, rtol=1e-12)
        p = max(p, p_inv)
    elif v > 0:
        p = 1.0
    return lo, hi, p
