"""Benchmark: multi-label metrics × 1,000 bootstrap replicates, vectorised vs a scikit-learn loop.

Data: a synthetic multi-label test set the size of Sourget et al.'s MIMIC test split (40,000
images, the six conditions, ~8% masked labels, sex / race White·Black·Asian / five age bins),
probabilities stored as float32 (as a model writes them), thresholds chosen on a synthetic
validation split. Vectorised path: ``multilabel.evaluate_multilabel`` with the (R, N) matrix of
stratified resample counts, replicates in blocks (``chunk_bytes``). Baseline: a plain loop over
replicates that resamples and calls scikit-learn per condition and per group (``roc_auc_score``,
``average_precision_score``, ``confusion_matrix``) plus a per-bin ECE loop; it is timed on a few
replicates and extrapolated linearly to R (the printout says so). Both are checked to agree first.

    python benchmarks/multilabel.py [--images 40000] [--replicates 1000] [--baseline-replicates 3]
                                    [--chunk-mib 16]
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc
import warnings

import numpy as np
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

from cxrfair.core import multilabel as ML
from cxrfair.core.bootstrap import resample_counts, stratified_indices

CONDITIONS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Pleural Effusion", "Pneumonia", "Pneumothorax"]
PREVALENCE = [0.12, 0.10, 0.05, 0.22, 0.08, 0.04]
LEVELS = {"sex": ["M", "F"], "race": ["White", "Black", "Asian"], "age_group": ["18-25", "25-50", "50-65", "65-80", "80+"]}


def synthetic(n: int, seed: int):
    """Y (N, C) in {0, 1, NaN}, P (N, C) float32-valued, attributes {name: (N,) labels}."""
    rng = np.random.default_rng(seed)
    attrs = {"sex": rng.choice(LEVELS["sex"], n), "race": rng.choice(LEVELS["race"], n, p=[0.7, 0.2, 0.1]),
             "age_group": rng.choice(LEVELS["age_group"], n, p=[0.05, 0.3, 0.3, 0.25, 0.1])}
    y = (rng.random((n, len(CONDITIONS))) < PREVALENCE).astype(float)
    # A planted group difference: the model separates less well for Black and for 80+ patients.
    signal = 2.0 - 0.6 * (attrs["race"] == "Black")[:, None] - 0.4 * (attrs["age_group"] == "80+")[:, None]
    logits = signal * y - 2.0 + rng.normal(size=y.shape)
    p = (1 / (1 + np.exp(-logits))).astype(np.float32).astype(np.float64)
    y[rng.random(y.shape) < 0.08] = np.nan  # uncertain labels, masked
    return y, p, attrs


# ----------------------------------------------------------------------------- baseline


def _ece(y, p):
    bins = np.clip(np.ceil(p * 15).astype(int) - 1, 0, 14)
    return sum(abs((y[bins == b] - p[bins == b]).sum()) for b in range(15)) / len(y)


def _sk_one(y, p, t):
    """One condition on one subset with scikit-learn: what one writes by hand."""
    m = ~np.isnan(y)
    y, p = y[m].astype(int), p[m]
    auc, ap = roc_auc_score(y, p), average_precision_score(y, p)
    tn, fp, fn, tp = confusion_matrix(y, p >= t, labels=[0, 1]).ravel()
    return {"auc": auc, "ap": ap, "adjusted_auprc": 1 - np.log(ap) / np.log(y.mean()),
            "tpr": tp / (tp + fn), "fpr": fp / (fp + tn), "fnr": fn / (tp + fn), "ece": _ece(y, p)}


def baseline(y, p, attrs, thresholds, idx):
    """Plain loop over replicates: resample, then every condition overall and per group."""
    out = []
    for i in idx:
        yr, pr = y[i], p[i]
        rep = {}
        for c, name in enumerate(CONDITIONS):
            rep[("", "", name)] = _sk_one(yr[:, c], pr[:, c], thresholds[c])
            for attr, labels in attrs.items():
                lab = labels[i]
                for g in LEVELS[attr]:
                    rep[(attr, g, name)] = _sk_one(yr[lab == g, c], pr[lab == g, c], thresholds[c])
        out.append(rep)
    return out


# ----------------------------------------------------------------------------- runs


def vectorised(y, p, attrs, thresholds, counts, chunk_bytes):
    groups = {a: (labels, LEVELS[a]) for a, labels in attrs.items()}
    return ML.evaluate_multilabel(y, p, CONDITIONS, groups, thresholds, weights=counts, chunk_bytes=chunk_bytes)


def check_agreement(fast, slow):
    for r, rep in enumerate(slow):
        for (attr, g, cond), vals in rep.items():
            for metric, v in vals.items():
                np.testing.assert_allclose(fast[(metric, attr, g, cond)][r], v, rtol=1e-9, atol=1e-12,
                                           err_msg=str((metric, attr, g, cond)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40000)
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--baseline-replicates", type=int, default=3)
    ap.add_argument("--chunk-mib", type=float, default=ML.CHUNK_BYTES / 2**20)
    args = ap.parse_args()
    chunk = int(args.chunk_mib * 2**20)

    y, p, attrs = synthetic(args.images, seed=0)
    y_val, p_val, _ = synthetic(args.images // 4, seed=1)
    thresholds = ML.choose_thresholds(y_val, p_val)
    strata = np.char.add(np.char.add(attrs["sex"], attrs["race"]), attrs["age_group"])
    idx = stratified_indices(strata, args.replicates, np.random.default_rng(0))
    counts = resample_counts(idx, len(y))

    # Agreement first: a speed ratio between different answers would mean nothing.
    nb = args.baseline_replicates
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t, c = time.perf_counter(), time.process_time()
        slow = baseline(y, p, attrs, thresholds, idx[:nb])
        t_base_meas, c_base_meas = time.perf_counter() - t, time.process_time() - c
    check_agreement(vectorised(y, p, attrs, thresholds, counts[:nb], chunk), slow)

    t, c = time.perf_counter(), time.process_time()
    out = vectorised(y, p, attrs, thresholds, counts, chunk)
    t_vec, c_vec = time.perf_counter() - t, time.process_time() - c

    # Peak memory of the vectorised path beyond its inputs, on a few blocks (it does not grow with R).
    rows = max(1, chunk // (8 * len(y)))
    tracemalloc.start()
    vectorised(y, p, attrs, thresholds, counts[:min(len(counts), 3 * rows)], chunk)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    t_base, c_base = t_base_meas * args.replicates / nb, c_base_meas * args.replicates / nb
    print(f"cpus: {os.cpu_count()}  load: {os.getloadavg()[0]:.1f}  images: {len(y)}  conditions: {len(CONDITIONS)}  "
          f"groups: {sum(len(v) for v in LEVELS.values())}  replicates: {args.replicates}  metric values: {len(out)}")
    print(f"count matrix (input, R x N float64): {counts.nbytes / 2**20:.0f} MiB; block: {rows} replicates "
          f"({args.chunk_mib:g} MiB of float64 weights); peak extra memory: {peak / 2**20:.0f} MiB")
    print(f"vectorised: wall {t_vec:.2f} s, CPU {c_vec:.2f} s ({t_vec / args.replicates * 1000:.1f} ms per replicate)")
    print(f"scikit-learn loop: measured wall {t_base_meas:.2f} s, CPU {c_base_meas:.2f} s on {nb} replicates; "
          f"extrapolated to {args.replicates}: wall {t_base:.0f} s, CPU {c_base:.0f} s")
    print(f"ratio (loop / vectorised): wall {t_base / t_vec:.0f}x, CPU {c_base / c_vec:.0f}x")


if __name__ == "__main__":
    main()
