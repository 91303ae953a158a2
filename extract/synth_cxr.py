"""Synthetic CheXpert and MIMIC-CXR-JPG (+ MIMIC-IV) data: the real files' names, columns and codes.

``cxrfair cohort synth --format chexpert --out DIR`` writes

- ``DIR/CheXpert-v1.0-small/train.csv`` and ``valid.csv`` (the last tenth of the patients):
  ``Path, Sex, Age, Frontal/Lateral, AP/PA`` + the 14 findings as ``1.0`` / ``0.0`` / ``-1.0`` /
  blank, one row per image; images at ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``;
- ``DIR/CHEXPERT DEMO.csv``: ``PATIENT, GENDER, AGE_AT_CXR, PRIMARY_RACE, ETHNICITY`` (the real
  file is ``CHEXPERT DEMO.xlsx``; the same columns as CSV, so no spreadsheet library is needed).

``cxrfair cohort synth --format mimic --out DIR`` writes

- ``DIR/mimic-cxr-jpg/2.0.0/mimic-cxr-2.0.0-metadata.csv.gz`` (``dicom_id, subject_id, study_id,
  PerformedProcedureStepDescription, ViewPosition, Rows, Columns, StudyDate, StudyTime, ...``),
  ``mimic-cxr-2.0.0-chexpert.csv.gz`` (one row per study; 2% of studies have none, as when the
  labeler found no report section), ``mimic-cxr-2.0.0-split.csv.gz`` (train / validate / test =
  70 / 10 / 20% of patients) and ``files/p1X/p1XXXXXXX/sYYYYYYYY/<dicom_id>.jpg``;
- ``DIR/mimiciv/2.2/hosp/patients.csv.gz`` (``subject_id, gender, anchor_age, anchor_year,
  anchor_year_group, dod``; 1% of the patients missing) and ``hosp/admissions.csv.gz`` (the 16
  columns of MIMIC-IV 2.2, race in MIMIC-IV's own strings; 10% of the patients without an
  admission, 4% with admissions whose race disagrees);
- with ``--reports``, ``DIR/mimic-cxr/2.0.0/mimic-cxr-reports.zip``: one free-text report per
  study saying what its labels say (``synth_reports.py``).

What is planted (on top of the NIH renderer's chest template and noise, ``synth.py``):

- Patients: sex M 55%; age at the first study uniform 18-89 (CheXpert: 2% children, 5-17);
  race White 60%, Black 20%, Asian 10%, other 7%, unknown 3%; 1 + Poisson(1.9) studies (MIMIC:
  2.5; at most 12), one more year of age every second study; 1 + Binomial(1, 0.19) images per
  study (MIMIC: Binomial(2, 1/3)), the second a lateral view: the real releases' images per
  patient (3.5 and 5.8), so ``--patients 65000 --no-images`` gives files of the real size.
- Findings per study: each of the six conditions and Edema positive 18%, negative 12%,
  uncertain 5%, blank otherwise; the other findings rarer; No Finding = 1 when nothing is positive.
- Frontal images show each positive finding's pattern (``synth.PATTERNS``; Pleural Effusion uses
  the Effusion pattern) at the group's amplitude, uncertain ones at half of it. Amplitude = the
  NIH sex x age factor (young M 1.0, young F 0.75, old M 0.7, old F 0.5; old = 60+) x a race
  factor: **White 1.0, Asian 0.85, Black 0.6** (findings are fainter on Black patients' images),
  so a model should do worst on Black and on old female patients. Lateral views carry no pattern.

Everything is drawn from seeded numpy Generators: same seed, same bytes (gzip files with mtime 0).
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfair.io import atomic_dir

from .cohort_format import csv_text
from .datasets import chexpert, mimic
from .synth_reports import DEMOGRAPHIC_SHARE, REPORTS_DIR, REPORTS_FILE, make_reports, write_reports_zip
from .synth_render import AMPLITUDE, NOISE_SD, PATTERNS, SynthConfig, render_images

CODES = np.array(["1.0", "0.0", "-1.0", ""], dtype=object)  # how both releases write 1 / 0 / -1 / blank
RENDERED = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation",
            "Pleural Effusion": "Effusion", "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", "Edema": "Edema"}
COMMON, RARE = (0.18, 0.12, 0.05), (0.06, 0.04, 0.03)  # P(1), P(0), P(-1); blank otherwise
RACES = ("White", "Black", "Asian", "other", "unknown")
RACE_SHARES = (0.60, 0.20, 0.10, 0.07, 0.03)
RACE_AMPLITUDE = {"White": 1.0, "Black": 0.6, "Asian": 0.85, "other": 1.0, "unknown": 1.0}
CHEXPERT_RACE = {"White": ("White", "White, non-Hispanic", "White, Hispanic"),
                 "Black": ("Black or African American", "Black, non-Hispanic"),
                 "Asian": ("Asian", "Asian, non-Hispanic"),
                 "other": ("Other", "Native Hawaiian or Other Pacific Islander"),
                 "unknown": ("Unknown", "Patient Refused")}
MIMIC_RACE = {"White": ("WHITE", "WHITE - OTHER EUROPEAN", "WHITE - RUSSIAN"),
              "Black": ("BLACK/AFRICAN AMERICAN", "BLACK/CAPE VERDEAN"),
              "Asian": ("ASIAN", "ASIAN - CHINESE", "ASIAN - SOUTH EAST ASIAN"),
              "other": ("HISPANIC/LATINO - PUERTO RICAN", "OTHER", "AMERICAN INDIAN/ALASKA NATIVE"),
              "unknown": ("UNKNOWN", "UNABLE TO OBTAIN")}
DEFAULT_PATIENTS = 400
# (extra studies per patient, (n, p) of extra images per study), matching the real releases' shape:
# CheXpert train 64,540 patients / 187,641 studies / 223,414 images; MIMIC-CXR-JPG 65,379 / 227,835 / 377,110.
SHAPE = {"chexpert": (1.9, (1, 0.19)), "mimic": (2.5, (2, 1 / 3))}
CHUNK = 512  # images rendered at a time
CXR_DIR, IV_DIR = "mimic-cxr-jpg/2.0.0", "mimiciv/2.2/hosp"
CHEXPERT_DIR, DEMO_NAME = "CheXpert-v1.0-small", "CHEXPERT DEMO.csv"


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


# --------------------------------------------------------------------------------------------
# Plan: patients -> studies -> images (vectorised: 65k patients take a second)


def plan_patients(n: int, fmt: str, rng: np.random.Generator) -> pd.DataFrame:
    child = rng.random(n) < (0.02 if fmt == "chexpert" else 0.0)
    return pd.DataFrame({"sex": np.where(rng.random(n) < 0.55, "M", "F"),
                         "age": np.where(child, rng.integers(5, 18, n), rng.integers(18, 90, n)),
                         "race": rng.choice(RACES, size=n, p=RACE_SHARES)})


def plan_studies(patients: pd.DataFrame, findings: tuple[str, ...], rng: np.random.Generator,
                 mean_extra: float = 1.9) -> pd.DataFrame:
    """One row per study: patient, k (0-based study number), age, and one code column per finding
    (0..3 indexing ``CODES``). Studies per patient: 1 + Poisson(``mean_extra``), at most 12."""
    n_st = 1 + np.minimum(rng.poisson(mean_extra, len(patients)), 11)
    pid = np.repeat(np.arange(len(patients)), n_st)
    k = np.arange(len(pid)) - np.repeat(np.cumsum(n_st) - n_st, n_st)
    studies = pd.DataFrame({"patient": pid, "k": k, "age": patients["age"].to_numpy()[pid] + k // 2})
    u = rng.random((len(pid), len(findings)))
    for j, f in enumerate(f for f in findings if f != "No Finding"):
        p = np.cumsum(COMMON if f in RENDERED else RARE)
        studies[f] = np.searchsorted(p, u[:, j], side="right").clip(0, 3)
    if "No Finding" in findings:
        any_pos = (studies[[f for f in findings if f != "No Finding"]] == 0).any(axis=1).to_numpy()
        studies["No Finding"] = np.where(any_pos, 3, 0)
    return studies


def plan_images(studies: pd.DataFrame, rng: np.random.Generator, extra: tuple[int, float] = (1, 0.19)) -> pd.DataFrame:
    """One row per image: study, j (image number in the study), frontal, view (AP / PA / LATERAL).
    Images per study: 1 + Binomial(*``extra``); the second is a lateral view."""
    n_img = 1 + rng.binomial(extra[0], extra[1], len(studies))
    st = np.repeat(np.arange(len(studies)), n_img)
    j = np.arange(len(st)) - np.repeat(np.cumsum(n_img) - n_img, n_img)
    frontal = j != 1
    view = np.where(frontal, np.where(rng.random(len(st)) < 0.35, "PA", "AP"), "LATERAL")
    return pd.DataFrame({"study": st, "j": j, "frontal": frontal, "view": view})


def render_plan(patients: pd.DataFrame, studies: pd.DataFrame, images: pd.DataFrame, size: int,
                rng: np.random.Generator):
    """Yield (image row index, (S, S) uint8) in chunks: frontal images with their findings, lateral
    images as the bare template turned on its side."""
    pat = studies["patient"].to_numpy()[images["study"].to_numpy()]
    sex, race = patients["sex"].to_numpy()[pat], patients["race"].to_numpy()[pat]
    band = np.where(studies["age"].to_numpy()[images["study"].to_numpy()] >= 60, "old", "young")
    amp = np.array([AMPLITUDE[(s, b)] * RACE_AMPLITUDE[r] for s, b, r in zip(sex, band, race)])
    sd = np.array([NOISE_SD[(s, b)] for s, b in zip(sex, band)])
    frontal = images["frontal"].to_numpy()
    for lo in range(0, len(images), CHUNK):
        idx = np.arange(lo, min(lo + CHUNK, len(images)))
        codes = {f: studies[f].to_numpy()[images["study"].to_numpy()[idx]] for f in RENDERED if f in studies.columns}
        weights = {RENDERED[f]: amp[idx] * frontal[idx] * np.select([c == 0, c == 2], [1.0, 0.5], 0.0)
                   for f, c in codes.items()}
        px = render_images(weights, sex[idx], sd[idx], size, rng)
        px[~frontal[idx]] = np.rot90(px[~frontal[idx]], axes=(1, 2))
        yield from zip(idx, px)


def _save_jpeg(path: Path, px: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(px).save(path, quality=90)


def _gz(path: Path, frame: pd.DataFrame) -> None:
    """A .csv.gz with fixed header fields (mtime 0), so the same seed gives the same bytes. Fast
    settings (level 1; our own CSV writer): the 377k-row benchmark files take seconds, not minutes."""
    data = csv_text(frame).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1) as f:
        f.write(data)


def _common_info(config: SynthConfig, patients, studies, images) -> dict:
    return {"generator": "cxrfair.extract.synth_cxr", "format": config.format, "seed": config.seed,
            "size": config.size, "images": int(len(images)), "studies": int(len(studies)),
            "patients": int(len(patients)), "frontal_images": int(images["frontal"].sum()),
            "rendered_findings": {f: PATTERNS[p] for f, p in RENDERED.items()},
            "uncertain_rendering": "uncertain (-1) findings are drawn at half the group's amplitude",
            "group_effects": {"pattern_amplitude_sex_age": {f"{b}_{s}": a for (s, b), a in AMPLITUDE.items()},
                              "pattern_amplitude_race": RACE_AMPLITUDE, "age_band_cut": 60,
                              "pixel_noise_sd": {f"{b}_{s}": v for (s, b), v in NOISE_SD.items()},
                              "side_marker": "bright square: top-left for F, top-right for M",
                              "expected": "AUC lowest for Black and for old female patients"},
            "race_shares": dict(zip(RACES, RACE_SHARES)),
            "patients_by_race": patients["race"].value_counts().reindex(RACES, fill_value=0).astype(int).to_dict()}


# --------------------------------------------------------------------------------------------
# CheXpert


def chexpert_tables(patients, studies, images, rng) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train + valid rows with a ``part`` column, demographics) in CheXpert's layout."""
    st, pid = images["study"].to_numpy(), studies["patient"].to_numpy()[images["study"].to_numpy()]
    part = np.where(pid >= int(len(patients) * 0.9), "valid", "train")
    kind = np.where(images["frontal"], "frontal", "lateral")
    paths = [f"{CHEXPERT_DIR}/{p}/patient{i + 1:05d}/study{k + 1}/view{j + 1}_{v}.jpg"
             for p, i, k, j, v in zip(part, pid, studies["k"].to_numpy()[st], images["j"], kind)]
    sex = patients["sex"].to_numpy()[pid]
    sex_text = np.where(sex == "M", "Male", "Female").astype(object)
    sex_text[np.flatnonzero(pid == 0)[:1]] = "Unknown"  # the real train.csv has one such image
    rows = pd.DataFrame({"Path": paths, "Sex": sex_text, "Age": studies["age"].to_numpy()[st],
                         "Frontal/Lateral": np.where(images["frontal"], "Frontal", "Lateral"),
                         "AP/PA": np.where(images["frontal"], images["view"], "")})
    for f in chexpert.FINDINGS:
        rows[f] = CODES[studies[f].to_numpy()[st]]
    rows["part"] = part
    race = patients["race"].to_numpy()
    pick = rng.integers(0, 2, len(patients))
    demo = pd.DataFrame({"PATIENT": [f"patient{i + 1:05d}" for i in range(len(patients))],
                         "GENDER": np.where(patients["sex"] == "M", "Male", "Female"),
                         "AGE_AT_CXR": patients["age"].to_numpy(),
                         "PRIMARY_RACE": [CHEXPERT_RACE[r][p % len(CHEXPERT_RACE[r])] for r, p in zip(race, pick)],
                         "ETHNICITY": np.where(pick == 1, "Non-Hispanic/Non-Latino", "Unknown")})
    return rows, demo


def write_chexpert(config: SynthConfig, tmp: Path, patients, studies, images, rng) -> dict:
    rows, demo = chexpert_tables(patients, studies, images, _rng(config.seed, "chexpert-demographics"))
    for part in ("train", "valid"):
        rows[rows["part"] == part].drop(columns="part").to_csv(tmp / CHEXPERT_DIR / f"{part}.csv", index=False, lineterminator="\n")
    demo.to_csv(tmp / DEMO_NAME, index=False, lineterminator="\n")
    if config.images:
        for i, px in render_plan(patients, studies, images, config.size, rng):
            _save_jpeg(tmp / rows["Path"].iat[i], px)
    return {"metadata": f"{CHEXPERT_DIR}/train.csv", "valid": f"{CHEXPERT_DIR}/valid.csv", "demographics": DEMO_NAME,
            "build": f"cxrfair cohort build --dataset chexpert --preset chexpert-6 --metadata OUT/{CHEXPERT_DIR}/train.csv "
                     f"--demographics 'OUT/{DEMO_NAME}' --images OUT --out COHORT"}


# --------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG + MIMIC-IV


def mimic_ids(patients, studies, images, rng) -> dict[str, np.ndarray]:
    """subject_id (8 digits from 10000000), study_id (from 50000000), dicom_id (five hex groups)."""
    subject = 10_000_000 + np.sort(rng.choice(10_000_000, size=len(patients), replace=False))
    study = 50_000_000 + rng.choice(10_000_000, size=len(studies), replace=False)
    words = rng.integers(0, 2**32, size=(len(images), 5), dtype=np.uint64)
    dicom = ["%08x-%08x-%08x-%08x-%08x" % tuple(row) for row in words.tolist()]
    return {"subject": subject, "study": study, "dicom": np.array(dicom, dtype=object)}


def mimic_tables(patients, studies, images, rng) -> dict[str, pd.DataFrame]:
    ids = mimic_ids(patients, studies, images, rng)
    st = images["study"].to_numpy()
    pid = studies["patient"].to_numpy()
    anchor_year = rng.integers(2110, 2187, len(patients))
    year = anchor_year[pid] + studies["k"].to_numpy() // 2
    date = year * 10000 + rng.integers(1, 13, len(studies)) * 100 + rng.integers(1, 29, len(studies))
    subject_of_image = ids["subject"][pid[st]]
    meta = pd.DataFrame({
        "dicom_id": ids["dicom"], "subject_id": subject_of_image, "study_id": ids["study"][st],
        "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": images["view"].to_numpy(),
        "Rows": 3056, "Columns": 2544, "StudyDate": date[st],
        "StudyTime": np.round(rng.uniform(0, 235959, len(images)), 3),
        "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
        "ViewCodeSequence_CodeMeaning": np.where(images["frontal"], "postero-anterior", "lateral"),
        "PatientOrientationCodeSequence_CodeMeaning": "Erect"})
    labelled = rng.random(len(studies)) >= 0.02
    labels = pd.DataFrame({"subject_id": ids["subject"][pid], "study_id": ids["study"]})
    for f in mimic.FINDINGS:
        labels[f] = CODES[studies[f].to_numpy()]
    split_of_patient = np.array(["train", "validate", "test"])[np.searchsorted([0.7, 0.8], rng.random(len(patients)))]
    split = pd.DataFrame({"dicom_id": ids["dicom"], "study_id": ids["study"][st], "subject_id": subject_of_image,
                          "split": split_of_patient[pid[st]]})
    return {"metadata": meta, "chexpert": labels[labelled], "split": split, "studies": labels[["subject_id", "study_id"]],
            "patients": mimic_patients(patients, ids["subject"], anchor_year, rng),
            "admissions": mimic_admissions(patients, ids["subject"], anchor_year, rng)}


def mimic_patients(patients, subject, anchor_year, rng) -> pd.DataFrame:
    keep = rng.random(len(patients)) >= 0.01
    group = np.array(["2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019"])[rng.integers(0, 4, len(patients))]
    return pd.DataFrame({"subject_id": subject, "gender": patients["sex"].to_numpy(),
                         "anchor_age": patients["age"].to_numpy(), "anchor_year": anchor_year,
                         "anchor_year_group": group, "dod": ""})[keep]


def mimic_admissions(patients, subject, anchor_year, rng) -> pd.DataFrame:
    """0-3 admissions per patient; race strings by group; 4% of patients with a disagreeing second race."""
    n_adm = np.where(rng.random(len(patients)) < 0.1, 0, rng.integers(1, 4, len(patients)))
    who = np.repeat(np.arange(len(patients)), n_adm)
    race = patients["race"].to_numpy()[who].astype(object)
    first = np.r_[True, who[1:] != who[:-1]] if len(who) else np.zeros(0, bool)
    conflict = (rng.random(len(patients)) < 0.04)[who] & ~first
    race[conflict] = np.where(race[conflict] == "White", "Black", "White")
    pick = rng.integers(0, 3, len(who))
    strings = [MIMIC_RACE[r][p % len(MIMIC_RACE[r])] for r, p in zip(race, pick)]
    year = anchor_year[who] + rng.integers(0, 3, len(who))
    admit = [f"{y}-0{m}-1{d} 08:00:00" for y, m, d in zip(year, rng.integers(1, 10, len(who)), rng.integers(0, 10, len(who)))]
    return pd.DataFrame({
        "subject_id": subject[who], "hadm_id": 20_000_000 + np.arange(len(who)), "admittime": admit,
        "dischtime": admit, "deathtime": "", "admission_type": "EW EMER.", "admit_provider_id": "P00000",
        "admission_location": "EMERGENCY ROOM", "discharge_location": "HOME", "insurance": "Other",
        "language": "ENGLISH", "marital_status": "SINGLE", "race": strings, "edregtime": "", "edouttime": "",
        "hospital_expire_flag": 0})


def write_mimic(config: SynthConfig, tmp: Path, patients, studies, images, rng) -> dict:
    tables = mimic_tables(patients, studies, images, _rng(config.seed, "mimic-ids"))
    for part in ("metadata", "chexpert", "split"):
        _gz(tmp / CXR_DIR / f"{mimic.PREFIX}{part}.csv.gz", tables[part])
    for part in ("patients", "admissions"):
        _gz(tmp / IV_DIR / f"{part}.csv.gz", tables[part])
    if config.images:
        meta = tables["metadata"]
        for i, px in render_plan(patients, studies, images, config.size, rng):
            sid, study, dicom = meta["subject_id"].iat[i], meta["study_id"].iat[i], meta["dicom_id"].iat[i]
            _save_jpeg(tmp / CXR_DIR / f"files/p{str(sid)[:2]}/p{sid}/s{study}/{dicom}.jpg", px)
    info = {"metadata": CXR_DIR, "mimic_iv": "mimiciv/2.2",
            "official_split": "train / validate / test = 70 / 10 / 20% of patients",
            "build": f"cxrfair cohort build --dataset mimic --preset mimic-sourget --metadata OUT/{CXR_DIR} "
                     f"--mimic-iv OUT/mimiciv/2.2 --images OUT/{CXR_DIR} --out COHORT"}
    if config.reports:
        info.update(write_synth_reports(config, tmp, patients, studies, tables["studies"]))
        info["build"] = info["build"].replace(" --out COHORT", f" --reports OUT/{REPORTS_FILE} --out COHORT")
    return info


def write_synth_reports(config: SynthConfig, tmp: Path, patients, studies, ids: pd.DataFrame) -> dict:
    """mimic-cxr-reports.zip from the studies' labels, on its own seeded stream; its synth_info entry."""
    sex = patients["sex"].to_numpy()[studies["patient"].to_numpy()]
    codes = studies[[f for f in mimic.FINDINGS if f != "No Finding"]]
    reports = make_reports(codes, sex, studies["age"].to_numpy(), _rng(config.seed, "reports"))
    write_reports_zip(tmp / REPORTS_FILE, ids["subject_id"].to_numpy(), ids["study_id"].to_numpy(), reports)
    return {"reports": {"file": REPORTS_FILE, "studies": len(reports),
                        "stating_age_and_sex": sum(r.count("The patient is a ") for r in reports),
                        "demographic_share": DEMOGRAPHIC_SHARE,
                        "content": "FINDINGS assert every positive label, hedge uncertain ones, negate negative ones; "
                                   "blank labels are not mentioned; IMPRESSION names the positives (synth_reports.py)"}}


def make_cxr_synth(config: SynthConfig) -> dict:
    """Write a synthetic CheXpert or MIMIC folder to ``config.out`` atomically; returns synth_info."""
    rng = np.random.default_rng(config.seed)
    findings = chexpert.FINDINGS
    patients = plan_patients(config.patients or DEFAULT_PATIENTS, config.format, rng)
    studies = plan_studies(patients, findings, rng, SHAPE[config.format][0])
    images = plan_images(studies, rng, SHAPE[config.format][1])
    info = _common_info(config, patients, studies, images)
    write = write_chexpert if config.format == "chexpert" else write_mimic
    writes = (CHEXPERT_DIR, DEMO_NAME, CXR_DIR.split("/")[0], IV_DIR.split("/")[0], REPORTS_DIR.split("/")[0],
              "synth_info.json")
    with atomic_dir(config.out, force=config.force, writes=writes) as tmp:
        if config.format == "chexpert":
            (tmp / CHEXPERT_DIR).mkdir()
        info.update(write(config, tmp, patients, studies, images, rng))
        (tmp / "synth_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info
