"""CheXpert: ``train.csv`` / ``valid.csv`` and, optionally, the demographics file for race.

Files (Stanford AIMI, https://stanfordaimi.azurewebsites.net/datasets/8cbd9ed4-2eb9-4565-affc-111cf4f7ebe2):

- ``--metadata CheXpert-v1.0[-small]/train.csv`` (or ``valid.csv``): ``Path, Sex, Age,
  Frontal/Lateral, AP/PA`` and 14 findings (``No Finding, Enlarged Cardiomediastinum, Cardiomegaly,
  Lung Opacity, Lung Lesion, Edema, Consolidation, Pneumonia, Atelectasis, Pneumothorax, Pleural
  Effusion, Pleural Other, Fracture, Support Devices``) holding 1, 0, -1 (uncertain) or blank.
  ``Path`` reads ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``: the patient
  id is the number after ``patient``; ``--images`` is the folder that holds ``CheXpert-v1.0-small/``.
  ``image_id`` is the path below the release folder (``train/patient00001/study1/view1_frontal.jpg``),
  so the small and the full download give the same ids (and the same cohort hash).
- ``--demographics FILE``: the separately licensed ``CHEXPERT DEMO.xlsx`` (or a CSV export of it)
  with ``PATIENT`` (``patient00001``) and ``PRIMARY_RACE``; mapped by ``races.CHEXPERT``. Reading
  XLSX needs openpyxl (``pip install 'cxrfair[xlsx]'``).

Sex ``Unknown`` is kept as unknown (such images leave cohorts that use sex). Frontal = the
``Frontal/Lateral`` column says ``Frontal``; ``view`` is the ``AP/PA`` value (``LATERAL`` for
lateral images).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfair.errors import CxrfairError

from .base import (
    DatasetTable, Option, Sources, Where, check_file, findings_frame, map_unique, parse_age, parse_sex, read_csv,
    require_columns, strip,
)
from .races import CHEXPERT, RACE_MAP, load_race_map, map_race, patient_groups

NAME = "chexpert"
METADATA = Option("metadata", "file", "CheXpert train.csv or valid.csv")
OPTIONS = (Option("demographics", "file", "'CHEXPERT DEMO.xlsx' or .csv: PATIENT, PRIMARY_RACE (race)"), RACE_MAP)
HOW = {"race": "--demographics"}  # how to give the standard data a preset may need (named in its error)
FINDINGS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
            "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
            "Fracture", "Support Devices")
REQUIRED = ("Path", "Sex", "Age", "Frontal/Lateral")
PATIENT = re.compile(r"(?:^|/)patient(\d+)/[^\n]*\n", re.MULTILINE)
HINT = "pass CheXpert's train.csv or valid.csv (columns Path, Sex, Age, Frontal/Lateral, AP/PA and the 14 findings)"
DEMO_HINT = "pass CheXpert's demographics file ('CHEXPERT DEMO.xlsx' or a CSV) with columns PATIENT and PRIMARY_RACE"


def read(sources: Sources) -> DatasetTable:
    """The standard table of a CheXpert CSV (see the module docstring)."""
    path = check_file(sources.metadata, "metadata", "--metadata", HINT)
    raw = read_csv(path, "metadata", HINT)
    require_columns(raw.columns, path, "metadata", list(REQUIRED), HINT)
    if raw.empty:
        raise CxrfairError(f"metadata {path}: no rows; {HINT}")
    where = Where("metadata", path, raw["Path"])
    findings = [f for f in FINDINGS if f in raw.columns]
    table = pd.DataFrame({"image_id": image_ids(raw["Path"]), "path": raw["Path"].to_numpy(),
                          "patient_id": patient_ids(raw["Path"], where)})
    table["sex"] = parse_sex(raw["Sex"], "Sex", where)
    table["age"] = parse_age(raw["Age"], "Age", where)
    table["frontal"], table["view"] = views(raw, where)
    _check_ids(table["image_id"], where)
    table = pd.concat([table, findings_frame(raw, findings, where)], axis=1)
    files, notes = [("metadata", path)], {}
    if sources.get("demographics") is not None:
        table["race"], notes = demographics_race(sources, table["patient_id"])
        files.append(("demographics", Path(sources.get("demographics"))))
    return DatasetTable(NAME, table, tuple(findings), tuple(files), path, notes)


def image_ids(paths: pd.Series) -> np.ndarray:
    """The path below the release folder: ``CheXpert-v1.0-small/train/x.jpg`` -> ``train/x.jpg``."""
    return np.array([p.split("/", 1)[1] if p.startswith("CheXpert") and "/" in p else p for p in paths.tolist()], dtype=object)


def patient_ids(paths: pd.Series, where: Where) -> np.ndarray:
    """int64 patient number from ``.../patient00001/...``; a path without one is an error."""
    values = paths.tolist()
    found = PATIENT.findall("\n".join(values) + "\n")  # one scan of all paths; per path only if counts differ
    if len(found) == len(values):
        return np.array(found, dtype=np.int64)
    bad = np.array([len(PATIENT.findall(v + "\n")) != 1 for v in values])
    raise where.fail("Path", f"has a path without one patientNNNNN folder '{values[int(np.flatnonzero(bad)[0])]}'", bad)


def views(raw: pd.DataFrame, where: Where) -> tuple[np.ndarray, np.ndarray]:
    """(frontal bool, view str) from ``Frontal/Lateral`` and ``AP/PA``."""
    fl = strip(raw["Frontal/Lateral"])
    bad = ~fl.isin(["Frontal", "Lateral"]).to_numpy()
    if bad.any():
        raise where.fail("Frontal/Lateral", f"has a value '{fl[bad].iloc[0]}'", bad, "allowed: Frontal, Lateral")
    frontal = (fl == "Frontal").to_numpy()
    ap_pa = strip(raw["AP/PA"]).to_numpy() if "AP/PA" in raw.columns else np.full(len(raw), "")
    return frontal, np.where(frontal, ap_pa, "LATERAL").astype(str)


def _check_ids(ids: pd.Series, where: Where) -> None:
    dup = ids.duplicated().to_numpy()
    if dup.any():
        raise where.fail("Path", f"repeats '{ids[dup].iloc[0]}'", dup, "each image must appear once")


# --------------------------------------------------------------------------------------------
# Demographics


def read_demographics(path: Path) -> pd.DataFrame:
    """``PATIENT`` and ``PRIMARY_RACE`` as str from a CSV or an XLSX file."""
    path = check_file(path, "demographics", "--demographics", DEMO_HINT)
    if path.suffix.lower() not in (".xlsx", ".xlsm"):
        return read_csv(path, "demographics", DEMO_HINT, usecols=["PATIENT", "PRIMARY_RACE"])
    try:
        import openpyxl  # noqa: F401 - pandas needs it for .xlsx
    except ImportError:
        raise CxrfairError(f"demographics {path}: reading .xlsx needs openpyxl; pip install 'cxrfair[xlsx]' "
                           "(or save the sheet as CSV and pass that)") from None
    try:
        raw = pd.read_excel(path, dtype=str, keep_default_na=False, engine="openpyxl")
    except Exception as e:  # openpyxl raises many types for a damaged or foreign file
        raise CxrfairError(f"demographics {path}: not a readable XLSX file ({type(e).__name__}: {e}); {DEMO_HINT}") from None
    require_columns(raw.columns, path, "demographics", ["PATIENT", "PRIMARY_RACE"], DEMO_HINT)
    return raw[["PATIENT", "PRIMARY_RACE"]].astype(str).replace("nan", "")


def demographics_race(sources: Sources, patient_id: pd.Series) -> tuple[np.ndarray, dict[str, int]]:
    """(N,) race group per image (``""`` unknown) and counts of images left without a race, by reason."""
    path = Path(sources.get("demographics"))
    raw = read_demographics(path)
    where = Where("demographics", path, raw["PATIENT"], "patient")
    mapping = load_race_map(sources.get("race_map"), CHEXPERT)
    group = map_race(raw["PRIMARY_RACE"], "PRIMARY_RACE", where, mapping)
    num = pd.to_numeric(raw["PATIENT"].str.strip().str.extract(r"^patient(\d+)$", expand=False), errors="coerce").to_numpy()
    bad = np.isnan(num)
    if bad.any():
        raise where.fail("PATIENT", f"has a patient id '{raw['PATIENT'][bad].iloc[0]}'", bad, "expected patientNNNNN")
    if not patient_id.isin(num.astype(np.int64)).any():
        # Every image would be left without a race, the race column silently empty.
        raise CxrfairError(
            f"demographics {path}: column 'PATIENT' matches no patient of metadata {sources.metadata} (its "
            f"first is '{raw['PATIENT'].iloc[0] if len(raw) else ''}', the metadata's paths hold patient"
            f"{int(patient_id.iloc[0]):05d}, ...); pass the demographics file of this CheXpert release")
    per_patient, conflicts = patient_groups(num.astype(np.int64), group)
    race = per_patient.reindex(patient_id.to_numpy()).fillna("").to_numpy(dtype=str)
    notes = {"race_conflict_images": int(patient_id.isin(conflicts).sum()),
                "race_missing_images": int((~patient_id.isin(per_patient.index) & ~patient_id.isin(conflicts)).sum())}
    return race, notes
