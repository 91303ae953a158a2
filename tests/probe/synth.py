"""Synthetic features and caches for the probe tests (numpy + write_cache; no torch)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrfair.extract.cache import TextEmbeddings, write_cache

CLASSES = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Pneumothorax"]
SPLIT_SIZES = {"train": 840, "val": 120, "test": 240}


def clusters(sizes: dict, dim: int, n_classes: int, spread: float, seed: int = 0):
    """Gaussian class clusters: unit-variance noise around class means drawn from N(0, spread²).

    Returns:
        x: split -> (N, dim) float32; y: split -> (N,) int32 (balanced, in class order).
    """
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_classes, dim)) * spread
    x, y = {}, {}
    for split, n in sizes.items():
        y[split] = (np.arange(n) % n_classes).astype(np.int32)
        x[split] = (means[y[split]] + rng.normal(size=(n, dim))).astype(np.float32)
    return x, y


def cohort_table(y: dict, classes=CLASSES) -> pd.DataFrame:
    """Cohort rows (cohort.csv columns) for labels per split, in split order."""
    rows, k = [], 0
    for split in ("train", "val", "test"):
        for i, label in enumerate(y[split]):
            age = 30 + (k * 7) % 60
            rows.append({"image_id": f"{k:08d}_000.png", "path": f"{k:08d}_000.png", "patient_id": k,
                         "label": classes[int(label)], "sex": "MF"[k % 2], "age": age,
                         "age_group": "young" if age < 60 else "old", "split": split})
            k += 1
    return pd.DataFrame(rows)


def make_cache(path, *, sizes=None, dim: int = 16, spread: float = 3.0, seed: int = 0, cohort_hash: str = "c0ffee" * 10,
               text=None, model: str = "tiny-clip", logit_scale: float = 100.0, nan_rows: int = 0, prompt_scores=None):
    """Write a cache of Gaussian clusters (and optional ``PromptScores``); returns (path, x, y, text)."""
    sizes = sizes or {"train": 60, "val": 24, "test": 30}
    x, y = clusters(sizes, dim, len(CLASSES), spread, seed)
    emb = np.concatenate([x["train"], x["val"], x["test"]])
    if nan_rows:
        emb[:nan_rows] = np.nan
    if text is None:
        rng = np.random.default_rng(seed + 1)
        text = {"plain": TextEmbeddings(np.repeat(rng.normal(size=(1, len(CLASSES), dim)), 3, 0).astype(np.float32),
                                        [[["a photo of x."]] * len(CLASSES)] * 3),
                "gloria": TextEmbeddings(rng.normal(size=(4, len(CLASSES), dim)).astype(np.float32),
                                         [[["x"]] * len(CLASSES)] * 4)}
    write_cache(path, image_embeddings=emb, cohort_table=cohort_table(y), classes=CLASSES, text=text,
                attrs={"model": model, "weights_id": "test", "cohort_hash": cohort_hash, "logit_scale": logit_scale},
                prompt_scores=prompt_scores)
    return path, x, y, text


def embedding_like(sizes: dict, dim: int, n_classes: int, spread: float, seed: int = 0):
    """Overlapping class clusters with anisotropic noise, closer to real image embeddings.

    Noise has a power-law spectrum (scale 3/sqrt(i) along the i-th of random orthogonal axes) and
    every feature an offset, as encoder outputs do; class means ~ N(0, spread²) per dimension.

    Returns:
        x: split -> (N, dim) float32; y: split -> (N,) int32 (balanced).
    """
    rng = np.random.default_rng(seed)
    axes, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    mix = axes * (3.0 / np.sqrt(np.arange(1, dim + 1)))
    means = rng.normal(size=(n_classes, dim)) * spread
    x, y = {}, {}
    for split, n in sizes.items():
        y[split] = (np.arange(n) % n_classes).astype(np.int32)
        x[split] = (means[y[split]] + rng.normal(size=(n, dim)) @ mix.T + 0.5).astype(np.float32)
    return x, y
