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


CONDITIONS = ["Atelectasis", "Pleural Effusion", "Pneumothorax"]
ML_ATTRIBUTES = {"sex": {"groups": ["M", "F"], "reference": "M"},
                 "age_group": {"groups": ["young", "old"], "reference": "young"},
                 "race": {"groups": ["White", "Black", "Asian"], "reference": "White"}}


def multilabel_features(sizes: dict, dim: int, n_conditions: int, signal: float, seed: int = 0, masked: float = 0.1):
    """Features where each condition adds its own direction: x = noise + signal * Σ_c y_c u_c.

    Returns:
        x: split -> (N, dim) float32; y: split -> (N, C) float32 in {1, 0, NaN} (a share
        ``masked`` of the labels NaN, as uncertain labels under ``--uncertain ignore``);
        directions: (C, dim) the unit vectors u_c.
    """
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n_conditions, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x, y = {}, {}
    for split, n in sizes.items():
        t = (rng.random((n, n_conditions)) < 0.35).astype(np.float32)
        t[0], t[1] = 1.0, 0.0  # every condition has a positive and a negative in every split
        x[split] = (rng.normal(size=(n, dim)) + signal * t @ u).astype(np.float32)
        t[2:][rng.random((n - 2, n_conditions)) < masked] = np.nan
        y[split] = t
    return x, y, u


def multilabel_table(y: dict, conditions=CONDITIONS) -> pd.DataFrame:
    """Multi-label cohort rows (no ``label``; race; ``y_`` columns last) for targets per split."""
    rows, k = [], 0
    for split in ("train", "val", "test"):
        for t in y[split]:
            age = 30 + (k * 7) % 60
            rows.append({"image_id": f"{k:08d}_000.png", "path": f"{k:08d}_000.png", "patient_id": k, "sex": "MF"[k % 2],
                         "age": age, "age_group": "young" if age < 60 else "old", "split": split,
                         "race": ML_ATTRIBUTES["race"]["groups"][k % 3],
                         **{f"y_{c}": v for c, v in zip(conditions, t)}})
            k += 1
    return pd.DataFrame(rows)


def make_multilabel_cache(path, *, sizes=None, dim: int = 12, signal: float = 2.0, seed: int = 0, text=None,
                          logit_scale: float = 50.0, conditions=CONDITIONS, cohort_hash: str = "ab12" * 16):
    """Write a multi-label cache (task, attributes with race, pair text sets); returns (path, x, y, text).

    Default text sets: ``good`` (3 draws: −u_c / +u_c plus noise), ``bad`` (2 random draws),
    ``fixed`` (identical draws of a weak direction).
    """
    from cxrfair.extract.cache import TextEmbeddings, write_cache

    sizes = sizes or {"train": 60, "val": 40, "test": 40}
    x, y, u = multilabel_features(sizes, dim, len(conditions), signal, seed)
    rng = np.random.default_rng(seed + 1)
    if text is None:
        pair = np.stack([-u, u], axis=1)  # (C, 2, D)
        prompts = lambda d: [[[["no x"], ["x"]]] * len(conditions)] * d  # noqa: E731
        text = {"good": TextEmbeddings(np.stack([pair + 0.3 * rng.normal(size=pair.shape) for _ in range(3)]).astype(np.float32), prompts(3)),
                "bad": TextEmbeddings(rng.normal(size=(2, *pair.shape)).astype(np.float32), prompts(2)),
                "fixed": TextEmbeddings(np.repeat((pair + 2 * rng.normal(size=pair.shape))[None], 4, 0).astype(np.float32), prompts(4))}
    emb = np.concatenate([x["train"], x["val"], x["test"]])
    write_cache(path, image_embeddings=emb, cohort_table=multilabel_table(y, conditions), classes=list(conditions),
                text=text, attrs={"model": "tiny-clip", "weights_id": "test", "cohort_hash": cohort_hash,
                                  "logit_scale": logit_scale, "task": "multilabel", "attributes": ML_ATTRIBUTES})
    return path, x, y, text
