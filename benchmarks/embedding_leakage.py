"""Benchmark: the whole leakage analysis on a 1,200 x 512 synthetic cache.

What is timed: ``cxrfair.probe.embeddings.leakage.leakage`` for two attributes (sex, age_group), three
probes (linear and MLP through the probe stage's compiled sweep, kNN), the permutation
baseline (each permutation reruns every probe with its selection) and 1,000 patient-bootstrap
replicates per AUC, overall and within each of 6 classes. Compilation is reported apart
(paid once per process and shape).

Baseline (the same protocol written plainly with scikit-learn): per labelling, a
``LogisticRegression`` for each C of a 6-value grid and an ``MLPClassifier`` for each of the
same number of configurations as our MLP grid (each selected on validation log-loss), a
``KNeighborsClassifier`` refit for each metric x k (selected on validation AUC), then a loop over
bootstrap replicates calling ``roc_auc_score`` on each resample. It is timed on one attribute,
one labelling and ``--baseline-replicates`` replicates and extrapolated linearly (fits x
labellings, replicates x AUCs); the printout says so.

    python benchmarks/embedding_leakage.py [--permutations 5] [--bootstrap 1000] [--baseline-replicates 50]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier

from cxrfair.extract.cache import write_cache
from cxrfair.probe.embeddings.attribute_probes import MLP_GRID, standardize
from cxrfair.probe.sweep import L2_GRIDS
from cxrfair.probe.embeddings.data import load_embedding_data
from cxrfair.probe.embeddings.leakage import LeakageConfig, leakage

CLASSES = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Pneumothorax"]


def synthetic_cache(path: Path, n: int = 1200, dim: int = 512, seed: int = 0) -> Path:
    """The 6x200 design: 50 images per class x sex x age cell, patients of 1-3 images, a weak sex
    and age direction in a 512-d embedding with a power-law spectrum."""
    rng = np.random.default_rng(seed)
    cells = [(c, s, a) for c in CLASSES for s in ("M", "F") for a in ("young", "old")]
    rows = [dict(label=c, sex=s, age_group=a) for c, s, a in cells for _ in range(n // len(cells))]
    table = pd.DataFrame(rows)
    table["patient_id"] = np.sort(rng.integers(0, int(n / 1.8), len(table)))
    table = table.sort_values("patient_id", kind="stable").reset_index(drop=True)
    table["image_id"] = [f"{i:08d}.png" for i in range(len(table))]
    table["path"], table["age"], table["split"] = table["image_id"], np.where(table["age_group"] == "old", 70, 40), "test"
    table = table[["image_id", "path", "patient_id", "label", "sex", "age", "age_group", "split"]]
    # Patients keep one sex and age group across their images.
    first = table.groupby("patient_id")[["sex", "age_group"]].transform("first")
    table[["sex", "age_group"]] = first
    axes, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    x = rng.normal(size=(len(table), dim)) @ (axes * (3.0 / np.sqrt(np.arange(1, dim + 1)))).T
    x += rng.normal(size=(len(CLASSES), dim))[table["label"].map(CLASSES.index).to_numpy()] * 0.3
    x[:, :8] += 0.25 * np.where(table["sex"] == "M", 1, -1)[:, None]
    x[:, 8:16] += 0.15 * np.where(table["age_group"] == "old", 1, -1)[:, None]
    write_cache(path, image_embeddings=x.astype(np.float32), cohort_table=table, classes=CLASSES, text={},
                attrs={"model": "synthetic-512", "weights_id": "none", "cohort_hash": "0" * 64, "logit_scale": 100.0})
    return path


def baseline_one_labelling(x: dict, y: dict, n_mlp: int, ks, metrics) -> dict:
    """The plain protocol for one labelling; returns test probabilities per probe."""
    out = {}
    fits = [LogisticRegression(C=c, max_iter=2000).fit(x["train"], y["train"]) for c in (1e-3, 1e-2, 1e-1, 1, 10, 100)]
    out["linear"] = min(fits, key=lambda m: log_loss(y["val"], m.predict_proba(x["val"]))).predict_proba(x["test"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fits = [MLPClassifier((MLP_GRID.hiddens[0],), alpha=a, solver="lbfgs", max_iter=1000,
                              random_state=0).fit(x["train"], y["train"])
                for a in np.logspace(-4, 0, n_mlp)]
    out["mlp"] = min(fits, key=lambda m: log_loss(y["val"], m.predict_proba(x["val"]))).predict_proba(x["test"])
    best = None
    for metric in metrics:
        for k in ks:
            m = KNeighborsClassifier(n_neighbors=k, metric=metric, algorithm="brute").fit(x["train"], y["train"])
            score = roc_auc_score(y["val"], m.predict_proba(x["val"])[:, 1])
            if best is None or score > best[0]:
                best = (score, m)
    out["knn"] = best[1].predict_proba(x["test"])
    return out


def baseline_bootstrap(y: np.ndarray, p: np.ndarray, patients: np.ndarray, reps: int, rng) -> float:
    """Seconds for ``reps`` patient-bootstrap replicates of one AUC, the plain way."""
    ids = np.unique(patients)
    members = {pid: np.flatnonzero(patients == pid) for pid in ids}
    t = time.perf_counter()
    for _ in range(reps):
        idx = np.concatenate([members[pid] for pid in rng.choice(ids, len(ids))])
        roc_auc_score(y[idx], p[idx, 1])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--permutations", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--baseline-replicates", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = load_embedding_data(synthetic_cache(Path(tmp) / "c.h5"))
    cfg = LeakageConfig(n_perm=args.permutations, n_boot=args.bootstrap)
    t0 = time.perf_counter()
    result = leakage(data, cfg)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    leakage(data, cfg)  # the same in a warm process: compiled programs reused
    warm = time.perf_counter() - t0
    t = result.table
    n_auc = int(t["auc"].notna().sum())
    labellings = 2 * (1 + args.permutations)
    print(f"load {os.getloadavg()[0]:.1f}; {len(data.x)} x {data.x.shape[1]} cache; 2 attributes x 3 probes, "
          f"{args.permutations} permutations, {args.bootstrap} replicates, {n_auc} AUC rows")
    print(t[t["condition"] == ""][["attribute", "probe", "auc", "ci_low", "ci_high", "chance_auc", "chance_low",
                                    "chance_high", "selected"]].to_string(index=False))
    print(f"cxrfair leakage: {first:.1f} s first call (compilation included), {warm:.1f} s warm")

    split = result.split["split"].to_numpy()
    y_all = (data.table["sex"] == "F").to_numpy().astype(int)
    x = standardize({s: data.x[split == s] for s in ("train", "val", "test")})
    y = {s: y_all[split == s] for s in ("train", "val", "test")}
    t0 = time.perf_counter()
    probs = baseline_one_labelling(x, y, len(L2_GRIDS["mlp"]), cfg.ks, cfg.knn_metrics)
    fit_s = time.perf_counter() - t0
    patients = data.patients[split == "test"]
    rng = np.random.default_rng(0)
    boot_all = baseline_bootstrap(y["test"], probs["linear"], patients, args.baseline_replicates, rng)
    in_class = (data.table["label"].to_numpy()[split == "test"] == CLASSES[0])
    boot_class = baseline_bootstrap(y["test"][in_class], probs["linear"][in_class], patients[in_class],
                                    args.baseline_replicates, rng)
    # Every labelling's three probes are bootstrapped overall and within each of the 6 classes.
    per_replicate = (boot_all + len(CLASSES) * boot_class) / args.baseline_replicates
    boot_total = per_replicate * args.bootstrap * 3 * labellings
    base = fit_s * labellings + boot_total
    print(f"baseline (scikit-learn, extrapolated): fits {fit_s:.1f} s per labelling x {labellings}; bootstrap "
          f"{1e3 * per_replicate:.1f} ms per replicate (overall + 6 classes, from {args.baseline_replicates}) x "
          f"{args.bootstrap} x 3 probes x {labellings} -> {boot_total:.0f} s; total {base:.0f} s")
    print(f"ratio: {base / first:.1f}x first call, {base / warm:.1f}x warm")


if __name__ == "__main__":
    main()
