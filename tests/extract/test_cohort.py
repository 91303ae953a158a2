"""The NIH 6x200 cohort on the real (vendored) metadata, and the pieces it is built from."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cxrfair.extract.cohort_split as split_module
from cxrfair.errors import CxrfairError
from cxrfair.io import sha256_file
from cxrfair.extract.cohort import (
    COLUMNS,
    GROUPS,
    SPLITS,
    CohortConfig,
    build_cohort,
    cell_quotas,
    cohort_hash,
    find_images,
    load_cohort,
    read_nih_metadata,
    split_cohort,
    split_targets,
    vendored_metadata,
)

SIX = ["Cardiomegaly", "Effusion", "Atelectasis", "Pneumothorax", "Edema", "Consolidation"]
# (cohort hash, SHA-256 of cohort.csv) of nih-6x200 on the vendored metadata, computed with the code
# before the dataset seam (commit c1960bf): moving NIH behind the reader must not change a byte.
PINNED = {0: ("4144cfb57eddfebf5898c80234639552f2964cdcff72be5b1f4e95a43157c4c4",
              "1ab7b57bd6f5f4dfb168eb0c470d9f3049b2f89b46e03a4d3ffaceaec3d588fa"),
          1: ("90f6097146f9ee47024c0ed073b323d9a293b84599c3d92a20e4d71cdc66c9cc",
              "dc099ccf8e0cbc6086973694ab49987d9e0377048396258af76da23754cc279e")}


@pytest.fixture(scope="module")
def nih() -> pd.DataFrame:
    """The real metadata as published (NIH column names)."""
    return pd.read_csv(vendored_metadata())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The preset cohort, seed 0, built twice into two folders, and once with seed 1."""
    root = tmp_path_factory.mktemp("cohorts")
    a = build_cohort(CohortConfig.from_preset(out=root / "a", seed=0))
    b = build_cohort(CohortConfig.from_preset(out=root / "b", seed=0))
    c = build_cohort(CohortConfig.from_preset(out=root / "c", seed=1))
    return a, b, c


def cell_counts(table: pd.DataFrame) -> pd.Series:
    return table.groupby(["label", "age_group", "sex"]).size()


# --- the preset on the real metadata ------------------------------------------------------------


def test_preset_has_1200_images_200_per_disease(built):
    table = built[0].table
    assert len(table) == 1200
    assert built[0].classes == SIX
    assert table["label"].value_counts().to_dict() == {d: 200 for d in SIX}


def test_every_cell_has_50_except_old_edema_47_female_53_male(built):
    counts = cell_counts(built[0].table)
    assert counts[("Edema", "old", "F")] == 47
    assert counts[("Edema", "old", "M")] == 53
    rest = counts.drop([("Edema", "old", "F"), ("Edema", "old", "M")])
    assert len(rest) == 22 and (rest == 50).all()


def test_splits_are_exact_overall_and_per_disease(built):
    table = built[0].table
    assert table["split"].value_counts().to_dict() == {"train": 840, "val": 120, "test": 240}
    per = table.groupby(["label", "split"]).size().unstack()
    assert (per["train"] == 140).all() and (per["val"] == 20).all() and (per["test"] == 40).all()


@pytest.mark.parametrize("which", [0, 2])
def test_no_patient_in_two_splits(built, which):
    table = built[which].table
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    # The real data does put patients in several cells, so the check above is not vacuous.
    assert table.groupby("patient_id").size().max() > 1


def test_each_cell_is_as_close_to_7_1_2_as_possible(built):
    for cohort in built:
        t = cohort.table
        counts = t.groupby(["label", "age_group", "sex", "split"]).size().unstack(fill_value=0)[list(SPLITS)]
        ideal = counts.sum(axis=1).to_numpy()[:, None] * np.array([0.7, 0.1, 0.2])
        assert np.abs(counts.to_numpy() - ideal).max() < 1


def test_rows_are_single_label_images_with_their_metadata(built, nih):
    t = built[0].table.merge(nih, left_on="image_id", right_on="Image Index", validate="1:1")
    assert (t["Finding Labels"] == t["label"]).all()
    assert (t["Patient ID"] == t["patient_id"]).all()
    assert (t["Patient Age"] == t["age"]).all()
    assert (t["Patient Gender"] == t["sex"]).all()
    assert (t["age_group"] == np.where(t["age"] >= 60, "old", "young")).all()
    assert t["image_id"].is_unique


def test_columns_and_row_order_follow_the_contract(built):
    t = built[0].table
    assert list(t.columns[: len(COLUMNS)]) == COLUMNS
    key = pd.DataFrame({"s": t["split"].map(SPLITS.index), "l": t["label"].map(SIX.index), "i": t["image_id"]})
    assert key.equals(key.sort_values(["s", "l", "i"]))
    assert (t["path"] == t["image_id"]).all()  # built without --images


def test_same_seed_same_bytes_other_seed_differs(built):
    a, b, c = built
    assert (a.folder / "cohort.csv").read_bytes() == (b.folder / "cohort.csv").read_bytes()
    assert a.hash == b.hash
    assert (a.folder / "cohort.csv").read_bytes() != (c.folder / "cohort.csv").read_bytes()
    assert a.hash != c.hash


@pytest.mark.parametrize("which, seed", [(0, 0), (2, 1)])
def test_nih_6x200_bytes_and_hash_are_pinned(built, which, seed):
    cohort = built[which]
    assert (cohort.hash, sha256_file(cohort.folder / "cohort.csv")) == PINNED[seed]
    assert load_cohort(cohort.folder).hash == PINNED[seed][0]


def test_cohort_json_fields(built):
    meta = json.loads((built[0].folder / "cohort.json").read_text())
    for key in ("format", "version", "preset", "classes", "parameters", "seed", "images_root",
                "metadata_source", "counts", "hash"):
        assert key in meta
    assert meta["format"] == "cxrfair-cohort" and meta["version"] == 2
    assert meta["preset"] == "nih-6x200" and meta["seed"] == 0 and meta["images_root"] is None
    assert meta["counts"]["split"] == {"train": 840, "val": 120, "test": 240}
    assert meta["counts"]["label_group_split"]["Edema"]["old_F"] == {"train": 33, "val": 5, "test": 9}
    assert meta["hash"] == cohort_hash(built[0].table, SIX)


def test_load_cohort_round_trip(built):
    a = built[0]
    back = load_cohort(a.folder)
    pd.testing.assert_frame_equal(back.table, a.table)
    assert back.classes == SIX and back.hash == a.hash and back.folder == a.folder
    paths = back.image_paths("/data/nih")
    assert paths[0].is_absolute() and paths[0].name == back.table["image_id"].iloc[0]
    with pytest.raises(CxrfairError, match="without --images"):
        back.image_paths()


def test_load_cohort_rejects_edited_or_foreign_folders(built, tmp_path):
    folder = tmp_path / "edited"
    shutil.copytree(built[0].folder, folder)
    csv = folder / "cohort.csv"
    csv.write_text(csv.read_text().replace(",train,", ",test,", 1))
    with pytest.raises(CxrfairError, match="hash"):
        load_cohort(folder)
    (folder / "cohort.json").write_text('{"format": "something-else"}')
    with pytest.raises(CxrfairError, match="not a cxrfair cohort"):
        load_cohort(folder)
    with pytest.raises(CxrfairError, match="cohort.json: not found"):
        load_cohort(tmp_path / "nowhere")


def test_hash_ignores_paths_but_not_content(built):
    t = built[0].table
    assert cohort_hash(t.assign(path="elsewhere/" + t["path"]), SIX) == built[0].hash
    assert cohort_hash(t.assign(age=t["age"] + 1), SIX) != built[0].hash
    assert cohort_hash(t, SIX[::-1]) != built[0].hash


def test_custom_diseases_and_per_group(tmp_path):
    c = build_cohort(CohortConfig.from_preset(out=tmp_path / "c", diseases="edema, Effusion", per_group=10))
    assert c.classes == ["Edema", "Effusion"] and c.meta["preset"] == "custom"
    assert len(c.table) == 80 and (cell_counts(c.table) == 10).all()
    per = c.table.groupby(["label", "split"]).size().unstack()
    assert (per["train"] == 28).all() and (per["val"] == 4).all() and (per["test"] == 8).all()
    assert c.table.groupby("patient_id")["split"].nunique().max() == 1


def test_custom_split_ratio_follows_per_disease(tmp_path):
    c = build_cohort(CohortConfig.from_preset(out=tmp_path / "c", diseases="Edema", per_group=7, split="6,2,2"))
    # 28 images at 6:2:2 = 16.8/5.6/5.6 -> largest remainder 17/6/5.
    assert c.table["split"].value_counts().to_dict() == {"train": 17, "val": 6, "test": 5}
    assert c.meta["parameters"]["split"] == [0.6, 0.2, 0.2]


# --- reading metadata ---------------------------------------------------------------------------


def write_2017_style(rows: pd.DataFrame, path) -> None:
    """The 2017 release's layout: the same columns plus a trailing empty one (every line ends in ',')."""
    text = rows.to_csv(index=False, lineterminator="\n")
    path.write_text("".join(line + ",\n" for line in text.splitlines()))


def test_2017_layout_gz_and_plain_read_the_same(nih, tmp_path):
    rows = nih.head(500)
    write_2017_style(rows, tmp_path / "Data_Entry_2017.csv")
    with gzip.open(tmp_path / "Data_Entry_2017.csv.gz", "wt") as f:
        f.write((tmp_path / "Data_Entry_2017.csv").read_text())
    rows.to_csv(tmp_path / "v2020.csv", index=False)
    plain = read_nih_metadata(tmp_path / "Data_Entry_2017.csv")
    assert not any(c.startswith("Unnamed") for c in plain.columns)
    pd.testing.assert_frame_equal(plain, read_nih_metadata(tmp_path / "Data_Entry_2017.csv.gz"))
    pd.testing.assert_frame_equal(plain, read_nih_metadata(tmp_path / "v2020.csv"))
    assert plain["age"].dtype == np.int64 and set(plain["sex"]) == {"M", "F"}


def test_old_style_ages_with_year_suffix_are_read(nih, tmp_path):
    rows = nih.head(20).astype({"Patient Age": str})
    rows.loc[0, "Patient Age"] = "058Y"
    rows.to_csv(tmp_path / "m.csv", index=False)
    assert read_nih_metadata(tmp_path / "m.csv")["age"].iloc[0] == 58


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("Patient Age", "abc", r"'Patient Age' has a non-integer value 'abc' in 1 row, first on line 5"),
        ("Patient Age", "413", r"'Patient Age' has an impossible value '413' \(allowed 0-120\)"),
        ("Patient Age", "-3", r"'Patient Age' has an impossible value '-3'"),
        ("Patient Gender", "X", r"'Patient Gender' has an unknown code 'X'.*allowed codes are M and F"),
        ("Patient ID", "p7", r"'Patient ID' has a non-integer value 'p7'"),
        ("Image Index", "00000001_000.png", r"'Image Index' repeats"),
    ],
)
def test_bad_values_name_file_column_and_line(nih, tmp_path, column, value, message):
    rows = nih.head(20).astype(str)
    rows.loc[3, column] = value  # line 5: header + rows 0..3
    rows.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(CxrfairError, match=message) as e:
        read_nih_metadata(tmp_path / "bad.csv")
    assert "bad.csv" in str(e.value)


def test_missing_columns_are_named(nih, tmp_path):
    nih.head(5).drop(columns=["Patient Age", "Patient Gender"]).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(CxrfairError, match=r"m.csv: missing column\(s\) 'Patient Age', 'Patient Gender'"):
        read_nih_metadata(tmp_path / "m.csv")


# --- sampling and split pieces ------------------------------------------------------------------


def test_cell_quotas_fill_from_the_other_sex():
    assert cell_quotas({"M": 53, "F": 47}, 50) == {"M": 53, "F": 47}
    assert cell_quotas({"M": 80, "F": 47}, 50) == {"M": 53, "F": 47}
    assert cell_quotas({"M": 80, "F": 90}, 50) == {"M": 50, "F": 50}
    assert cell_quotas({"M": 52, "F": 47}, 50) is None
    assert cell_quotas({"M": 49, "F": 47}, 50) is None


@given(n=st.integers(0, 5000), a=st.floats(0.05, 1), b=st.floats(0.05, 1), c=st.floats(0.05, 1))
def test_split_targets_sum_and_stay_within_one_of_ideal(n, a, b, c):
    r = np.array([a, b, c]) / (a + b + c)
    t = split_targets(n, tuple(r))
    assert t.sum() == n and np.abs(t - n * r).max() < 1


def test_split_targets_examples():
    assert split_targets(200, (0.7, 0.1, 0.2)).tolist() == [140, 20, 40]
    assert split_targets(28, (0.7, 0.1, 0.2)).tolist() == [20, 3, 5]
    assert split_targets(53, (0.7, 0.1, 0.2)).tolist() == [37, 5, 11]


def random_patients(seed: int, n_patients: int) -> pd.DataFrame:
    """Patients with 1-6 images each, spread at random over two diseases and all groups."""
    rng = np.random.default_rng(seed)
    rows = []
    for pid in range(n_patients):
        for _ in range(rng.integers(1, 7)):
            rows.append(dict(patient_id=pid, label=str(rng.choice(["A", "B"])), group=str(rng.choice(GROUPS))))
    return pd.DataFrame(rows)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), n_patients=st.integers(20, 120))
def test_split_is_patient_disjoint_and_exact_or_refuses(seed, n_patients):
    table = random_patients(seed, n_patients)
    try:
        split = split_cohort(table, ["A", "B"], (0.7, 0.1, 0.2), seed)
    except CxrfairError as e:
        assert "without putting a patient in two splits" in str(e)
        return
    t = table.assign(split=split)
    assert t.groupby("patient_id")["split"].nunique().max() == 1
    for label, rows_ in t.groupby("label"):
        got = [int((rows_["split"] == s).sum()) for s in SPLITS]
        assert got == split_targets(len(rows_), (0.7, 0.1, 0.2)).tolist()


def split_counts(table: pd.DataFrame, split: pd.Series) -> dict:
    return {k: v.tolist() for k, v in table.assign(split=split).groupby(["label", "split"]).size().unstack()[list(SPLITS)].iterrows()}


def test_repair_fixes_what_the_greedy_pass_misses(monkeypatch):
    # 24 lumpy patients, 89 images: the greedy pass alone leaves a disease total off.
    table = random_patients(11, 24)
    assert split_counts(table, split_cohort(table, ["A", "B"], (0.7, 0.1, 0.2), 11, restarts=0)) == \
        {"A": [30, 4, 8], "B": [33, 5, 9]}
    monkeypatch.setattr(split_module, "_local_search", lambda problem, assign, **kw: assign)
    with pytest.raises(CxrfairError, match="could not split"):
        split_cohort(table, ["A", "B"], (0.7, 0.1, 0.2), 11, restarts=0)


def test_restarts_escape_a_local_optimum():
    # Feasible (checked by exhaustive search over val/test counts), but the first greedy +
    # repair lands in a local optimum; a seeded restart finds an exact split.
    table = random_patients(0, 24)
    with pytest.raises(CxrfairError, match="could not split"):
        split_cohort(table, ["A", "B"], (0.7, 0.1, 0.2), 0, restarts=0)
    split = split_cohort(table, ["A", "B"], (0.7, 0.1, 0.2), 0)
    assert table.assign(split=split).groupby("patient_id")["split"].nunique().max() == 1
    assert split_counts(table, split) == {c: split_targets(int((table["label"] == c).sum()), (0.7, 0.1, 0.2)).tolist()
                                          for c in ["A", "B"]}


def test_split_refuses_when_one_patient_is_too_big():
    # One patient holds 30 of 40 images: train may take at most 28, so no exact split exists.
    table = pd.DataFrame({"patient_id": [0] * 30 + list(range(1, 11)), "label": "A", "group": GROUPS[0]})
    with pytest.raises(CxrfairError, match="could not split A into exact 28/4/8"):
        split_cohort(table, ["A"], (0.7, 0.1, 0.2), 0)


# --- images and config --------------------------------------------------------------------------


def test_find_images_searches_the_nih_layout(tmp_path):
    for folder, name in [("images_001/images", "a.png"), ("images_002/images", "b.png"), ("images_002/images", "x.png")]:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / name).write_bytes(b"")
    assert find_images(tmp_path, ["a.png", "b.png"]) == {"a.png": "images_001/images/a.png", "b.png": "images_002/images/b.png"}
    with pytest.raises(CxrfairError, match=r"--images .*: 7 of 8 cohort images not found \(first: m0.png, m1.png, m2.png, m3.png, m4.png, \.\.\.\)"):
        find_images(tmp_path, ["a.png"] + [f"m{i}.png" for i in range(7)])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(per_group=0), "--per-group 0"),
        (dict(split="0.7,0.3"), "--split"),
        (dict(split="a,b,c"), "--split a,b,c"),
        (dict(split="0.7,0,0.3"), "three positive numbers"),
        (dict(diseases="Edema,Edema"), "Edema given twice"),
        (dict(diseases=" , "), "--diseases: empty"),
        (dict(age_threshold=200), "--age-threshold 200"),
    ],
)
def test_config_rejects_bad_options(tmp_path, overrides, message):
    with pytest.raises(CxrfairError, match=message):
        CohortConfig.from_preset(out=tmp_path / "c", **overrides)


def test_unknown_preset(tmp_path):
    with pytest.raises(CxrfairError, match="--preset nih-9x9: unknown preset; known: nih-6x200"):
        CohortConfig.from_preset("nih-9x9", out=tmp_path)


def test_preset_defaults_and_split_normalisation(tmp_path):
    c = CohortConfig.from_preset(out=tmp_path, split="7,1,2")
    assert c.preset == "nih-6x200" and c.split == (0.7, 0.1, 0.2) and c.diseases == tuple(SIX)


def test_an_all_male_metadata_warns_naming_the_empty_groups(nih, tmp_path):
    """Balanced sampling fills a short sex from the other, so every F cell is 0: said, not silent."""
    from cxrfair.errors import CxrfairWarning

    males = tmp_path / "Data_Entry_2017.csv"
    nih[nih["Patient Gender"] == "M"].to_csv(males, index=False)
    with pytest.warns(CxrfairWarning, match=rf"cohort from metadata {males}: sensitive group sex=F has no images in "
                                            r"train, val, test") as caught:
        c = build_cohort(CohortConfig.from_preset(out=tmp_path / "c", metadata=males, diseases="Edema,Effusion",
                                                  per_group=10))
    assert set(c.table["sex"]) == {"M"}
    assert [str(w.message).split(": ")[1].split(" has")[0] for w in caught] == ["sensitive group sex=F"]


def test_a_cohort_with_every_group_present_does_not_warn(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_cohort(CohortConfig.from_preset(out=tmp_path / "c", diseases="edema, Effusion", per_group=10))
