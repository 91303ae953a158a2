"""A hand-made cohort for the fine-tuning tests: 60 small PNGs with one learnable pattern per class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrfair.extract.cohort import COLUMNS, FORMAT, VERSION, cohort_hash, count_composition

CLASSES = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Pneumothorax"]
PER_SPLIT = {"train": 6, "val": 2, "test": 2}  # images per class: 36 / 12 / 12


def class_image(k: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """(size, size) uint8: noisy grey background + a bright block whose place encodes class ``k``.

    The image is a 2 x 3 grid of cells and class ``k`` lights cell ``k``: a large, easy signal,
    because the random tiny encoder's features barely vary between images at first.
    """
    img = rng.normal(0.3, 0.06, (size, size))
    h, w = size // 2, size // 3
    img[(k // 3) * h:(k // 3 + 1) * h, (k % 3) * w:(k % 3 + 1) * w] += 0.5
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def make_cohort(folder: Path, images: Path, per_split: dict = PER_SPLIT, classes=CLASSES, seed: int = 0,
                size: int = 80) -> Path:
    """Write ``folder/cohort.csv`` + ``cohort.json`` (contract format) and the PNGs under ``images``.

    Images are ``size`` px (larger than the tiny model's 64, so ``prepare`` really resizes).
    """
    rng = np.random.default_rng(seed)
    images.mkdir(parents=True, exist_ok=True)
    rows, n = [], 0
    for split, count in per_split.items():
        for k, label in enumerate(classes):
            for j in range(count):
                image_id = f"{n:08d}_000.png"
                Image.fromarray(class_image(k, rng, size), mode="L").save(images / image_id)
                rows.append({"image_id": image_id, "path": image_id, "patient_id": n, "label": label,
                             "sex": "MF"[j % 2], "age": 30 + 40 * ((j // 2) % 2),
                             "age_group": ("young", "old")[(j // 2) % 2], "split": split})
                n += 1
    table = pd.DataFrame(rows, columns=COLUMNS)
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "cohort.csv", index=False, lineterminator="\n")
    meta = {"format": FORMAT, "version": VERSION, "preset": "test", "classes": list(classes), "parameters": {},
            "seed": seed, "images_root": str(images.resolve()), "metadata_source": None,
            "counts": count_composition(table, list(classes)), "hash": cohort_hash(table, list(classes))}
    (folder / "cohort.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return folder


CONDITIONS = ["Effusion", "Pleural Thickening"]  # a space in a name, as CheXpert's "Pleural Effusion"
ML_ATTRIBUTES = {"sex": {"groups": ["M", "F"], "reference": "M"},
                 "age_group": {"groups": ["young", "old"], "reference": "young"},
                 "race": {"groups": ["White", "Black", "Asian"], "reference": "White"}}
ML_PER_SPLIT = {"train": 36, "val": 12, "test": 12}


def multilabel_image(y: np.ndarray, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """(size, size) uint8: condition k present lights the k-th vertical half (unknown: dimmer)."""
    img = rng.normal(0.3, 0.06, (size, size))
    w = size // max(len(y), 1)
    for k, v in enumerate(y):
        img[:, k * w:(k + 1) * w] += 0.5 * (1.0 if v == 1 else 0.2 if np.isnan(v) else 0.0)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def make_multilabel_cohort(folder: Path, images: Path, conditions=CONDITIONS, per_split: dict = ML_PER_SPLIT,
                           seed: int = 0, size: int = 80, empty_row: bool = True) -> Path:
    """A version-2 multi-label cohort (``y_<C>`` 1/0/empty, attributes sex, age_group, race) + PNGs.

    Labels are drawn per row (~40% positive, ~10% masked); every split has positives and
    negatives of each condition and every group. ``empty_row``: one training row has no observed
    condition at all (it must carry no loss).
    """
    from cxrfair.extract.cohort_format import ML_COLUMNS, count_multilabel, write_cohort_files

    rng = np.random.default_rng(seed)
    images.mkdir(parents=True, exist_ok=True)
    rows, n = [], 0
    races = ML_ATTRIBUTES["race"]["groups"]
    for split, count in per_split.items():
        for j in range(count):
            y = np.where(rng.random(len(conditions)) < 0.4, 1.0, 0.0)
            y[j % len(conditions)] = float(j % 4 < 2)  # certain positives and negatives in every split
            y[rng.random(len(conditions)) < 0.1] = np.nan
            if empty_row and split == "train" and j == 5:
                y[:] = np.nan
            image_id = f"{n:08d}_000.png"
            Image.fromarray(multilabel_image(y, rng, size), mode="L").save(images / image_id)
            row = {"image_id": image_id, "path": image_id, "patient_id": n, "sex": "MF"[j % 2],
                   "age": 30 + 40 * ((j // 2) % 2), "age_group": ("young", "old")[(j // 2) % 2], "split": split,
                   "race": races[(j // 4) % 3]}
            row.update({f"y_{c}": v for c, v in zip(conditions, y)})
            rows.append(row)
            n += 1
    table = pd.DataFrame(rows, columns=[*ML_COLUMNS, "race", *[f"y_{c}" for c in conditions]])
    classes = list(conditions)
    meta = {"format": FORMAT, "version": 2, "preset": "test", "task": "multilabel", "dataset": "csv",
            "classes": classes, "attributes": ML_ATTRIBUTES, "parameters": {}, "seed": seed,
            "images_root": str(images.resolve()), "metadata_source": None,
            "counts": count_multilabel(table, classes, ML_ATTRIBUTES),
            "hash": cohort_hash(table, classes, "multilabel", ML_ATTRIBUTES)}
    folder.mkdir(parents=True, exist_ok=True)
    write_cohort_files(folder, table, meta)
    return folder
