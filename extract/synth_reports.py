"""Synthetic free-text reports for the synthetic MIMIC-CXR folder (``cxrfair cohort synth --format
mimic --reports``), so image-text (contrastive) training can be tested without PhysioNet access.

Written as PhysioNet ships the real ones: ``DIR/mimic-cxr/2.0.0/mimic-cxr-reports.zip`` holding
one report per study at ``files/p1X/p1XXXXXXX/sYYYYYYYY.txt``, which ``cohort build --dataset mimic
--reports`` reads (``datasets/mimic.py``).

A report says what the study's labels say, as the CheXpert labeler would read it back:

- a finding labelled 1 (positive) is asserted in the FINDINGS section with one of three
  phrasings (``POSITIVE``; "Small left pleural effusion.") and named again in the IMPRESSION;
- -1 (uncertain) is hedged: "Possible {noun}." / "{Noun} cannot be excluded." / "Findings may
  represent {noun}." (``NOUN``);
- 0 (negative) is negated: "No {noun}." / "There is no {noun}." / "{Noun} is not seen.", or, for
  half the studies with several negatives, one sentence "There is no {a}, {b} or {c}.";
- blank is not mentioned; a study with nothing positive has an IMPRESSION such as "No acute
  cardiopulmonary process." (No Finding).

Sentences of the FINDINGS section come in random order. Every report also has an EXAMINATION,
an INDICATION naming the sex with the age redacted as MIMIC does ("___-year-old woman with
cough.") and a COMPARISON; those sections are not part of the text a cohort keeps. In
``DEMOGRAPHIC_SHARE`` of the reports the FINDINGS section opens with "The patient is a 72-year-old
woman." (the age at the study), as real reports sometimes state it: the text then reveals sex and
age, as a real report can. Drawn from its own seeded stream, so every other file of the folder is
the same with or without reports; same seed, same bytes (zip entries dated 1980-01-01).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

REPORTS_DIR, REPORTS_NAME = "mimic-cxr/2.0.0", "mimic-cxr-reports.zip"
REPORTS_FILE = f"{REPORTS_DIR}/{REPORTS_NAME}"  # in the synthetic folder, as on PhysioNet
DEMOGRAPHIC_SHARE = 0.10  # reports whose FINDINGS state the patient's age and sex
# Three ways to assert each finding (no hedging words, no other finding's terms).
POSITIVE = {
    "Atelectasis": ("Bibasilar atelectasis.", "There is subsegmental atelectasis at the left base.",
                    "Streaky right basilar atelectasis is seen."),
    "Cardiomegaly": ("The heart is enlarged.", "Moderate cardiomegaly.", "There is cardiomegaly."),
    "Consolidation": ("Focal consolidation in the right lower lobe.", "There is a left lower lobe consolidation.",
                      "Patchy consolidation is seen in the lingula."),
    "Edema": ("Mild pulmonary edema.", "There is moderate interstitial edema.",
              "Findings are consistent with pulmonary edema."),
    "Enlarged Cardiomediastinum": ("The cardiomediastinal silhouette is enlarged.", "The mediastinum is widened.",
                                   "There is mediastinal widening."),
    "Fracture": ("There is a healing fracture of the left sixth rib.", "An acute right rib fracture is seen.",
                 "Old left clavicle fracture."),
    "Lung Lesion": ("A 12 mm nodule in the right upper lobe.", "There is a left perihilar mass.",
                    "A pulmonary nodule is seen at the right base."),
    "Lung Opacity": ("Hazy opacity at the left base.", "There is an ill-defined opacity in the right mid lung.",
                     "Patchy opacities are seen bilaterally."),
    "Pleural Effusion": ("Small left pleural effusion.", "There is a moderate right pleural effusion.",
                         "Bilateral pleural effusions are present."),
    "Pleural Other": ("Pleural thickening at the right apex.", "Calcified pleural plaques are seen.",
                      "There is left apical pleural thickening."),
    "Pneumonia": ("Right lower lobe pneumonia.", "There is a left basilar pneumonia.",
                  "Pneumonia in the right middle lobe."),
    "Pneumothorax": ("Small right apical pneumothorax.", "There is a moderate left pneumothorax.",
                     "A tiny pneumothorax is seen at the left apex."),
    "Support Devices": ("An endotracheal tube terminates 4 cm above the carina.",
                        "A right internal jugular central venous catheter ends in the SVC.",
                        "A left-sided pacemaker is in place."),
}
# The noun hedged, negated and named in the IMPRESSION (singular, no article).
NOUN = {"Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly", "Consolidation": "focal consolidation",
        "Edema": "pulmonary edema", "Enlarged Cardiomediastinum": "mediastinal widening", "Fracture": "rib fracture",
        "Lung Lesion": "pulmonary nodule", "Lung Opacity": "focal opacity", "Pleural Effusion": "pleural effusion",
        "Pleural Other": "pleural thickening", "Pneumonia": "pneumonia", "Pneumothorax": "pneumothorax",
        "Support Devices": "indwelling catheter"}
UNCERTAIN = ("Possible {n}.", "{N} cannot be excluded.", "Findings may represent {n}.")
NEGATIVE = ("No {n}.", "There is no {n}.", "{N} is not seen.")
NORMAL = ("No acute cardiopulmonary process.", "No acute intrathoracic abnormality.", "Normal chest radiograph.")
COMPLAINTS = ("cough", "shortness of breath", "chest pain", "fever", "hypoxia", "line placement")
# Label codes as synth_cxr.CODES indexes them: 1, 0, -1, blank.
POS, NEG, UNC, BLANK = 0, 1, 2, 3


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _wrap(text: str, width: int = 77) -> str:
    """A section body as MIMIC lays it out: lines of at most ``width`` + 1 characters, each indented by
    a space (greedy on spaces; textwrap took 80% of the time at the real size's 227k reports)."""
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join(" " + x for x in lines + [line])


def _series(nouns: list[str], conjunction: str) -> str:
    """``["a", "b", "c"]`` -> ``"a, b or c"``."""
    return nouns[0] if len(nouns) == 1 else ", ".join(nouns[:-1]) + f" {conjunction} " + nouns[-1]


def make_reports(codes: pd.DataFrame, sex: np.ndarray, age: np.ndarray, rng: np.random.Generator) -> list[str]:
    """One report per study (row).

    Args:
        codes: (S, F) label codes 0..3 (``POS, NEG, UNC, BLANK``), one column per finding of
            ``POSITIVE`` (others, such as No Finding, are ignored).
        sex: (S,) ``M`` / ``F``; age: (S,) int age at the study.
        rng: the reports' own Generator.
    Returns:
        S report texts in MIMIC-CXR's layout (module docstring).
    """
    findings = [f for f in codes.columns if f in POSITIVE]
    c = codes[findings].to_numpy()
    n, k = c.shape
    phrasing = rng.integers(0, 3, (n, k))
    order = rng.random((n, k + 1)).argsort(axis=1)
    joint_negatives = rng.random(n) < 0.5
    demographic = rng.random(n) < DEMOGRAPHIC_SHARE
    normal, complaint = rng.integers(0, len(NORMAL), n), rng.integers(0, len(COMPLAINTS), n)
    reports = []
    for i in range(n):
        sentences = {}  # slot in the random order -> sentence
        negatives = [j for j in range(k) if c[i, j] == NEG]
        for j in range(k):
            f, code, v = findings[j], c[i, j], phrasing[i, j]
            if code == POS:
                sentences[j] = POSITIVE[f][v]
            elif code == UNC:
                sentences[j] = UNCERTAIN[v].format(n=NOUN[f], N=_cap(NOUN[f]))
            elif code == NEG and not (joint_negatives[i] and len(negatives) > 1):
                sentences[j] = NEGATIVE[v].format(n=NOUN[f], N=_cap(NOUN[f]))
        if joint_negatives[i] and len(negatives) > 1:
            sentences[k] = "There is no " + _series([NOUN[findings[j]] for j in negatives], "or") + "."
        body = [sentences[j] for j in order[i] if j in sentences]
        woman = sex[i] == "F"
        if demographic[i]:
            body.insert(0, f"The patient is a {int(age[i])}-year-old {'woman' if woman else 'man'}.")
        positives = [NOUN[findings[j]] for j in range(k) if c[i, j] == POS]
        impression = _cap(_series(positives, "and")) + "." if positives else NORMAL[normal[i]]
        reports.append("\n".join([
            " " * 33 + "FINAL REPORT", " EXAMINATION:  CHEST (PA AND LAT)", " ",
            f" INDICATION:  ___-year-old {'woman' if woman else 'man'} with {COMPLAINTS[complaint[i]]}.", " ",
            " COMPARISON:  None.", " ", " FINDINGS:", " ", _wrap(" ".join(body) or "The lungs are clear."), " ",
            " IMPRESSION:", " ", _wrap(impression), ""]))
    return reports


def report_path(subject: int, study: int) -> str:
    """Where MIMIC-CXR keeps a study's report: ``files/p10/p10000032/s50414267.txt``."""
    return f"files/p{str(subject)[:2]}/p{subject}/s{study}.txt"


def write_reports_zip(path: Path, subject: np.ndarray, study: np.ndarray, reports: list[str]) -> None:
    """The reports as ``mimic-cxr-reports.zip``: entries in path order, fixed dates, so bytes repeat."""
    entries = sorted(zip((report_path(int(p), int(s)) for p, s in zip(subject, study)), reports))
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
            zf.writestr(info, text.encode("utf-8"), compresslevel=1)
