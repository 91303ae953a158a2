"""The group-metric engine of both tasks, and the NaN rule it rests on. NumPy only.

Both tasks (``metrics``: multi-class; ``multilabel``: multi-label and binary) report group
fairness the same way, as fairlearn's ``MetricFrame`` does: a per-sample metric is evaluated on
each group (``by_group``, the one disaggregation helper) and the groups' values are combined by
one small spec (``GroupMetric``: name, base metrics, combine) from one vocabulary (``COMBINES``),
applied by one function (``combine_groups``). Each task owns its spec table
(``metrics.GROUP_METRICS``, ``multilabel.GROUP_METRICS``), written in this vocabulary.

Shapes, for both tasks:

- a base value is ``(..., C)``: leading axes from the weights (``(R,)`` for R bootstrap
  replicates, none for plain data) and a trailing class axis -- classes (multi-class) or
  conditions (multi-label). A whole-sample value (accuracy, macro AUC) has ``C = 1``.
- per-group values are stacked ``(G, ..., C)``, groups in level order, the reference group
  (``M``, ``young``; run.json ``attributes``) first.
- ``combine_groups`` returns ``(...)``: the gap over groups, summarised over classes; with
  ``per_class=True`` also ``(..., C)``, the gap of each class (reported per condition by the
  multi-label task).

NaN rule (the only one): a ratio whose denominator is zero is NaN (``ratio``). Reductions over
classes skip NaN terms (``nanmean_last``), like scikit-learn's ``zero_division=np.nan``; they are
NaN only when every term is. Combinations over groups propagate NaN: a gap involving an
undefined group is NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

ECE_BINS = 15  # equal-width confidence bins of the binned calibration error, both tasks

# The combine vocabulary of every spec table (what each does: GroupMetric.combine).
PAIRWISE_COMBINES = ("difference", "abs_difference", "magnitude")
COMBINES = PAIRWISE_COMBINES + ("max_range", "min", "equity")
# The combines that are a nondecreasing function of |pair differences| alone (``pair_components``).
ABS_COMBINES = ("abs_difference", "max_range")
# The combines whose metric is a monotone function of a few signed components (``components``), so a box
# that holds every component bounds the metric (``component_range``), with the sign of the plug-in's
# small-sample bias (Jensen): +1, too large (the largest |difference| of noisy values), -1, too small
# (the smallest of noisy group values; an AUC shrunk by a sum of noisy |differences|).
COMPONENT_BIAS = {"abs_difference": +1, "max_range": +1, "min": -1, "equity": -1}


# ----------------------------------------------------------------------------- the NaN rule


def as_weights(weights, n: int) -> np.ndarray:
    """(..., N) float64 sample weights (bootstrap counts); ones (N,) when None."""
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape[-1] != n:
        raise ValueError(f"weights have {w.shape[-1]} columns for {n} samples")
    return w


def ratio(num, den) -> np.ndarray:
    """num / den with NaN where den == 0 (the NaN rule). Broadcasts; returns float64."""
    num, den = np.broadcast_arrays(np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64))
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def nanmean_last(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis skipping NaN: (..., C) -> (...); NaN (no warning) if all terms are NaN."""
    ok = ~np.isnan(x)
    return ratio(np.where(ok, x, 0).sum(-1), ok.sum(-1))


# ----------------------------------------------------------------------------- disaggregation


def by_group(metric: Callable, y_true, y_prob, groups, *, levels=None, weights=None, **kwargs) -> dict:
    """Evaluate ``metric`` on each group's samples separately (the one disaggregation helper).

    Args:
        metric: ``f(y_true, y_prob, *, weights, **kwargs)`` of either task, e.g. ``metrics.f1``,
            ``metrics.all_metrics`` (y_true (N,) int, y_prob (N, C)) or
            ``multilabel.condition_metrics`` (Y (N, C) in {1, 0, NaN}, P (N, C)).
        y_true, y_prob: the task's arrays, samples on the first axis.
        groups: (N,) group label of each sample.
        levels: group labels in output order (default: sorted unique), the reference first; a
            level without samples gets the metric of empty data (NaN).
        weights: (N,) or (..., N) sample weights.
        **kwargs: passed on, e.g. ``thresholds=`` of the multi-label metrics.

    Returns:
        {group: the metric's value on that group}, in level order.
    """
    y_true, y_prob, groups = np.asarray(y_true), np.asarray(y_prob), np.asarray(groups)
    if groups.shape != (len(y_true),):
        raise ValueError(f"group labels {groups.shape} must be one per sample ({len(y_true)},)")
    w = as_weights(weights, len(y_true))
    levels = sorted(set(groups.tolist())) if levels is None else list(levels)
    out = {}
    for g in levels:
        # Subsetting (not zero-weighting) keeps the work over all groups at one pass over N.
        m = groups == g
        out[g] = metric(y_true[m], y_prob[m], weights=w[..., m], **kwargs)
    return out


def stack_groups(per_group: Mapping, base: str, like: np.ndarray) -> np.ndarray:
    """{group: {base: (..., C)}} in level order -> (G, ..., C) values of one base; G may be 0 (shape of ``like``)."""
    if not per_group:
        return np.empty((0,) + np.shape(like))
    return np.stack([values[base] for values in per_group.values()])


# ----------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class GroupMetric:
    """A fairness metric built from per-group values of base metrics (a row of a spec table).

    Attributes:
        name: output name (metrics.csv ``metric``).
        bases: names of per-sample metrics of the task whose per-group values it combines.
        combine: one of COMBINES, how groups (axis G) and classes (axis C) are combined:
            "difference": value(A) − value(A') per class, mean over bases; summary: the class
                mean of the differences (pair by pair, before the largest pair is taken). Signed.
            "abs_difference": |value(A) − value(A')| per class, mean over bases; summary: the
                class mean of the absolute differences.
            "magnitude": |difference|, the size of "difference" whichever group is ahead.
            For these three, A is the first level (the reference); with more than two groups
            the result is the largest over all ordered pairs (for a signed difference: max − min);
            with fewer than two, NaN.
            "max_range": per class, max − min over groups of each base, the largest over bases
                (fairlearn's worst-case ``equalized_odds_difference`` for bases tpr and fpr);
                summary: the class mean.
            "min": per class the smallest group value (one base); summary: the class mean.
            "equity": per class overall / (1 + Σ_g |overall − value(g)|) (one base); summary:
                the class mean.
        doc: one sentence, for METRIC_DEFINITIONS and the report.
        debiased: per-sample metrics of the task that estimate ``bases`` (same order) with their
            small-sample bias removed (``ece`` → ``ece_debiased``); the gap's interval is built from
            their per-group values (``core.intervals``, method ``debiased``). Empty: none.
    """

    name: str
    bases: tuple[str, ...]
    combine: str
    doc: str
    debiased: tuple[str, ...] = ()

    def __post_init__(self):
        if self.combine not in COMBINES:
            raise ValueError(f"unknown combine {self.combine!r}; choose among {', '.join(COMBINES)}")
        if not self.bases or (self.combine in ("min", "equity") and len(self.bases) != 1):
            raise ValueError(f"{self.name}: combine {self.combine!r} takes {'one base' if self.bases else 'a base'}")
        if self.debiased and (len(self.debiased) != len(self.bases) or self.combine not in ABS_COMBINES):
            raise ValueError(f"{self.name}: debiased bases pair with the bases one to one, for a combine in "
                             f"{', '.join(ABS_COMBINES)}")


# ----------------------------------------------------------------------------- the engine


def _over_pairs(d: np.ndarray) -> np.ndarray:
    """(G, G, ...) pairwise values -> (...): the (reference, other) entry for two groups, the
    largest over ordered pairs for more (NaN propagates), NaN for fewer than two."""
    g = d.shape[0]
    if g < 2:
        return np.full(d.shape[2:], np.nan)
    if g == 2:
        return d[0, 1]
    return d[~np.eye(g, dtype=bool)].max(axis=0)


def _stacked(values) -> np.ndarray:
    return np.stack(list(values.values())) if isinstance(values, Mapping) else np.asarray(values)


def pair_components(spec: GroupMetric, per_group: Mapping) -> np.ndarray:
    """The signed components of an ``ABS_COMBINES`` metric: every base's difference over every pair of groups.

    An ``abs_difference`` or ``max_range`` metric is a function of these components' absolute
    values alone, nondecreasing in each (``combine_components``): so a box that holds every
    component maps to an interval that holds the metric (``core.intervals.component_band``).

    Args:
        spec: the metric (its ``combine`` in ``ABS_COMBINES``).
        per_group: {base: (G, ..., C)} (or {base: {group: (..., C)}}) in level order.

    Returns:
        (B, P, ..., C) value(i) − value(j) of base b over the P = G(G − 1)/2 pairs i < j in level
        order ((0, 1), (0, 2), ..., (1, 2), ...); P = 0 with fewer than two groups.
    """
    if spec.combine not in ABS_COMBINES:
        raise ValueError(f"{spec.name}: combine {spec.combine!r} has no components view (only {', '.join(ABS_COMBINES)})")
    values = [_stacked(per_group[b]) for b in spec.bases]
    i, j = np.triu_indices(values[0].shape[0], k=1)
    return np.stack([v[i] - v[j] for v in values])


def components(spec: GroupMetric, per_group: Mapping, overall: Mapping | None = None) -> np.ndarray:
    """The signed components of a ``COMPONENT_BIAS`` metric, which ``component_range`` maps a box of back to the metric.

    Args:
        spec: the metric. per_group: {base: (G, ..., C)} (or {base: {group: (..., C)}}) in level order.
        overall: {base: (..., C)} values on all samples; needed by "equity" only.

    Returns:
        ``abs_difference``, ``max_range``: (B, P, ..., C), ``pair_components``; ``min``: (G, ..., C) the
        group values; ``equity``: (1 + G, ..., C) the overall value, then overall − value(g) of each group.
    """
    if spec.combine in ABS_COMBINES:
        return pair_components(spec, per_group)
    if spec.combine not in COMPONENT_BIAS:
        raise ValueError(f"{spec.name}: combine {spec.combine!r} has no components view (only {', '.join(COMPONENT_BIAS)})")
    values = _stacked(per_group[spec.bases[0]])
    if spec.combine == "min":
        return values
    base = np.asarray(overall[spec.bases[0]], dtype=np.float64)
    return np.concatenate([base[None], base[None] - values])


def abs_range(low, high) -> tuple[np.ndarray, np.ndarray]:
    """The image of intervals [low, high] under |·|: (...), (...) -> (...), (...)."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    a, b = np.abs(low), np.abs(high)
    holds0 = (low <= 0) & (high >= 0)
    return np.where(holds0, 0.0, np.minimum(a, b)), np.maximum(a, b)


def component_range(spec: GroupMetric, low, high, *, n_groups: int | None = None,
                    min_range_groups: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The smallest and largest summary a ``COMPONENT_BIAS`` metric takes while every component lies in [low, high].

    Exact, not a bound: each metric is monotone in every component (or in its |·|) separately.

    Args:
        spec: the metric. low, high: bounds on its ``components``, that shape.
        n_groups, min_range_groups: as ``combine_components`` (``abs_difference``, ``max_range``).

    Returns:
        (low, high), each (...): the class mean skips NaN, as the metric's own summary.
    """
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    if spec.combine in ABS_COMBINES:
        near, far = abs_range(low, high)
        args = dict(n_groups=n_groups, min_range_groups=min_range_groups)
        return combine_components(spec, near, **args), combine_components(spec, far, **args)
    if spec.combine not in COMPONENT_BIAS:
        raise ValueError(f"{spec.name}: combine {spec.combine!r} has no components view (only {', '.join(COMPONENT_BIAS)})")
    if spec.combine == "min":  # nondecreasing in every group value
        if low.shape[0] == 0:
            return np.full(low.shape[2:], np.nan), np.full(low.shape[2:], np.nan)
        return nanmean_last(low.min(axis=0)), nanmean_last(high.min(axis=0))
    # equity: overall / (1 + Σ_g |deviation_g|): monotone in the overall value (increasing while it is
    # positive) and nonincreasing in each |deviation|; the extremes sit at the ends of both.
    near, far = abs_range(low[1:], high[1:])
    small, large = 1 + near.sum(axis=0), 1 + far.sum(axis=0)
    lo = np.minimum(low[0] / large, low[0] / small)
    hi = np.maximum(high[0] / small, high[0] / large)
    return nanmean_last(lo), nanmean_last(hi)


def combine_components(spec: GroupMetric, magnitudes, *, per_class: bool = False, n_groups: int | None = None,
                       min_range_groups: int = 2):
    """An ``ABS_COMBINES`` metric from the absolute values of its components (``pair_components``).

    Nondecreasing in every entry of ``magnitudes``, which is what lets a bound on each |component|
    bound the metric. ``combine_groups`` computes these metrics through here (one engine).

    Args:
        spec: the metric. magnitudes: (B, P, ..., C) |components| (or bounds on them), P pairs of
            G groups in ``pair_components`` order.
        per_class: also return the per-class values.
        n_groups: G (default: from P, taking P = 0 for one group); needed only to tell one group from none.
        min_range_groups: as ``combine_groups``.

    Returns:
        (...) the metric, or with ``per_class`` ((..., C), (...)).
    """
    a = np.asarray(magnitudes, dtype=np.float64)
    if n_groups is None:
        n_groups = int(round((1 + np.sqrt(1 + 8 * a.shape[1])) / 2))
    if spec.combine == "abs_difference":
        if n_groups < 2:
            per, summary = np.full(a.shape[2:], np.nan), np.full(a.shape[2:-1], np.nan)
        else:
            # Mean over bases, then the largest pair (NaN propagates); the summary's class mean skips NaN.
            summary = (sum(nanmean_last(x) for x in a) / len(a)).max(axis=0)
            per = (sum(a) / len(a)).max(axis=0)
    else:  # max_range: per class, max − min over groups = the largest |pair difference|; the largest over bases
        if n_groups == 0 or n_groups < min_range_groups:
            per = np.full(a.shape[2:], np.nan)
        elif n_groups == 1:
            per = np.zeros(a.shape[2:])
        else:
            per = a.max(axis=(0, 1))  # NaN propagates
        summary = nanmean_last(per)
    return (per, summary) if per_class else summary


def combine_groups(spec: GroupMetric, per_group: Mapping, overall: Mapping | None = None, *, per_class: bool = False,
                   min_range_groups: int = 2):
    """Apply one GroupMetric to per-group base values (either task).

    Args:
        spec: the metric.
        per_group: {base: (G, ..., C)} values of the groups in level order (reference first);
            a base may also be given as {group: (..., C)} in level order.
        overall: {base: (..., C)} values on all samples; needed by "equity" only.
        per_class: also return the per-class (per-condition) values.
        min_range_groups: "max_range" is NaN with fewer groups than this. 2 (a range needs two
            groups, as every gap); the multi-label task passes 1 (the range of one group is 0),
            which its metrics.csv has always reported.

    Returns:
        (...) the metric, or with ``per_class`` the pair ((..., C) per class, (...) summary).
    """
    values = {b: _stacked(per_group[b]) for b in spec.bases}
    first = values[spec.bases[0]]
    n_groups = first.shape[0]
    if spec.combine in ABS_COMBINES:
        return combine_components(spec, np.abs(pair_components(spec, values)), per_class=per_class,
                                  n_groups=n_groups, min_range_groups=min_range_groups)
    if spec.combine in PAIRWISE_COMBINES:
        d = [v[:, None] - v[None, :] for v in values.values()]  # each (G, G, ..., C)
        summary = _over_pairs(sum(nanmean_last(x) for x in d) / len(d))  # class mean skips NaN
        per = _over_pairs(sum(d) / len(d)) if per_class else None
        if spec.combine == "magnitude":
            summary, per = np.abs(summary), (None if per is None else np.abs(per))
        return (per, summary) if per_class else summary
    if n_groups == 0:
        per = np.full(first.shape[1:], np.nan)
    elif spec.combine == "min":
        per = first.min(axis=0)
    else:  # equity
        base = np.asarray(overall[spec.bases[0]])
        per = base / (1 + np.abs(base - first).sum(axis=0))
    summary = nanmean_last(per)
    return (per, summary) if per_class else summary
