"""MIMIC-CXR-JPG joined to MIMIC-IV for sex, age and race.

Files (PhysioNet, credentialed access: https://physionet.org/content/mimic-cxr-jpg/2.0.0/ and
https://physionet.org/content/mimiciv/):

- ``--metadata DIR``: the MIMIC-CXR-JPG folder holding (``.csv.gz`` or ``.csv``)
  ``mimic-cxr-2.0.0-metadata`` (``dicom_id, subject_id, study_id, ViewPosition, StudyDate, ...``),
  ``mimic-cxr-2.0.0-chexpert`` (``subject_id, study_id`` + 14 findings in 1 / 0 / -1 / blank) and
  ``mimic-cxr-2.0.0-split`` (``dicom_id, study_id, subject_id, split`` = train / validate / test).
  Passing one of these files instead of the folder works too. ``--images`` is the folder holding
  ``files/``; an image's path is ``files/p10/p10000032/s50414267/<dicom_id>.jpg``.
- ``--mimic-iv DIR``: the MIMIC-IV folder holding ``hosp/patients.csv.gz`` (``subject_id, gender,
  anchor_age, anchor_year``; required: MIMIC-CXR itself has no sex or age) and
  ``hosp/admissions.csv.gz`` (``subject_id, race``, older releases ``ethnicity``; optional, gives
  race). Passing the ``hosp`` folder itself works too.
- ``--reports PATH`` (optional): MIMIC-CXR's free-text reports (https://physionet.org/content/mimic-cxr/2.0.0/),
  ``mimic-cxr-reports.zip`` as PhysioNet ships it or the folder holding (or being) ``files/``, one
  report per study at ``files/p10/p10000032/s50414267.txt``. With it the table gains ``text``: each
  image carries its study's report (``report_text``: the FINDINGS then the IMPRESSION section when
  either is there, else the whole report; whitespace runs become one space); a study without a
  report file gets ``""`` (counted).

Rules: age at the study = ``anchor_age + (study year - anchor_year)``; race per patient from
all admissions by ``races.MIMIC_IV``, unknown codes ignored, patients whose admissions disagree
have no race (counted); frontal = ``ViewPosition`` AP or PA; images whose study has no row in the
label file are set aside (counted: the labeler had no report section to read). The official
split is checked to be patient-disjoint; images of a patient found in a later split too (test
after validate after train) are set aside (counted).
"""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfair.errors import CxrfairError

from .base import (
    DatasetTable, Option, Sources, Where, findings_frame, parse_age, parse_int, parse_sex, parse_split, read_csv, strip,
)
from .races import MIMIC_IV, RACE_MAP, load_race_map, map_race, patient_groups

NAME = "mimic"
PREFIX = "mimic-cxr-2.0.0-"
PARTS = ("metadata", "chexpert", "split")
METADATA = Option("metadata", "folder", "the MIMIC-CXR-JPG folder with mimic-cxr-2.0.0-metadata.csv.gz, "
                  "mimic-cxr-2.0.0-chexpert.csv.gz, mimic-cxr-2.0.0-split.csv.gz",
                  files=tuple(f"{PREFIX}{part}.csv" for part in PARTS))
OPTIONS = (
    Option("mimic_iv", "folder", "the MIMIC-IV folder with hosp/patients.csv.gz (sex, age) and hosp/admissions.csv.gz "
           "(race)", files=("hosp/patients.csv", "hosp/admissions.csv"), required=True),
    RACE_MAP,
    Option("reports", "folder", "MIMIC-CXR's reports: mimic-cxr-reports.zip, or the folder holding files/pXX/pNNNNNNNN/"
           "sNNNNNNNN.txt (gives the cohort a text column)"),
)
HOW = {"race": "--mimic-iv with hosp/admissions.csv.gz"}  # how to give the standard data a preset may need
FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
            "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
            "Pneumothorax", "Support Devices")
FRONTAL = ("AP", "PA")
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
HINT = "pass the MIMIC-CXR-JPG folder holding mimic-cxr-2.0.0-metadata.csv.gz, -chexpert.csv.gz and -split.csv.gz"
REPORTS_HINT = ("pass --reports with mimic-cxr-reports.zip from PhysioNet's MIMIC-CXR, or the folder holding "
                "files/p10/p10000032/s50414267.txt")
# A section header: a line starting with capitals and a colon (" FINDINGS:", " WET READ:"), as the
# MIMIC-CXR authors' section parser finds them (github.com/MIT-LCP/mimic-cxr, txt/section_parser.py).
HEADER = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&-]*?)[ \t]*:(?=\s|\Z)", re.M)
SECTIONS = {"FINDINGS": 0, "FINDING": 0, "IMPRESSION": 1, "IMPRESSIONS": 1}  # kept, in this order
ZIP_IN_MEMORY = 2**31  # bytes: a reports zip up to this size is read into memory at once
REPORT_NAME = re.compile(r"(?:^|/)p(\d+)/s(\d+)\.txt$")  # files/p10/p10000032/s50414267.txt
IV_HINT = ("pass --mimic-iv with the MIMIC-IV folder holding hosp/patients.csv.gz and hosp/admissions.csv.gz "
           "(MIMIC-CXR itself has no sex or age)")


def read(sources: Sources) -> DatasetTable:
    """The standard table of MIMIC-CXR-JPG + MIMIC-IV (see the module docstring)."""
    files = cxr_files(sources.metadata)
    hosp = hosp_folder(sources.get("mimic_iv"))
    images = read_metadata(files["metadata"])
    labels, findings = read_labels(files["chexpert"])
    images, notes = _join_labels(images, labels)
    images["official_split"], overlap = read_official_split(files["split"], images)
    notes["official_split_overlap_images"] = overlap
    images = _join_patients(images, hosp / _name(hosp, "patients"))
    used = [("metadata", files["metadata"]), ("labels", files["chexpert"]), ("official_split", files["split"]),
            ("patients", hosp / _name(hosp, "patients"))]
    admissions = _optional(hosp, "admissions")
    if admissions is not None:
        images["race"], race_notes = admissions_race(admissions, images["patient_id"], sources.get("race_map"))
        notes.update(race_notes)
        used.append(("admissions", admissions))
    if sources.get("reports") is not None:
        reports = Path(sources.get("reports"))
        images["text"], notes["no_report_images"] = read_reports(reports, images["patient_id"], images["study_id"])
        if reports.is_file():  # a zip; a folder's 227k files are not hashed one by one
            used.append(("reports", reports))
    table = images.drop(columns=["year"]).reset_index(drop=True)
    return DatasetTable(NAME, table, tuple(findings), tuple(used), files["chexpert"], notes)


# --------------------------------------------------------------------------------------------
# Locating files


def _name(folder: Path, stem: str) -> str:
    """``stem.csv.gz`` if present, else ``stem.csv`` (a user may have unpacked them)."""
    return f"{stem}.csv" if not (folder / f"{stem}.csv.gz").is_file() and (folder / f"{stem}.csv").is_file() else f"{stem}.csv.gz"


def cxr_files(metadata: Path | None) -> dict[str, Path]:
    """The three MIMIC-CXR-JPG files, from their folder or from one of them."""
    if metadata is None:
        raise CxrfairError(f"--metadata: not given; {HINT}")
    metadata = Path(metadata)
    folder = metadata if metadata.is_dir() else metadata.parent
    if not metadata.exists():
        raise CxrfairError(f"metadata {metadata}: not found; {HINT}")
    files = {p: folder / _name(folder, PREFIX + p) for p in PARTS}
    missing = [f.name for f in files.values() if not f.is_file()]
    if missing:
        raise CxrfairError(f"metadata {folder}: missing {', '.join(missing)}; {HINT}")
    return files


def hosp_folder(mimic_iv: Path | None) -> Path:
    if mimic_iv is None:
        raise CxrfairError(f"--mimic-iv: not given; {IV_HINT}")
    root = Path(mimic_iv)
    for folder in (root / "hosp", root):
        if (folder / _name(folder, "patients")).is_file():
            return folder
    raise CxrfairError(f"--mimic-iv {root}: no hosp/patients.csv.gz there; {IV_HINT}")


def _optional(folder: Path, stem: str) -> Path | None:
    path = folder / _name(folder, stem)
    return path if path.is_file() else None


# --------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG


def read_metadata(path: Path) -> pd.DataFrame:
    """One row per image: image_id, path, patient_id, study_id, view, frontal, study_date, year."""
    raw = read_csv(path, "metadata", HINT, usecols=["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate"],
                   ints=["subject_id", "study_id", "StudyDate"])
    if raw.empty:
        raise CxrfairError(f"metadata {path}: no rows; {HINT}")
    where = Where("metadata", path, raw["dicom_id"])
    ids = strip(raw["dicom_id"])
    dup = ids.duplicated().to_numpy()
    if dup.any() or (ids == "").any():
        bad = dup | (ids == "").to_numpy()
        raise where.fail("dicom_id", f"repeats or lacks an id ('{ids[bad].iloc[0]}')", bad, "each image must appear once")
    subject = parse_int(raw["subject_id"], "subject_id", where)
    study = parse_int(raw["study_id"], "study_id", where)
    date = parse_int(raw["StudyDate"], "StudyDate", where, lo=10000101)
    view = strip(raw["ViewPosition"]).to_numpy()
    paths = [f"files/p{str(p)[:2]}/p{p}/s{s}/{d}.jpg" for p, s, d in zip(subject.tolist(), study.tolist(), ids.tolist())]
    iso = [f"{d // 10000:04d}-{d // 100 % 100:02d}-{d % 100:02d}" for d in date.tolist()]
    return pd.DataFrame({
        "image_id": ids.to_numpy(), "path": paths, "patient_id": subject, "study_id": study,
        "frontal": np.isin(view, FRONTAL), "view": view, "study_date": iso, "year": date // 10000})


def read_labels(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """The CheXpert-labeler file: one row per study, findings as float32 1/0/-1/NaN."""
    raw = read_csv(path, "labels", HINT, ints=["subject_id", "study_id"])
    missing = [c for c in ("subject_id", "study_id") if c not in raw.columns]
    if missing:
        raise CxrfairError(f"labels {path}: missing column(s) {', '.join(repr(c) for c in missing)}; {HINT}")
    findings = [f for f in FINDINGS if f in raw.columns]
    where = Where("labels", path, raw["study_id"], "study")
    out = findings_frame(raw, findings, where)
    out.insert(0, "study_id", parse_int(raw["study_id"], "study_id", where))
    dup = out["study_id"].duplicated().to_numpy()
    if dup.any():
        raise where.fail("study_id", f"repeats '{out['study_id'][dup].iloc[0]}'", dup, "one row per study")
    return out, findings


def _join_labels(images: pd.DataFrame, labels: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    merged = images.merge(labels, on="study_id", how="left", indicator=True, validate="m:1")
    unlabeled = (merged["_merge"] == "left_only").to_numpy()
    return merged[~unlabeled].drop(columns="_merge").reset_index(drop=True), {"no_label_row_images": int(unlabeled.sum())}


def read_official_split(path: Path, images: pd.DataFrame) -> tuple[np.ndarray, int]:
    """(N,) train / val / test per image ("" if unlisted), patient-disjoint; and how many images were
    blanked because their patient also appears in a later split."""
    raw = read_csv(path, "official_split", HINT, usecols=["dicom_id", "split"])
    where = Where("official_split", path, raw["dicom_id"])
    values = np.append(parse_split(raw["split"], "split", where), "")
    pos = pd.Index(strip(raw["dicom_id"]).to_numpy(dtype=object)).get_indexer(images["image_id"].to_numpy(dtype=object))
    split = values[pos]  # -1 (not listed) picks the appended ""; a repeated id resolves to its first row
    rank = np.select([split == s for s in SPLIT_ORDER], list(SPLIT_ORDER.values()), -1)
    latest = pd.Series(rank).groupby(images["patient_id"].to_numpy()).transform("max").to_numpy()
    overlap = (rank >= 0) & (rank < latest)
    return np.where(overlap, "", split), int(overlap.sum())


# --------------------------------------------------------------------------------------------
# MIMIC-IV


def _join_patients(images: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Add sex and age at the study from ``patients``; images of unknown patients get sex "" and age NaN."""
    raw = read_csv(path, "patients", IV_HINT, usecols=["subject_id", "gender", "anchor_age", "anchor_year"],
                   ints=["subject_id", "anchor_year"])
    where = Where("patients", path, raw["subject_id"], "subject")
    pats = pd.DataFrame({"patient_id": parse_int(raw["subject_id"], "subject_id", where),
                         "sex": parse_sex(raw["gender"], "gender", where),
                         "anchor_age": parse_age(raw["anchor_age"], "anchor_age", where),
                         "anchor_year": parse_int(raw["anchor_year"], "anchor_year", where)})
    dup = pats["patient_id"].duplicated().to_numpy()
    if dup.any():
        raise where.fail("subject_id", f"repeats '{pats['patient_id'][dup].iloc[0]}'", dup, "one row per patient")
    merged = images.merge(pats, on="patient_id", how="left", validate="m:1")
    merged["sex"] = merged["sex"].fillna("")
    merged["age"] = merged["anchor_age"] + (merged["year"] - merged["anchor_year"])
    return merged.drop(columns=["anchor_age", "anchor_year"])


def admissions_race(path: Path, patient_id: pd.Series, race_map: Path | None) -> tuple[np.ndarray, dict[str, int]]:
    """(N,) race group per image ("" unknown or conflicting) and counts by reason."""
    header = pd.read_csv(path, nrows=0).columns
    column = "race" if "race" in header else "ethnicity"
    raw = read_csv(path, "admissions", IV_HINT + " (admissions needs subject_id and race or ethnicity)",
                   usecols=["subject_id", column], ints=["subject_id"])
    where = Where("admissions", path, raw["subject_id"], "subject")
    group = map_race(raw[column], column, where, load_race_map(race_map, MIMIC_IV))
    per_patient, conflicts = patient_groups(parse_int(raw["subject_id"], "subject_id", where), group)
    race = per_patient.reindex(patient_id.to_numpy()).fillna("").to_numpy(dtype=str)
    in_conflict = patient_id.isin(conflicts).to_numpy()
    return race, {"race_conflict_images": int(in_conflict.sum()),
                  "race_missing_images": int(((race == "") & ~in_conflict).sum())}


# --------------------------------------------------------------------------------------------
# MIMIC-CXR reports


def report_text(raw: str) -> str:
    """The text a report contributes: its FINDINGS then its IMPRESSION section (every section so
    headed, in that order) when either has text, else the whole report; whitespace runs become one
    space. ``"FINDINGS:\\n  No effusion.\\n IMPRESSION: Normal."`` -> ``"No effusion. Normal."``."""
    heads = list(HEADER.finditer(raw))
    parts: list[tuple[int, int, str]] = []
    for k, (head, nxt) in enumerate(zip(heads, heads[1:] + [None])):
        which = SECTIONS.get(" ".join(head.group(1).split()))
        if which is not None:
            parts.append((which, k, raw[head.end(): nxt.start() if nxt is not None else len(raw)]))
    text = " ".join(" ".join(body for _, _, body in sorted(parts)).split())
    return text or " ".join(raw.split())


def read_reports(path: Path, patient_id: pd.Series, study_id: pd.Series) -> tuple[np.ndarray, int]:
    """(N,) the report text (``report_text``) of each image's study, ``""`` where the study has no
    report file; and how many images that is. ``path``: mimic-cxr-reports.zip, or a folder holding
    (or being) ``files/``. Each study's report is read once."""
    keys = pd.DataFrame({"p": patient_id.to_numpy(), "s": study_id.to_numpy()})
    studies = keys.drop_duplicates()
    if path.is_file():
        texts = _zip_reports(path, studies)
    elif path.is_dir():
        texts = _folder_reports(path, studies)
    else:
        raise CxrfairError(f"--reports {path}: not found; {REPORTS_HINT}")
    if studies.size and not any(texts):
        raise CxrfairError(f"--reports {path}: no report for any of the {len(studies)} studies (looked for e.g. "
                           f"{_report_name(*studies.iloc[0])}); {REPORTS_HINT}")
    lookup = pd.Series(texts, index=pd.MultiIndex.from_frame(studies), dtype=object)
    text = lookup.reindex(pd.MultiIndex.from_frame(keys)).fillna("").to_numpy(dtype=object)
    return text, int((text == "").sum())


def _report_name(patient: int, study: int) -> str:
    return f"files/p{str(patient)[:2]}/p{patient}/s{study}.txt"


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CxrfairError(f"reports {where}: not UTF-8 text ({e.reason} at byte {e.start}); replace the file with "
                           "the one PhysioNet ships") from None


def _folder_reports(root: Path, studies: pd.DataFrame) -> list[str]:
    files = root if root.name == "files" and not (root / "files").is_dir() else root / "files"
    texts = []
    for p, s in zip(studies["p"].tolist(), studies["s"].tolist()):
        f = files / _report_name(p, s).removeprefix("files/")
        texts.append(report_text(_decode(f.read_bytes(), str(f))) if f.is_file() else "")
    return texts


def _zip_reports(path: Path, studies: pd.DataFrame) -> list[str]:
    """Reports out of the zip, found by their ``pNNNNNNNN/sNNNNNNNN.txt`` ending wherever the zip nests them."""
    try:  # from memory when it fits (the real zip is ~135 MB): a third faster than 227k seeks
        source = io.BytesIO(path.read_bytes()) if path.stat().st_size < ZIP_IN_MEMORY else path
        with zipfile.ZipFile(source) as zf:
            names = {}
            for name in zf.namelist():
                m = REPORT_NAME.search(name)
                if m:
                    names.setdefault((int(m.group(1)), int(m.group(2))), name)
            wanted = [names.get((p, s)) for p, s in zip(studies["p"].tolist(), studies["s"].tolist())]
            return [report_text(_decode(zf.read(n), f"{path}:{n}")) if n is not None else "" for n in wanted]
    except (zipfile.BadZipFile, zlib.error, OSError) as e:
        raise CxrfairError(f"--reports {path}: not a readable zip ({e}); {REPORTS_HINT}") from None
