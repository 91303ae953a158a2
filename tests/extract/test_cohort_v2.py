"""Cohort v2: multi-label presets on synthetic data in the real layouts, attributes as data, splits, bad input.

Each preset's rows are checked against a reference computed here from the raw files with plain
pandas (which images pass, their targets, their split), not against the builder's own helpers.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrfair.errors import CxrfairError
from cxrfair.extract.cohort import (
    ML_COLUMNS, CohortConfig, build_cohort, cohort_hash, composition_table, deal_patients, load_cohort, split_cohort,
    split_targets,
)
from cxrfair.extract.cohort_format import COLUMNS, FORMAT, count_composition
from cxrfair.extract.synth import NEATX_NAME, SynthConfig, make_synth

SIX = ["Atelectasis", "Cardiomegaly", "Consolidation", "Pleural Effusion", "Pneumonia", "Pneumothorax"]
BINS = ["18-25", "25-50", "50-65", "65-80", "80+"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Metadata-only synthetic CheXpert (300 patients), MIMIC (300) and NIH (per cell 16) folders."""
    root = tmp_path_factory.mktemp("synth")
    for fmt, extra in (("chexpert", dict(patients=300)), ("mimic", dict(patients=300)), ("nih", dict(per_cell=16))):
        make_synth(SynthConfig(out=root / fmt, format=fmt, images=False, seed=1, **extra))
    return root


def chexpert_config(synth, out, **kw):
    return CohortConfig.from_preset("chexpert-6", out=out, metadata=synth / "chexpert/CheXpert-v1.0-small/train.csv", **kw)


def mimic_config(synth, out, **kw):
    return CohortConfig.from_preset("mimic-sourget", out=out, metadata=synth / "mimic/mimic-cxr-jpg/2.0.0",
                                    mimic_iv=synth / "mimic/mimiciv/2.2", **kw)


def reference_targets(raw: pd.DataFrame, uncertain: str) -> pd.DataFrame:
    """Blank -> 0; -1 -> NaN / 0 / 1; one y_ column per condition."""
    v = raw[SIX].replace("", np.nan).astype(float).fillna(0.0)
    v = v.replace(-1.0, {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[uncertain])
    return v.rename(columns=lambda c: f"y_{c}")


# --- chexpert-6 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chexpert6(synth, tmp_path_factory):
    root = tmp_path_factory.mktemp("chx")
    return {u: build_cohort(chexpert_config(synth, root / u, uncertain=None if u == "ignore" else u))
            for u in ("ignore", "zeros", "ones")}


def test_chexpert6_keeps_every_frontal_adult_image_of_known_sex(synth, chexpert6):
    raw = pd.read_csv(synth / "chexpert/CheXpert-v1.0-small/train.csv", dtype=str, keep_default_na=False)
    keep = raw[(raw["Frontal/Lateral"] == "Frontal") & raw["Sex"].isin(["Male", "Female"]) & (raw["Age"].astype(int) >= 18)]
    t = chexpert6["ignore"].table
    assert sorted(t["path"]) == sorted(keep["Path"])
    ref = keep.set_index("Path")
    assert (t["sex"] == ref.loc[t["path"], "Sex"].str[0].to_numpy()).all()
    assert (t["age"] == ref.loc[t["path"], "Age"].astype(int).to_numpy()).all()
    assert list(t.columns) == ML_COLUMNS + ["view"] + [f"y_{c}" for c in SIX]
    excluded = chexpert6["ignore"].meta["excluded"]
    assert sum(excluded.values()) == len(raw) - len(t) and excluded["not_frontal"] == (raw["Frontal/Lateral"] == "Lateral").sum()


@pytest.mark.parametrize("uncertain", ["ignore", "zeros", "ones"])
def test_targets_follow_the_uncertain_policy(synth, chexpert6, uncertain):
    raw = pd.read_csv(synth / "chexpert/CheXpert-v1.0-small/train.csv", dtype=str, keep_default_na=False).set_index("Path")
    cohort = chexpert6[uncertain]
    ref = reference_targets(raw.loc[cohort.table["path"]], uncertain)
    np.testing.assert_array_equal(cohort.table[ref.columns].to_numpy(), ref.to_numpy())
    np.testing.assert_array_equal(cohort.targets(), ref.to_numpy(dtype=np.float32))
    assert cohort.targets().dtype == np.float32 and cohort.targets().shape == (len(cohort.table), 6)
    assert np.isnan(cohort.targets()).any() == (uncertain == "ignore")
    assert cohort.meta["uncertain"] == uncertain and cohort.meta["preset"] == ("chexpert-6" if uncertain == "ignore" else "custom")


def test_chexpert6_split_is_70_10_20_by_patients_and_patient_disjoint(chexpert6):
    t = chexpert6["ignore"].table
    assert t.groupby("patient_id")["split"].nunique().max() == 1
    per = t.groupby("split")["patient_id"].nunique()
    assert [per["train"], per["val"], per["test"]] == split_targets(t["patient_id"].nunique(), (0.7, 0.1, 0.2)).tolist()
    counts = chexpert6["ignore"].meta["counts"]
    assert counts["patients_per_split"] == {s: int(per[s]) for s in ("train", "val", "test")}
    for c in SIX:  # every condition has positives and negatives in every split
        for s in ("train", "val", "test"):
            y = t.loc[t["split"] == s, f"y_{c}"]
            assert counts["condition_split"][c][s] == {"positive": int((y == 1).sum()), "negative": int((y == 0).sum()),
                                                      "masked": int(y.isna().sum())}
            assert (y == 1).any() and (y == 0).any()


def test_multilabel_cohort_round_trip_bytes_and_hash(synth, chexpert6, tmp_path):
    a = chexpert6["ignore"]
    back = load_cohort(a.folder)
    pd.testing.assert_frame_equal(back.table, a.table)
    assert back.task == "multilabel" and back.classes == SIX and back.hash == a.hash and back.dataset == "chexpert"
    assert back.attributes == {"sex": {"groups": ["M", "F"], "reference": "M"},
                               "age_group": {"groups": BINS, "reference": "18-25"}}
    again = build_cohort(chexpert_config(synth, tmp_path / "again"))
    assert (again.folder / "cohort.csv").read_bytes() == (a.folder / "cohort.csv").read_bytes()
    other = build_cohort(chexpert_config(synth, tmp_path / "seed2", seed=2))
    assert other.hash != a.hash
    # The hash covers the targets: flip one and loading refuses the folder.
    shutil.copytree(a.folder, tmp_path / "edited")
    lines = (tmp_path / "edited/cohort.csv").read_text().splitlines()
    lines[1] = lines[1][:-1] + ("0" if lines[1].endswith("1") else "1")
    (tmp_path / "edited/cohort.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(CxrfairError, match="does not match the hash"):
        load_cohort(tmp_path / "edited")


def test_v2_hash_covers_every_column_but_path(chexpert6):
    t = chexpert6["ignore"].table
    args = (SIX, "multilabel", chexpert6["ignore"].attributes)
    assert cohort_hash(t, *args) == chexpert6["ignore"].hash
    assert cohort_hash(t.assign(path="x/" + t["path"]), *args) == chexpert6["ignore"].hash
    assert cohort_hash(t.assign(view="PA"), *args) != chexpert6["ignore"].hash
    assert cohort_hash(t, SIX, "multiclass", chexpert6["ignore"].attributes) != chexpert6["ignore"].hash


def test_demographics_add_race_and_leave_out_other_and_unknown(synth, tmp_path):
    c = build_cohort(chexpert_config(synth, tmp_path / "c", demographics=synth / "chexpert/CHEXPERT DEMO.csv"))
    demo = pd.read_csv(synth / "chexpert/CHEXPERT DEMO.csv")
    kept = demo[demo["PRIMARY_RACE"].str.contains("White|Black|Asian")]
    assert set(c.table["patient_id"]) <= {int(p[7:]) for p in kept["PATIENT"]}
    assert list(c.attributes) == ["sex", "age_group", "race"] and c.attributes["race"]["reference"] == "White"
    assert set(c.table["race"]) == {"White", "Black", "Asian"} and c.meta["preset"] == "chexpert-6"
    assert c.meta["excluded"]["race_other"] > 0 and c.meta["excluded"]["race_unknown"] > 0
    assert "race White" in composition_table(c)


# --- mimic-sourget ------------------------------------------------------------------------------


def test_mimic_sourget_uses_the_official_split_and_three_race_groups(synth, tmp_path):
    c = build_cohort(mimic_config(synth, tmp_path / "m"))
    split = pd.read_csv(synth / "mimic/mimic-cxr-jpg/2.0.0/mimic-cxr-2.0.0-split.csv.gz").set_index("dicom_id")["split"]
    t = c.table
    assert (t["split"].to_numpy() == split.loc[t["image_id"]].replace("validate", "val").to_numpy()).all()
    assert set(t["race"]) == {"White", "Black", "Asian"} and t["age"].min() >= 18
    assert set(t["view"]) <= {"AP", "PA"} and list(c.attributes) == ["sex", "age_group", "race"]
    assert c.attributes["age_group"]["groups"] == BINS and c.meta["preset"] == "mimic-sourget"
    meta = pd.read_csv(synth / "mimic/mimic-cxr-jpg/2.0.0/mimic-cxr-2.0.0-metadata.csv.gz").set_index("dicom_id")
    assert (t["path"].str.split("/").str[-1] == t["image_id"] + ".jpg").all()
    assert (t["study_id"] == meta.loc[t["image_id"], "study_id"].to_numpy()).all()
    assert c.meta["notes"]["race_conflict_images"] > 0 and c.meta["notes"]["no_label_row_images"] > 0
    assert [s["role"] for s in c.meta["sources"]] == ["metadata", "labels", "official_split", "patients", "admissions"]


def test_max_train_keeps_whole_patients_and_leaves_val_test_alone(synth, tmp_path):
    full = build_cohort(mimic_config(synth, tmp_path / "full"))
    capped = build_cohort(mimic_config(synth, tmp_path / "cap", max_train=200))
    tr_full, tr_cap = (c.table[c.table["split"] == "train"] for c in (full, capped))
    assert len(tr_cap) <= 200 and len(tr_cap) > 150
    assert set(tr_cap["image_id"]) <= set(tr_full["image_id"])
    assert (tr_full[tr_full["patient_id"].isin(tr_cap["patient_id"])]["image_id"].isin(tr_cap["image_id"])).all()
    for s in ("val", "test"):
        assert capped.table.loc[capped.table["split"] == s, "image_id"].tolist() == \
            full.table.loc[full.table["split"] == s, "image_id"].tolist()
    assert capped.meta["excluded"]["max_train"] == len(tr_full) - len(tr_cap) and capped.meta["preset"] == "mimic-sourget"


# --- nih-neatx-pneumothorax ---------------------------------------------------------------------


def test_nih_neatx_pneumothorax(synth, tmp_path):
    nih = synth / "nih"
    c = build_cohort(CohortConfig.from_preset("nih-neatx-pneumothorax", out=tmp_path / "n", metadata=nih / "Data_Entry_2017.csv",
                                              official_split=nih, drains=nih / NEATX_NAME))
    meta = pd.read_csv(nih / "Data_Entry_2017.csv", index_col=False).set_index("Image Index")
    test_list = (nih / "test_list.txt").read_text().split()
    t = c.table
    assert sorted(t.loc[t["split"] == "test", "image_id"]) == sorted(test_list)
    assert (t["y_Pneumothorax"] == meta.loc[t["image_id"], "Finding Labels"].str.contains("Pneumothorax").to_numpy()).all()
    neatx = pd.read_csv(nih / NEATX_NAME, index_col=0).set_index("Image Index")["Drain"]
    np.testing.assert_array_equal(t["drain"].to_numpy(), neatx.reindex(t["image_id"]).to_numpy(dtype=float))
    assert c.meta["shortcuts"] == ["drain"] and "drain" not in c.attributes and c.classes == ["Pneumothorax"]
    trainval = t[t["split"] != "test"].groupby("split")["patient_id"].nunique()
    n = trainval.sum()
    assert [trainval["train"], trainval["val"]] == split_targets(n, (0.875, 0.125)).tolist()
    assert t.groupby("patient_id")["split"].nunique().max() == 1
    back = load_cohort(c.folder)
    np.testing.assert_array_equal(back.table["drain"].to_numpy(), t["drain"].to_numpy())


# --- csv and attributes -------------------------------------------------------------------------


def export(path, n=240, seed=0) -> None:
    """A hospital export: 4 images per patient, two findings, one single label per image, a scanner."""
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(n // 4), 4)
    pd.DataFrame({"file": [f"img/{i}.png" for i in range(n)], "pid": [f"H{p:04d}" for p in pid],
                  "sex": np.where(pid % 2 == 0, "M", "F"), "age": 20 + (pid * 7) % 70,
                  "A": rng.choice(["1", "0", "-1", ""], n), "B": rng.choice(["1", "0"], n),
                  "finding": np.where(np.arange(n) % 2 == 0, "Edema", "Mass"),
                  "scanner": np.where(pid % 3 == 0, "GE", "other")}).to_csv(path, index=False)


def test_csv_all_multilabel_with_an_extra_attribute(tmp_path):
    export(tmp_path / "e.csv")
    c = build_cohort(CohortConfig.from_preset("all-multilabel", dataset="csv", out=tmp_path / "c", metadata=tmp_path / "e.csv",
                                              columns="path=file,patient=pid,sex=sex,age=age,scanner=scanner",
                                              labels="A,B", attributes="sex,age_group,scanner"))
    # "other" is an ordinary group of a csv attribute (only race maps set "other" races aside)
    assert c.classes == ["A", "B"] and c.attributes["scanner"] == {"groups": ["GE", "other"], "reference": "GE"}
    assert len(c.table) == 240 and "scanner_unknown" not in c.meta["excluded"]
    assert list(c.table.columns) == ML_COLUMNS + ["view", "patient_key", "scanner", "y_A", "y_B"]
    assert c.table.groupby("patient_id")["split"].nunique().max() == 1 and c.meta["preset"] == "custom"
    assert load_cohort(c.folder).hash == c.hash


def test_csv_multiclass_through_the_6x200_rules(tmp_path):
    export(tmp_path / "e.csv", n=400)
    c = build_cohort(CohortConfig.from_preset("nih-6x200", dataset="csv", out=tmp_path / "c", metadata=tmp_path / "e.csv",
                                              columns="path=file,patient=pid,sex=sex,age=age,label=finding",
                                              diseases="Edema,Mass", per_group=8))
    assert c.task == "multiclass" and c.classes == ["Edema", "Mass"] and len(c.table) == 2 * 4 * 8
    assert list(c.table.columns[: len(COLUMNS)]) == COLUMNS and c.meta["preset"] == "custom"
    assert c.targets().tolist() == c.table["label"].map({"Edema": 0, "Mass": 1}).tolist()


def test_age_bins_on_the_6x200_rules(tmp_path):
    c = build_cohort(CohortConfig.from_preset(out=tmp_path / "c", diseases="Effusion", per_group=5, age_bins="18,40,65"))
    assert c.attributes["age_group"]["groups"] == ["18-40", "40-65", "65+"]
    assert c.table.groupby(["age_group", "sex"]).size().tolist() == [5] * 6
    assert c.meta["parameters"]["groups"] == ["18-40_M", "18-40_F", "40-65_M", "40-65_F", "65+_M", "65+_F"]
    assert load_cohort(c.folder).hash == c.hash  # v1 hash rule (sex + age_group only), age groups in it
    assert "65+_F" in composition_table(c)


def test_version_1_folders_still_load(tmp_path):
    """A folder as cxrfair wrote it before version 2 (no task, attributes, dataset keys)."""
    rows = [{"image_id": f"{i:08d}_000.png", "path": f"{i:08d}_000.png", "patient_id": i, "label": "AB"[i % 2],
             "sex": "MF"[i // 2 % 2], "age": 30 + 40 * (i // 4 % 2), "age_group": ("young", "old")[i // 4 % 2],
             "split": ("train", "val", "test")[i % 3]} for i in range(12)]
    table = pd.DataFrame(rows, columns=COLUMNS)
    tmp_path.joinpath("cohort.csv").write_text(table.to_csv(index=False, lineterminator="\n"))
    meta = {"format": FORMAT, "version": 1, "preset": "test", "classes": ["A", "B"], "parameters": {}, "seed": 0,
            "images_root": None, "metadata_source": None, "counts": count_composition(table, ["A", "B"]),
            "hash": cohort_hash(table, ["A", "B"])}
    tmp_path.joinpath("cohort.json").write_text(json.dumps(meta))
    c = load_cohort(tmp_path)
    assert c.task == "multiclass" and c.dataset == "nih" and list(c.attributes) == ["sex", "age_group"]
    assert c.targets().tolist() == [i % 2 for i in range(12)] and c.targets().dtype == np.int64


# --- splits -------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(strata=st.lists(st.integers(0, 6), min_size=1, max_size=300), seed=st.integers(0, 2**16),
       ratio=st.sampled_from([(0.7, 0.1, 0.2), (0.8, 0.2), (1, 1, 1), (0.6, 0.2, 0.2)]))
def test_deal_patients_is_exact_overall_and_within_one_per_stratum(strata, seed, ratio):
    strata = np.array(strata)
    assign = deal_patients(strata, ratio, seed)
    share = np.asarray(ratio) / sum(ratio)
    assert np.bincount(assign, minlength=len(ratio)).tolist() == split_targets(len(strata), tuple(share)).tolist()
    for s in np.unique(strata):
        got = np.bincount(assign[strata == s], minlength=len(ratio))
        assert np.abs(got - (strata == s).sum() * share).max() < 2  # interleave: off by at most one, plus rounding


def test_deal_patients_depends_on_the_seed():
    strata = np.zeros(100, dtype=int)
    assert not np.array_equal(deal_patients(strata, (0.7, 0.1, 0.2), 0), deal_patients(strata, (0.7, 0.1, 0.2), 1))
    assert np.array_equal(deal_patients(strata, (0.7, 0.1, 0.2), 3), deal_patients(strata, (0.7, 0.1, 0.2), 3))


def test_large_multiclass_split_is_exact_and_patient_disjoint():
    """Above EXACT_SEARCH_MAX_PATIENTS the split starts from a deal: still exact totals, no shared patient."""
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 5, 2500)
    pid = np.repeat(np.arange(2500), sizes)
    group = np.repeat(rng.choice(["young_M", "young_F", "old_M", "old_F"], 2500), sizes)  # a patient keeps one group
    table = pd.DataFrame({"patient_id": pid, "group": group, "label": rng.choice(["A", "B", "C"], len(pid))})
    split = split_cohort(table, ["A", "B", "C"], (0.7, 0.1, 0.2), 0)
    t = table.assign(split=split)
    assert t.groupby("patient_id")["split"].nunique().max() == 1
    for c, rows in t.groupby("label"):
        assert [int((rows["split"] == s).sum()) for s in ("train", "val", "test")] == \
            split_targets(len(rows), (0.7, 0.1, 0.2)).tolist()
    # Cells (label x group) stay near the ratio too: patients mix labels here, so not within one
    # image as the exhaustive small-cohort search gets, but within 2% of a cell of ~500 images.
    cells = t.groupby(["label", "group", "split"]).size().unstack()[["train", "val", "test"]]
    n = cells.sum(axis=1).to_numpy()[:, None]
    assert (np.abs(cells.to_numpy() - n * [0.7, 0.1, 0.2]) < 0.02 * n).all()


# --- bad input: one line naming what to fix, nothing written ------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda s, o: CohortConfig.from_preset(out=o, per_group=1),
         r"class Cardiomegaly: its 4 images split 3/0/1 train/val/test, so val has none.*raise --per-group"),
        (lambda s, o: mimic_config(s, o, attributes="sex,age_group,race,scanner"), r"--attributes: 'scanner' is not in the data"),
        (lambda s, o: chexpert_config(s, o, attributes="sex,age_group,race"), r"'race' is not in the data .*needs --demographics"),
        (lambda s, o: chexpert_config(s, o, diseases="Atelectasis,Pneumonitis"),
         r"--diseases: 'Pneumonitis' is not a finding in metadata .*train.csv; known findings: No Finding"),
        (lambda s, o: CohortConfig.from_preset("nih-neatx-pneumothorax", out=o, metadata=s / "nih/Data_Entry_2017.csv",
                                               official_split=s / "nih"),
         r"--preset nih-neatx-pneumothorax: needs drain data, which --dataset nih has only with --drains"),
        (lambda s, o: CohortConfig.from_preset("nih-neatx-pneumothorax", out=o, metadata=s / "nih/Data_Entry_2017.csv",
                                               drains=s / "nih" / NEATX_NAME),
         r"needs official split data, which --dataset nih has only with --official-split DIR"),
        (lambda s, o: chexpert_config(s, o, age_bins="30,20"), r"--age-bins 30,20: expected increasing ages"),
        (lambda s, o: chexpert_config(s, o, per_group=5), r"--per-group 5: .*applies to multi-class presets"),
        (lambda s, o: chexpert_config(s, o, attributes="race,sex"), r"--attributes race,sex: must start with sex,age_group"),
        (lambda s, o: CohortConfig.from_preset("nih-neatx-pneumothorax", out=o, metadata=s / "nih/Data_Entry_2017.csv",
                                               official_split=s / "nih", drains=s / "nih" / NEATX_NAME,
                                               attributes="sex,age_group,drain"),
         r"--attributes: 'drain' is not a sensitive attribute"),
        (lambda s, o: chexpert_config(s, o, split="official"), r"--preset chexpert-6: needs official split data"),
        (lambda s, o: chexpert_config(s, o, min_age=95), r"no image passes the cohort's rules .*below_min_age"),
        (lambda s, o: chexpert_config(s, o, age_threshold=50, age_bins="18,60"), r"--age-threshold and --age-bins: give one"),
        (lambda s, o: CohortConfig.from_preset("chexpert-6", dataset="csv", out=o, metadata=s / "nih/Data_Entry_2017.csv"),
         r"--columns: missing path=COLUMN, patient=COLUMN, sex=COLUMN, age=COLUMN"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(synth, tmp_path, make, message):
    out = tmp_path / "out"
    with pytest.raises(CxrfairError, match=message) as e:
        build_cohort(make(synth, out))
    assert "\n" not in str(e.value) and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_a_preset_the_data_cannot_fill_names_the_condition(synth, tmp_path):
    raw = pd.read_csv(synth / "chexpert/CheXpert-v1.0-small/train.csv", dtype=str, keep_default_na=False)
    raw.loc[raw["Pneumonia"] == "1.0", "Pneumonia"] = "0.0"
    raw.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(CxrfairError, match=r"condition Pneumonia has 0 positive and \d+ negative images in train"):
        build_cohort(CohortConfig.from_preset("chexpert-6", out=tmp_path / "c", metadata=tmp_path / "train.csv"))
    assert not (tmp_path / "c").exists()
