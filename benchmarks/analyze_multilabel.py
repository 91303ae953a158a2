"""Benchmark: ``cxrfair analyze``'s ``compute()`` on multi-label runs, and its shortcut test vs a scikit-learn loop.

Data: synthetic multi-label runs on one test set (default 10,000 test + 2,500 validation images,
the six conditions of benchmarks/multilabel.py, ~8% masked labels, sex / five age bins / race
White·Black·Asian declared in run.json, about 1.5 images per patient, a ``drain`` column 1/0/empty);
runs: two zero-shot draws and two linear seeds. Measured:

- ``compute()`` end to end (patient bootstrap with pooled strata, validation thresholds, every
  multi-label metric, the shortcut test, seeds.csv and comparisons.csv), against the time of the
  bare ``multilabel.evaluate_multilabel`` calls it makes (point + replicates per run), so the
  ratio is what the analysis layer adds on top of the metric kernel;
- the shortcut test's two AUCs × R replicates (``analyze.shortcut_metrics`` with the (R, N) count
  matrix) against a plain loop that resamples and calls ``roc_auc_score`` on both subsets, timed
  on a few replicates and extrapolated linearly (the printout says so); both agree first.

    python benchmarks/analyze_multilabel.py [--images 10000] [--replicates 1000] [--baseline-replicates 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).parent))
from multilabel import CONDITIONS, synthetic  # noqa: E402  (the same synthetic MIMIC-like data)

from cxrfair.core import multilabel as ML  # noqa: E402
from cxrfair.analysis.analyze import AnalyzeConfig, compute, shortcut_metrics, shortcut_subsets  # noqa: E402
from cxrfair.core.runs import Run, make_predictions, parse_run_id  # noqa: E402

ATTRIBUTES = {"sex": {"groups": ["M", "F"], "reference": "M"},
              "age_group": {"groups": ["18-25", "25-50", "50-65", "65-80", "80+"], "reference": "50-65"},
              "race": {"groups": ["White", "Black", "Asian"], "reference": "White"}}
RUNS = [("zeroshot", "clip-d0", 0), ("zeroshot", "clip-d1", 1), ("linear", "best", 0), ("linear", "best", 1)]


def rows_and_scores(n_test: int, seed: int = 0):
    """Cohort-like rows (val + test) and, per run, (N, C) scores of different skill."""
    rng = np.random.default_rng(seed)
    parts = []
    for split, n, s in (("val", n_test // 4, seed + 1), ("test", n_test, seed)):
        y, p, attrs = synthetic(n, s)
        df = pd.DataFrame({"split": split, **attrs, **{f"y_{c}": y[:, j] for j, c in enumerate(CONDITIONS)}})
        parts.append(df)
    rows = pd.concat(parts, ignore_index=True)
    n = len(rows)
    rows.insert(0, "image_id", [f"i{k:07d}" for k in range(n)])
    # ~1.5 images per patient: a patient's images share its attributes (copied from its first image).
    new_patient = (rng.random(n) < 0.67) | (rows["split"] != rows["split"].shift())
    rows.insert(1, "patient_id", np.cumsum(new_patient))
    for a in ATTRIBUTES:
        rows[a] = rows.groupby("patient_id")[a].transform("first")
    pneumo = rows["y_Pneumothorax"].to_numpy() == 1
    rows["drain"] = np.where(rng.random(n) < 0.15, np.nan, (rng.random(n) < np.where(pneumo, 0.5, 0.1)).astype(float))
    y = np.nan_to_num(rows[[f"y_{c}" for c in CONDITIONS]].to_numpy())
    scores = []
    for j in range(len(RUNS)):
        logits = (1.0 + 0.5 * j) * y - 1.5 + rng.normal(size=y.shape) + 0.8 * (rows["drain"].to_numpy() == 1)[:, None]
        scores.append((1 / (1 + np.exp(-logits))).astype(np.float32).astype(np.float64))
    return rows, scores


def runs_of(rows, scores) -> list[Run]:
    out = []
    for (method, tag, seed), p in zip(RUNS, scores):
        run_id = f"bench__{method}__{tag}__s{seed}"
        meta = {"run_id": run_id, "model": "bench", "method": method, "seed": seed, "classes": CONDITIONS,
                "cohort_hash": "bench", "task": "multilabel", "attributes": ATTRIBUTES, **({"draw": seed} if method == "zeroshot" else {})}
        assert parse_run_id(run_id).method == method
        out.append(Run(meta, make_predictions(rows, p, CONDITIONS, task="multilabel", attributes=ATTRIBUTES), None))
    return out


def sklearn_shortcut(test: pd.DataFrame, counts: np.ndarray) -> np.ndarray:
    """(R, 2) AUC with / without the drain, resampling by repeating images and calling scikit-learn."""
    y, p, d = test["y_Pneumothorax"].to_numpy(), test["p_Pneumothorax"].to_numpy(), test["drain"].to_numpy()
    out = []
    for r in range(len(counts)):
        idx = np.repeat(np.arange(len(test)), counts[r].astype(int))
        yi, pi, di = y[idx], p[idx], d[idx]
        pair = []
        for v in (1, 0):
            keep = ((yi == 1) & (di == v)) | (yi == 0)
            pair.append(roc_auc_score(yi[keep], pi[keep]))
        out.append(pair)
    return np.array(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--baseline-replicates", type=int, default=20)
    args = ap.parse_args()
    rows, scores = rows_and_scores(args.images)
    runs = runs_of(rows, scores)
    config = AnalyzeConfig(".", ".", n_boot=args.replicates, figures=False)

    t = time.perf_counter()
    res = compute(runs, config)
    t_compute = time.perf_counter() - t

    # The metric kernel alone, on the same resamples (re-drawn as compute draws them).
    from cxrfair.analysis.analyze import _Context, _resamples, group_labels, stratum_name

    cfg = res.config
    ctx = _Context(cfg, np.random.default_rng(cfg.seed), None)
    t_kernel = 0.0
    for run in runs:
        test = run.split("test").sort_values("image_id")
        attrs = group_labels(test, cfg.attributes, run, cross=cfg.cross)
        _, w = _resamples(ctx, test, run, attrs[stratum_name(cfg)][0])
        Y, P = run.arrays("test")
        order = np.argsort(run.split("test")["image_id"].to_numpy(), kind="stable")
        Y, P = Y[order], P[order]
        th = ML.choose_thresholds(*run.arrays("val"))
        t = time.perf_counter()
        ML.evaluate_multilabel(Y, P, CONDITIONS, attrs, th)
        ML.evaluate_multilabel(Y, P, CONDITIONS, attrs, th, weights=w)
        t_kernel += time.perf_counter() - t

    # Shortcut: vectorised vs scikit-learn loop on one run.
    run = runs[-1]
    test = run.split("test").sort_values("image_id")
    subsets, k = shortcut_subsets(test, run, "drain", "Pneumothorax")
    nb = args.baseline_replicates
    t = time.perf_counter()
    slow = sklearn_shortcut(test, w[:nb])
    t_slow = (time.perf_counter() - t) * len(w) / nb
    fast = shortcut_metrics(subsets, test["p_Pneumothorax"].to_numpy(), "drain", "Pneumothorax", weights=w)
    np.testing.assert_allclose(fast[("shortcut_auc_with", "drain", "", "Pneumothorax")][:nb], slow[:, 0], rtol=1e-9)
    np.testing.assert_allclose(fast[("shortcut_auc_without", "drain", "", "Pneumothorax")][:nb], slow[:, 1], rtol=1e-9)
    t = time.perf_counter()
    shortcut_metrics(subsets, test["p_Pneumothorax"].to_numpy(), "drain", "Pneumothorax", weights=w)
    t_fast = time.perf_counter() - t

    print(f"cpus: {os.cpu_count()}  load: {os.getloadavg()[0]:.1f}  test images: {len(test)}  runs: {len(runs)}  "
          f"replicates: {args.replicates}  metrics.csv rows: {len(res.metrics)}  strata pooled: {len(res.strata['pooled'])}")
    print(f"compute(): {t_compute:.2f} s; evaluate_multilabel calls alone: {t_kernel:.2f} s "
          f"(analysis layer adds {t_compute / t_kernel:.2f}x)")
    print(f"shortcut test ({k}): vectorised {t_fast:.3f} s; scikit-learn loop {t_slow:.1f} s "
          f"(extrapolated from {nb} replicates); ratio {t_slow / t_fast:.0f}x")


if __name__ == "__main__":
    main()
