"""NIH ChestX-ray14: ``Data_Entry_2017*.csv[.gz]``, optionally the official split lists and NEATX drains.

Files (https://nihcc.app.box.com/v/ChestXray-NIHCC):

- ``Data_Entry_2017_v2020.csv`` (or the 2017 release ``Data_Entry_2017.csv``, whose lines end in an
  empty column and whose ages may read ``058Y``): ``Image Index, Finding Labels, Follow-up #,
  Patient ID, Patient Age, Patient Gender, View Position, ...``. The v2020 file ships with cxrfair
  and is used when ``--metadata`` is not given.
- ``--official-split DIR``: ``DIR/test_list.txt`` and ``DIR/train_val_list.txt``, one image name
  per line (patient-disjoint). Images in neither list are set aside and counted.
- ``--drains FILE``: NEATX ``NIH-CX14_TubeAnnotations_NonExperts_aggregated.csv`` (Zenodo
  14944064) with ``Image Index`` and ``Drain`` (1/0); images it does not list have an unknown
  drain (empty ``drain``).

Findings: one column per name in ``Finding Labels`` (``No Finding`` included), 1 or 0 (NIH has no
uncertain labels); ``label`` holds the finding of single-label images (the multi-class source).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfair.errors import CxrfairError

from .base import (
    MAX_AGE, SEX_CODES, DatasetTable, Option, Sources, Where, check_file, map_unique, parse_drain, read_csv, read_list,
)

NAME = "nih"
COLUMNS = {
    "Image Index": "image_id",
    "Finding Labels": "labels",
    "Patient ID": "patient_id",
    "Patient Age": "age",
    "Patient Gender": "sex",
}
OPTIONAL = {"View Position": "view"}
VENDORED_METADATA = "data/Data_Entry_2017_v2020.csv.gz"
SPLIT_LISTS = {"test": "test_list.txt", "train_val": "train_val_list.txt"}
NEATX_HINT = "pass NEATX NIH-CX14_TubeAnnotations_NonExperts_aggregated.csv (columns Image Index, Drain)"
SEARCH_IMAGES = True  # the download nests images in images_00k/images/: --images is searched by file name


def vendored_metadata() -> Path:
    """Path of the vendored NIH ``Data_Entry_2017_v2020.csv.gz`` (see extract/data/README.md)."""
    return Path(str(resources.files("cxrfair.extract").joinpath(VENDORED_METADATA)))


METADATA = Option("metadata", "file", "Data_Entry_2017*.csv[.gz] (default: the vendored v2020 file)",
                  default=vendored_metadata)
OPTIONS = (
    Option("official_split", "folder", "DIR with test_list.txt, train_val_list.txt", files=tuple(SPLIT_LISTS.values())),
    Option("drains", "file", "NEATX NIH-CX14_TubeAnnotations_NonExperts_aggregated.csv"),
)
# How to give the standard data a preset may need (named in its error).
HOW = {"official_split": "--official-split DIR (test_list.txt, train_val_list.txt)",
       "drain": "--drains NEATX NIH-CX14_TubeAnnotations_NonExperts_aggregated.csv"}


def read(sources: Sources) -> DatasetTable:
    """The standard table of NIH ChestX-ray14 (see the module docstring)."""
    path = sources.metadata or vendored_metadata()
    meta = read_nih_metadata(path)
    names = known_findings(meta)
    table = meta.drop(columns=["line"]).assign(path=meta["image_id"], frontal=True, age=meta["age"].astype(float))
    table["label"] = np.where(meta["labels"].str.contains("|", regex=False), "", meta["labels"])
    table = pd.concat([table, finding_columns(meta["labels"], names)], axis=1)
    files, notes = [("metadata", Path(path))], {}
    if sources.get("official_split") is not None:
        split, lists = official_split(sources.get("official_split"), table["image_id"])
        table["official_split"] = split
        files += lists
    if sources.get("drains") is not None:
        table["drain"] = read_drains(sources.get("drains"), table["image_id"], path)
        files.append(("drains", Path(sources.get("drains"))))
    return DatasetTable(NAME, table, tuple(names), tuple(files), Path(path), notes)


# --------------------------------------------------------------------------------------------
# Data_Entry_2017*.csv


def read_nih_metadata(path: Path | str) -> pd.DataFrame:
    """Read and validate an NIH ChestX-ray14 ``Data_Entry_2017*.csv[.gz]``.

    Returns:
        DataFrame, one row per image, columns ``image_id`` (str), ``labels`` (str, '|'-joined),
        ``patient_id`` (int64), ``age`` (int64), ``sex`` ('M'/'F'), ``line`` (int, line in the
        file) and ``view`` (str) when the file has ``View Position``.
    Raises:
        CxrfairError naming the file, column and line for anything unreadable or implausible.
    """
    path = Path(path)
    if not path.is_file():
        raise CxrfairError(f"metadata {path}: file not found (or not a file); pass --metadata Data_Entry_2017*.csv[.gz]")
    raw = read_csv(path, "metadata", "pass the NIH Data_Entry_2017*.csv[.gz]")
    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        raise CxrfairError(
            f"metadata {path}: missing column(s) {', '.join(repr(c) for c in missing)}; expected the NIH "
            f"ChestX-ray14 columns ({', '.join(list(COLUMNS) + list(OPTIONAL))}, ...)")
    if raw.empty:
        raise CxrfairError(f"metadata {path}: no rows; pass the NIH Data_Entry_2017*.csv[.gz]")
    cols = {**COLUMNS, **{k: v for k, v in OPTIONAL.items() if k in raw.columns}}
    df = raw[list(cols)].rename(columns=cols)
    df = df.apply(lambda col: pd.Series(map_unique(col, str.strip), index=col.index, name=col.name))
    df["line"] = np.arange(len(df)) + 2  # header is line 1
    df["image_id"] = _check_image_ids(df, path)
    df["patient_id"] = _parse_int(df, "patient_id", "Patient ID", path, 0, None)
    df["age"] = _parse_int(df, "age", "Patient Age", path, 0, MAX_AGE, strip_suffix="Y")
    df["sex"] = _parse_sex(df, path)
    return df.reset_index(drop=True)


def _bad_rows(df: pd.DataFrame, bad: pd.Series) -> str:
    """'3 rows, first on line 12 (image X)' for an error message."""
    first = df[bad].iloc[0]
    n = int(bad.sum())
    return f"{n} row{'s' if n > 1 else ''}, first on line {first['line']} (image {first['image_id'] or '?'})"


def _check_image_ids(df: pd.DataFrame, path: Path) -> pd.Series:
    ids = df["image_id"]
    if (ids == "").any():
        raise CxrfairError(f"metadata {path}: column 'Image Index' is empty in {_bad_rows(df, ids == '')}; fix those rows")
    dup = ids.duplicated()
    if dup.any():
        raise CxrfairError(f"metadata {path}: column 'Image Index' repeats '{ids[dup].iloc[0]}' "
                           f"({_bad_rows(df, dup)}); each image must appear once")
    return ids


def _parse_int(df, col: str, nih: str, path: Path, lo: int, hi: int | None, strip_suffix: str = "") -> pd.Series:
    """Integer column with a range check; the 2017 Box release wrote ages as '058Y', so a suffix may go."""
    text = (pd.Series(map_unique(df[col], lambda v: v.upper().removesuffix(strip_suffix)), index=df.index)
            if strip_suffix else df[col])
    num = pd.to_numeric(text, errors="coerce")
    bad = num.isna() | (num != np.floor(num))
    if bad.any():
        value = df.loc[bad, col].iloc[0]
        raise CxrfairError(f"metadata {path}: column '{nih}' has a non-integer value '{value}' in "
                           f"{_bad_rows(df, bad)}; fix or remove those rows")
    out_of_range = (num < lo) | ((num > hi) if hi is not None else False)
    if out_of_range.any():
        value = df.loc[out_of_range, col].iloc[0]
        limits = f"{lo}-{hi}" if hi is not None else f">= {lo}"
        hint = ("; the v2020 release (Data_Entry_2017_v2020.csv) corrects the 2017 file's impossible ages"
                if col == "age" else "")
        raise CxrfairError(f"metadata {path}: column '{nih}' has an impossible value '{value}' (allowed {limits}) "
                           f"in {_bad_rows(df, out_of_range)}; fix or remove those rows{hint}")
    return num.astype("int64")


def _parse_sex(df: pd.DataFrame, path: Path) -> pd.Series:
    sex = pd.Series(map_unique(df["sex"], lambda v: SEX_CODES.get(v.upper())), index=df.index)
    bad = sex.isna()
    if bad.any():
        value = df.loc[bad, "sex"].iloc[0]
        raise CxrfairError(f"metadata {path}: column 'Patient Gender' has an unknown code '{value}' in "
                           f"{_bad_rows(df, bad)}; allowed codes are M and F")
    return sex.astype(str)


def known_findings(meta: pd.DataFrame) -> list[str]:
    """Every finding named in ``labels`` (sorted)."""
    return sorted({f.strip() for labels in meta["labels"].unique() for f in labels.split("|")} - {""})


def finding_columns(labels: pd.Series, names: list[str]) -> pd.DataFrame:
    """(N, F) float32 1/0 per finding from the '|'-joined labels, computed once per distinct label set."""
    codes, uniques = pd.factorize(labels)
    sets = [set(u.split("|")) for u in uniques]
    table = np.array([[n in s for n in names] for s in sets], dtype=np.float32).reshape(len(sets), len(names))
    return pd.DataFrame(table[codes], columns=names, index=labels.index)


# --------------------------------------------------------------------------------------------
# Official split and NEATX drains


def official_split(folder: Path, image_ids: pd.Series) -> tuple[np.ndarray, list[tuple[str, Path]]]:
    """``test`` for images in test_list.txt, ``train`` for train_val_list.txt (val is carved out of
    it later, by patients), ``""`` for images in neither; an image in both lists is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CxrfairError(f"--official-split {folder}: not a folder; pass the NIH folder holding test_list.txt and train_val_list.txt")
    paths = {k: check_file(folder / name, "--official-split", "--official-split",
                           f"the NIH download has {name} next to the metadata") for k, name in SPLIT_LISTS.items()}
    test, train_val = (set(read_list(paths[k], "--official-split")) for k in ("test", "train_val"))
    both = sorted(test & train_val)
    if both:
        raise CxrfairError(f"--official-split {folder}: image '{both[0]}' is in both test_list.txt and "
                           f"train_val_list.txt ({len(both)} images); use the lists as published")
    split = np.where(image_ids.isin(test), "test", np.where(image_ids.isin(train_val), "train", ""))
    return split, [("official_split", paths["test"]), ("official_split", paths["train_val"])]


def read_drains(path: Path, image_ids: pd.Series, metadata: Path | str | None = None) -> np.ndarray:
    """(N,) float64 drain per image: 1 / 0 from NEATX, NaN where NEATX has no annotation.

    A file annotating none of the images is an error naming it (``metadata``: where the ids come
    from, for the message); otherwise the cohort would say the drain data is missing.
    """
    path = check_file(path, "drains", "--drains", NEATX_HINT)
    raw = read_csv(path, "drains", NEATX_HINT, usecols=["Image Index", "Drain"])
    ids = raw["Image Index"].str.strip()
    where = Where("drains", path, ids)
    drain = parse_drain(raw["Drain"], "Drain", where)
    dup = ids.duplicated().to_numpy()
    if dup.any():
        raise where.fail("Image Index", f"repeats '{ids[dup].iloc[0]}'", dup, "keep one annotation per image")
    out = pd.Series(drain, index=ids).reindex(image_ids.to_numpy()).to_numpy(dtype=float)
    if len(image_ids) and len(ids) and np.isnan(out).all():
        raise CxrfairError(f"drains {path}: column 'Image Index' matches no image of metadata {metadata or 'given'} "
                           f"(its first is '{ids.iloc[0]}', the metadata's '{image_ids.iloc[0]}'); {NEATX_HINT} for "
                           "these images")
    return out
