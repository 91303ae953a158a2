"""Tiny synthetic cohorts and runs for the analysis tests (no files beyond tmp_path)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrfair.analysis.runs import make_predictions, write_run

CLASSES = ["Atelectasis", "Effusion", "Infiltration", "No Finding"]


def cohort_rows(n_per_split: int = 24, seed: int = 0, classes=CLASSES, splits=("val", "test")) -> pd.DataFrame:
    """Cohort-like rows (cohort.csv columns, ``path`` included) balanced over sex x age cells."""
    rng = np.random.default_rng(seed)
    rows = []
    k = 0
    for split in splits:
        for i in range(n_per_split):
            age = int(rng.integers(20, 90))
            rows.append({
                "image_id": f"{k:08d}_000.png", "path": f"{k:08d}_000.png", "patient_id": k,
                "label": classes[i % len(classes)], "sex": "MF"[(i // len(classes)) % 2],
                "age": age, "age_group": "young" if (i // (2 * len(classes))) % 2 == 0 else "old",
                "split": split, "view": "PA",
            })
            k += 1
    return pd.DataFrame(rows)


def probs_for(rows: pd.DataFrame, classes=CLASSES, skill: float = 1.5, seed: int = 0) -> np.ndarray:
    """(N, C) softmax probabilities that favour the true label by ``skill`` logits."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(rows), len(classes)))
    y = rows["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    logits[np.arange(len(rows)), y] += skill
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def meta_for(model: str, method: str, seed: int, classes=CLASSES, tag: str = "best") -> dict:
    return {
        "run_id": f"{model}__{method}__{tag}__s{seed}", "model": model, "method": method, "seed": seed,
        "classes": list(classes), "cohort_hash": "abc123", "hyperparameters": {"lr": 1e-3},
        "selected_epoch": None, "trainable_params": None, "timings": {"fit": 1.0},
    }


def write_runs(runs_dir, grid, n_per_split: int = 24, classes=CLASSES) -> list:
    """Write one run per (model, method, seed) in ``grid``; skill grows with the method index."""
    rows = cohort_rows(n_per_split, classes=classes)
    out = []
    for j, (model, method, seed) in enumerate(grid):
        probs = probs_for(rows, classes, skill=0.5 + 0.4 * (j % 5), seed=100 + j)
        out.append(write_run(runs_dir, meta_for(model, method, seed, classes), make_predictions(rows, probs, classes)))
    return out
