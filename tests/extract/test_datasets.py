"""Dataset readers on small files in the real datasets' layouts: standard columns, joins, bad input.

Every file here is written in the test (synthetic rows, real column names and codes). The MIMIC
join is checked against a plain per-row reference written below.
"""

from __future__ import annotations

import gzip
import re

import numpy as np
import pandas as pd
import pytest

from cxrfair.errors import CxrfairError
from cxrfair.extract.datasets import OPTIONS, PATH_OPTIONS, READERS, Option, Sources, read_dataset
from cxrfair.extract.datasets import chexpert, mimic, races
from cxrfair.extract.datasets.nih import vendored_metadata

# --- registry -----------------------------------------------------------------------------------


def test_registry_lists_the_four_readers_and_refuses_foreign_options(tmp_path):
    assert list(READERS) == ["nih", "chexpert", "mimic", "csv"]
    for module in READERS.values():
        assert callable(module.read) and module.METADATA.key == "metadata" and isinstance(module.OPTIONS, tuple)
        assert all(isinstance(o, Option) for o in module.OPTIONS)
    with pytest.raises(CxrfairError, match=r"--drains: not used by --dataset chexpert \(it is for --dataset nih\)"):
        read_dataset("chexpert", Sources(metadata=tmp_path / "x.csv", drains=tmp_path / "d.csv"))
    with pytest.raises(CxrfairError, match="--dataset vindr: unknown dataset; known: nih, chexpert, mimic, csv"):
        read_dataset("vindr", Sources())


def test_a_readers_declaration_is_its_cli_options_config_keys_and_hashed_files(tmp_path):
    """One declaration per reader: --dataset's choices, the reader options of `cohort build`, the
    [cohort] keys, CohortConfig's options and the files the pipeline hashes all come from it."""
    import click

    from cxrfair.config import CohortSettings, config_from_dict
    from cxrfair.extract.cohort import CohortConfig
    from cxrfair.extract.cohort_cli import build

    assert list(OPTIONS) == ["official_split", "drains", "demographics", "race_map", "mimic_iv", "reports", "columns", "labels"]
    assert PATH_OPTIONS == ("official_split", "drains", "demographics", "race_map", "mimic_iv", "reports")
    params = {p.name: p for p in build.get_params(click.Context(build))}
    assert set(OPTIONS) <= set(params) and list(params["dataset"].type.choices) == list(READERS)
    assert all(params[k].opts == [o.flag] for k, o in OPTIONS.items())
    fields = [f.name for f in __import__("dataclasses").fields(CohortSettings)]
    assert fields[:3] == ["dataset", "metadata", "images"] and fields[3:3 + len(OPTIONS)] == list(OPTIONS)
    cfg = config_from_dict({"models": ["tiny-clip"], "cohort": {"columns": {"path": "P"}, "labels": ["A"], "drains": "d.csv"}},
                           base=tmp_path)
    assert cfg.cohort.columns == {"path": "P"} and cfg.cohort.labels == ("A",) and cfg.cohort.drains == tmp_path / "d.csv"
    c = CohortConfig.from_preset("all-multilabel", out=tmp_path / "o", dataset="csv", columns="path=P,sex=S",
                                 labels=("A",), race_map=str(tmp_path / "m.csv"))
    assert c.options == {"columns": (("path", "P"), ("sex", "S")), "labels": ("A",), "race_map": tmp_path / "m.csv"}
    assert c.sources().get("columns") == (("path", "P"), ("sex", "S")) and c.sources().get("drains") is None
    mimic = CohortConfig.from_preset("mimic-sourget", out=tmp_path / "o", metadata=tmp_path / "cxr", mimic_iv=tmp_path / "iv")
    assert [(k, p.name, files) for k, p, files in mimic.source_files()] == [
        ("metadata", "cxr", ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-split.csv")),
        ("mimic_iv", "iv", ("hosp/patients.csv", "hosp/admissions.csv"))]
    nih = CohortConfig.from_preset("nih-6x200", out=tmp_path / "o")
    assert [k for k, _, _ in nih.source_files()] == ["metadata"] and nih.source_files()[0][1].is_file()  # vendored
    with pytest.raises(CxrfairError, match="scanner: not an option of any dataset reader"):
        CohortConfig(out=tmp_path / "o", options={"scanner": "x"})
    with pytest.raises(CxrfairError, match="--columns: 'path' is not key=COLUMN"):
        CohortConfig.from_preset("all-multilabel", out=tmp_path / "o", dataset="csv", columns="path")


# --- NIH ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nih_head(tmp_path_factory):
    """The first 400 real metadata rows, with official lists and drains over them."""
    root = tmp_path_factory.mktemp("nih")
    rows = pd.read_csv(vendored_metadata(), nrows=400, dtype=str)
    rows.to_csv(root / "Data_Entry_2017_v2020.csv", index=False)
    ids = rows["Image Index"].tolist()
    (root / "test_list.txt").write_text("\n".join(ids[:100]) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(ids[100:390]) + "\n")  # 10 images in neither list
    pd.DataFrame({"Image Index": ids[:50], "Drain": [1, 0] * 25}).to_csv(root / "neatx.csv")  # leading index column
    return root, rows


def test_nih_standard_table_with_official_split_and_drains(nih_head):
    root, rows = nih_head
    data = read_dataset("nih", Sources(metadata=root / "Data_Entry_2017_v2020.csv", official_split=root,
                                       drains=root / "neatx.csv"))
    t = data.table
    assert t["image_id"].tolist() == rows["Image Index"].tolist()
    assert (t["path"] == t["image_id"]).all() and t["frontal"].all()
    assert t["official_split"].tolist() == ["test"] * 100 + ["train"] * 290 + [""] * 10
    assert t["drain"].iloc[:4].tolist() == [1.0, 0.0, 1.0, 0.0] and t["drain"].iloc[50:].isna().all()
    # One 1/0 column per finding named in Finding Labels; `label` only for single-label images.
    for i in range(len(rows)):
        names = set(rows["Finding Labels"].iloc[i].split("|"))
        assert {f for f in data.findings if t[f].iloc[i] == 1} == names
        assert t["label"].iloc[i] == (rows["Finding Labels"].iloc[i] if len(names) == 1 else "")
    assert [r for r, _ in data.files] == ["metadata", "official_split", "official_split", "drains"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda r: ((r / "test_list.txt").write_text("00000001_000.png\n"),
                    (r / "train_val_list.txt").write_text("00000001_000.png\n")), "in both test_list.txt and train_val_list.txt"),
        (lambda r: (r / "test_list.txt").unlink(), "test_list.txt: file not found"),
        (lambda r: pd.DataFrame({"Image Index": ["a.png"], "Drain": ["yes"]}).to_csv(r / "neatx.csv", index=False),
         r"drains .*neatx.csv: column 'Drain' has a value 'yes' outside \{1, 0, blank\} in 1 row, first on line 2"),
        (lambda r: pd.DataFrame({"Image": ["a.png"], "Drain": [1]}).to_csv(r / "neatx.csv", index=False),
         r"missing column\(s\) 'Image Index'"),
    ],
)
def test_nih_bad_lists_and_drains(nih_head, tmp_path, setup, message):
    root, rows = nih_head
    rows.to_csv(tmp_path / "meta.csv", index=False)
    for name in ("test_list.txt", "train_val_list.txt", "neatx.csv"):
        (tmp_path / name).write_bytes((root / name).read_bytes())
    setup(tmp_path)
    with pytest.raises(CxrfairError, match=message):
        read_dataset("nih", Sources(metadata=tmp_path / "meta.csv", official_split=tmp_path, drains=tmp_path / "neatx.csv"))


# --- CheXpert -----------------------------------------------------------------------------------

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *chexpert.FINDINGS]


def chexpert_rows() -> pd.DataFrame:
    """Five images of three patients in train.csv's layout (floats as the real file writes them)."""
    rows = [
        ["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Female", "68", "Frontal", "AP"],
        ["CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg", "Male", "87", "Frontal", "PA"],
        ["CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg", "Male", "87", "Lateral", ""],
        ["CheXpert-v1.0-small/train/patient00013/study1/view1_frontal.jpg", "Unknown", "0", "Frontal", "AP"],
        ["CheXpert-v1.0-small/train/patient00013/study3/view1_frontal.jpg", "Female", "41", "Frontal", "LL"],
    ]
    codes = ["1.0", "", "0.0", "-1.0", "", "1.0", "0.0", "", "-1.0", "1.0", "", "", "0.0", "1.0"]
    return pd.DataFrame([r + codes[i:] + codes[:i] for i, r in enumerate(rows)], columns=CHEXPERT_HEADER)


def test_chexpert_standard_table(tmp_path):
    raw = chexpert_rows()
    raw.to_csv(tmp_path / "train.csv", index=False)
    data = read_dataset("chexpert", Sources(metadata=tmp_path / "train.csv"))
    t = data.table
    assert data.findings == chexpert.FINDINGS
    assert t["image_id"].iloc[0] == "train/patient00001/study1/view1_frontal.jpg"
    assert t["path"].tolist() == raw["Path"].tolist()
    assert t["patient_id"].tolist() == [1, 2, 2, 13, 13]
    assert t["sex"].tolist() == ["F", "M", "M", "", "F"]
    assert t["age"].tolist() == [68, 87, 87, 0, 41]
    assert t["frontal"].tolist() == [True, True, False, True, True]
    assert t["view"].tolist() == ["AP", "PA", "LATERAL", "AP", "LL"]
    expect = raw[list(chexpert.FINDINGS)].replace("", np.nan).astype(float).to_numpy()
    np.testing.assert_array_equal(t[list(chexpert.FINDINGS)].to_numpy(dtype=float), expect)
    assert "race" not in t.columns


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("Pneumonia", "2.0", r"column 'Pneumonia' has a value '2.0' outside \{1, 0, -1, blank\} in 1 row, first on line 4"),
        ("Age", "sixty", r"column 'Age' has an age that cannot be parsed 'sixty'"),
        ("Age", "61.5", r"column 'Age' has an age that cannot be parsed '61.5'"),
        ("Sex", "X", r"column 'Sex' has an unknown sex code 'X'"),
        ("Frontal/Lateral", "Oblique", r"column 'Frontal/Lateral' has a value 'Oblique'"),
        ("Path", "CheXpert-v1.0-small/train/p1/study1/view1_frontal.jpg", "without one patientNNNNN folder"),
    ],
)
def test_chexpert_bad_values_name_file_column_value_and_line(tmp_path, column, value, message):
    raw = chexpert_rows()
    raw.loc[2, column] = value
    raw.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(CxrfairError, match=message) as e:
        read_dataset("chexpert", Sources(metadata=tmp_path / "train.csv"))
    assert str(e.value).startswith(f"metadata {tmp_path / 'train.csv'}: ")
    assert "\n" not in str(e.value)


def test_chexpert_missing_column_and_file(tmp_path):
    chexpert_rows().drop(columns=["Frontal/Lateral"]).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(CxrfairError, match=r"missing column\(s\) 'Frontal/Lateral'"):
        read_dataset("chexpert", Sources(metadata=tmp_path / "train.csv"))
    with pytest.raises(CxrfairError, match="metadata .*nope.csv: file not found"):
        read_dataset("chexpert", Sources(metadata=tmp_path / "nope.csv"))


def write_demographics(path, races_by_patient: dict[str, list[str]]) -> None:
    rows = [(p, "Female", 50, r, "Unknown") for p, rs in races_by_patient.items() for r in rs]
    pd.DataFrame(rows, columns=["PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE", "ETHNICITY"]).to_csv(path, index=False)


def test_chexpert_demographics_map_race(tmp_path):
    chexpert_rows().to_csv(tmp_path / "train.csv", index=False)
    write_demographics(tmp_path / "demo.csv", {"patient00001": ["White, Hispanic"], "patient00002": ["Asian - Historical Conv"],
                                               "patient00013": ["Black or African American", "Other"]})
    data = read_dataset("chexpert", Sources(metadata=tmp_path / "train.csv", demographics=tmp_path / "demo.csv"))
    assert data.table["race"].tolist() == ["White", "Asian", "Asian", "", ""]  # patient 13's rows disagree
    assert data.notes == {"race_conflict_images": 2, "race_missing_images": 0}


def test_chexpert_unknown_race_code_and_xlsx_without_openpyxl(tmp_path, monkeypatch):
    chexpert_rows().to_csv(tmp_path / "train.csv", index=False)
    write_demographics(tmp_path / "demo.csv", {"patient00001": ["Martian"]})
    with pytest.raises(CxrfairError, match=r"demographics .*demo.csv: column 'PRIMARY_RACE' has an unknown race code "
                                           r"'Martian' in 1 row, first on line 2 \(patient patient00001\).*--race-map"):
        read_dataset("chexpert", Sources(metadata=tmp_path / "train.csv", demographics=tmp_path / "demo.csv"))
    (tmp_path / "map.csv").write_text("code,group\nMartian,other\n")
    data = read_dataset("chexpert", Sources(metadata=tmp_path / "train.csv", demographics=tmp_path / "demo.csv",
                                            race_map=tmp_path / "map.csv"))
    assert data.table["race"].iloc[0] == "other"
    (tmp_path / "demo.xlsx").write_bytes(b"PK\x03\x04 not really")
    monkeypatch.setitem(__import__("sys").modules, "openpyxl", None)  # as if not installed
    with pytest.raises(CxrfairError, match=r"demo.xlsx: reading .xlsx needs openpyxl; pip install 'cxrfair\[xlsx\]'"):
        read_dataset("chexpert", Sources(metadata=tmp_path / "train.csv", demographics=tmp_path / "demo.xlsx"))


def test_chexpert_demographics_xlsx(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    chexpert_rows().to_csv(tmp_path / "train.csv", index=False)
    book = openpyxl.Workbook()
    book.active.append(["PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE", "ETHNICITY"])
    book.active.append(["patient00002", "Male", 87, "Black, non-Hispanic", "Non-Hispanic/Non-Latino"])
    book.save(tmp_path / "CHEXPERT DEMO.xlsx")
    data = read_dataset("chexpert", Sources(metadata=tmp_path / "train.csv", demographics=tmp_path / "CHEXPERT DEMO.xlsx"))
    assert data.table["race"].tolist() == ["", "Black", "Black", "", ""]


def test_race_maps_cover_every_published_code():
    # The 33 race strings of MIMIC-IV 2.2 admissions, the 8 ethnicity strings of MIMIC-IV 1.0 and the
    # 24 PRIMARY_RACE strings of CHEXPERT DEMO.xlsx (as listed by the datasets' users).
    mimic_codes = ["WHITE", "WHITE - OTHER EUROPEAN", "WHITE - EASTERN EUROPEAN", "WHITE - RUSSIAN", "WHITE - BRAZILIAN",
                   "BLACK/AFRICAN AMERICAN", "BLACK/AFRICAN", "BLACK/CAPE VERDEAN", "BLACK/CARIBBEAN ISLAND", "ASIAN",
                   "ASIAN - CHINESE", "ASIAN - SOUTH EAST ASIAN", "ASIAN - ASIAN INDIAN", "ASIAN - KOREAN",
                   "HISPANIC OR LATINO", "HISPANIC/LATINO - PUERTO RICAN", "HISPANIC/LATINO - DOMINICAN",
                   "HISPANIC/LATINO - GUATEMALAN", "HISPANIC/LATINO - SALVADORAN", "HISPANIC/LATINO - COLUMBIAN",
                   "HISPANIC/LATINO - MEXICAN", "HISPANIC/LATINO - HONDURAN", "HISPANIC/LATINO - CUBAN",
                   "HISPANIC/LATINO - CENTRAL AMERICAN", "SOUTH AMERICAN", "PORTUGUESE", "AMERICAN INDIAN/ALASKA NATIVE",
                   "NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER", "MULTIPLE RACE/ETHNICITY", "OTHER", "UNKNOWN",
                   "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER", "HISPANIC/LATINO"]
    chexpert_codes = ["Other", "White, non-Hispanic", "Black or African American", "White", "Native Hawaiian or Other Pacific Islander",
                      "Asian", "Asian, non-Hispanic", "Unknown", "Native American, non-Hispanic", "Race and Ethnicity Unknown",
                      "White, Hispanic", "Other, Hispanic", "Black, non-Hispanic", "American Indian or Alaska Native",
                      "Patient Refused", "Other, non-Hispanic", "Pacific Islander, Hispanic", "Black, Hispanic",
                      "Pacific Islander, non-Hispanic", "White or Caucasian", "Asian, Hispanic", "Native American, Hispanic",
                      "Asian - Historical Conv"]
    for codes, mapping in ((mimic_codes, races.MIMIC_IV), (chexpert_codes, races.CHEXPERT)):
        assert set(codes) <= set(mapping)
        for code in codes:  # a code of White, Black or Asian names that group; the others name none
            named = [g for g in ("White", "Black", "Asian") if re.search(rf"\b{g}\b", code, re.IGNORECASE)]
            assert named == ([mapping[code]] if mapping[code] in named or named else [])
            assert mapping[code] in races.GROUPS and (mapping[code] in ("other", "unknown")) == (not named)


def test_patient_groups_ignore_unknown_and_drop_conflicts():
    per, conflict = races.patient_groups(np.array([1, 1, 2, 2, 3, 4]), np.array(["White", "", "White", "other", "", "Asian"]))
    assert per.to_dict() == {1: "White", 4: "Asian"} and conflict.tolist() == [2]


# --- MIMIC --------------------------------------------------------------------------------------


def gz(path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        frame.to_csv(f, index=False)


@pytest.fixture()
def mimic_files(tmp_path):
    """Seven images of four patients; patient 13 is not in patients.csv; 12's admissions disagree."""
    cxr, hosp = tmp_path / "mimic-cxr-jpg" / "2.0.0", tmp_path / "mimiciv" / "2.2" / "hosp"
    meta = pd.DataFrame({
        "dicom_id": ["d1", "d2", "d3", "d4", "d5", "d6", "d7"],
        "subject_id": [10000032, 10000032, 10000032, 11000012, 11000012, 12000013, 15000001],
        "study_id": [50000001, 50000001, 50000002, 50000003, 50000004, 50000005, 50000006],
        "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
        "ViewPosition": ["PA", "LATERAL", "AP", "AP", "LL", "PA", ""],
        "StudyDate": [21800506, 21800506, 21830101, 21550412, 21560101, 21900101, 21120303], "StudyTime": 1.0})
    labels = pd.DataFrame({"subject_id": [10000032, 10000032, 11000012, 11000012, 12000013],
                           "study_id": [50000001, 50000002, 50000003, 50000004, 50000005]})  # no row for 50000006
    for i, f in enumerate(mimic.FINDINGS):
        labels[f] = ["1.0", "", "-1.0", "0.0", ""][i % 5:] + ["1.0", "", "-1.0", "0.0", ""][: i % 5]
    split = pd.DataFrame({"dicom_id": meta["dicom_id"], "study_id": meta["study_id"], "subject_id": meta["subject_id"],
                          "split": ["train", "train", "test", "validate", "validate", "test", "train"]})
    patients = pd.DataFrame({"subject_id": [10000032, 11000012, 15000001], "gender": ["F", "M", "M"],
                             "anchor_age": [52, 91, 30], "anchor_year": [2180, 2154, 2112],
                             "anchor_year_group": "2014 - 2016", "dod": ""})
    admissions = pd.DataFrame({"subject_id": [10000032, 10000032, 11000012, 11000012, 15000001],
                               "hadm_id": [1, 2, 3, 4, 5], "race": ["WHITE", "UNKNOWN", "ASIAN", "BLACK/AFRICAN", "OTHER"]})
    for name, frame in (("metadata", meta), ("chexpert", labels), ("split", split)):
        gz(cxr / f"mimic-cxr-2.0.0-{name}.csv.gz", frame)
    gz(hosp / "patients.csv.gz", patients)
    gz(hosp / "admissions.csv.gz", admissions)
    return cxr, tmp_path / "mimiciv" / "2.2", dict(meta=meta, labels=labels, split=split, patients=patients)


def test_mimic_join_matches_a_row_by_row_reference(mimic_files):
    cxr, iv, raw = mimic_files
    data = read_dataset("mimic", Sources(metadata=cxr, mimic_iv=iv))
    t = data.table.set_index("image_id")
    assert data.notes["no_label_row_images"] == 1 and "d7" not in t.index
    pats = raw["patients"].set_index("subject_id")
    for _, m in raw["meta"][raw["meta"]["dicom_id"] != "d7"].iterrows():
        row = t.loc[m["dicom_id"]]
        assert row["path"] == f"files/p{str(m['subject_id'])[:2]}/p{m['subject_id']}/s{m['study_id']}/{m['dicom_id']}.jpg"
        assert row["frontal"] == (m["ViewPosition"] in ("AP", "PA"))
        assert row["study_date"] == f"{str(m['StudyDate'])[:4]}-{str(m['StudyDate'])[4:6]}-{str(m['StudyDate'])[6:]}"
        if m["subject_id"] in pats.index:
            p = pats.loc[m["subject_id"]]
            assert row["sex"] == p["gender"]
            assert row["age"] == p["anchor_age"] + (m["StudyDate"] // 10000 - p["anchor_year"])
        else:
            assert row["sex"] == "" and np.isnan(row["age"])
        lab = raw["labels"].set_index("study_id").loc[m["study_id"]]
        for f in mimic.FINDINGS:
            assert (np.isnan(row[f]) and lab[f] == "") or row[f] == float(lab[f])
    assert t["race"].to_dict() == {"d1": "White", "d2": "White", "d3": "White", "d4": "", "d5": "", "d6": ""}
    assert data.notes["race_conflict_images"] == 2 and data.notes["race_missing_images"] == 1
    # Patient 11000012 is in validate twice and 10000032 in train and test: its train images go.
    assert t["official_split"].to_dict() == {"d1": "", "d2": "", "d3": "test", "d4": "val", "d5": "val", "d6": "test"}
    assert data.notes["official_split_overlap_images"] == 2


def test_mimic_older_release_ethnicity_column(mimic_files):
    cxr, iv, _ = mimic_files
    adm = pd.DataFrame({"subject_id": [10000032], "hadm_id": [1], "ethnicity": ["BLACK/AFRICAN AMERICAN"]})
    gz(iv / "hosp" / "admissions.csv.gz", adm)
    assert read_dataset("mimic", Sources(metadata=cxr, mimic_iv=iv)).table["race"].iloc[0] == "Black"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda cxr, iv: gz(iv / "hosp" / "admissions.csv.gz", pd.DataFrame({"subject_id": [1], "race": ["KLINGON"]})),
         r"admissions .*admissions.csv.gz: column 'race' has an unknown race code 'KLINGON' in 1 row, first on line 2"),
        (lambda cxr, iv: (cxr / "mimic-cxr-2.0.0-split.csv.gz").unlink(), r"missing mimic-cxr-2.0.0-split.csv.gz"),
        (lambda cxr, iv: (iv / "hosp" / "patients.csv.gz").unlink(), r"--mimic-iv .*: no hosp/patients.csv.gz there"),
        (lambda cxr, iv: gz(iv / "hosp" / "patients.csv.gz", pd.DataFrame({"subject_id": [1], "gender": ["F"],
                                                                          "anchor_age": ["fifty"], "anchor_year": [2100]})),
         r"patients .*: column 'anchor_age' has an age that cannot be parsed 'fifty'"),
        (lambda cxr, iv: gz(cxr / "mimic-cxr-2.0.0-chexpert.csv.gz", pd.DataFrame({"subject_id": [1], "study_id": [50000001],
                                                                                    "Edema": ["yes"]})),
         r"labels .*chexpert.csv.gz: column 'Edema' has a value 'yes' outside \{1, 0, -1, blank\}.*\(study 50000001\)"),
    ],
)
def test_mimic_bad_input(mimic_files, edit, message):
    cxr, iv, _ = mimic_files
    edit(cxr, iv)
    with pytest.raises(CxrfairError, match=message):
        read_dataset("mimic", Sources(metadata=cxr, mimic_iv=iv))


def test_mimic_needs_mimic_iv(mimic_files):
    with pytest.raises(CxrfairError, match="--mimic-iv: not given; pass --mimic-iv .* no sex or age"):
        read_dataset("mimic", Sources(metadata=mimic_files[0] / "mimic-cxr-2.0.0-metadata.csv.gz"))


# --- csv ----------------------------------------------------------------------------------------


def hospital_export(path) -> pd.DataFrame:
    raw = pd.DataFrame({"file": ["a/1.png", "a/2.png", "b/3.png", "b/4.png"], "pid": ["P-b", "P-a", "P-b", "P-c"],
                        "gender": ["m", "F", "male", ""], "years": ["58", "071Y", "58.0", "33"],
                        "proj": ["PA", "LATERAL", "ap", "Frontal"], "scanner": ["X", "Y", "X", "Y"],
                        "finding": ["Edema", "", "Effusion", "Edema"], "PE": ["1", "-1.0", "", "0"]})
    raw.to_csv(path, index=False)
    return raw


def test_csv_reader_maps_columns(tmp_path):
    hospital_export(tmp_path / "export.csv")
    data = read_dataset("csv", Sources(metadata=tmp_path / "export.csv", labels=("Pleural Effusion=PE",), columns=(
        ("path", "file"), ("patient", "pid"), ("sex", "gender"), ("age", "years"), ("view", "proj"), ("scanner", "scanner"))))
    t = data.table
    assert t["image_id"].tolist() == t["path"].tolist() == ["a/1.png", "a/2.png", "b/3.png", "b/4.png"]
    assert t["patient_id"].tolist() == [2, 1, 2, 3] and t["patient_key"].tolist() == ["P-b", "P-a", "P-b", "P-c"]
    assert t["sex"].tolist() == ["M", "F", "M", ""] and t["age"].tolist() == [58, 71, 58, 33]
    assert t["frontal"].tolist() == [True, False, True, True] and t["scanner"].tolist() == ["X", "Y", "X", "Y"]
    assert data.findings == ("Pleural Effusion",)
    np.testing.assert_array_equal(t["Pleural Effusion"].to_numpy(), [1, -1, np.nan, 0])


def test_csv_label_column_gives_single_labels_and_one_hot_findings(tmp_path):
    hospital_export(tmp_path / "export.csv")
    data = read_dataset("csv", Sources(metadata=tmp_path / "export.csv", columns=(
        ("path", "file"), ("patient", "pid"), ("sex", "gender"), ("age", "years"), ("label", "finding"))))
    assert data.findings == ("Edema", "Effusion") and data.table["label"].tolist() == ["Edema", "", "Effusion", "Edema"]
    assert data.table["Edema"].tolist() == [1, 0, 0, 1] and data.table["frontal"].all()


@pytest.mark.parametrize(
    "columns, labels, message",
    [
        ((("path", "file"), ("patient", "pid")), (), r"--columns: missing sex=COLUMN, age=COLUMN"),
        ((("path", "file"), ("patient", "pid"), ("sex", "gender"), ("age", "AGE")), (), r"missing column\(s\) 'AGE'"),
        ((("path", "file"), ("patient", "pid"), ("sex", "gender"), ("age", "years")), ("scanner",),
         r"column 'scanner' has a value 'X' outside \{1, 0, -1, blank\} in 4 rows, first on line 2 \(image a/1.png\)"),
        ((("path", "file"), ("patient", "pid"), ("sex", "gender"), ("age", "years"), ("split", "scanner")), (),
         r"column 'scanner' has a split 'X'"),
        ((("path", "file"), ("patient", "pid"), ("sex", "gender"), ("age", "years"), ("drain", "PE")), (),
         r"--columns: 'drain' cannot name an extra attribute"),
    ],
)
def test_csv_bad_mapping(tmp_path, columns, labels, message):
    hospital_export(tmp_path / "export.csv")
    with pytest.raises(CxrfairError, match=message):
        read_dataset("csv", Sources(metadata=tmp_path / "export.csv", columns=columns, labels=labels))


def test_chexpert_demographics_matching_no_patient_is_an_error(tmp_path):
    """Else race would be dropped from every image while the preset still says chexpert-6."""
    chexpert_rows().to_csv(tmp_path / "train.csv", index=False)
    write_demographics(tmp_path / "demo.csv", {"patient90001": ["White"], "patient90002": ["Asian"]})
    with pytest.raises(CxrfairError, match=r"demographics .*demo.csv: column 'PATIENT' matches no patient of metadata "
                                           r".*train.csv \(its first is 'patient90001', the metadata's paths hold "
                                           r"patient00001, ...\); pass the demographics file"):
        read_dataset("chexpert", Sources(metadata=tmp_path / "train.csv", demographics=tmp_path / "demo.csv"))


def test_nih_drains_matching_no_image_name_the_file(nih_head, tmp_path):
    """Not "the preset needs --drains" when --drains was given: the file's ids match none of the images."""
    root, _ = nih_head
    pd.DataFrame({"Image Index": ["99999999_000.png", "99999999_001.png"], "Drain": [1, 0]}).to_csv(
        tmp_path / "neatx.csv", index=False)
    with pytest.raises(CxrfairError, match=r"drains .*neatx.csv: column 'Image Index' matches no image of metadata "
                                           r".*Data_Entry_2017_v2020.csv \(its first is '99999999_000.png', the "
                                           r"metadata's '00000001_000.png'\); pass NEATX"):
        read_dataset("nih", Sources(metadata=root / "Data_Entry_2017_v2020.csv", drains=tmp_path / "neatx.csv"))
