"""Any dataset as one CSV plus a column mapping: VinDr-CXR, PadChest or a hospital's own export.

``--metadata FILE --columns path=COL,patient=COL,sex=COL,age=COL[,...] --labels A,B,...``

Mapping keys (``--columns``):

=========  ========  ==========================================================================
key        needed    meaning
=========  ========  ==========================================================================
path       yes       image path relative to ``--images``
patient    yes       patient id (integers are kept; any other ids are numbered 1.. in sorted
                     order and the original goes to the extra column ``patient_key``)
sex        yes       M/F, Male/Female (any case); Unknown or blank = unknown
age        yes       whole years (``58``, ``58.0``, ``058Y``); blank = unknown
image      no        image id (default: the path)
view       no        frontal = AP, PA or FRONTAL (any case); without it every image counts as frontal
split      no        official split: train, validate/val, test (used with ``--split official``)
race       no        race group per image as written (``--race-map FILE`` maps codes to groups)
label      no        one finding name per image (multi-class source, e.g. ``label=Finding``);
                     it also gives one 1/0 finding column per name
study      no        integer study id
text       no        free-text report or caption of the image, kept as the file holds it
                     (commas, quotes, spacing; line ends become ``\n``; blank = none): the
                     cohort's ``text`` column
any other  no        an extra attribute column of that name (e.g. ``scanner=Manufacturer``),
                     usable in ``--attributes``
=========  ========  ==========================================================================

``--labels A,B`` names finding columns (1 / 0 / -1 / blank, also 1.0 / 0.0 / -1.0); ``Name=COL``
reads finding ``Name`` from column ``COL``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfair.errors import CxrfairError

from .base import (
    DatasetTable, Option, Sources, Where, check_file, check_unique, findings_frame, parse_age, parse_int, parse_sex, parse_split,
    read_csv, require_columns, strip,
)
from .races import RACE_MAP, load_race_map, map_race

NAME = "csv"
METADATA = Option("metadata", "file", "your CSV")
OPTIONS = (
    Option("columns", "pairs", "key=COLUMN pairs: path=COL,patient=COL,sex=COL,age=COL [,view=,split=,race=,label=,"
           "image=,study=,text=,NAME=COL]", required=True),
    Option("labels", "list", "finding columns: A,B or Name=COL,... (or label=COL in --columns)"),
    RACE_MAP,
)
# How to give the standard data a preset may need (named in its error).
HOW = {"official_split": "split=COLUMN in --columns", "race": "race=COLUMN in --columns", "label": "label=COLUMN to --columns"}
REQUIRED = ("path", "patient", "sex", "age")
KNOWN = REQUIRED + ("image", "view", "split", "race", "label", "study", "text")
STANDARD = ("image_id", "path", "patient_id", "sex", "age", "frontal", "view", "official_split", "label", "study_id",
            "race", "patient_key", "drain", "age_group", "split", "group", "text")
FRONTAL = {"AP", "PA", "FRONTAL", "POSTEROANTERIOR", "ANTEROPOSTERIOR"}
HINT = "see `cxrfair cohort build --help` for --columns and --labels"


def read(sources: Sources) -> DatasetTable:
    """The standard table of a user's CSV under a column mapping (see the module docstring)."""
    path = check_file(sources.metadata, "metadata", "--metadata", "pass your CSV with --metadata")
    mapping = check_mapping(dict(sources.get("columns", ())))
    labels = label_columns(sources.get("labels", ()))
    raw = read_csv(path, "metadata", HINT)
    require_columns(raw.columns, path, "metadata", list(mapping.values()) + list(labels.values()),
                    f"--columns/--labels name columns of the file (it has: {', '.join(map(str, raw.columns[:20]))})")
    if raw.empty:
        raise CxrfairError(f"metadata {path}: no rows; pass a CSV with one row per image")
    ids = raw[mapping.get("image", mapping["path"])].pipe(strip)
    where = Where("metadata", path, ids)
    table = standard_columns(raw, mapping, where, sources.get("race_map"))
    check_unique(table["image_id"], mapping.get("image", mapping["path"]), where)
    findings = findings_frame(raw.rename(columns={c: n for n, c in labels.items()}), labels, where)
    if "label" in mapping and not labels:
        findings = one_hot(table["label"])
    table = pd.concat([table, findings.reset_index(drop=True)], axis=1)
    return DatasetTable(NAME, table, tuple(findings.columns), (("metadata", path),), path, {})


def check_mapping(mapping: dict[str, str]) -> dict[str, str]:
    missing = [k for k in REQUIRED if k not in mapping]
    if missing:
        raise CxrfairError(f"--columns: missing {', '.join(f'{k}=COLUMN' for k in missing)}; "
                           "e.g. --columns path=Path,patient=PatientID,sex=Sex,age=Age")
    clash = [k for k in mapping if k not in KNOWN and k in STANDARD]
    bad = [k for k in mapping if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", k)]
    if clash or bad:
        raise CxrfairError(f"--columns: '{(clash + bad)[0]}' cannot name an extra attribute; use letters, digits and _ "
                           f"and not one of {', '.join(STANDARD)}")
    return mapping


def label_columns(labels: tuple[str, ...]) -> dict[str, str]:
    """``("Edema", "Pleural Effusion=PE")`` -> ``{"Edema": "Edema", "Pleural Effusion": "PE"}``."""
    out = {}
    for item in labels:
        name, _, column = item.partition("=")
        name, column = name.strip(), (column or name).strip()
        if not name or name in out or name in STANDARD:
            raise CxrfairError(f"--labels: '{item}' is empty, repeated or a reserved column name; give Name or Name=COLUMN")
        out[name] = column
    return out


def standard_columns(raw: pd.DataFrame, m: dict[str, str], where: Where, race_map: Path | None) -> pd.DataFrame:
    col = lambda key: raw[m[key]]  # noqa: E731
    table = pd.DataFrame({"image_id": col("image" if "image" in m else "path").pipe(strip).to_numpy(),
                          "path": col("path").pipe(strip).to_numpy()})
    table["patient_id"], key = patient_numbers(col("patient"), m["patient"], where)
    table["sex"] = parse_sex(col("sex"), m["sex"], where)
    table["age"] = parse_age(col("age"), m["age"], where)
    view = col("view").pipe(strip).to_numpy() if "view" in m else np.full(len(raw), "")
    table["frontal"] = np.isin(np.char.upper(view.astype(str)), list(FRONTAL)) if "view" in m else True
    table["view"] = view
    if key is not None:
        table["patient_key"] = key
    if "study" in m:
        table["study_id"] = parse_int(col("study"), m["study"], where)
    if "split" in m:
        table["official_split"] = parse_split(col("split"), m["split"], where)
    if "race" in m:
        race = col("race").pipe(strip)
        table["race"] = (map_race(race, m["race"], where, load_race_map(race_map, {}))
                         if race_map is not None else race.to_numpy())
    if "label" in m:
        table["label"] = col("label").pipe(strip).to_numpy()
    if "text" in m:  # as written, line ends as \n (csv writers that leave a lone \r unquoted would split the row)
        table["text"] = np.array([v.replace("\r\n", "\n").replace("\r", "\n") for v in col("text").tolist()], dtype=object)
    for k in (k for k in m if k not in KNOWN):
        table[k] = col(k).pipe(strip).to_numpy()
    return table


def patient_numbers(col: pd.Series, column: str, where: Where) -> tuple[np.ndarray, np.ndarray | None]:
    """(int64 patient ids, original text or None): integer ids are kept, any others numbered 1.. sorted."""
    text = col.pipe(strip)
    empty = (text == "").to_numpy()
    if empty.any():
        raise where.fail(column, "is empty", empty, "every image needs a patient id")
    num = pd.to_numeric(text, errors="coerce")
    if num.notna().all() and (num == np.floor(num)).all() and num.abs().max() < 2**62:
        return num.to_numpy().astype(np.int64), None
    uniques = np.sort(text.unique())
    return np.searchsorted(uniques, text.to_numpy()).astype(np.int64) + 1, text.to_numpy()


def one_hot(label: pd.Series) -> pd.DataFrame:
    """One 1/0 float32 column per distinct non-empty label (sorted)."""
    names = sorted(set(label) - {""})
    return pd.DataFrame({n: (label == n).to_numpy(dtype=np.float32) for n in names})
