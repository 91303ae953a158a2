"""Benchmark: every metric × 1,000 bootstrap replicates × 30 runs of 240 test images.

Vectorised path: ``cxrfair.analysis`` computes all replicates of a run at once from an (R, N)
matrix of resample counts. Baseline: a plain Python loop over replicates that resamples the
images and calls scikit-learn for each metric on each group (what one would write by hand).
The baseline is timed on a few replicates of a few runs and extrapolated linearly to
1,000 × 30 (it is linear in both); the printout says so. Both are checked to agree first.

    python benchmarks/bootstrap.py [--replicates 1000] [--runs 30] [--baseline-replicates 20]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

from cxrfair.core import metrics as M
from cxrfair.analysis.analyze import AnalyzeConfig, compute
from cxrfair.core.bootstrap import interval, resample_counts, stratified_indices
from cxrfair.core.runs import Run, make_predictions

CLASSES = ["Cardiomegaly", "Effusion", "Atelectasis", "Pneumothorax", "Edema", "Consolidation"]
LEVELS = {"sex": ["M", "F"], "age_group": ["young", "old"]}


def synthetic_test_set(n=240, seed=0):
    """(N,) labels and sex/age labels: 40 per class, 10 per class × sex × age cell (the paper's design)."""
    y = np.repeat(np.arange(len(CLASSES)), n // len(CLASSES))
    sex = np.tile(np.repeat(["M", "F"], n // len(CLASSES) // 2), len(CLASSES))
    age = np.tile(["young", "old"], n // 2)
    return y, sex, age


def synthetic_probs(y, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(y), len(CLASSES)))
    logits[np.arange(len(y)), y] += 1.0 + 0.05 * seed
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def attributes(sex, age):
    cross = np.char.add(np.char.add(sex, "×"), age)
    return {"sex": (sex, LEVELS["sex"]), "age_group": (age, LEVELS["age_group"]),
            "sex×age": (cross, [f"{s}×{a}" for s in LEVELS["sex"] for a in LEVELS["age_group"]])}


# ----------------------------------------------------------------------------- baseline


def _sk_group(y, p, c):
    """Per-group metrics with scikit-learn on one resample's subset."""
    pred = p.argmax(1)
    labels = list(range(c))
    out = {"accuracy": accuracy_score(y, pred),
           "f1": f1_score(y, pred, labels=labels, average=None, zero_division=np.nan)}
    out["auc"] = np.array([roc_auc_score(y == k, p[:, k]) if 0 < (y == k).sum() < len(y) else np.nan for k in labels])
    cm = confusion_matrix(y, pred, labels=labels)
    tp = np.diag(cm)
    fn, fp = cm.sum(1) - tp, cm.sum(0) - tp
    tn = len(y) - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        out["tpr"], out["fpr"], out["sel"] = tp / (tp + fn), fp / (fp + tn), (tp + fp) / len(y)
    conf, correct = p.max(1), (pred == y)
    bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    out["ece"] = sum(abs((correct[bins == b] - conf[bins == b]).sum()) for b in range(15)) / len(y)
    out["ece_paper"] = np.mean(np.abs(conf - correct))
    return out


def sklearn_all_metrics(y, p, attrs):
    """The same metric set as ``metrics.evaluate_all`` for one resample (overall + groups + gaps)."""
    c = p.shape[1]
    overall = _sk_group(y, p, c)
    out = {"accuracy": overall["accuracy"], "f1_macro": np.nanmean(overall["f1"]), "auc_macro": np.nanmean(overall["auc"]),
           "var_f1": np.nanvar(overall["f1"]), "ece": overall["ece"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, (labels, levels) in attrs.items():
            g = {lv: _sk_group(y[labels == lv], p[labels == lv], c) for lv in levels}
            pairs = [(a, b) for a in levels for b in levels if a != b]
            f1_gap = [np.nanmean(g[a]["f1"] - g[b]["f1"]) for a, b in pairs]
            eq = [0.5 * (np.nanmean(abs(g[a]["tpr"] - g[b]["tpr"])) + np.nanmean(abs(g[a]["fpr"] - g[b]["fpr"]))) for a, b in pairs]
            out[("f1_gap", name)] = f1_gap[0] if len(levels) == 2 else max(f1_gap)
            out[("eqodds", name)] = eq[0] if len(levels) == 2 else max(eq)
            out[("worst_group_accuracy", name)] = min(g[a]["accuracy"] for a in levels)
            out[("es_auc", name)] = out["auc_macro"] / (1 + sum(abs(out["auc_macro"] - np.nanmean(g[a]["auc"])) for a in levels))
            out[("ece_gap", name)] = max(abs(g[a]["ece"] - g[b]["ece"]) for a, b in pairs)
            out[("dp_gap", name)] = max(np.nanmean(abs(g[a]["sel"] - g[b]["sel"])) for a, b in pairs)
    return out


def baseline(y, p, attrs, idx):
    """Plain loop over replicates: resample, then scikit-learn. Returns a list of dicts."""
    return [sklearn_all_metrics(y[i], p[i], {k: (v[0][i], v[1]) for k, v in attrs.items()}) for i in idx]


# ----------------------------------------------------------------------------- vectorised


def vectorised(y, probs_list, attrs, idx, level=0.95):
    """All metrics of every run over all replicates, with intervals (what analyze does per run)."""
    w = resample_counts(idx, len(y))
    out = []
    for p in probs_list:
        reps = M.evaluate_all(y, p, CLASSES, attrs, weights=w)
        out.append({k: interval(v, level) for k, v in reps.items()})
    return out


def _runs(y, sex, age, probs_list):
    """The same data as Run objects, to time the whole ``analyze`` computation (tables included)."""
    import pandas as pd

    n = len(y)
    rows = pd.DataFrame({"image_id": [f"{i:08d}_000.png" for i in range(n)], "patient_id": np.arange(n),
                         "split": "test", "label": [CLASSES[k] for k in y], "sex": sex,
                         "age": np.where(age == "young", 40, 70), "age_group": age})
    meta = lambda s: {"run_id": f"bench__linear__best__s{s}", "model": "bench", "method": "linear", "seed": s,  # noqa: E731
                      "classes": CLASSES, "cohort_hash": "x", "hyperparameters": {}, "selected_epoch": None,
                      "trainable_params": None, "timings": {}}
    return [Run(meta(s), make_predictions(rows, p, CLASSES), path=None) for s, p in enumerate(probs_list)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--baseline-replicates", type=int, default=20)
    ap.add_argument("--baseline-runs", type=int, default=2)
    args = ap.parse_args()

    y, sex, age = synthetic_test_set()
    attrs = attributes(sex, age)
    probs_list = [synthetic_probs(y, s) for s in range(args.runs)]
    idx = stratified_indices(attrs["sex×age"][0], args.replicates, np.random.default_rng(0))

    # Agreement first: a speed ratio between different answers would mean nothing.
    w = resample_counts(idx[:5], len(y))
    fast = M.evaluate_all(y, probs_list[0], CLASSES, attrs, weights=w)
    slow = baseline(y, probs_list[0], attrs, idx[:5])
    for k in ["accuracy", "f1_macro", "auc_macro", "var_f1", "ece", ("eqodds", "sex"), ("f1_gap", "sex×age"),
              ("es_auc", "age_group"), ("ece_gap", "sex"), ("dp_gap", "sex×age"), ("worst_group_accuracy", "sex×age")]:
        key = (k, "", "", "") if isinstance(k, str) else (k[0], k[1], "", "")
        np.testing.assert_allclose(fast[key], [s[k] for s in slow], rtol=1e-9, atol=1e-12, err_msg=str(k))

    t = time.perf_counter()
    vectorised(y, probs_list, attrs, idx)
    t_vec = time.perf_counter() - t

    t = time.perf_counter()
    compute(_runs(y, sex, age, probs_list), AnalyzeConfig(runs_dir=".", out=".", n_boot=args.replicates))
    t_full = time.perf_counter() - t

    nb, nr = args.baseline_replicates, args.baseline_runs
    t = time.perf_counter()
    for p in probs_list[:nr]:
        baseline(y, p, attrs, idx[:nb])
    t_base_meas = time.perf_counter() - t
    t_base = t_base_meas * (args.replicates / nb) * (args.runs / nr)

    print(f"cpus: {os.cpu_count()}  runs: {args.runs}  test images: {len(y)}  replicates: {args.replicates}  "
          f"metric values per run: {len(fast)}")
    print(f"vectorised (all replicates as arrays + intervals): {t_vec:.2f} s")
    print(f"analyze compute() incl. tables, seeds, comparisons: {t_full:.2f} s")
    print(f"scikit-learn loop: measured {t_base_meas:.2f} s on {nb} replicates × {nr} runs, "
          f"extrapolated to {args.replicates} × {args.runs}: {t_base:.0f} s")
    print(f"ratio (loop / vectorised): {t_base / t_vec:.0f}x;  (loop / full compute): {t_base / t_full:.0f}x")


if __name__ == "__main__":
    main()
