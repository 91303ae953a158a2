"""Tiny synthetic cohorts and runs for the analysis tests (no files beyond tmp_path)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrfair.core.runs import make_predictions, write_run

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


# ----------------------------------------------------------------------------- multi-label (Runs v2)

CONDITIONS = ["Atelectasis", "Effusion", "Pneumothorax"]
AGE_BINS = ["18-25", "25-50", "50-65", "65-80", "80+"]
ML_ATTRIBUTES = {"sex": {"groups": ["M", "F"], "reference": "M"},
                 "age_group": {"groups": AGE_BINS, "reference": "50-65"},
                 "race": {"groups": ["White", "Black", "Asian"], "reference": "White"}}


def multilabel_rows(n_per_split: int = 60, seed: int = 0, conditions=CONDITIONS, splits=("val", "test")) -> pd.DataFrame:
    """Multi-label cohort rows: sex, five age bins, race; ``y_<C>`` 1/0/empty (about 10% masked);
    a ``drain`` column (1/0/empty) more often 1 on Pneumothorax positives; some patients with two images."""
    rng = np.random.default_rng(seed)
    rows, k = [], 0
    for split in splits:
        patient = None
        for i in range(n_per_split):
            if patient is None or rng.random() > 0.25:  # a quarter of the images are a patient's second one
                patient = {"patient_id": 1000 + k, "sex": "MF"[int(rng.integers(2))],
                           "age_group": AGE_BINS[int(rng.integers(5))], "race": ["White", "Black", "Asian"][int(rng.integers(3))]}
            y = {f"y_{c}": (np.nan if rng.random() < 0.1 else float(rng.random() < 0.35)) for c in conditions}
            pneumo = y.get("y_Pneumothorax", 0.0) == 1
            drain = rng.choice([1.0, 0.0, np.nan], p=[0.5, 0.35, 0.15] if pneumo else [0.1, 0.75, 0.15])
            rows.append({"image_id": f"p{k:06d}.jpg", "path": f"files/p{k:06d}.jpg", **patient, "age": 40,
                         "split": split, "view": "PA", "drain": drain, **y})
            k += 1
    df = pd.DataFrame(rows)
    return df[[c for c in df.columns if not c.startswith("y_")] + [f"y_{c}" for c in conditions]]


def multilabel_probs(rows: pd.DataFrame, conditions=CONDITIONS, skill: float = 1.5, shortcut: float = 1.0,
                     seed: int = 0) -> np.ndarray:
    """(N, C) independent sigmoid scores that separate positives by ``skill`` and rise by
    ``shortcut`` where ``drain`` is 1, on a grid of 0.05 (ties)."""
    rng = np.random.default_rng(seed)
    y = np.nan_to_num(rows[[f"y_{c}" for c in conditions]].to_numpy(float))
    logits = skill * (2 * y - 1) + rng.normal(size=y.shape) + shortcut * (rows["drain"].to_numpy() == 1)[:, None]
    return np.round(20 / (1 + np.exp(-logits))) / 20


def multilabel_meta(model: str, method: str, seed: int, conditions=CONDITIONS, tag: str = "best", **extra) -> dict:
    return meta_for(model, method, seed, conditions, tag) | {"task": "multilabel", "attributes": ML_ATTRIBUTES,
                                                             "cohort_hash": "ml0001"} | extra


def write_multilabel_runs(runs_dir, grid, rows: pd.DataFrame | None = None, conditions=CONDITIONS) -> list:
    """One multi-label run per (model, method, seed) of ``grid``; zero-shot runs are prompt draws
    (``clip-d<seed>``, ``draw``); skill grows with the position in the grid."""
    rows = multilabel_rows(conditions=conditions) if rows is None else rows
    out = []
    for j, (model, method, seed) in enumerate(grid):
        extra = {"draw": seed} if method == "zeroshot" else {}
        tag = f"clip-d{seed}" if method == "zeroshot" else "best"
        probs = multilabel_probs(rows, conditions, skill=0.4 + 0.3 * j, seed=200 + j)
        preds = make_predictions(rows, probs, conditions, task="multilabel", attributes=ML_ATTRIBUTES)
        out.append(write_run(runs_dir, multilabel_meta(model, method, seed, conditions, tag, **extra), preds))
    return out


# ----------------------------------------------------------------------------- embedding analysis outputs


def write_embedding_outputs(root, model: str, rows: pd.DataFrame, attributes: dict, seed: int = 0) -> None:
    """``<root>/<model>/leakage/leakage.csv`` and ``<root>/<model>/geometry/{pca,pca_scores,pca_tests}.csv,
    geometry.json`` in the formats of docs/CONTRACTS.md ("Embedding analysis"), with made-up numbers:
    AUC 0.9 / 0.8 / 0.7 for linear / mlp / knn minus 0.1 per attribute index, chance 0.5 [0.44, 0.56];
    one label-conditional row per attribute and probe; component 1 significant."""
    from pathlib import Path

    from cxrfair.probe.embeddings.leakage import COLUMNS

    rng = np.random.default_rng(seed)
    leak = Path(root) / model / "leakage"
    geo = Path(root) / model / "geometry"
    leak.mkdir(parents=True, exist_ok=True)
    geo.mkdir(parents=True, exist_ok=True)
    recs = []
    for i, (a, spec) in enumerate(attributes.items()):
        for condition in ("", "label=Effusion"):
            for probe, auc in (("linear", 0.9), ("mlp", 0.8), ("knn", 0.7)):
                auc = auc - 0.1 * i - (0.05 if condition else 0.0)
                recs.append({"model": model, "attribute": a, "condition": condition, "probe": probe, "auc": auc,
                             "ci_low": auc - 0.05, "ci_high": auc + 0.04, "chance_auc": 0.5, "chance_low": 0.44,
                             "chance_high": 0.56, "n_train": 60, "n_val": 20, "n_test": 20, "selected": "k=3 metric=cosine",
                             "groups": "|".join(spec["groups"]), "n_perm": 5, "note": ""})
    pd.DataFrame(recs, columns=COLUMNS).to_csv(leak / "leakage.csv", index=False)
    pd.DataFrame({"model": model, "component": [1, 2, 3], "explained_variance": [3.0, 2.0, 1.0],
                  "explained_variance_ratio": [0.3, 0.2, 0.1], "cumulative_ratio": [0.3, 0.5, 0.6],
                  "normalize": "l2"}).to_csv(geo / "pca.csv", index=False)
    scores = rows[["image_id", "patient_id", "split", *attributes]].copy()
    for k in (1, 2, 3):
        scores[f"pc{k}"] = rng.normal(size=len(scores))
    scores.to_csv(geo / "pca_scores.csv", index=False)
    pd.DataFrame([{"model": model, "attribute": a, "component": c, "statistic": "ks", "value": 0.1, "p_perm": 0.01 * c,
                   "p_holm": 0.03 * c, "p_asymptotic": 0.01, "significant": c == 1, "n_groups": len(spec["groups"]),
                   "groups": "|".join(spec["groups"]), "n_images": len(rows), "n_patients": len(rows), "n_perm": 59}
                  for a, spec in attributes.items() for c in (1, 2, 3)]).to_csv(geo / "pca_tests.csv", index=False)
    import json

    (geo / "geometry.json").write_text(json.dumps({"format": "cxrfair-geometry", "version": 1, "model": model,
                                                    "attributes": {a: s["groups"] for a, s in attributes.items()}}))
