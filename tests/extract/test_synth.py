"""Synthetic NIH-format data: layout, determinism, counts, and that the planted signals are there."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrfair.errors import CxrfairError
from cxrfair.extract.cohort import read_nih_metadata
from cxrfair.extract.synth import AMPLITUDE, DISEASES, NIH_HEADER, SynthConfig, make_synth, plan_rows, render

SMALL = dict(seed=3, size=32, per_cell=8)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synth(SynthConfig(out=root / "a", **SMALL))
    make_synth(SynthConfig(out=root / "b", **SMALL))
    make_synth(SynthConfig(out=root / "c", **{**SMALL, "seed": 4}))
    return root


def files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_layout_is_nih(small):
    a = small / "a"
    lines = (a / "Data_Entry_2017.csv").read_text().splitlines()
    assert lines[0] == NIH_HEADER
    assert lines[0].startswith("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                               "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
    assert all(line.endswith(",") for line in lines)  # the 2017 release's trailing empty column
    meta = read_nih_metadata(a / "Data_Entry_2017.csv")
    pngs = [p for p in files(a) if p.endswith(".png")]
    assert {p.split("/")[-1] for p in pngs} == set(meta["image_id"])
    assert all(p.startswith("images_0") and p.split("/")[1] == "images" for p in pngs)
    img = Image.open(a / pngs[0])
    assert img.mode == "L" and img.size == (32, 32)


def test_same_seed_same_bytes_other_seed_differs(small):
    a, b, c = small / "a", small / "b", small / "c"
    assert files(a) == files(b)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files(a))
    assert (a / "Data_Entry_2017.csv").read_bytes() != (c / "Data_Entry_2017.csv").read_bytes()


def test_counts_patients_and_filter_fodder(small):
    meta = read_nih_metadata(small / "a" / "Data_Entry_2017.csv")
    meta["band"] = np.where(meta["age"] >= 60, "old", "young")
    single = meta[meta["labels"].isin(DISEASES)]
    counts = single.groupby(["labels", "band", "sex"]).size()
    assert len(counts) == 24 and (counts == 8).all()
    assert (meta["labels"] == "No Finding").sum() == 4 * 4
    assert meta["labels"].str.contains("|", regex=False).sum() == 4 * 2
    per_patient = meta.groupby("patient_id")
    assert per_patient.size().max() > 1
    assert (per_patient["sex"].nunique() == 1).all() and (per_patient["band"].nunique() == 1).all()
    assert (per_patient["labels"].nunique() > 1).any()  # patients span findings: splits must respect that
    info = json.loads((small / "a" / "synth_info.json").read_text())
    assert info["images"] == len(meta) and info["single_label_counts"]["Edema"]["old_F"] == 8
    assert set(info["patterns"]) == set(DISEASES) and "pattern_amplitude" in info["group_effects"]


def nearest_centroid_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Train on even rows, test on odd rows; x (N, P) float, y (N,) int."""
    tr, te = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    cents = np.stack([x[tr & (y == k)].mean(0) for k in range(len(DISEASES))])
    pred = ((x[te, None, :] - cents[None]) ** 2).sum(-1).argmin(1)
    return float((pred == y[te]).mean())


def test_patterns_are_learnable_and_fainter_for_old_women():
    """A nearest-centroid classifier on pixels: well above chance, best on young M, worst on old F."""
    config = SynthConfig(out="unused", seed=0, size=32, per_cell=64)
    rng = np.random.default_rng(0)
    rows = plan_rows(config, rng)
    pixels = render(rows, config.size, rng).reshape(len(rows), -1).astype(float) / 255
    single = rows["labels"].isin(DISEASES).to_numpy()
    acc = {}
    for sex, band in AMPLITUDE:
        m = single & (rows["sex"] == sex).to_numpy() & (rows["age_group"] == band).to_numpy()
        y = rows.loc[m, "labels"].map(DISEASES.index).to_numpy()
        acc[f"{band}_{sex}"] = nearest_centroid_accuracy(pixels[m], y)
    assert min(acc.values()) > 1 / 6 + 0.2, acc
    assert acc["young_M"] > acc["old_F"] + 0.05, acc


def test_sex_marker_reveals_sex():
    rng = np.random.default_rng(1)
    rows = plan_rows(SynthConfig(out="unused", size=32, per_cell=4), rng)
    px = render(rows, 32, rng).astype(float)
    left, right = px[:, 2:4, 2:4].mean((1, 2)), px[:, 2:4, -4:-2].mean((1, 2))
    female = (rows["sex"] == "F").to_numpy()
    assert ((left > right) == female).mean() > 0.95


@pytest.mark.parametrize("kw, message", [(dict(size=8), "--size 8"), (dict(per_cell=0), "--per-cell 0"),
                                         (dict(seed=-1), "--seed -1")])
def test_config_rejects_bad_options(tmp_path, kw, message):
    with pytest.raises(CxrfairError, match=message):
        SynthConfig(out=tmp_path, **kw)


def test_existing_output_needs_force(small):
    with pytest.raises(CxrfairError, match="--force"):
        make_synth(SynthConfig(out=small / "a", **SMALL))
    before = files(small / "a")
    make_synth(SynthConfig(out=small / "a", force=True, **SMALL))
    assert files(small / "a") == before


def test_rows_table_is_sorted_like_nih():
    rows = plan_rows(SynthConfig(out="unused", per_cell=4), np.random.default_rng(0))
    assert rows["image_id"].is_monotonic_increasing and rows["image_id"].is_unique
    assert isinstance(rows, pd.DataFrame) and rows["age"].between(18, 89).all()
