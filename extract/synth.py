"""Synthetic chest X-rays in the layouts of NIH ChestX-ray14, CheXpert and MIMIC-CXR-JPG, with known,
planted group differences.

``cxrfair cohort synth --format nih|chexpert|mimic --out DIR``. The NIH layout is described here;
the CheXpert and MIMIC layouts (multi-label findings, race, the real file names) in
``synth_cxr.py``. All three share the renderer in ``synth_render.py``.

``cxrfair cohort synth --out DIR`` (NIH) writes

- ``DIR/Data_Entry_2017.csv``: the NIH metadata columns in the 2017 release's exact layout
  (``Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age, Patient Gender,
  View Position, OriginalImage[Width,Height], OriginalImagePixelSpacing[x,y]`` and the trailing
  empty column that release has);
- ``DIR/images_001/images/00000001_000.png`` ...: 8-bit grayscale PNGs, ``size`` px square,
  spread over ``images_00k/images/`` folders of 500 like the NIH download;
- ``DIR/test_list.txt`` and ``DIR/train_val_list.txt``: the official split, by patient (about a
  quarter of the patients in test), one image name per line as NIH publishes them;
- ``DIR/NIH-CX14_TubeAnnotations_NonExperts_aggregated.csv``: NEATX-style chest-drain labels
  (``Image Index, Drain``) for every image with Pneumothorax; half of them (seeded) have a drain,
  and those images carry a drain marker (below); other images are not annotated (unknown);
- ``DIR/synth_info.json``: everything below, as data (seed, counts, patterns, group effects).

What is planted (all intensities on a 0..1 scale before 8-bit quantisation):

- Background: a chest-like template (body ellipse ~0.55, two darker lung fields ~0.25, a brighter
  mediastinum), per-image smooth low-frequency variation (sd 0.04), brightness/contrast jitter
  (+-0.03 / x0.9..1.1) and white pixel noise whose sd depends on the group (below).
- One pattern per finding, at its place (coordinates are fractions of the image, y down; ``side``
  = one lung chosen at random per image; positions jitter by +-0.03):

  ============== ===============================================================================
  Cardiomegaly   enlarged bright heart: ellipse at (0.62, 0.50), radii 0.17 x 0.24, +0.35
  Effusion       bright fluid level filling the base of one lung below y ~ 0.70, +0.40
  Atelectasis    two thin bright horizontal plates (y ~ 0.55, 0.62) across one lung, +0.45
  Pneumothorax   dark apex of one lung above y ~ 0.36 (-0.30) with a bright pleural line
  Edema          both lungs: perihilar haze (+0.15) and horizontal stripes (period 4/64 of the
                 image, +-0.12; "Kerley lines")
  Consolidation  mottled bright blob in one mid lung (sd 0.08 of the image), +0.40 x texture
  ============== ===============================================================================

- Group differences (controlled, so fairness gaps are real and their direction is known):

  * pattern amplitude factor: young M 1.00, young F 0.75, old M 0.70, old F 0.50 (the finding is
    fainter for old and for female patients, most for old women);
  * pixel-noise sd: young M 0.04, young F 0.06, old M 0.08, old F 0.10 (old images noisiest);
  * a side marker (a small bright square, 5% of the image) in the top-left corner for F and the
    top-right corner for M: sex is readable from the image, as it is on real radiographs, but the
    marker carries no label information.

  A classifier should therefore be least accurate on old female and most accurate on young male
  images, with an age gap larger than the sex gap (a nearest-centroid classifier on the pixels of
  64 px images scores about 0.87 young M, 0.82 young F, 0.80 old M, 0.63 old F, over seeds 0-2).

- Rows: per (sex, age band) group, ``per_cell`` single-label images of each of the six preset
  diseases, ``per_cell // 2`` "No Finding" images and ``per_cell // 4`` images with two findings
  (so the single-label filter has something to drop). The images of a group are dealt out in
  random order to patients of 1-4 images each (several findings per patient, so patient-disjoint
  splits are exercised); a patient's age stays in its band over follow-ups. Ages: young 18-58,
  old 60-89. View Position: PA with probability 0.6, else AP (independent of everything else).

- Drain marker (the shortcut NEATX lets one test): a bright tube (+0.5, 1.5% of the image wide,
  at least 1.5 pixels)
  from the lower outer chest wall (y 0.88) up into the apex of one lung (y 0.30), drawn on the
  Pneumothorax images whose drain label is 1, at the same strength in every group.

Everything is drawn from ``numpy.random.default_rng(seed)``; the official split and the drains from
their own seeded streams, so images without a drain are the bytes this module wrote before drains
existed. Same seed, same bytes.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfair.io import atomic_dir

from .synth_cxr import make_cxr_synth
from .synth_render import AMPLITUDE, NOISE_SD, PATTERNS, SynthConfig, render_images
from .synth_reports import REPORTS_FILE

DISEASES = ("Cardiomegaly", "Effusion", "Atelectasis", "Pneumothorax", "Edema", "Consolidation")
GROUPS = (("M", "young"), ("F", "young"), ("M", "old"), ("F", "old"))
AGE_RANGE = {"young": (18, 57), "old": (60, 88)}  # base age; follow-ups add at most 1 year
PATIENT_SIZES, PATIENT_PROBS = (1, 2, 3, 4), (0.4, 0.3, 0.2, 0.1)
PER_FOLDER = 500  # images per images_00k/ folder (NIH uses ~10,000)
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
METADATA_NAME = "Data_Entry_2017.csv"
SPLIT_NAMES = ("test_list.txt", "train_val_list.txt")
NEATX_NAME = "NIH-CX14_TubeAnnotations_NonExperts_aggregated.csv"
TEST_SHARE = 0.25  # patients in the official test list (NIH: 25,596 of 112,120 images)
DRAIN_SHARE = 0.5  # Pneumothorax images with a drain
DRAIN_MARKER = "bright tube (+0.5, width 1.5% of the image, at least 1.5 px) from (0.88, chest wall) to (0.30, lung apex) on one side"



# --------------------------------------------------------------------------------------------
# Rows (the metadata table)


def _group_findings(per_cell: int, rng: np.random.Generator) -> list[str]:
    """The 'Finding Labels' of one group's images, shuffled."""
    labels = [d for d in DISEASES for _ in range(per_cell)] + ["No Finding"] * (per_cell // 2)
    for _ in range(per_cell // 4):
        pair = rng.choice(len(DISEASES), size=2, replace=False)
        labels.append("|".join(sorted(DISEASES[i] for i in pair)))
    return [labels[i] for i in rng.permutation(len(labels))]


def _deal_to_patients(n: int, rng: np.random.Generator) -> list[int]:
    """Split n images into consecutive patients of 1-4 images; returns the patient sizes."""
    sizes = []
    while sum(sizes) < n:
        sizes.append(min(int(rng.choice(PATIENT_SIZES, p=PATIENT_PROBS)), n - sum(sizes)))
    return sizes


def plan_rows(config: SynthConfig, rng: np.random.Generator) -> pd.DataFrame:
    """The metadata rows, NIH-sorted by image index.

    Returns:
        DataFrame with ``image_id, labels, follow_up, patient_id, age, sex, age_group, view``.
    """
    patients = []  # (sex, band, [findings]) per patient
    for sex, band in GROUPS:
        findings = _group_findings(config.per_cell, rng)
        start = 0
        for k in _deal_to_patients(len(findings), rng):
            patients.append((sex, band, findings[start:start + k]))
            start += k
    rows = []
    for pid, p in enumerate(rng.permutation(len(patients)), start=1):
        sex, band, findings = patients[p]
        base = int(rng.integers(AGE_RANGE[band][0], AGE_RANGE[band][1] + 1))
        for k, f in enumerate(findings):
            rows.append(dict(image_id=f"{pid:08d}_{k:03d}.png", labels=f, follow_up=k, patient_id=pid,
                             age=base + k // 2, sex=sex, age_group=band, view="PA" if rng.random() < 0.6 else "AP"))
    return pd.DataFrame(rows).sort_values("image_id", ignore_index=True)


def metadata_csv(rows: pd.DataFrame, size: int) -> str:
    """The 2017-release CSV text (trailing empty column included) for ``rows``."""
    spacing = round(0.143 * 1024 / size, 6)
    lines = [NIH_HEADER] + [
        f"{r.image_id},{r.labels},{r.follow_up},{r.patient_id},{r.age},{r.sex},{r.view},{size},{size},{spacing},{spacing},"
        for r in rows.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def render(rows: pd.DataFrame, size: int, rng: np.random.Generator) -> np.ndarray:
    """(N, S, S) uint8 images for NIH ``rows`` (see the module docstring for what is planted)."""
    amp = np.array([AMPLITUDE[(s, b)] for s, b in zip(rows["sex"], rows["age_group"])])
    findings = rows["labels"].str.split("|")
    weights = {d: amp * findings.apply(lambda ls, d=d: d in ls).to_numpy() for d in DISEASES}
    sd = np.array([NOISE_SD[(s, b)] for s, b in zip(rows["sex"], rows["age_group"])])
    drain = rows["drain"].to_numpy() == 1 if "drain" in rows.columns else None
    side = rows["drain_side"].to_numpy() if "drain" in rows.columns else None
    return render_images(weights, rows["sex"].to_numpy(), sd, size, rng, drain, side)


# --------------------------------------------------------------------------------------------
# Official split and drains (their own seeded streams, so the rows and pixels above stay put)


def _stream(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def plan_official_split(rows: pd.DataFrame, seed: int) -> np.ndarray:
    """(N,) bool: the image's patient is in the official test list (``TEST_SHARE`` of patients)."""
    patients = np.unique(rows["patient_id"])
    test = patients[_stream(seed, "official-split").random(len(patients)) < TEST_SHARE]
    return rows["patient_id"].isin(test).to_numpy()


def plan_drains(rows: pd.DataFrame, seed: int) -> pd.DataFrame:
    """``drain`` (1 / 0 on Pneumothorax images, NaN elsewhere: not annotated) and ``drain_side``."""
    rng = _stream(seed, "drains")
    ptx = rows["labels"].str.split("|").apply(lambda ls: "Pneumothorax" in ls).to_numpy()
    drain = np.where(ptx, (rng.random(len(rows)) < DRAIN_SHARE).astype(float), np.nan)
    return rows.assign(drain=drain, drain_side=rng.integers(0, 2, size=len(rows)))


def neatx_csv(rows: pd.DataFrame) -> str:
    """NEATX's aggregated file for the annotated images (pandas-style leading index column)."""
    ann = rows[rows["drain"].notna()]
    return "".join([",Image Index,Drain\n"] + [f"{i},{im},{int(d)}\n" for i, (im, d) in
                                                 enumerate(zip(ann["image_id"], ann["drain"]))])


# --------------------------------------------------------------------------------------------
# Writing


def image_relpath(index: int, image_id: str) -> str:
    """NIH-style location of the index-th image: ``images_001/images/<id>`` (500 per folder)."""
    return f"images_{index // PER_FOLDER + 1:03d}/images/{image_id}"


def synth_info(config: SynthConfig, rows: pd.DataFrame) -> dict:
    """What was generated and planted, for synth_info.json."""
    single = rows[rows["labels"].isin(DISEASES)]
    counts = single.groupby(["labels", "age_group", "sex"]).size()
    return {
        "generator": "cxrfair.extract.synth", "format": "nih",
        "seed": config.seed, "size": config.size, "per_cell": config.per_cell,
        "metadata": METADATA_NAME, "images": int(len(rows)), "patients": int(rows["patient_id"].nunique()),
        "single_label_counts": {d: {f"{b}_{s}": int(counts.get((d, b, s), 0)) for s, b in GROUPS} for d in DISEASES},
        "other_rows": {"No Finding": int((rows["labels"] == "No Finding").sum()),
                       "multi_label": int(rows["labels"].str.contains("|", regex=False).sum())},
        "patterns": {d: PATTERNS[d] for d in DISEASES},
        "group_effects": {
            "pattern_amplitude": {f"{b}_{s}": a for (s, b), a in AMPLITUDE.items()},
            "pixel_noise_sd": {f"{b}_{s}": v for (s, b), v in NOISE_SD.items()},
            "side_marker": "bright square, 5% of the image: top-left for F, top-right for M",
            "expected": "accuracy lowest for old_F, highest for young_M; age gap > sex gap",
        },
        "ages": {band: [lo, hi + 1] for band, (lo, hi) in AGE_RANGE.items()},
        "official_split": {"files": list(SPLIT_NAMES), "test_patient_share": TEST_SHARE,
                           "test_images": int(rows["official_test"].sum())},
        "drains": {"file": NEATX_NAME, "annotated": "every image with Pneumothorax; others unknown",
                   "drain_share": DRAIN_SHARE, "with_drain": int((rows["drain"] == 1).sum()),
                   "without_drain": int((rows["drain"] == 0).sum()), "marker": DRAIN_MARKER,
                   "expected": "Pneumothorax is easier to detect on images with a drain (a shortcut)"},
    }


def build_command(info: dict, out: Path) -> str:
    """The ``cxrfair cohort build`` line for a synthetic folder (printed by ``cohort synth``)."""
    q = lambda p: f"'{p}'" if " " in str(p) else str(p)  # noqa: E731
    if info["format"] == "nih":
        return (f"cxrfair cohort build --metadata {q(out / info['metadata'])} --images {q(out)} --out COHORT\n"
                f"  (drains: --preset nih-neatx-pneumothorax --official-split {q(out)} --drains {q(out / NEATX_NAME)})")
    return info["build"].replace("OUT", str(out))


def make_synth(config: SynthConfig) -> dict:
    """Write the synthetic data set to ``config.out`` atomically; returns synth_info."""
    if config.format != "nih":
        return make_cxr_synth(config)
    from PIL import Image  # Pillow only where images are written (importing this module stays light)

    rng = np.random.default_rng(config.seed)
    rows = plan_drains(plan_rows(config, rng), config.seed)
    rows["official_test"] = plan_official_split(rows, config.seed)
    pixels = render(rows, config.size, rng) if config.images else []
    info = synth_info(config, rows)
    writes = ("images_*", METADATA_NAME, *SPLIT_NAMES, NEATX_NAME, "synth_info.json")
    with atomic_dir(config.out, force=config.force, writes=writes) as tmp:
        for i, (image_id, px) in enumerate(zip(rows["image_id"], pixels)):
            path = tmp / image_relpath(i, image_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(px).save(path, compress_level=6)
        (tmp / METADATA_NAME).write_text(metadata_csv(rows, config.size), encoding="utf-8")
        for name, test in zip(SPLIT_NAMES, (True, False)):
            (tmp / name).write_text("".join(f"{i}\n" for i in rows.loc[rows["official_test"] == test, "image_id"]), encoding="utf-8")
        (tmp / NEATX_NAME).write_text(neatx_csv(rows), encoding="utf-8")
        (tmp / "synth_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


__all__ = ["DISEASES", "REPORTS_FILE", "SynthConfig", "build_command", "make_synth", "plan_rows", "render", "render_images", "synth_info"]
