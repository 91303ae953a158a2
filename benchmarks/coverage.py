"""Coverage of the bootstrap intervals `cxrfair analyze` reports, by simulation against a known truth.

    python benchmarks/coverage.py --quick          # minutes: 2 and 4 groups, 60 per group, 100 draws
    python benchmarks/coverage.py                  # the full grid of the statistics issue
    python benchmarks/coverage.py --task multilabel  # the same grid for the multi-label metrics
    python benchmarks/coverage.py --seed-deltas 1 2 3 5 --gaps 0.05 --sizes 60 --groups 2 --draws 300 \
        --replicates 500 --truth 20000   # deltas of two seed means (RESULTS.md, "Interval coverage, part 3")

Each setting draws a population of test images whose classifier is known: C classes, G groups,
an image's label uniform, its predicted probabilities a softmax of Gaussian noise plus ``signal_g``
on the true class and ``tilt_g`` on class 0; group 0 has no tilt, the others a tilt of
``TILT_PER_GAP × gap`` (so their selection rates, and dp_gap, differ too) and the signal that puts
their accuracy ``gap`` below group 0's (gap 0: every group identical, so every true gap is 0). The
true value of every metric is that of the population (computed on ``--truth`` images per group,
so its own error is negligible). Each of ``--draws`` test sets (``n`` images per group, one image
per patient) gets the analysis' interval — the stratified patient bootstrap of
``cxrfair.core.bootstrap`` with ``--replicates`` replicates, strata = groups, as `analyze`
draws — and we count how often the interval holds the truth.

Methods compared (``cxrfair.core.intervals``): ``used`` (the method its table gives the metric:
what `analyze` reports), ``percentile``, ``basic`` (2θ̂ − the percentile interval, clipped to the
metric's range), ``shifted`` (the percentile interval minus twice the bootstrap bias), ``hull``
(the smallest interval holding the percentile and basic ones), ``bca``
(Efron's BCa, acceleration from a grouped delete-a-block jackknife of ``JACK_BLOCKS`` blocks of
patients), and for the gaps with a components view (``eqodds``, ``eqodds_worst``, ``dp_gap``,
``ece_gap``) ``band`` (both ends from the max-t simultaneous band of the per-pair, per-class
differences, ``intervals.band_interval``), ``band_basic`` (its low end, the basic high end: what
``used`` is for those gaps with 3+ groups) and ``band_bc`` (both ends, the band centred on the
components' bias-corrected values: a candidate for ``ece_gap``); for ``ece_gap`` also ``debiased``
(the hull of the pivot θ*_d − θ̂ of the gap recomputed from the groups' ``ece_debiased``: what
``used`` is with two groups, and for the multi-label summary) and ``debiased_band`` (the max-t band
of the debiased pair differences: what ``used`` is with 3+ groups and one class), ``debiased_band_hull``
(that band's low end, the ``debiased`` high end). The per-sample
``ece`` and ``ece_debiased`` (multi-label ``ece_macro``, ``ece_debiased_macro``) are studied too:
their truth is the population's binned ECE. A nominal 95% interval should cover 95% of the time; an absolute or max-over-groups
gap is biased upward in small samples, which the percentile interval inherits.

Prints one row per (setting, metric): truth, mean plug-in estimate (its bias), mean
bias-corrected estimate, share of draws whose reported interval excludes the plug-in value,
coverage per method (binomial standard error ≈ 0.011 at 400 draws); with ``--widths`` also the
mean width per method.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import time

from statistics import NormalDist

import numpy as np

from cxrfair.analysis.replicates import delta_interval, seed_resampled, seed_variance, seed_widened
from cxrfair.core import metrics as M
from cxrfair.core import multilabel as ML
from cxrfair.core.bootstrap import interval as interval_percentile
from cxrfair.core.bootstrap import p_value, patient_counts
from cxrfair.core.groups import COMPONENT_BIAS, pair_components
from cxrfair.core.intervals import (band_columns, band_interval, component_columns, debiased_columns, interval,
                                    interval_method, intervals_by_metric, one_sided_band)

# The metrics whose coverage is studied: (name in evaluate_all's keys, attribute-level?).
STUDIED = ("accuracy", "auc_macro", "ece", "ece_debiased", "f1_gap", "f1_gap_abs", "eqodds", "eqodds_worst", "dp_gap",
           "ece_gap", "ece_gap_paper", "fnr_gap", "es_auc", "worst_group_accuracy")
CLASSES = ("A", "B", "C")
METHODS = ("used", "percentile", "basic", "shifted", "hull", "bca", "band", "band_basic", "band_bc", "debiased",
           "debiased_band", "debiased_band_hull")  # "used": core.intervals' choice for the metric
JACK_BLOCKS = 20  # delete-a-block jackknife of the BCa acceleration: blocks of patients


TILT_PER_GAP = 3.0  # logit added to class 0 in the non-reference groups, per unit of accuracy gap


def simulate(signals: np.ndarray, n_per_group: int, rng: np.random.Generator, noise: float = 1.0, tilts=None,
             images: int = 1, patient_sd: float = 0.0):
    """Images of every group: ((N,) labels, (N, C) probabilities, (N,) group labels, (N,) patient ids).

    signals, tilts: (G,) per group: the logit added to the true class, and to class 0 (a
    prediction bias towards it, so that selection rates, hence dp_gap, differ between groups).
    images, patient_sd: ``n_per_group`` patients per group, each with 1 to ``images`` images (uniform)
    that share the patient's label and a patient effect N(0, patient_sd²) on the true class's logit
    (some patients are easy, some hard): images of one patient are correlated. With the defaults,
    one image per patient and the same draws as before these options existed.
    """
    c = len(CLASSES)
    patient_group = np.repeat(np.arange(len(signals)), n_per_group)
    n_images = rng.integers(1, images + 1, size=len(patient_group)) if images > 1 else np.ones(len(patient_group), int)
    patients = np.repeat(np.arange(len(patient_group)), n_images)
    groups = patient_group[patients]
    y = rng.integers(0, c, size=len(patient_group))[patients]
    effect = rng.normal(0.0, patient_sd, size=len(patient_group))[patients] if patient_sd > 0 else 0.0
    logits = rng.normal(0.0, noise, size=(len(groups), c))
    logits[np.arange(len(groups)), y] += signals[groups] + effect
    if tilts is not None:
        logits[:, 0] += np.asarray(tilts)[groups]
    p = np.exp(logits - logits.max(1, keepdims=True))
    return y, p / p.sum(1, keepdims=True), np.array([f"g{g}" for g in groups]), patients


def values(y, p, groups, weights=None, full: bool = False) -> dict[str, np.ndarray]:
    """The studied metrics: {name: () or (R,)} (group metrics over the one attribute); ``full``: every key."""
    levels = sorted(set(groups.tolist()))
    out = M.evaluate_all(y, p, list(CLASSES), {"group": (groups, levels)}, weights=weights)
    if full:
        return out
    return {name: out[(name, "", "", "")] if (name, "", "", "") in out else out[(name, "group", "", "")]
            for name in STUDIED}


def _bca(estimate: float, reps: np.ndarray, jack: np.ndarray, level: float) -> tuple[float, float]:
    """BCa interval (Efron 1987): bias-correction z0 from the replicates, acceleration from the grouped jackknife."""
    nd = NormalDist()
    r = reps[~np.isnan(reps)]
    j = jack[~np.isnan(jack)]
    frac = (np.sum(r < estimate) + 0.5 * np.sum(r == estimate)) / len(r)
    z0 = nd.inv_cdf(min(max(frac, 1 / (2 * len(r))), 1 - 1 / (2 * len(r))))
    d = j.mean() - j
    den = 6 * (d @ d) ** 1.5
    a = float(np.sum(d ** 3)) / den if den > 0 else 0.0
    out = []
    for q in ((1 - level) / 2, (1 + level) / 2):
        z = nd.inv_cdf(q)
        out.append(float(np.quantile(r, nd.cdf(z0 + (z0 + z) / (1 - a * (z0 + z))))))
    return out[0], out[1]


def intervals(name: str, estimate: float, reps: np.ndarray, jack: np.ndarray, level: float) -> dict[str, tuple[float, float]]:
    """The candidate methods' (low, high) from one estimate and its (R,) replicates, clipped to the metric's range."""
    spec = interval_method(name)
    one = {k: tuple(float(v[0]) for v in interval(reps[:, None], [estimate], k, level, spec.low, spec.high))
           for k in ("percentile", "basic", "shifted", "hull")}
    return {**one, "bca": _bca(estimate, reps, jack, level)}


def debiased_intervals(name: str, estimate: float, rep_mat: np.ndarray, est_vec: np.ndarray, where: dict,
                       level: float) -> dict[str, tuple[float, float]]:
    """A gap with debiased per-group values (``ece_gap``): ``debiased`` (the hull of the pivot θ*_d − θ̂ around
    θ̂_d, ``intervals`` method ``debiased``) and ``debiased_band`` (the max-t band of the debiased pair
    components, deviations taken from the plug-in components: the bootstrap world's truth); NaN otherwise."""
    key = (name, "group", "", "")
    cd, cp = component_columns(key, where, debiased=True), component_columns(key, where)
    if cd is None:
        return dict.fromkeys(("debiased", "debiased_band", "debiased_band_hull"), (np.nan, np.nan))
    spec, cols_d, _ = cd
    gap_d, reps_d = debiased_columns(rep_mat, est_vec, spec, cols_d)
    (lo,), (hi,) = interval((reps_d + gap_d - estimate)[:, None], [gap_d], "hull", level, 0.0, 1.0)

    def comps(x, cols):  # (..., K) -> (B, P, ..., C) pair components of the columns (B, G, C)
        return pair_components(spec, {b: np.moveaxis(x[..., cols[i]], -2, 0) for i, b in enumerate(spec.bases)})

    comp_d, comp_p = comps(est_vec, cols_d), comps(est_vec, cp[1])
    comp_r = np.moveaxis(comps(rep_mat, cols_d), 2, 0)  # (R, B, P, C)
    band = band_interval(spec, comp_r - comp_p + comp_d, comp_d, level, cols_d.shape[1])
    band = tuple(float(np.clip(v, 0.0, 1.0)) for v in band)
    return {"debiased": (float(lo), float(hi)), "debiased_band": band,
            "debiased_band_hull": (band[0], max(float(hi), band[0]))}


def _accuracy(signal: float, tilt: float = 0.0, n: int = 50_000) -> float:
    """Population accuracy at one signal and tilt (common random numbers, so it is monotone in the signal)."""
    y, p, _, _ = simulate(np.array([signal]), n, np.random.default_rng(1), tilts=np.array([tilt]))
    return float((p.argmax(1) == y).mean())


def signals_for(n_groups: int, gap: float, base: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-group (signals, tilts): group 0 at ``base`` and no tilt; the others tilted towards class 0 by
    ``TILT_PER_GAP * gap`` and with the signal (bisection) that makes their accuracy ``gap`` lower."""
    tilt = TILT_PER_GAP * gap
    target, lo, hi = _accuracy(base) - gap, base - 4.0, base
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _accuracy(mid, tilt) < target else (lo, mid)
    return np.array([base] + [(lo + hi) / 2] * (n_groups - 1)), np.array([0.0] + [tilt] * (n_groups - 1))


# The multi-label variant (``--task multilabel``): C conditions, labels 1 with probability
# ``ML_PREVALENCE``, score sigmoid(signal_g · (2y − 1) + noise + tilt_g), decision thresholds 0.5
# (fixed, as if chosen on validation), through ``multilabel.evaluate_multilabel``. The other groups'
# signal is ``ML_SIGNAL_PER_GAP × gap`` lower and their scores tilted up by ``TILT_PER_GAP × gap``
# (so TPR, FPR and calibration differ); each metric's truth is printed.
ML_STUDIED = ("auc_macro", "ece_macro", "ece_debiased_macro", "auc_gap", "worst_group_auc", "es_auc", "eqodds", "eqodds_worst",
              "fnr_gap", "ece_gap")
ML_PREVALENCE, ML_SIGNAL_PER_GAP, ML_NOISE = 0.3, 5.0, 1.5


def simulate_multilabel(signals: np.ndarray, n_per_group: int, rng: np.random.Generator, tilts=None,
                        images: int = 1, patient_sd: float = 0.0):
    """((N, C) labels in {0, 1}, (N, C) probabilities, (N,) group labels, (N,) patient ids): one image per patient."""
    if images != 1 or patient_sd:
        raise ValueError("--images and --patient-sd are simulated for the multi-class task only")
    c = len(CLASSES)
    groups = np.repeat(np.arange(len(signals)), n_per_group)
    y = (rng.random((len(groups), c)) < ML_PREVALENCE).astype(np.float64)
    logit = signals[groups][:, None] * (2 * y - 1) + rng.normal(0.0, ML_NOISE, size=y.shape)
    if tilts is not None:
        logit += np.asarray(tilts)[groups][:, None]
    return y, 1 / (1 + np.exp(-logit)), np.array([f"g{g}" for g in groups]), np.arange(len(groups))


def values_multilabel(y, p, groups, weights=None, full: bool = False) -> dict[str, np.ndarray]:
    """The studied multi-label metrics (macros over conditions): {name: () or (R,)}; ``full``: every key."""
    levels = sorted(set(groups.tolist()))
    out = ML.evaluate_multilabel(y, p, list(CLASSES), {"group": (groups, levels)}, np.full(len(CLASSES), 0.5),
                                 weights=weights)
    if full:
        return out
    return {name: out[(name, "", "", "")] if (name, "", "", "") in out else out[(name, "group", "", "")]
            for name in ML_STUDIED}


def signals_multilabel(n_groups: int, gap: float, base: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Per-group (signals, tilts) of the multi-label variant."""
    return (np.array([base] + [base - ML_SIGNAL_PER_GAP * gap] * (n_groups - 1)),
            np.array([0.0] + [TILT_PER_GAP * gap] * (n_groups - 1)))


# Candidates for the metrics biased downward (``worst_group_auc``, ``es_auc``; RESULTS.md, part 3), for any
# number of groups: ``band_one`` is ``intervals.one_sided_band`` (the band's end on the side the plug-in is
# biased away from, the basic end on the other: what ``used`` is with 3+ groups), ``band_hull`` the band's
# end with the hull's other end (``band_basic`` above is the upward-biased gaps' variant only).
ONE_SIDED = ("band_one", "band_hull")
METHODS = METHODS + ONE_SIDED


def one_sided(found: dict, cc, reps, est, r, e, spec, level: float) -> dict:
    """``ONE_SIDED`` (low, high) of one metric from its ``found`` intervals and ``component_columns`` ``cc``."""
    if not cc:
        return dict.fromkeys(ONE_SIDED, (np.nan, np.nan))
    (lo,), (hi,) = one_sided_band(reps, est, r[:, None], np.array([e]), [cc], level, [spec.low], [spec.high],
                                  [spec.critical(level)])
    band_lo, band_hi = found["band"]
    if COMPONENT_BIAS[cc[0].combine] > 0:
        hull = (band_lo, max(found["hull"][1], band_lo))
    else:
        hull = (min(found["hull"][0], band_hi), band_hi)
    return {"band_one": (float(lo), float(hi)), "band_hull": hull}


TASKS = {"multiclass": (STUDIED, simulate, values, signals_for),
         "multilabel": (ML_STUDIED, simulate_multilabel, values_multilabel, signals_multilabel)}


def run_setting(n_groups: int, n_per_group: int, gap: float, args, rng, task: str = "multiclass") -> list[dict]:
    """Coverage of every method for every studied metric in one setting: one row per metric."""
    studied, simulate, values, signals_for = TASKS[task]
    signals, tilts = signals_for(n_groups, gap)
    cluster = dict(images=getattr(args, "images", 1), patient_sd=getattr(args, "patient_sd", 0.0))
    truth = values(*simulate(signals, args.truth, np.random.default_rng(10_000 + n_groups), tilts=tilts, **cluster)[:3])
    hits = {(m, k): 0 for m in studied for k in METHODS}
    width = {(m, k): 0.0 for m in studied for k in METHODS}
    made = {(m, k): 0 for m in studied for k in METHODS}
    excludes = dict.fromkeys(studied, 0)
    defined = dict.fromkeys(studied, 0)
    estimates = {m: [] for m in studied}
    corrected = {m: [] for m in studied}
    for _ in range(args.draws):
        y, p, groups, patients = simulate(signals, n_per_group, rng, tilts=tilts, **cluster)
        # `analyze` resamples patients; --resample image redraws images one by one (the contrast).
        units = patients if getattr(args, "resample", "patient") == "patient" else np.arange(len(y))
        counts = patient_counts(units, groups, args.replicates, rng)
        block = rng.permutation(patients[-1] + 1)[patients] % JACK_BLOCKS  # grouped jackknife: blocks of patients
        jack_w = (block[None, :] != np.arange(JACK_BLOCKS)[:, None]).astype(np.float64)
        est_all, reps_all = values(y, p, groups, full=True), values(y, p, groups, weights=counts, full=True)
        jack = values(y, p, groups, weights=jack_w)
        keys_all = list(est_all)
        where = {k: i for i, k in enumerate(keys_all)}
        est_vec = np.array([float(est_all[k]) for k in keys_all])
        rep_mat = np.stack([np.asarray(reps_all[k], dtype=np.float64) for k in keys_all], 1)
        col = {m: where[(m, "", "", "")] if (m, "", "", "") in where else where[(m, "group", "", "")] for m in studied}
        est, reps = {m: est_vec[col[m]] for m in studied}, {m: rep_mat[:, col[m]] for m in studied}
        # Every key, as `analyze` passes them: a band gap's interval is built from the per-group values.
        all_lo, all_hi, all_bc, _ = intervals_by_metric(rep_mat, est_vec, keys_all, args.level)
        used_lo, used_hi, used_bc = (np.array([x[col[m]] for m in studied]) for x in (all_lo, all_hi, all_bc))
        for i, m in enumerate(studied):
            e, r = float(est[m]), np.asarray(reps[m], dtype=np.float64)
            if not np.isfinite(e) or np.isnan(r).all():
                continue
            defined[m] += 1
            estimates[m].append(e)
            corrected[m].append(float(used_bc[i]))
            found = {"used": (float(used_lo[i]), float(used_hi[i])),
                     **intervals(m, e, r, np.asarray(jack[m], dtype=np.float64), args.level)}
            cc = component_columns((m, "group", "", ""), where, est_vec)  # the max-t band needs the per-group values
            found["band"] = band_columns(rep_mat, est_vec, *cc, args.level) if cc else (np.nan, np.nan)
            found["band_basic"] = (found["band"][0], max(found["basic"][1], found["band"][0]))
            found["band_bc"] = (band_columns(rep_mat, est_vec, *cc, args.level, recentre=True) if cc
                                else (np.nan, np.nan))
            found.update(one_sided(found, cc, rep_mat, est_vec, r, e, interval_method(m), args.level))
            found.update(debiased_intervals(m, e, rep_mat, est_vec, where, args.level))
            excludes[m] += not found["used"][0] <= e <= found["used"][1]
            for k, (lo, hi) in found.items():
                if np.isnan(lo):  # a method that does not apply to this metric (band: no components view)
                    continue
                made[(m, k)] += 1
                hits[(m, k)] += lo <= float(truth[m]) <= hi
                width[(m, k)] += hi - lo
    rows = []
    for m in studied:
        n = max(defined[m], 1)
        rows.append({"groups": n_groups, "per_group": n_per_group, "gap": gap, "metric": m,
                     "method": interval_method(m).method, "truth": float(truth[m]),
                     "mean_estimate": float(np.mean(estimates[m])) if estimates[m] else np.nan,
                     "mean_bc": float(np.mean(corrected[m])) if corrected[m] else np.nan,
                     "excludes": excludes[m] / n, "draws": defined[m],
                     # The oracle width: 2 z sd of the plug-in over the draws, the width of the exact interval
                     # θ̂ − bias ± z sd when θ̂ is normal (an interval needlessly wider than this over-covers).
                     "w_oracle": 2 * NormalDist().inv_cdf((1 + args.level) / 2) * float(np.std(estimates[m], ddof=1))
                     if len(estimates[m]) > 1 else np.nan,
                     **{k: hits[(m, k)] / made[(m, k)] if made[(m, k)] else np.nan for k in METHODS},
                     **{f"w_{k}": width[(m, k)] / made[(m, k)] if made[(m, k)] else np.nan for k in METHODS}})
    return rows


# Paired deltas (``--delta``): two models scored on the same test images, as `analyze` compares a run with
# its baseline (comparisons.csv) and a mitigation with its ERM (mitigation.csv). Model A has accuracy gap
# ``gap_a``, model B ``gap_b``; their logit noise is correlated (``DELTA_RHO``: both read the same images).
# Both get the same patient resamples, so replicate r of Δ = B − A is B's replicate r minus A's (paired).
DELTA_STUDIED = ("accuracy", "f1_gap_abs", "eqodds", "worst_group_accuracy")
DELTA_METHODS = ("percentile", "basic", "hull")
DELTA_RHO = 0.5


def simulate_pair(a: tuple, b: tuple, n_per_group: int, rng: np.random.Generator, rho: float = DELTA_RHO):
    """Two models on the same images: ((N,) labels, (N, C) probabilities of A, of B, (N,) group labels).

    a, b: each model's (signals, tilts) per group (``signals_for``)."""
    c, n_groups = len(CLASSES), len(a[0])
    groups = np.repeat(np.arange(n_groups), n_per_group)
    y = rng.integers(0, c, size=len(groups))
    z1, z2 = rng.normal(size=(2, len(groups), c))
    probs = []
    for (signals, tilts), z in ((a, z1), (b, rho * z1 + np.sqrt(1 - rho ** 2) * z2)):
        logits = z.copy()
        logits[np.arange(len(groups)), y] += signals[groups]
        logits[:, 0] += tilts[groups]
        e = np.exp(logits - logits.max(1, keepdims=True))
        probs.append(e / e.sum(1, keepdims=True))
    return y, probs[0], probs[1], np.array([f"g{g}" for g in groups])


def run_delta_setting(n_groups: int, n_per_group: int, gap_a: float, gap_b: float, args, rng) -> list[dict]:
    """Coverage of the paired Δ = metric(B) − metric(A) by each of ``DELTA_METHODS``: one row per metric."""
    a, b = signals_for(n_groups, gap_a), signals_for(n_groups, gap_b)
    y, pa, pb, g = simulate_pair(a, b, args.truth, np.random.default_rng(20_000 + n_groups))
    truth = {m: float(values(y, pb, g)[m]) - float(values(y, pa, g)[m]) for m in DELTA_STUDIED}
    hits = {(m, k): 0 for m in DELTA_STUDIED for k in DELTA_METHODS}
    width = {(m, k): 0.0 for m in DELTA_STUDIED for k in DELTA_METHODS}
    defined = dict.fromkeys(DELTA_STUDIED, 0)
    for _ in range(args.draws):
        y, pa, pb, g = simulate_pair(a, b, n_per_group, rng)
        counts = patient_counts(np.arange(len(y)), g, args.replicates, rng)
        ea, eb = values(y, pa, g), values(y, pb, g)
        ra, rb = values(y, pa, g, weights=counts), values(y, pb, g, weights=counts)
        for m in DELTA_STUDIED:
            e = float(eb[m]) - float(ea[m])
            r = np.asarray(rb[m], dtype=np.float64) - np.asarray(ra[m], dtype=np.float64)
            if not np.isfinite(e):
                continue
            defined[m] += 1
            for k in DELTA_METHODS:
                (lo,), (hi,) = interval(r[:, None], [e], k, args.level, -1.0, 1.0)
                hits[(m, k)] += lo <= truth[m] <= hi
                width[(m, k)] += hi - lo
    return [{"groups": n_groups, "per_group": n_per_group, "gap_a": gap_a, "gap_b": gap_b, "metric": m,
             "truth": truth[m], "draws": defined[m], **{k: hits[(m, k)] / max(defined[m], 1) for k in DELTA_METHODS},
             **{f"w_{k}": width[(m, k)] / max(defined[m], 1) for k in DELTA_METHODS}} for m in DELTA_STUDIED]


# Seed means (``--seeds K ...``): K models (seeds) of one method scored on the same test images, as
# `analyze` averages them in seeds.csv. Seed s has the signal of every group shifted by N(0, seed_sd²)
# and logit noise correlated with the other seeds' (``SEED_RHO``: the same images). The truth is the
# mean over seeds of the population metric (``SEED_TRUTH_SEEDS`` seeds on ``--truth`` images per group).
SEED_STUDIED = ("accuracy", "f1_gap", "eqodds", "worst_group_accuracy")
SEED_METHODS = ("patients", "two_level", "t_quad")
SEED_RHO, SEED_TRUTH_SEEDS = 0.7, 40


def simulate_seeds(signals, tilts, shifts, n_per_group: int, rng: np.random.Generator, rho: float = SEED_RHO):
    """((N,) labels, [(N, C) probabilities of each seed], (N,) group labels); shifts: (S,) each seed's signal shift."""
    c = len(CLASSES)
    groups = np.repeat(np.arange(len(signals)), n_per_group)
    y = rng.integers(0, c, size=len(groups))
    shared = rng.normal(size=(len(groups), c))
    probs = []
    for shift in shifts:
        logits = rho * shared + np.sqrt(1 - rho ** 2) * rng.normal(size=shared.shape)
        logits[np.arange(len(groups)), y] += signals[groups] + shift
        logits[:, 0] += tilts[groups]
        e = np.exp(logits - logits.max(1, keepdims=True))
        probs.append(e / e.sum(1, keepdims=True))
    return y, probs, np.array([f"g{g}" for g in groups])


def seed_mean_intervals(per_seed_est, per_seed_reps, keys, level: float, rng) -> dict:
    """Each of ``SEED_METHODS``' (K,) low and high for the seed mean of K keys.

    per_seed_est: (S, K); per_seed_reps: (S, R, K) on shared patient resamples. ``patients``: the
    mean's replicates without seed resampling; ``two_level``: seeds then patients
    (``replicates.seed_resampled``, what `analyze` reports); ``t_quad``: the patients interval's
    half-widths widened in quadrature by t_{S−1} · sd over seeds / √S (``replicates.seed_widened``)."""
    est = per_seed_est.mean(0)
    out = {}
    for name, r in (("patients", seed_resampled(per_seed_reps, None)), ("two_level", seed_resampled(per_seed_reps, rng))):
        out[name] = intervals_by_metric(r, est, keys, level)[:2]
    out["t_quad"] = seed_widened(est, *out["patients"], per_seed_est, level)
    return out


def run_seed_setting(n_groups: int, n_per_group: int, gap: float, n_seeds: int, args, rng) -> list[dict]:
    """Coverage (width) of each of ``SEED_METHODS`` for the mean over ``n_seeds`` seeds: one row per metric."""
    signals, tilts = signals_for(n_groups, gap)
    truth_rng = np.random.default_rng(30_000 + n_groups)
    shifts = truth_rng.normal(0.0, args.seed_sd, SEED_TRUTH_SEEDS)
    y, probs, g = simulate_seeds(signals, tilts, shifts, args.truth, truth_rng)
    truth = {m: float(np.mean([values(y, p, g)[m] for p in probs])) for m in SEED_STUDIED}
    hits = {(m, k): 0 for m in SEED_STUDIED for k in SEED_METHODS}
    width = {(m, k): 0.0 for m in SEED_STUDIED for k in SEED_METHODS}
    for _ in range(args.draws):
        y, probs, g = simulate_seeds(signals, tilts, rng.normal(0.0, args.seed_sd, n_seeds), n_per_group, rng)
        counts = patient_counts(np.arange(len(y)), g, args.replicates, rng)
        est = [values(y, p, g, full=True) for p in probs]
        keys = list(est[0])
        reps = [values(y, p, g, weights=counts, full=True) for p in probs]
        per_est = np.array([[float(e[k]) for k in keys] for e in est])
        per_reps = np.stack([np.stack([np.asarray(r[k], dtype=np.float64) for k in keys], 1) for r in reps])
        found = seed_mean_intervals(per_est, per_reps, keys, args.level, rng)
        for m in SEED_STUDIED:
            j = keys.index((m, "", "", "")) if (m, "", "", "") in keys else keys.index((m, "group", "", ""))
            for k, (lo, hi) in found.items():
                hits[(m, k)] += lo[j] <= truth[m] <= hi[j]
                width[(m, k)] += hi[j] - lo[j]
    return [{"groups": n_groups, "per_group": n_per_group, "gap": gap, "seeds": n_seeds, "metric": m, "truth": truth[m],
             **{k: hits[(m, k)] / args.draws for k in SEED_METHODS},
             **{f"w_{k}": width[(m, k)] / args.draws for k in SEED_METHODS}} for m in SEED_STUDIED]


# Deltas of seed means (``--seed-deltas S ...``): two arms (methods) of S seeds each scored on the same test
# images, as `analyze` compares a method's seed mean with its baseline's (comparisons.csv) and a mitigation's
# with its ERM's (mitigation.csv). The arms are independent trainings: seed s of an arm shifts every group's
# signal by a common N(0, sd²) plus its own N(0, (sd/2)²) (so gaps move with the seed too), with logit noise
# correlated with every other model's (``SEED_RHO``: the same images). Arm B equals arm A (gap ``gap``, true
# Δ = 0 for every metric) or has accuracy gap ``gap_b`` (Δ ≠ 0). The truth is Δ of the arms' means over
# ``--truth-seeds`` seed draws of the population metric, the same draws for both arms (exactly 0 when equal).
SEED_DELTA_STUDIED = ("accuracy", "worst_group_accuracy", "eqodds")
# patients: no seed term; two_level: each arm seed-resampled, subtracted (comparisons.csv before issue 23);
# two_level_pairs: (B, A) pairs by seed index resampled (mitigation.csv before); welch: the patients interval
# widened by the Welch t term of both arms (``replicates.delta_interval``, comparisons.csv after); paired_t:
# widened by the per-pair differences' t term (mitigation.csv after).
SEED_DELTA_METHODS = ("patients", "two_level", "two_level_pairs", "welch", "paired_t")


def seed_shifts(n_seeds: int, n_groups: int, sd: float, rng: np.random.Generator) -> np.ndarray:
    """(S, G) each seed's signal shift per group: a common N(0, sd²) plus a group's own N(0, (sd/2)²)."""
    return rng.normal(0.0, sd, (n_seeds, 1)) + rng.normal(0.0, sd / 2, (n_seeds, n_groups))


def simulate_arms(arms: list, n_per_group: int, rng: np.random.Generator, rho: float = SEED_RHO):
    """((N,) labels, [[(N, C) probabilities of each seed] per arm], (N,) group labels).

    arms: [(signals (G,), tilts (G,), shifts (S, G))] per arm; every model's logit noise shares ``rho``."""
    c = len(CLASSES)
    groups = np.repeat(np.arange(len(arms[0][0])), n_per_group)
    y = rng.integers(0, c, size=len(groups))
    shared = rng.normal(size=(len(groups), c))
    out = []
    for signals, tilts, shifts in arms:
        probs = []
        for shift in shifts:
            logits = rho * shared + np.sqrt(1 - rho ** 2) * rng.normal(size=shared.shape)
            logits[np.arange(len(groups)), y] += (signals + shift)[groups]
            logits[:, 0] += tilts[groups]
            e = np.exp(logits - logits.max(1, keepdims=True))
            probs.append(e / e.sum(1, keepdims=True))
        out.append(probs)
    return y, out, np.array([f"g{g}" for g in groups])


def seed_delta_intervals(est_a, est_b, reps_a, reps_b, level: float, rng) -> dict:
    """Each of ``SEED_DELTA_METHODS``' ((K,) low, (K,) high, (K,) p-value) for Δ = mean(B) − mean(A).

    est_a, est_b: (S, K) each seed's values; reps_a, reps_b: (S, R, K) on the shared patient resamples."""
    delta = est_b.mean(0) - est_a.mean(0)
    plain = seed_resampled(reps_b, None) - seed_resampled(reps_a, None)
    out = {}
    for name, r in (("patients", plain),
                    ("two_level", seed_resampled(reps_b, rng) - seed_resampled(reps_a, rng)),
                    ("two_level_pairs", seed_resampled(reps_b - reps_a, rng) if len(est_a) == len(est_b) else None)):
        out[name] = (*interval_percentile(r, level), p_value(r)) if r is not None else None
    for name, arms in (("welch", [est_a, est_b]), ("paired_t", [est_b - est_a] if len(est_a) == len(est_b) else None)):
        out[name] = delta_interval(delta, plain, *seed_variance(arms)[:2], level) if arms is not None else None
    return out


@functools.lru_cache(maxsize=None)
def _signals(n_groups: int, gap: float) -> tuple[np.ndarray, np.ndarray]:
    return signals_for(n_groups, gap)


@functools.lru_cache(maxsize=None)
def _seed_delta_truth(n_groups: int, gap: float, gap_b: float, sd: float, n_truth: int, n_seeds: int) -> tuple:
    """``SEED_DELTA_STUDIED``'s true Δ: the arms' population metrics averaged over the same ``n_seeds`` shifts."""
    if gap == gap_b:
        return (0.0,) * len(SEED_DELTA_STUDIED)  # the same arm twice: 0 by construction
    truth_rng = np.random.default_rng(40_000 + n_groups)
    shifts = seed_shifts(n_seeds, n_groups, sd, truth_rng)
    y, arms, g = simulate_arms([(*_signals(n_groups, gap), shifts), (*_signals(n_groups, gap_b), shifts)],
                               n_truth, truth_rng)
    a, b = (np.mean([_studied(values(y, p, g)) for p in arm], axis=0) for arm in arms)
    return tuple(float(x) for x in b - a)


def _studied(found: dict) -> np.ndarray:
    """(K,) or (K, R): ``SEED_DELTA_STUDIED``'s values out of ``values``' dict."""
    return np.array([np.asarray(found[m], dtype=np.float64) for m in SEED_DELTA_STUDIED])


def run_seed_delta_setting(n_groups: int, n_per_group: int, gap: float, gap_b: float, n_seeds: int, sd: float,
                           args, rng) -> list[dict]:
    """Coverage, type-I error (true Δ = 0) and width of each of ``SEED_DELTA_METHODS`` for Δ of two arms of
    ``n_seeds`` seeds: one row per metric of ``SEED_DELTA_STUDIED``."""
    a, b = _signals(n_groups, gap), _signals(n_groups, gap_b)
    truth = dict(zip(SEED_DELTA_STUDIED, _seed_delta_truth(n_groups, gap, gap_b, sd, args.truth, args.truth_seeds)))
    hits = {(m, k): 0 for m in SEED_DELTA_STUDIED for k in SEED_DELTA_METHODS}
    excl = {(m, k): 0 for m in SEED_DELTA_STUDIED for k in SEED_DELTA_METHODS}
    signif = {(m, k): 0 for m in SEED_DELTA_STUDIED for k in SEED_DELTA_METHODS}
    width = {(m, k): 0.0 for m in SEED_DELTA_STUDIED for k in SEED_DELTA_METHODS}
    seed_sd, patient_sd = dict.fromkeys(SEED_DELTA_STUDIED, 0.0), dict.fromkeys(SEED_DELTA_STUDIED, 0.0)
    made = dict.fromkeys(SEED_DELTA_STUDIED, 0)
    for _ in range(args.draws):
        arms = [(*a, seed_shifts(n_seeds, n_groups, sd, rng)), (*b, seed_shifts(n_seeds, n_groups, sd, rng))]
        y, (pa, pb), g = simulate_arms(arms, n_per_group, rng)
        counts = patient_counts(np.arange(len(y)), g, args.replicates, rng)
        est = [np.array([_studied(values(y, p, g)) for p in arm]) for arm in (pa, pb)]  # (S, K) per arm
        reps = [np.stack([_studied(values(y, p, g, weights=counts)).T for p in arm]) for arm in (pa, pb)]  # (S, R, K)
        if np.isnan(est[0]).any() or np.isnan(est[1]).any():
            continue
        found = seed_delta_intervals(est[0], est[1], reps[0], reps[1], args.level, rng)
        plain = seed_resampled(reps[1], None) - seed_resampled(reps[0], None)
        for j, m in enumerate(SEED_DELTA_STUDIED):
            made[m] += 1
            seed_sd[m] += float(np.std(est[0][:, j], ddof=1)) if n_seeds > 1 else np.nan
            patient_sd[m] += float(np.nanstd(plain[:, j]))
            for k, f in found.items():
                if f is None:
                    continue
                lo, hi, p = (float(x[j]) for x in f)
                hits[(m, k)] += lo <= truth[m] <= hi
                excl[(m, k)] += not lo <= 0.0 <= hi
                signif[(m, k)] += p < 1 - args.level
                width[(m, k)] += hi - lo
    rows = []
    for m in SEED_DELTA_STUDIED:
        n = max(made[m], 1)
        rows.append({"groups": n_groups, "per_group": n_per_group, "gap": gap, "gap_b": gap_b, "seeds": n_seeds,
                     "seed_sd": sd, "metric": m, "truth": truth[m], "draws": made[m],
                     "metric_seed_sd": seed_sd[m] / n, "patient_sd": patient_sd[m] / n,
                     **{k: hits[(m, k)] / n for k in SEED_DELTA_METHODS},
                     **{f"excl_{k}": excl[(m, k)] / n for k in SEED_DELTA_METHODS},
                     **{f"p_{k}": signif[(m, k)] / n for k in SEED_DELTA_METHODS},
                     **{f"w_{k}": width[(m, k)] / n for k in SEED_DELTA_METHODS}})
    return rows


def _main_seed_deltas(args) -> None:
    """``--seed-deltas``: print one row per (setting, metric); coverage (width), and at Δ = 0 the type-I error."""
    rng = np.random.default_rng(args.seed)
    print(f"{args.draws} draws, {args.replicates} replicates, nominal {args.level:.0%}, {args.truth_seeds} truth seeds; "
          f"load {os.getloadavg()[0]:.1f}. Coverage (mean width) per method; at true Δ = 0 also 'I:' the share whose "
          "interval excludes 0 / whose p < 1 − level (the type-I error). sd_seed: a metric's sd over an arm's "
          "seeds; sd_pat: sd of Δ's patients-only replicates", flush=True)
    for n_groups, n, gb, k, sd in itertools.product(args.groups, args.sizes, args.delta_gaps, args.seed_deltas,
                                                     args.seed_sds):
        start = time.perf_counter()
        for r in run_seed_delta_setting(n_groups, n, args.gaps[0], gb, k, sd, args, rng):
            cells = []
            for m in SEED_DELTA_METHODS:
                cells.append(f"{m} {r[m]:.3f} ({r['w_' + m]:.3f})" + (
                    f" I:{r['excl_' + m]:.3f}/{r['p_' + m]:.3f}" if r["truth"] == 0 else ""))
            print(f"{n_groups:>2} {n:>4} gaps {r['gap']:.2f}/{gb:.2f} S={k} sd={sd:<4} {r['metric']:<21} "
                  f"truth {r['truth']:>7.3f} sd_seed {r['metric_seed_sd']:.3f} sd_pat {r['patient_sd']:.3f} n={r['draws']}  "
                  + "  ".join(cells), flush=True)
        print(f"   ({time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 per group, gaps 0 and 0.15, at most 100 draws of 500 replicates")
    parser.add_argument("--draws", type=int, default=400, help="simulated test sets per setting")
    parser.add_argument("--replicates", type=int, default=1000, help="bootstrap replicates per test set")
    parser.add_argument("--truth", type=int, default=200_000, help="images per group of the population")
    parser.add_argument("--groups", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes", type=int, nargs="+", default=[60, 150, 300],
                        help="patients per group (= images, unless --images)")
    parser.add_argument("--gaps", type=float, nargs="+", default=[0.0, 0.05, 0.15], help="true accuracy gaps")
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=sorted(TASKS), default="multiclass")
    parser.add_argument("--widths", action="store_true", help="also print each method's mean interval width")
    parser.add_argument("--metrics", nargs="+", help="only these metrics' rows (default: all studied)")
    parser.add_argument("--delta", type=float, nargs=2, metavar=("GAP_A", "GAP_B"),
                        help="paired deltas instead: Δ = B − A of two models with these accuracy gaps (multi-class)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seed means instead: of this many seeds (multi-class)")
    parser.add_argument("--seed-sd", type=float, default=0.3, help="sd of a seed's signal shift (with --seeds)")
    parser.add_argument("--images", type=int, default=1,
                        help="clustered patients (multi-class): 1 to this many images per patient")
    parser.add_argument("--patient-sd", type=float, default=0.0,
                        help="sd of a patient effect on the true class's logit, shared by the patient's images")
    parser.add_argument("--resample", choices=("patient", "image"), default="patient",
                        help="bootstrap unit: patients (what `analyze` draws) or images (the contrast)")
    parser.add_argument("--seed-deltas", type=int, nargs="+", metavar="S",
                        help="deltas of seed means instead: two arms of S seeds each (multi-class; --gaps[0] is arm "
                             "A's accuracy gap, --delta-gaps arm B's)")
    parser.add_argument("--seed-sds", type=float, nargs="+", default=[0.05, 0.5],
                        help="sd of a seed's signal shift (with --seed-deltas)")
    parser.add_argument("--delta-gaps", type=float, nargs="+", default=[0.05, 0.15],
                        help="arm B's accuracy gaps (with --seed-deltas; equal to --gaps[0]: true delta 0)")
    parser.add_argument("--truth-seeds", type=int, default=200, help="seed draws of the truth (with --seed-deltas)")
    args = parser.parse_args()
    if args.seed_deltas:
        return _main_seed_deltas(args)
    if args.quick:
        args.sizes, args.gaps = [60], [0.0, 0.15]
        args.draws, args.replicates = min(args.draws, 100), min(args.replicates, 500)
    if args.task != "multiclass" and (args.images != 1 or args.patient_sd):
        parser.error("--images and --patient-sd are simulated for --task multiclass only")
    rng = np.random.default_rng(args.seed)
    if args.seeds:
        if args.task != "multiclass" or args.delta or args.images != 1 or args.patient_sd or args.resample != "patient":
            parser.error("--seeds is simulated for --task multiclass with one image per patient, without --delta")
        print(f"{args.draws} draws, {args.replicates} replicates, nominal {args.level:.0%}, seed sd {args.seed_sd} "
              "(signal): coverage (width) of the seed mean")
        for n_groups, n, gap, k in itertools.product(args.groups, args.sizes, args.gaps, args.seeds):
            for r in run_seed_setting(n_groups, n, gap, k, args, rng):
                print(f"{n_groups:>2} {n:>4} {gap:>5.2f} k={k}  {r['metric']:<21} truth {r['truth']:>7.3f}  " + "  ".join(
                    f"{m} {r[m]:.3f} ({r['w_' + m]:.3f})" for m in SEED_METHODS), flush=True)
        return
    if args.delta:
        if args.task != "multiclass" or args.images != 1 or args.patient_sd or args.resample != "patient":
            parser.error("--delta is simulated for --task multiclass with one image per patient")
        print(f"{args.draws} draws, {args.replicates} replicates, nominal {args.level:.0%}: coverage (width) of the "
              f"paired Δ = B − A, accuracy gaps A {args.delta[0]}, B {args.delta[1]}")
        for n_groups, n in itertools.product(args.groups, args.sizes):
            for r in run_delta_setting(n_groups, n, *args.delta, args, rng):
                print(f"{n_groups:>2} {n:>4}  {r['metric']:<21} truth {r['truth']:>7.3f}  " + "  ".join(
                    f"{k} {r[k]:.3f} ({r['w_' + k]:.3f})" for k in DELTA_METHODS), flush=True)
        return
    print(f"{args.draws} draws, {args.replicates} replicates, nominal {args.level:.0%}, 1-{args.images} images per patient, "
          f"patient sd {args.patient_sd}, {args.resample} bootstrap. Coverage by method; "
          "'used' = the method of core.intervals; 'bc' = mean bias-corrected estimate; 'excl' = share of "
          "draws whose interval (method used) excludes the plug-in value")
    print(f"{'G':>2} {'n/g':>4} {'gap':>5}  {'metric':<21} {'used':<10} {'truth':>7} {'mean est':>8} {'bc':>7} "
          f"{'excl':>5}  " + " ".join(f"{k:>10}" for k in METHODS)
          + ("   widths: " + " ".join(f"{k:>10}" for k in METHODS) if args.widths else ""))
    for n_groups, n, gap in itertools.product(args.groups, args.sizes, args.gaps):
        start = time.perf_counter()
        for r in run_setting(n_groups, n, gap, args, rng, args.task):
            if args.metrics and r["metric"] not in args.metrics:
                continue
            print(f"{r['groups']:>2} {r['per_group']:>4} {r['gap']:>5.2f}  {r['metric']:<21} {r['method']:<10} "
                  f"{r['truth']:>7.3f} {r['mean_estimate']:>8.3f} {r['mean_bc']:>7.3f} {r['excludes']:>5.2f}  "
                  + " ".join(f"{r[k]:>10.3f}" for k in METHODS)
                  + ("   widths: " + " ".join(f"{r['w_' + k]:>10.3f}" for k in METHODS) if args.widths else "")
                  + (f"   oracle {r['w_oracle']:.3f}" if args.widths else ""), flush=True)
        print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
