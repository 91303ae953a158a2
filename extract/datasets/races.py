"""Race maps: a dataset's own race codes -> the groups cxrfair compares (White, Black, Asian).

Every code a map knows goes to one of ``White``, ``Black``, ``Asian`` (kept), ``other`` (a known
race outside those three: left out of cohorts that use race, and counted) or ``unknown`` (not
recorded, declined, unknown: also left out and counted). A code that no map knows is an error
naming the file, column and value, so a new release's new spelling is never silently dropped;
``--race-map FILE`` (CSV ``code,group``) adds or overrides codes.

The maps follow the usual practice of the chest X-ray fairness literature (Gichoya et al. 2022,
Glocker et al. 2023, Sourget et al. 2025): a code belongs to a group when the group's name leads
it (MIMIC) or appears in it (CheXpert), and everything else is ``other``. Hispanic/Latino is an
ethnicity in CheXpert (``White, Hispanic`` is White) but a race category of its own in MIMIC-IV
(``HISPANIC/LATINO - ...`` is other). ``PORTUGUESE`` in MIMIC-IV is a category of its own, not
under ``WHITE - ...``, and so is other. docs/datasets.md lists both maps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrfair.errors import CxrfairError

from .base import RACE_GROUPS, Option, Where, map_unique, read_csv

GROUPS = (*RACE_GROUPS, "other", "unknown")

# MIMIC-IV hosp/admissions.csv.gz `race` (v2.x, 33 codes) and `ethnicity` (v1.0, 8 codes).
MIMIC_IV = {
    "WHITE": "White", "WHITE - OTHER EUROPEAN": "White", "WHITE - EASTERN EUROPEAN": "White",
    "WHITE - RUSSIAN": "White", "WHITE - BRAZILIAN": "White",
    "BLACK/AFRICAN AMERICAN": "Black", "BLACK/AFRICAN": "Black", "BLACK/CAPE VERDEAN": "Black",
    "BLACK/CARIBBEAN ISLAND": "Black",
    "ASIAN": "Asian", "ASIAN - CHINESE": "Asian", "ASIAN - SOUTH EAST ASIAN": "Asian",
    "ASIAN - ASIAN INDIAN": "Asian", "ASIAN - KOREAN": "Asian",
    "HISPANIC/LATINO": "other", "HISPANIC OR LATINO": "other", "HISPANIC/LATINO - PUERTO RICAN": "other",
    "HISPANIC/LATINO - DOMINICAN": "other", "HISPANIC/LATINO - GUATEMALAN": "other",
    "HISPANIC/LATINO - SALVADORAN": "other", "HISPANIC/LATINO - COLUMBIAN": "other",
    "HISPANIC/LATINO - MEXICAN": "other", "HISPANIC/LATINO - HONDURAN": "other",
    "HISPANIC/LATINO - CUBAN": "other", "HISPANIC/LATINO - CENTRAL AMERICAN": "other",
    "SOUTH AMERICAN": "other", "PORTUGUESE": "other", "AMERICAN INDIAN/ALASKA NATIVE": "other",
    "NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER": "other", "MULTIPLE RACE/ETHNICITY": "other", "OTHER": "other",
    "UNKNOWN": "unknown", "UNABLE TO OBTAIN": "unknown", "PATIENT DECLINED TO ANSWER": "unknown", "": "unknown",
}

# CheXpert demographics (CHEXPERT DEMO.xlsx) `PRIMARY_RACE`, 24 codes.
CHEXPERT = {
    "White": "White", "White, non-Hispanic": "White", "White, Hispanic": "White", "White or Caucasian": "White",
    "Black or African American": "Black", "Black, non-Hispanic": "Black", "Black, Hispanic": "Black",
    "Asian": "Asian", "Asian, non-Hispanic": "Asian", "Asian, Hispanic": "Asian", "Asian - Historical Conv": "Asian",
    "Native Hawaiian or Other Pacific Islander": "other", "Pacific Islander, non-Hispanic": "other",
    "Pacific Islander, Hispanic": "other", "American Indian or Alaska Native": "other",
    "Native American, non-Hispanic": "other", "Native American, Hispanic": "other",
    "Other": "other", "Other, non-Hispanic": "other", "Other, Hispanic": "other",
    "Unknown": "unknown", "Race and Ethnicity Unknown": "unknown", "Patient Refused": "unknown", "": "unknown",
}


# The option every reader with race codes accepts (declared once, here, where the maps live).
RACE_MAP = Option("race_map", "file", "CSV code,group adding race codes to the built-in maps (README)")


def load_race_map(path: Path | None, base: dict[str, str]) -> dict[str, str]:
    """``base`` extended by the user's CSV (columns ``code,group``; group one of GROUPS)."""
    if path is None:
        return dict(base)
    hint = "pass a CSV with columns code,group (group: White, Black, Asian, other or unknown)"
    if not Path(path).is_file():
        raise CxrfairError(f"--race-map {path}: file not found (or not a file); {hint}")
    raw = read_csv(Path(path), "--race-map", hint, usecols=["code", "group"])
    bad = ~raw["group"].isin(GROUPS).to_numpy()
    if bad.any():
        raise Where("--race-map", Path(path), raw["code"], "code").fail(
            "group", f"has a group '{raw['group'][bad].iloc[0]}'", bad, f"allowed groups: {', '.join(GROUPS)}")
    return {**base, **dict(zip(raw["code"].str.strip(), raw["group"]))}


def map_race(col: pd.Series, column: str, where: Where, mapping: dict[str, str]) -> np.ndarray:
    """Race codes -> ``White``/``Black``/``Asian``/``other``/``""`` (unknown). Unmapped code: CxrfairError."""
    groups = map_unique(col, lambda v: mapping.get(v.strip()))
    bad = pd.isna(groups)
    if bad.any():
        raise where.fail(column, f"has an unknown race code '{col.iloc[int(np.flatnonzero(bad)[0])]}'", bad,
                         "the race maps are listed in docs/datasets.md ('Race maps'); add the code with --race-map FILE "
                         "(CSV code,group)")
    return np.where(groups == "unknown", "", groups).astype(str)


def patient_groups(patients: np.ndarray, groups: np.ndarray) -> tuple[pd.Series, np.ndarray]:
    """One race group per patient from several records (admissions, demographics rows).

    Unknown records (``""``) are ignored; a patient whose known records disagree (``White`` in one
    admission, ``Black`` or ``other`` in another) has no usable race and is returned as a conflict.

    Returns:
        (group per patient: Series indexed by patient id, conflicting patient ids (K,)).
    """
    known = groups != ""
    pairs = pd.DataFrame({"p": patients[known], "g": groups[known]}).drop_duplicates()
    counts = pairs["p"].value_counts()
    conflict = counts.index[counts > 1].to_numpy()
    single = pairs[~pairs["p"].isin(conflict)]
    return pd.Series(single["g"].to_numpy(), index=single["p"].to_numpy()), conflict
