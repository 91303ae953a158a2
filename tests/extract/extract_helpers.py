"""Shared data for the extract-stage tests: a 48-image synthetic cohort and a tiny-model cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cxrfair.extract.cache import TextEmbeddings, write_cache
from cxrfair.extract.cohort import CohortConfig, build_cohort, load_cohort
from cxrfair.extract.distributed import part_path, shard_rows
from cxrfair.extract.synth import SynthConfig, make_synth

CLASSES6 = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Pneumothorax"]


def make_cohort(root: Path, per_group: int = 2, size: int = 96) -> Path:
    """Synthetic NIH data (``root/nih``) and a cohort of 6 x 4 x ``per_group`` images (``root/cohort``)."""
    make_synth(SynthConfig(out=root / "nih", per_cell=per_group + 1, size=size))
    build_cohort(CohortConfig.from_preset("nih-6x200", out=root / "cohort", metadata=root / "nih" / "Data_Entry_2017.csv",
                                          images=root / "nih", per_group=per_group))
    return root / "cohort"


def copy_images(cohort: Path, dest: Path) -> Path:
    """A private copy of the cohort's images (to corrupt one without touching the shared set)."""
    src = Path(load_cohort(cohort).meta["images_root"])
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.csv", "*.json"))
    return dest


def reference_image_embeddings(fm, paths: list[Path]) -> np.ndarray:
    """(N, D) the slow way: one image at a time, PIL -> prepare -> normalize -> encode_image."""
    out = []
    with torch.inference_mode():
        for p in paths:
            with Image.open(p) as im:
                x = fm.preprocess.normalize(torch.from_numpy(fm.preprocess.prepare(im))[None])
            out.append(fm.encode_image(x).float().numpy()[0])
    return np.stack(out)


def fake_parts(tmp_path, world=2, n=6, model="m", cohort="h", d=4):
    """Part files written directly (no torch): rows of one cohort split into ``world`` shards."""
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"image_id": [f"{i:08d}_000.png" for i in range(n)], "path": "p", "patient_id": range(n),
                          "label": "A", "sex": "M", "age": 30, "age_group": "young", "split": "train"})
    text = {"clip": TextEmbeddings(np.ones((1, 1, d), np.float32), [[["a"]]])}
    paths = []
    for r in range(world):
        start, stop = shard_rows(n, r, world)
        paths.append(part_path(tmp_path / "parts", r, world))
        write_cache(paths[-1], image_embeddings=rng.normal(size=(stop - start, d)), cohort_table=table.iloc[start:stop],
                    classes=["A"], text=text, attrs={"model": model, "weights_id": "w", "cohort_hash": cohort,
                                                     "logit_scale": 1.0, "precision": "fp32",
                                                     "shard": {"rank": r, "world": world, "start": start, "stop": stop, "n_total": n}})
    return paths
