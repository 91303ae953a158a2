"""Interval methods of the bootstrap, and the one table that says which metric uses which.

``cxrfair analyze`` draws R replicates of every metric on patient resamples
(``bootstrap.patient_counts``); this module turns a metric's plug-in estimate and its (R,)
replicates into an interval and, where the metric is biased, a bias-corrected estimate.

Why more than one method: the percentile interval is right for a smooth, roughly unbiased
statistic (accuracy, AUC, a per-group rate, a signed gap of two groups), but an absolute gap
(``|Δ|``), a mean of absolute gaps over classes or a largest-over-groups quantity is biased
upward in small samples (|Δ̂| ≥ 0 even when Δ = 0; the max of noisy values exceeds the max of
their means), and its replicates inherit the bias a second time: the percentile interval sits
about twice the bias above the truth (4 groups × 60 images, true EO gap 0.05: 0.3% coverage).
``benchmarks/coverage.py`` measures every method against a known truth; its results
(benchmarks/RESULTS.md, "Interval coverage") chose the table ``INTERVAL_METHODS``.

Methods (``METHODS``), each over the replicate axis and vectorised over every other axis:

- ``percentile``: the (α/2, 1 − α/2) quantiles of the replicates (``bootstrap.interval``).
  Estimate: the plug-in value.
- ``basic``: the percentile interval reflected about the estimate, ``[2θ̂ − q_hi, 2θ̂ − q_lo]``
  (Davison & Hinkley's basic bootstrap), clipped to the metric's range. Its centre is the
  bootstrap bias-corrected estimate ``θ̂_bc = 2θ̂ − mean(θ*)`` (clipped), reported beside the
  plug-in value, which the interval may exclude when the bias is large.
- ``shifted``: the percentile interval moved down by twice the bootstrap bias,
  ``[q_lo − 2b, q_hi − 2b]``, ``b = mean(θ*) − θ̂``: centred on ``θ̂_bc`` like ``basic`` but
  keeping the replicates' skew. A candidate of the study; no metric uses it (nor ``basic`` alone).
- ``hull``: the smallest interval holding both the percentile and the basic one. The percentile
  interval is right when the metric's bias is small next to its spread (a large true gap), the
  basic one when the bootstrap estimates the bias well (a gap near 0); the hull covers whenever
  either does, at the price of width (in the study: 0.91-0.99 coverage for every checked gap
  metric, against 0.74-0.98 for basic and 0-0.98 for percentile). Estimate: ``θ̂_bc``, as
  ``basic``; the interval holds the plug-in value whenever the percentile interval does.
- ``folded``: the interval of ``|s|`` for a metric that is the absolute value of a signed one
  (``f1_gap_abs = |f1_gap|``): the image of the signed metric's ``hull`` interval ``[L, U]`` under ``|·|``,
  ``[0, max(|L|, |U|)]`` when it holds 0, else ``[min, max]`` of ``|L|, |U|``. It covers ``|s|``
  whenever the signed interval covers ``s``, so a true gap of 0 is covered as often as the
  signed gap's 0 is; its estimate is ``|θ̂_bc|`` of the signed metric.

- ``band``: for a gap that is a nondecreasing function of |pair differences| (``groups.ABS_COMBINES``:
  ``eqodds``, ``eqodds_worst``, ``dp_gap``) over 3+ groups (``BAND_MIN_GROUPS``). Its signed components
  (every base's per-class difference of every pair of groups, ``groups.pair_components``) are
  rebuilt from the per-group values beside it; their max-t simultaneous band (``component_band``:
  ``θ̂_k ± c · sd_k``, c the 95% quantile of the replicates' largest studentized deviation) maps through
  the gap to a low end (``band_interval``: the gap of the smallest |value| each band allows) that holds
  the truth whenever the band holds every component, whatever the bias of the plug-in largest pair;
  the high end is the basic interval's. The hull's low end, ``2θ̂ − q_hi``, trusts the bootstrap's
  bias estimate, which for the largest of 6 pairs is too small (4 groups × 60: 0.80–0.84 coverage).
  With two groups (one pair) it is the hull (the basic high end under-covers large gaps there);
  without the per-group values among the keys, too (the method column says ``hull``). Estimate: ``θ̂_bc``.
  The same route serves a smallest group value biased downward (``worst_group_auc``: ``min``) and an
  AUC shrunk by its groups' deviations (``es_auc``: ``equity``; ``groups.COMPONENT_BIAS`` says each
  combine's side): the components are the group values (and the overall one), the band gives the
  *high* end (``groups.component_range``) and the basic interval the low one. Their band is pointwise
  (``IntervalMethod.band_critical``: ``c = z_{(1+level)/2}``): a minimum's high end fails only when the
  worst group's own bound does, so it needs no multiplicity correction (the max-t ``c`` made it wider at
  the same coverage). With 4 groups (gaps 0.05, 0.15) the hull covered ``worst_group_auc`` 0.89–0.955 and
  ``es_auc`` 0.835–0.995, the band 0.985–0.995 and 0.90–0.985 (RESULTS.md, "Interval coverage, part 3").

- ``debiased``: for a gap whose per-group base has a debiased estimator beside it in the metric
  tables (``GroupMetric.debiased``: ``ece_gap`` from ``ece_debiased``). The binned ECE is itself
  biased upward in a small group, by an amount that depends on the group's calibration (a
  well-calibrated group gains most), so the plug-in gap's bias has either sign and no interval of
  the plug-in's own replicates covers (RESULTS.md). Instead the gap is recomputed from the groups'
  debiased values (``debiased_columns``: ``θ̂_d``, and its replicates ``θ*_d``), and the hull is
  taken of the bootstrap pivot ``θ*_d − θ̂`` (θ̂ the plug-in gap: the bootstrap world's truth, since
  the binned ECE of the sample is the population ECE of the resampled world) around ``θ̂_d``, both
  reflected and not: ``[θ̂_d − (q_hi − θ̂), θ̂_d − (q_lo − θ̂)] ∪ [θ̂_d + (q_lo − θ̂), θ̂_d + (q_hi − θ̂)]``.
  A gap over 3+ groups without a class axis (multi-class; one condition) takes, as ``band`` does,
  both ends from the max-t band of the debiased pair differences, their deviations taken from the
  plug-in differences (``debiased_interval``). Without the debiased values among the keys it is
  the hull. Estimate: ``hull``'s bias correction of that pivot, ``θ̂ + θ̂_d − mean(θ*_d)``.

- ``pivot``: a per-sample value with a debiased estimator beside it (``ece`` and ``ece_debiased``,
  both rows): the hull of the pivot ``θ*_d − θ̂`` around ``θ̂_d`` (θ̂ the plug-in, θ̂_d the
  debiased value, θ*_d its replicates), as ``debiased`` with two groups. The debiased replicates
  scatter about the plug-in value (the bootstrap world's truth), so their percentile interval
  would be the plug-in's; the plug-in's own percentile interval sits above the truth. Estimate:
  ``θ̂ + θ̂_d − mean(θ*_d)`` (the same on both rows; the row's ``value`` stays its own).

The plug-in value itself never changes (it equals fairlearn's); ``value_bc`` is added beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from cxrfair.core.bootstrap import interval as percentile_interval
from cxrfair.core import metrics, multilabel
from cxrfair.core.groups import (COMPONENT_BIAS, GroupMetric, abs_range, combine_components, component_range, components,
                                 pair_components)

METHODS = ("percentile", "basic", "shifted", "hull", "folded", "band", "debiased", "pivot")
BAND_MIN_GROUPS = 3  # a "band" gap over fewer groups (one pair) takes the hull (RESULTS.md: the basic end under-covers there)


@dataclass(frozen=True)
class IntervalMethod:
    """How one metric's interval is made (a row of ``INTERVAL_METHODS``).

    Attributes:
        method: one of ``METHODS``.
        low, high: the metric's range; an interval (and a bias-corrected estimate) is clipped to it.
        coverage_checked: True when ``benchmarks/coverage.py`` found the method's coverage of a
            nominal 95% interval within [0.90, 0.99] for true values away from the range's edge
            (true gaps ≥ 0.05); False when no bootstrap method reached it (the report says so).
        checked_groups: for a metric over groups, the largest number of groups that check held
            for (None: any number); with more groups the metric counts as not checked.
        why: one sentence, for the report's notes and docs.
        signed: for ``folded``, the signed metric whose interval is folded (same attribute, group, class).
        band_critical: for ``band``, the band's critical value ``c``: ``"max_t"`` (simultaneous, for a
            gap that is the largest of many differences: ``component_band``) or ``"pointwise"`` (the
            normal quantile ``z_{(1+level)/2}``: for a smallest group value, whose high end fails only
            when the worst group's own bound does, so needs no multiplicity correction).
        plugin, debiased: for ``pivot``, the plug-in metric and its debiased estimator (same attribute,
            group, class); the row is one of the two.
    """

    method: str
    low: float = -np.inf
    high: float = np.inf
    coverage_checked: bool = True
    why: str = ""
    signed: str = ""
    checked_groups: int | None = None
    band_critical: str = "max_t"
    plugin: str = ""
    debiased: str = ""

    BAND_CRITICALS = ("max_t", "pointwise")

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown interval method {self.method!r}; choose among {', '.join(METHODS)}")
        if (self.method == "folded") != bool(self.signed):
            raise ValueError("a folded interval names its signed metric, and only a folded one")
        if (self.method == "pivot") != bool(self.plugin) or bool(self.plugin) != bool(self.debiased):
            raise ValueError("a pivot interval names its plug-in and debiased metrics, and only a pivot one")
        if self.band_critical not in self.BAND_CRITICALS:
            raise ValueError(f"unknown band critical value {self.band_critical!r}; choose among "
                             f"{', '.join(self.BAND_CRITICALS)}")

    def critical(self, level: float) -> float | None:
        """The ``band``'s given critical value at ``level`` (None: the max-t quantile of the replicates)."""
        return NormalDist().inv_cdf((1 + level) / 2) if self.band_critical == "pointwise" else None

    def checked(self, n_groups: int | None = None) -> bool:
        """Whether the coverage study confirmed this interval (for an attribute of ``n_groups`` groups)."""
        return self.coverage_checked and (self.checked_groups is None or n_groups is None
                                          or n_groups <= self.checked_groups)


_HULL = ("the hull of the percentile and basic intervals: percentile alone under-covers a biased gap (twice the "
         "bias above the truth), basic alone a large one (reflection)")

# The one table: metric name (metrics.csv ``metric``, either task) -> its method, chosen by
# benchmarks/coverage.py (RESULTS.md "Interval coverage"; both tasks: a flag holds for the worse). Names absent here (every per-sample
# value: accuracy, AUC, F1, TPR, ECE, ... overall or per group) are PERCENTILE.
# Their range is [0, 1] (rates, AUC, F1, ECE, AP); the few percentile metrics with another range have rows below.
_SMOOTH = "a smooth, roughly unbiased statistic: the percentile interval"
PERCENTILE = IntervalMethod("percentile", 0.0, 1.0, why=_SMOOTH)
INTERVAL_METHODS: dict[str, IntervalMethod] = {
    # Percentile metrics outside [0, 1]: AP minus prevalence (negative below chance), a signed AUC difference.
    "adjusted_auprc": IntervalMethod("percentile", -1.0, 1.0, why=_SMOOTH),
    "adjusted_auprc_macro": IntervalMethod("percentile", -1.0, 1.0, why=_SMOOTH),
    "shortcut_delta": IntervalMethod("percentile", -1.0, 1.0, why=_SMOOTH),
    # Signed gaps: unbiased for two groups; with 3+ groups max − min over groups, biased upward.
    "f1_gap": IntervalMethod("hull", -1.0, 1.0, why="a signed gap (3+ groups: the largest pair, biased upward): " + _HULL),
    "fnr_gap": IntervalMethod("hull", -1.0, 1.0, why="a signed gap (3+ groups: the largest pair, biased upward): " + _HULL),
    "auc_gap": IntervalMethod("hull", -1.0, 1.0, why="a signed gap (3+ groups: the largest pair, biased upward): " + _HULL),
    "f1_gap_abs": IntervalMethod("folded", 0.0, 1.0, signed="f1_gap",
                                 why="|f1_gap|: the signed gap's interval folded at 0 (so it reads the same as "
                                     "f1_gap's, and a true gap of 0 is covered as often)"),
    # Means of absolute gaps over classes (3+ groups: the largest pair), biased upward; with 4 groups the
    # hull covered 0.80-0.84 at 60 patients per group, the band 0.9x (RESULTS.md, "Gaps over 3+ groups").
    **{name: IntervalMethod("band", 0.0, 1.0, why="a mean of absolute gaps over classes (3+ groups: the largest pair), "
                                                  "biased upward: with two groups " + _HULL + "; with 3+ groups the low "
                                                  "end of the simultaneous (max-t) band of every pair's per-class "
                                                  "differences and the high end of the basic interval, as the hull "
                                                  "under-covers the largest of many pairs")
       for name in ("eqodds", "eqodds_worst", "dp_gap")},
    # Four groups: multi-class 0.94-1.00, multi-label 0.845-0.975 (RESULTS.md, part 3): checked for two groups only.
    "ece_gap": IntervalMethod("debiased", 0.0, 1.0, checked_groups=2,
                              why="the binned ECE is itself biased upward in small groups, most in a well-calibrated "
                                  "one, so the plug-in gap's bias has either sign: the hull of the bootstrap pivot of the "
                                  "gap recomputed from the groups' debiased ECE (ece_debiased, Kumar et al. 2019); with "
                                  "3+ groups and one class the max-t band of their pair differences"),
    "ece_gap_paper": IntervalMethod("band", 0.0, 1.0,
                                    why="|difference| of two groups' mean |p − o| (3+ groups: the largest pair), biased "
                                        "upward as eqodds is: with two groups " + _HULL + "; with 3+ groups the band"),
    # The binned ECE and its debiased estimator (below 0 possible): the plug-in's percentile interval covered the
    # population ECE 0.44-0.95 (RESULTS.md, part 3); both rows take the pivot interval of the debiased one.
    **{name: IntervalMethod("pivot", low, 1.0, plugin=plugin, debiased=plugin.replace("ece", "ece_debiased"),
                            why="the binned ECE is biased upward in small samples and its replicates again (the "
                                "percentile interval sits above the truth): the hull of the pivot of its debiased "
                                "estimator (ece_debiased, Kumar et al. 2019), whose replicates scatter about the plug-in "
                                "value (the resampled world's truth), about the debiased value")
       for name, plugin, low in (("ece", "ece", 0.0), ("ece_macro", "ece_macro", 0.0), ("ece_debiased", "ece", -1.0),
                                 ("ece_debiased_macro", "ece_macro", -1.0))},
    "worst_group_accuracy": IntervalMethod("hull", 0.0, 1.0, why="the smallest group's value, biased downward: " + _HULL),
    # Biased downward (the smallest of noisy group values); with four groups the hull covered 0.835-0.995, the band
    # 0.90-0.995 in every setting of both tasks (RESULTS.md, "Interval coverage, part 3"); two groups keep the hull.
    **{name: IntervalMethod("band", 0.0, 1.0, why=why, band_critical="pointwise") for name, why in (
        ("worst_group_auc", "the smallest group's value, biased downward: with two groups " + _HULL + "; with 3+ "
                            "groups the high end of the simultaneous (max-t) band of the per-group values and the "
                            "low end of the basic interval, as the hull under-covers the smallest of many groups"),
        ("es_auc", "AUC shrunk by Σ_g |AUC − AUC_g|, biased downward: with two groups " + _HULL + "; with 3+ groups "
                   "the high end of the simultaneous (max-t) band of the overall value and every group's deviation, "
                   "and the low end of the basic interval, as the hull under-covers a sum of many noisy deviations"))},
}


def interval_method(metric: str) -> IntervalMethod:
    """The interval method of a metrics.csv metric name (``PERCENTILE`` for names not in the table)."""
    return INTERVAL_METHODS.get(metric, PERCENTILE)


def _mean(reps: np.ndarray) -> np.ndarray:
    """NaN-skipping mean over axis 0 without warnings: (R, ...) -> (...)."""
    ok = ~np.isnan(reps)
    n = ok.sum(axis=0)
    return np.divide(np.where(ok, reps, 0).sum(axis=0), n, out=np.full(n.shape, np.nan), where=n > 0)


fold = abs_range  # the image of intervals [low, high] under |·| (the ``folded`` method)


def interval(replicates, estimate, method: str = "percentile", level: float = 0.95, low=-np.inf,
             high=np.inf) -> tuple[np.ndarray, np.ndarray]:
    """One method's interval, for every column at once.

    Args:
        replicates: (R, ...) bootstrap replicates; NaN replicates are skipped. For ``folded``,
            the replicates of the *signed* metric.
        estimate: (...) plug-in values (broadcast against ``replicates[0]``); for ``folded``, the
            signed metric's (whose own interval is ``hull``).
        method: one of ``METHODS``.
        level: nominal coverage, e.g. 0.95.
        low, high: scalars or (...) arrays, the metric's range; the interval is clipped to it.

    Returns:
        (low, high), each (...); NaN where the estimate is NaN or every replicate is.
    """
    reps = np.asarray(replicates, dtype=np.float64)
    lo, hi = percentile_interval(reps, level)
    est = np.broadcast_to(np.asarray(estimate, dtype=np.float64), lo.shape)
    if method == "basic":
        lo, hi = 2 * est - hi, 2 * est - lo
    elif method in ("hull", "folded"):
        lo, hi = np.fmin(lo, 2 * est - hi), np.fmax(hi, 2 * est - lo)
        if method == "folded":
            lo, hi = fold(lo, hi)
    elif method == "shifted":
        shift = 2 * (_mean(reps) - est)
        lo, hi = lo - shift, hi - shift
    elif method in ("band", "debiased", "pivot"):
        raise ValueError(f"a {method} interval is made from the gap's components or plug-in partner (other "
                         "columns): intervals_by_metric")
    elif method != "percentile":
        raise ValueError(f"unknown interval method {method!r}; choose among {', '.join(METHODS)}")
    bad = np.isnan(est) | np.isnan(lo)
    lo, hi = np.clip(lo, low, high), np.clip(hi, low, high)
    return np.where(bad, np.nan, lo), np.where(bad, np.nan, hi)


def bias_corrected(replicates, estimate, method: str = "percentile", low=-np.inf, high=np.inf) -> np.ndarray:
    """The estimate a method's interval is centred on, clipped to [low, high].

    ``percentile``: the plug-in value; ``basic``, ``shifted``, ``hull`` and ``band``: the bootstrap bias-corrected
    ``2θ̂ − mean(θ*)`` (NaN replicates skipped); ``folded``: ``|2ŝ − mean(s*)|`` of the signed
    metric (``replicates`` and ``estimate`` are the signed metric's).

    Args:
        replicates: (R, ...). estimate: (...). method: one of ``METHODS``. low, high: the range.

    Returns:
        (...) estimates; NaN where the estimate is NaN (or, except for ``percentile``, every replicate is).
    """
    est = np.asarray(estimate, dtype=np.float64)
    if method == "percentile":
        return np.clip(est, low, high)
    if method not in METHODS:
        raise ValueError(f"unknown interval method {method!r}; choose among {', '.join(METHODS)}")
    bc = 2 * est - _mean(np.asarray(replicates, dtype=np.float64))
    return np.clip(np.abs(bc) if method == "folded" else bc, low, high)


def intervals_by_metric(replicates, estimates, keys, level: float = 0.95):
    """Every column's interval and estimate by its metric's method (``interval_method``): what the engine reports.

    Args:
        replicates: (R, K) replicates of K metric values. estimates: (K,) plug-in values.
        keys: K metrics.csv keys ``(metric, attribute, group, class)``; a ``folded`` metric's
            signed partner is looked up among them (NaN interval if it is absent), and a ``band``
            gap's per-group base values (``component_columns``; the hull if they are absent).
        level: nominal coverage.

    Returns:
        ((K,) low, (K,) high, (K,) bias-corrected estimates, K method names). One call per
        method over all of its columns, so the work stays vectorised over replicates and keys.
    """
    reps, est = np.asarray(replicates, dtype=np.float64), np.asarray(estimates, dtype=np.float64)
    keys = [tuple(k) for k in keys]
    specs = [interval_method(k[0]) for k in keys]
    where = {k: i for i, k in enumerate(keys)}
    # Column whose replicates each key's interval is made of: its own, or its signed partner's.
    source = np.array([where.get((s.signed, *k[1:]), -1) if s.signed else i for i, (k, s) in enumerate(zip(keys, specs))],
                      dtype=np.int64)
    # With fewer than BAND_MIN_GROUPS groups (or without the per-group values among the keys) a band
    # gap takes the hull, and its method column says so.
    views = {i: component_columns(k, where, est) for i, (k, s) in enumerate(zip(keys, specs)) if s.method == "band"}
    views = {i: c for i, c in views.items() if c is not None and c[1].shape[1] >= BAND_MIN_GROUPS}
    # A debiased gap without its debiased per-group values among the keys takes the hull too.
    views.update({i: c for i, (k, s) in enumerate(zip(keys, specs)) if s.method == "debiased"
                  and (c := component_columns(k, where, est, debiased=True)) is not None})
    used = [("hull" if s.method in ("band", "debiased") and i not in views else s.method) for i, s in enumerate(specs)]
    lo, hi, bc = (np.full(len(specs), np.nan) for _ in range(3))
    for method in METHODS:
        cols = np.array([i for i, m in enumerate(used) if m == method and source[i] >= 0], dtype=np.int64)
        if not len(cols):
            continue
        a = np.array([specs[i].low for i in cols])
        b = np.array([specs[i].high for i in cols])
        r, e = reps[:, source[cols]], est[source[cols]]
        if method == "band":
            lo[cols], hi[cols] = one_sided_band(reps, est, r, e, [views[i] for i in cols], level, a, b,
                                                [specs[i].critical(level) for i in cols])
        elif method == "debiased":
            found = np.array([debiased_interval(reps, est, keys[i], where, level) for i in cols])  # (k, 3)
            lo[cols], hi[cols], bc[cols] = (np.clip(x, a, b) for x in found.T)
            continue
        elif method == "pivot":
            # The pivot θ*_d − θ̂ around θ̂_d: the debiased replicates shifted by θ̂_d − θ̂ (NaN without both columns).
            d, p = ([where.get((getattr(specs[i], role), *keys[i][1:]), -1) for i in cols] for role in ("debiased", "plugin"))
            d, p = np.array(d), np.array(p)
            ok = (d >= 0) & (p >= 0)
            e_d = np.where(ok, est[d], np.nan)
            shifted = reps[:, d] + np.where(ok, e_d - est[p], np.nan)
            lo[cols], hi[cols] = interval(shifted, e_d, "hull", level, a, b)
            bc[cols] = np.where(ok, bias_corrected(shifted, e_d, "hull", a, b), np.nan)
            continue
        else:
            lo[cols], hi[cols] = interval(r, e, method, level, a, b)
        bc[cols] = bias_corrected(r, e, method, a, b)
    return lo, hi, bc, used


def one_sided_band(reps, est, r, e, found: list, level: float, a, b, critical=None) -> tuple[np.ndarray, np.ndarray]:
    """The ``band`` method's (n,) low and high ends of n metrics: the component band's end on the side
    the plug-in is biased away from (``groups.COMPONENT_BIAS``: the low end of a gap biased upward, the
    high end of a minimum biased downward), the basic interval's (bias-corrected) end on the other.

    Args:
        reps, est: (R, K), (K,) every column. r, e: (R, n), (n,) the metrics' own. found: n
            ``component_columns`` results. level: nominal coverage. a, b: (n,) the metrics' ranges.
        critical: n critical values of the bands (None: each the max-t quantile), ``IntervalMethod.critical``.
    """
    critical = [None] * len(found) if critical is None else critical
    band = np.array([band_columns(reps, est, *f, level=level, critical=c) for f, c in zip(found, critical)])
    band = np.clip(band.reshape(-1, 2).T, a, b)
    basic = interval(r, e, "basic", level, a, b)
    up = np.array([COMPONENT_BIAS[f[0].combine] > 0 for f in found])
    # The basic end never crosses the band's (possible only when the replicates all lie far to one side).
    lo = np.where(up, band[0], np.fmin(basic[0], band[1]))
    hi = np.where(up, np.fmax(basic[1], band[0]), band[1])
    bad = np.isnan(basic[0]) | np.isnan(band).any(axis=0)
    return np.where(bad, np.nan, lo), np.where(bad, np.nan, hi)


# ----------------------------------------------------------------------------- simultaneous component bands


def _sd(reps: np.ndarray) -> np.ndarray:
    """NaN-skipping standard deviation over axis 0 (ddof 1) without warnings: (R, ...) -> (...)."""
    m = _mean(reps)
    ok = ~np.isnan(reps)
    n = ok.sum(axis=0)
    ss = np.where(ok, (reps - m) ** 2, 0).sum(axis=0)
    return np.sqrt(np.divide(ss, n - 1, out=np.full(n.shape, np.nan), where=n > 1))


def max_t(replicates, estimates) -> tuple[np.ndarray, np.ndarray]:
    """Studentized deviations of every replicate and their largest per replicate (the max-t statistic).

    Args:
        replicates: (R, K, ...) bootstrap replicates of K signed components (any trailing axes
            are independent columns, e.g. the metrics of several runs). estimates: (K, ...).

    Returns:
        ((K, ...) bootstrap sd of each component, (R, ...) max over k of |θ*_k − θ̂_k| / sd_k).
        A component with sd 0 or NaN (constant, or undefined) does not enter the max; a replicate
        with no component is 0.
    """
    reps = np.asarray(replicates, dtype=np.float64)
    est = np.asarray(estimates, dtype=np.float64)
    sd = _sd(reps)
    ok = np.isfinite(sd) & (sd > 0) & np.isfinite(est)
    t = np.abs(reps - est) / np.where(ok, sd, 1.0)
    t = np.where(ok & ~np.isnan(t), t, 0.0)
    return sd, t.max(axis=1)


def component_band(replicates, estimates, level: float = 0.95, critical=None) -> tuple[np.ndarray, np.ndarray]:
    """The max-t simultaneous band of K signed components: ``θ̂_k ± c · sd_k`` for every k at once.

    ``c`` is the ``level`` quantile of the per-replicate max-t statistic (``max_t``), so in the
    bootstrap world the band holds all K components together in a share ``level`` of replicates
    (Hothorn, Bretz & Westfall's simultaneous intervals, with the bootstrap for the joint law).

    Args:
        replicates: (R, K). estimates: (K,). level: joint coverage.
        critical: a given ``c`` instead of the max-t quantile (tests; 1.96 is the pointwise band).

    Returns:
        (low, high), each (K,); NaN where the estimate or the sd is NaN.
    """
    est = np.asarray(estimates, dtype=np.float64)
    sd, t = max_t(replicates, est)
    c = percentile_interval(t[:, None], 2 * level - 1)[1][0] if critical is None else np.asarray(critical, dtype=np.float64)
    return est - c * sd, est + c * sd


def band_interval(spec: GroupMetric, replicates, estimates, level: float = 0.95, n_groups: int | None = None,
                  critical=None, min_range_groups: int = 2, recentre: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The interval of a ``groups.COMPONENT_BIAS`` metric from the simultaneous band of its components.

    The metric is monotone in every component (or its |·|) (``groups.component_range``), so when the
    band holds every component the metric lies between the smallest and the largest value it takes
    over the band: the interval covers at least as often as the band covers all components, whatever
    the bias of the plug-in max (or min). It is wide when many components are far from the one that
    decides the metric (each is widened by ``c``).

    Args:
        spec: the metric (``groups.GroupMetric``). replicates: (R, ...) replicates of its
            ``groups.components`` (e.g. (R, B, P, C) for a gap over pairs); estimates: (...) the plug-in components.
        level, critical: as ``component_band`` (the components are flattened into one family).
        n_groups, min_range_groups: as ``groups.combine_components``.
        recentre: centre the band on each component's bootstrap bias-corrected value
            ``2 d̂ − mean(d*)`` (replicates shifted alike) instead of ``d̂``: a candidate of the
            coverage study for ``ece_gap``, whose components (differences of two groups' binned ECE)
            are biased themselves; no metric uses it (RESULTS.md).

    Returns:
        (low, high), two floats as 0-d arrays.
    """
    reps = np.asarray(replicates, dtype=np.float64)
    est = np.asarray(estimates, dtype=np.float64)
    if recentre:
        centre = 2 * est - _mean(reps)
        reps, est = reps - est + centre, centre
    lo, hi = component_band(reps.reshape(len(reps), -1), est.reshape(-1), level, critical)
    return component_range(spec, lo.reshape(est.shape), hi.reshape(est.shape), n_groups=n_groups,
                           min_range_groups=min_range_groups)


def _component_specs() -> dict[str, tuple[GroupMetric, ...]]:
    """{name: its specs} of the metrics with a components view (``groups.COMPONENT_BIAS``), from both
    tasks' spec tables: a name means the same combine in both (checked here), its bases may differ
    (``es_auc``: the macro AUC multi-class, each condition's AUC multi-label)."""
    out: dict[str, tuple[GroupMetric, ...]] = {}
    for spec in (*metrics.GROUP_METRICS, *multilabel.GROUP_METRICS):
        if spec.combine not in COMPONENT_BIAS:
            continue
        seen = out.setdefault(spec.name, (spec,))
        if (seen[0].combine, seen[0].debiased) != (spec.combine, spec.debiased):
            raise ValueError(f"{spec.name}: the two tasks' spec tables disagree on its combine or debiased bases")
        if spec.bases not in [s.bases for s in seen]:  # the same metric (its doc may differ by task)
            out[spec.name] = (*seen, spec)
    return out


COMPONENT_SPECS = _component_specs()


def _columns_of(spec: GroupMetric, attr: str, cls: str, where: dict,
                debiased: bool = False) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(B, G, C) per-group columns and, for "equity", (B, C) overall columns of one spec (with ``debiased``:
    of its debiased bases, ``GroupMetric.debiased``); None if one is missing (or the spec has no debiased bases)."""
    bases = spec.debiased if debiased else spec.bases
    if not bases:
        return None
    groups = list(dict.fromkeys(k[2] for k in where if k[0] == bases[0] and k[1] == attr and k[2]))
    if cls:
        classes = [cls]
    else:
        classes = sorted({k[3] for k in where if k[0] == bases[0] and k[1] == attr and k[2] and k[3]}) or [""]
    try:
        cols = np.array([[[where[(b, attr, g, c)] for c in classes] for g in groups] for b in bases], dtype=np.int64)
        overall = (np.array([[where[(b, "", "", c)] for c in classes] for b in bases], dtype=np.int64)
                   if spec.combine == "equity" else None)
    except KeyError:
        return None
    return cols, overall


def component_candidates(key: tuple, where: dict, debiased: bool = False) -> list[tuple[GroupMetric, np.ndarray, np.ndarray | None]]:
    """Every spec of a metric (one per task, ``COMPONENT_SPECS``) whose per-group base values are all among the columns.

    Args:
        key: ``(metric, attribute, "", class)`` (class "": the summary over classes).
        where: {metrics.csv key: column}: the per-group values ``(base, attribute, group, class)``
            that ``evaluate_all`` / ``evaluate_multilabel`` report beside the metric (and, for
            "equity", the overall ones ``(base, "", "", class)``).
        debiased: the columns of the spec's debiased bases (``GroupMetric.debiased``) instead of its bases.

    Returns:
        [(spec, (B, G, C) int columns: base b of group g and class c, groups in column order, classes
        sorted; the class "" alone for a base without a class axis, (B, C) the overall columns for
        "equity", else None)]; empty when the metric has no components view or a column is missing.
    """
    name, attr, _, cls = key
    if not attr:
        return []
    found = [(spec, _columns_of(spec, attr, cls, where, debiased)) for spec in COMPONENT_SPECS.get(name, ())]
    return [(spec, *cols) for spec, cols in found if cols is not None and cols[0].shape[1]]


def component_columns(key: tuple, where: dict, estimates=None,
                      debiased: bool = False) -> tuple[GroupMetric, np.ndarray, np.ndarray | None] | None:
    """Where a metric's per-group base values sit among the columns of a metrics table, to rebuild its components.

    Both tasks report the bases of both (``es_auc``: each condition's AUC and the macro AUC per group), so
    where a name has two specs the table's own is the one whose components rebuild the reported value.

    Args:
        key, where, debiased: as ``component_candidates``. estimates: (K,) the columns' values; needed only
            to choose between two specs (without it, or when neither rebuilds the value: None; a
            metric with debiased bases has one spec).

    Returns:
        One of ``component_candidates``, or None.
    """
    found = component_candidates(key, where, debiased)
    if len(found) < 2:
        return found[0] if found else None
    if estimates is None:
        return None
    est = np.asarray(estimates, dtype=np.float64)
    value = est[where[tuple(key)]]
    for spec, cols, overall in found:
        comp = components(spec, {b: est[cols[i]] for i, b in enumerate(spec.bases)},
                          None if overall is None else {b: est[overall[i]] for i, b in enumerate(spec.bases)})
        if np.isclose(component_range(spec, comp, comp, n_groups=cols.shape[1])[0], value, rtol=0, atol=1e-9):
            return spec, cols, overall
    return None


def band_columns(replicates, estimates, spec: GroupMetric, cols: np.ndarray, overall: np.ndarray | None = None,
                 level: float = 0.95, critical=None, recentre: bool = False) -> tuple[float, float]:
    """``band_interval`` of one metric from the columns of its per-group base values (``component_columns``).

    Args:
        replicates: (R, K) replicates of every column; estimates: (K,). cols: (B, G, C).
        overall: (B, C) columns of the overall values ("equity"), else None.

    Returns:
        (low, high) of the metric; NaN when it has fewer than two groups.
    """
    reps, est = np.asarray(replicates, dtype=np.float64), np.asarray(estimates, dtype=np.float64)
    n_groups = cols.shape[1]
    if n_groups < 2:
        return np.nan, np.nan
    per_group = {b: reps[:, cols[i]].transpose(1, 0, 2) for i, b in enumerate(spec.bases)}  # (G, R, C)
    whole = None if overall is None else {b: reps[:, overall[i]] for i, b in enumerate(spec.bases)}  # (R, C)
    comp_reps = np.moveaxis(components(spec, per_group, whole), -2, 0)  # (R, ..., C)
    comp_est = components(spec, {b: est[cols[i]] for i, b in enumerate(spec.bases)},
                          None if overall is None else {b: est[overall[i]] for i, b in enumerate(spec.bases)})
    lo, hi = band_interval(spec, comp_reps, comp_est, level, n_groups, critical, recentre=recentre)
    return float(lo), float(hi)


def debiased_columns(replicates, estimates, spec: GroupMetric, cols: np.ndarray) -> tuple[float, np.ndarray]:
    """A gap recomputed from its groups' debiased values (``component_columns(..., debiased=True)``).

    Args:
        replicates: (R, K) replicates of every column; estimates: (K,). cols: (B, G, C), the debiased bases'.

    Returns:
        (θ̂_d, (R,) θ*_d): the gap of the debiased per-group values and its replicates; NaN with fewer than two groups.
    """
    reps, est = np.asarray(replicates, dtype=np.float64), np.asarray(estimates, dtype=np.float64)
    n_groups = cols.shape[1]
    if n_groups < 2:
        return np.nan, np.full(len(reps), np.nan)
    # pair_components reads the values under the spec's base names: the debiased values take their places.
    per_group = {b: reps[:, cols[i]].transpose(1, 0, 2) for i, b in enumerate(spec.bases)}  # (G, R, C)
    gap_r = combine_components(spec, np.abs(pair_components(spec, per_group)), n_groups=n_groups)
    gap = combine_components(spec, np.abs(pair_components(spec, {b: est[cols[i]] for i, b in enumerate(spec.bases)})),
                             n_groups=n_groups)
    return float(gap), gap_r


def debiased_interval(replicates, estimates, key: tuple, where: dict, level: float = 0.95) -> tuple[float, float, float]:
    """The ``debiased`` interval of one gap and its estimate (see the module docstring).

    The hull of the pivot ``θ*_d − θ̂`` around ``θ̂_d`` (``debiased_columns``), except for a gap of
    ``BAND_MIN_GROUPS`` or more groups without a class axis (one class: multi-class ``ece_gap``,
    a multi-label one of one condition): there, as ``band``, the gap of the max-t band's ends of
    the debiased pair components, each component's deviations taken from the plug-in component
    (the bootstrap world's truth) and the band centred on the debiased one. The hull of the
    largest of six single differences trusts the bootstrap's bias estimate of a max, which falls
    short (4 groups, accuracy gap 0.05: 0.84–0.875); for a mean over conditions of |differences|
    (the multi-label summary) the band, which bounds every condition's difference at once,
    over-covered (1.00 at 2.4–2.9 times the width) and the hull is kept (0.845–0.975 with four
    groups: not coverage-checked there; RESULTS.md, part 3).

    Args:
        replicates: (R, K); estimates: (K,). key: the gap's metrics.csv key. where: {key: column},
            holding its groups' debiased (and plug-in) base values (``component_columns``).

    Returns:
        (low, high, estimate) unclipped; the estimate is ``θ̂ + θ̂_d − mean(θ*_d)`` either way. NaN
        without the debiased values.
    """
    reps, est = np.asarray(replicates, dtype=np.float64), np.asarray(estimates, dtype=np.float64)
    found, plain = component_columns(key, where, debiased=True), component_columns(key, where)
    if found is None:
        return np.nan, np.nan, np.nan
    spec, cols, _ = found
    gap_d, reps_d = debiased_columns(reps, est, spec, cols)
    shifted = (reps_d + gap_d - est[where[key]])[:, None]  # (R, 1): the pivot around θ̂_d
    bc = float(bias_corrected(shifted, [gap_d], "hull")[0])
    if cols.shape[1] < BAND_MIN_GROUPS or cols.shape[2] > 1 or plain is None:
        (lo,), (hi,) = interval(shifted, [gap_d], "hull", level)
        return float(lo), float(hi), bc

    def pairs(x, c):  # (..., K) -> (B, P, ..., C) pair components of the columns c (B, G, C)
        return pair_components(spec, {b: np.moveaxis(x[..., c[i]], -2, 0) for i, b in enumerate(spec.bases)})

    comp_d, comp_p = pairs(est, cols), pairs(est, plain[1])
    comp_r = np.moveaxis(pairs(reps, cols), 2, 0)  # (R, B, P, C)
    lo, hi = band_interval(spec, comp_r - comp_p + comp_d, comp_d, level, cols.shape[1])
    return float(lo), float(hi), bc


def with_components(keys: list, available) -> list:
    """``keys`` and, after them, the other columns their intervals read (a ``band`` or ``debiased`` gap's per-group
    values, a ``pivot`` value's plug-in and debiased partners).

    For a caller that makes intervals of a few keys (e.g. a trade-off point): pass the result to
    ``intervals_by_metric``, and read the first ``len(keys)`` columns.

    Args:
        keys: metrics.csv keys. available: every key the run has.

    Returns:
        keys + the missing component keys, in ``available`` order.
    """
    where = {tuple(k): i for i, k in enumerate(available)}
    extra = set()
    for k in keys:
        method = interval_method(k[0]).method
        # A band reads the plug-in bases' per-group values (every task's: intervals_by_metric picks by value);
        # a debiased gap the debiased ones, and the plug-in ones too.
        for debiased in {"band": (False,), "debiased": (True, False)}.get(method, ()):
            for found in component_candidates(tuple(k), where, debiased=debiased):
                extra.update(np.concatenate([c.reshape(-1) for c in found[1:] if c is not None]).tolist())
        if method == "pivot":  # its plug-in and debiased partners
            spec = interval_method(k[0])
            extra.update(where[p] for p in ((spec.plugin, *k[1:]), (spec.debiased, *k[1:])) if p in where)
    have = {tuple(k) for k in keys}
    return list(keys) + [k for k in (tuple(a) for a in available) if where[k] in extra and k not in have]
