"""Synthetic embedding caches for the leakage and geometry tests (numpy + write_cache; no torch).

Patients have 1-4 images; sex, age group, race and a random ``coin`` attribute are per patient;
the label is per image. The embedding is noise plus a planted sex direction (``sex_shift``
along dimension 0, +/- for M/F), optionally a weaker age direction (``age_shift``, dimension 1),
plus a label mean, so sex is readable from the embedding and ``coin`` is not.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrfair.extract.cache import TextEmbeddings, write_cache

CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion"]


def cohort(n_patients: int = 300, seed: int = 0, max_images: int = 4) -> pd.DataFrame:
    """Cohort rows (cohort.csv columns + race, coin), several images per patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        sex, old, race, coin = rng.choice(["M", "F"]), rng.random() < 0.5, rng.choice(["White", "Black", "Asian"]), rng.choice(["heads", "tails"])
        for v in range(int(rng.integers(1, max_images + 1))):
            age = int(rng.integers(60, 90) if old else rng.integers(20, 59))
            rows.append({"image_id": f"{p:08d}_{v:03d}.png", "path": f"{p:08d}_{v:03d}.png", "patient_id": p,
                         "label": CLASSES[int(rng.integers(len(CLASSES)))], "sex": sex, "age": age,
                         "age_group": "old" if old else "young", "split": rng.choice(["train", "val", "test"], p=[0.7, 0.1, 0.2]),
                         "race": race, "coin": coin})
    return pd.DataFrame(rows)


def embeddings(table: pd.DataFrame, dim: int = 16, sex_shift: float = 3.0, label_shift: float = 1.0, seed: int = 0,
               age_shift: float = 0.0) -> np.ndarray:
    """(N, dim) float32: unit noise + sex_shift * (+1 M, -1 F) on dim 0 + age_shift * (+1 old,
    -1 young) on dim 1 + a label mean."""
    rng = np.random.default_rng(seed + 1)
    means = rng.normal(size=(len(CLASSES), dim)) * label_shift
    x = rng.normal(size=(len(table), dim)) + means[table["label"].map(CLASSES.index).to_numpy()]
    x[:, 0] += sex_shift * np.where(table["sex"] == "M", 1.0, -1.0)
    x[:, 1] += age_shift * np.where(table["age_group"] == "old", 1.0, -1.0)
    return x.astype(np.float32)


def make_cache(path, *, table: pd.DataFrame | None = None, x: np.ndarray | None = None, attributes: dict | None = None,
               text: bool = True, **kw):
    """Write a cache; returns (path, table, x). ``attributes``: the v2 ``attributes`` attr (None: v1)."""
    table = cohort() if table is None else table
    x = embeddings(table, **kw) if x is None else x
    attrs = {"model": "tiny-clip", "weights_id": "test", "cohort_hash": "ab" * 32, "logit_scale": 100.0}
    if attributes is not None:
        attrs["attributes"] = attributes
    sets = {}
    if text:
        rng = np.random.default_rng(7)
        sets["clip"] = TextEmbeddings(rng.normal(size=(2, len(CLASSES), x.shape[1])).astype(np.float32),
                                      [[["a"]] * len(CLASSES)] * 2)
    write_cache(path, image_embeddings=x, cohort_table=table, classes=CLASSES, text=sets, attrs=attrs)
    return path, table, x
