"""Synthetic NIH-format data: layout, determinism, counts, and that the planted signals are there."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrfair.errors import CxrfairError
from cxrfair.extract.cohort import read_nih_metadata
from cxrfair.extract.datasets import chexpert, mimic, races
from cxrfair.extract.synth import (
    AMPLITUDE, DISEASES, NEATX_NAME, NIH_HEADER, SynthConfig, make_synth, plan_drains, plan_rows, render,
)
from cxrfair.extract.synth_cxr import plan_images, plan_patients, plan_studies, render_plan

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


# --- NIH additions: official lists and NEATX drains ---------------------------------------------

# SHA-256 over Data_Entry_2017.csv and every PNG without a drain of SMALL, as the code before
# drains existed wrote them (commit c1960bf): adding drains changed only the drain images.
PRE_DRAIN_DIGEST = "1de7e7f568b1f872bc3e1055210cf8dca412f1c6b4cf1398a0743be0d24be362"


def test_nih_bytes_other_than_drain_images_are_unchanged(small):
    a = small / "a"
    neatx = pd.read_csv(a / NEATX_NAME, index_col=0)
    drains = set(neatx.loc[neatx["Drain"] == 1, "Image Index"])
    h = hashlib.sha256()
    for rel in files(a):
        if rel == "Data_Entry_2017.csv" or (rel.endswith(".png") and rel.split("/")[-1] not in drains):
            h.update(rel.encode())
            h.update((a / rel).read_bytes())
    assert h.hexdigest() == PRE_DRAIN_DIGEST


def test_official_lists_split_patients_and_neatx_covers_pneumothorax(small):
    a = small / "a"
    meta = read_nih_metadata(a / "Data_Entry_2017.csv")
    test, train_val = ((a / n).read_text().split() for n in ("test_list.txt", "train_val_list.txt"))
    assert sorted(test + train_val) == sorted(meta["image_id"]) and not set(test) & set(train_val)
    in_test = meta["image_id"].isin(test)
    assert meta.groupby("patient_id").apply(lambda r: in_test[r.index].nunique()).max() == 1  # patient-level
    neatx = pd.read_csv(a / NEATX_NAME, index_col=0)
    assert list(neatx.columns) == ["Image Index", "Drain"] and set(neatx["Drain"]) == {0, 1}
    ptx = meta.loc[meta["labels"].str.contains("Pneumothorax"), "image_id"]
    assert sorted(neatx["Image Index"]) == sorted(ptx)


def test_drain_marker_is_a_tube_and_only_on_drain_images():
    config = SynthConfig(out="unused", size=32, per_cell=8)
    rows = plan_rows(config, np.random.default_rng(0))
    with_drain = render(plan_drains(rows, 0), 32, np.random.default_rng(1)).astype(int)
    without = render(rows, 32, np.random.default_rng(1)).astype(int)
    drain = (plan_drains(rows, 0)["drain"] == 1).to_numpy()
    assert drain.any() and (with_drain[~drain] == without[~drain]).all()
    diff = (with_drain[drain] - without[drain]) > 40  # the tube: +0.5 before noise
    assert (diff.sum(axis=(1, 2)) >= 15).all() and (diff.mean(axis=(1, 2)) < 0.1).all()  # a thin line, not a blob


# --- CheXpert and MIMIC layouts -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cxr(tmp_path_factory):
    root = tmp_path_factory.mktemp("cxr")
    for fmt in ("chexpert", "mimic"):
        make_synth(SynthConfig(out=root / fmt, format=fmt, size=32, patients=40, seed=2))
        make_synth(SynthConfig(out=root / f"{fmt}-again", format=fmt, size=32, patients=40, seed=2))
    return root


def test_chexpert_layout_and_names(cxr):
    root = cxr / "chexpert"
    train = pd.read_csv(root / "CheXpert-v1.0-small/train.csv", dtype=str, keep_default_na=False)
    assert list(train.columns) == ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *chexpert.FINDINGS]
    assert set(train["Sex"]) <= {"Male", "Female", "Unknown"} and set(train["Frontal/Lateral"]) == {"Frontal", "Lateral"}
    assert set(train[list(chexpert.FINDINGS)].to_numpy().ravel()) <= {"1.0", "0.0", "-1.0", ""}
    assert train["Path"].str.fullmatch(r"CheXpert-v1.0-small/train/patient\d{5}/study\d+/view\d_(frontal|lateral)\.jpg").all()
    assert all((root / p).is_file() for p in train["Path"])
    assert (root / "CheXpert-v1.0-small/valid.csv").is_file()
    demo = pd.read_csv(root / "CHEXPERT DEMO.csv")
    assert list(demo.columns) == ["PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE", "ETHNICITY"]
    assert set(demo["PRIMARY_RACE"]) <= set(races.CHEXPERT)


def test_mimic_layout_and_names(cxr):
    root = cxr / "mimic"
    cxr_dir, hosp = root / "mimic-cxr-jpg/2.0.0", root / "mimiciv/2.2/hosp"
    meta = pd.read_csv(cxr_dir / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert list(meta.columns[:5]) == ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition"]
    assert {"StudyDate", "StudyTime"} <= set(meta.columns) and meta["StudyDate"].between(21000101, 22001231).all()
    labels = pd.read_csv(cxr_dir / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert list(labels.columns) == ["subject_id", "study_id", *mimic.FINDINGS]
    split = pd.read_csv(cxr_dir / "mimic-cxr-2.0.0-split.csv.gz")
    assert list(split.columns) == ["dicom_id", "study_id", "subject_id", "split"]
    assert set(split["split"]) == {"train", "validate", "test"} and split.groupby("subject_id")["split"].nunique().max() == 1
    assert list(pd.read_csv(hosp / "patients.csv.gz").columns) == ["subject_id", "gender", "anchor_age", "anchor_year",
                                                                   "anchor_year_group", "dod"]
    admissions = pd.read_csv(hosp / "admissions.csv.gz", keep_default_na=False)
    assert len(admissions.columns) == 16 and set(admissions["race"]) <= set(races.MIMIC_IV)
    for _, m in meta.head(5).iterrows():
        assert (cxr_dir / f"files/p{str(m.subject_id)[:2]}/p{m.subject_id}/s{m.study_id}/{m.dicom_id}.jpg").is_file()


@pytest.mark.parametrize("fmt", ["chexpert", "mimic"])
def test_cxr_formats_same_seed_same_bytes(cxr, fmt):
    a, b = cxr / fmt, cxr / f"{fmt}-again"
    assert files(a) == files(b) and all((a / f).read_bytes() == (b / f).read_bytes() for f in files(a))
    info = json.loads((a / "synth_info.json").read_text())
    assert info["format"] == fmt and info["group_effects"]["pattern_amplitude_race"]["Black"] == 0.6


def test_findings_are_fainter_on_black_patients():
    """Cardiomegaly's bright heart: the positive - negative contrast in the heart region is smaller
    for Black patients (race amplitude 0.6) than for White ones (1.0)."""
    rng = np.random.default_rng(0)
    patients = plan_patients(1500, "mimic", rng)
    studies = plan_studies(patients, chexpert.FINDINGS, rng)
    images = plan_images(studies, rng)
    px = np.zeros((len(images), 32, 32))
    for i, p in render_plan(patients, studies, images, 32, rng):
        px[i] = p
    heart = px[:, 17:22, 12:20].mean(axis=(1, 2))  # around (0.62, 0.50)
    st = images["study"].to_numpy()
    race = patients["race"].to_numpy()[studies["patient"].to_numpy()[st]]
    code = studies["Cardiomegaly"].to_numpy()[st]
    front = images["frontal"].to_numpy()
    contrast = {r: heart[front & (race == r) & (code == 0)].mean() - heart[front & (race == r) & (code == 3)].mean()
                for r in ("White", "Black")}
    assert contrast["White"] > 1.3 * contrast["Black"] > 0, contrast


def test_format_options_are_checked(tmp_path):
    with pytest.raises(CxrfairError, match="--format dicom"):
        SynthConfig(out=tmp_path, format="dicom")
    with pytest.raises(CxrfairError, match="--patients 5"):
        SynthConfig(out=tmp_path, format="mimic", patients=5)
