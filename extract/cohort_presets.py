"""Cohort presets as data: one row per published protocol.

A preset fixes the rules (task, classes, how images are chosen and split, which attributes are
compared, age bins); every rule can be overridden on the command line, and ``cohort.json`` then
says ``"preset": "custom"``. Adding a preset is one ``Preset(...)`` in ``PRESETS``.

Split rules:

- ``exact``: multi-class; every class gets exactly its largest-remainder share of ``split``,
  patient-disjoint (Sun et al., ISBI 2025).
- ``patients``: patients are dealt to train/val/test in the ``split`` ratio (exact patient
  counts), stratified by sex, age group, race, conditions and image count.
- ``official``: the dataset's own split (NIH ``test_list.txt`` / ``train_val_list.txt``, MIMIC
  ``split`` file, a csv ``split`` column). Where it has no validation split (NIH), val is dealt
  out of the official training patients in the ratio val : train of ``split`` (1 : 7).
"""

from __future__ import annotations

from dataclasses import dataclass

SIX_NIH = ("Cardiomegaly", "Effusion", "Atelectasis", "Pneumothorax", "Edema", "Consolidation")
# Sourget et al.'s six conditions, CheXpert / MIMIC spelling (class names are the dataset's own,
# so the label columns read y_Pleural Effusion, and prompts say "Pleural Effusion").
SIX_CHEXPERT = ("Atelectasis", "Cardiomegaly", "Consolidation", "Pleural Effusion", "Pneumonia", "Pneumothorax")
SOURGET_BINS = (18, 25, 50, 65, 80)
TASKS = ("multiclass", "multilabel")
SPLIT_RULES = ("exact", "patients", "official")
UNCERTAIN = ("ignore", "zeros", "ones")


@dataclass(frozen=True)
class Preset:
    """The rules of one protocol (each field is a default the command line may override)."""

    name: str
    dataset: str  # reader used when --dataset is not given
    task: str  # multiclass (one label per image) | multilabel (one 1/0/empty target per condition)
    classes: tuple[str, ...]  # classes / conditions in order; () = every finding the data has
    split_rule: str  # exact | patients | official (module docstring)
    split: tuple[float, float, float]  # train/val/test ratio
    attributes: tuple[str, ...]  # sensitive attributes compared downstream, in order
    age_bins: tuple[int, ...]  # one number = young/old cut; several = left-closed bins from the first
    per_group: int | None = None  # multiclass: images per class x (sex, age group) cell
    min_age: int | None = None  # images of younger patients are left out
    views: str = "frontal"  # frontal (AP/PA) | all
    uncertain: str = "ignore"  # multilabel: -1 -> masked (ignore) / 0 (zeros) / 1 (ones)
    optional_attributes: tuple[str, ...] = ()  # appended to attributes when the data has them
    needs: tuple[str, ...] = ()  # standard columns the data must provide (drain, official_split, race)
    description: str = ""


# The preset a bare --dataset gets (the first preset written for it).
DEFAULT_PRESET = {"nih": "nih-6x200", "chexpert": "chexpert-6", "mimic": "mimic-sourget", "csv": "all-multilabel"}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("nih-6x200", "nih", "multiclass", SIX_NIH, "exact", (0.7, 0.1, 0.2), ("sex", "age_group"), (60,),
           per_group=50,
           description="Sun et al. (ISBI 2025): single-label NIH images of six findings, 50 per finding x sex x "
                       "age band (<60, >=60), split 7:1:2 per finding, patient-disjoint"),
    Preset("mimic-sourget", "mimic", "multilabel", SIX_CHEXPERT, "official", (0.7, 0.1, 0.2),
           ("sex", "age_group", "race"), SOURGET_BINS, min_age=18, needs=("race", "official_split"),
           description="Sourget et al.: every frontal MIMIC-CXR image of White, Black and Asian adults; official "
                       "split (test for evaluation, train / validate for probes and fine-tuning); six conditions"),
    Preset("nih-neatx-pneumothorax", "nih", "multilabel", ("Pneumothorax",), "official", (0.7, 0.1, 0.2),
           ("sex", "age_group"), (60,), needs=("drain", "official_split"),
           description="Sourget et al.'s shortcut test: NIH official test list with NEATX chest-drain labels, binary "
                       "Pneumothorax; train/val from train_val_list.txt (val = 1/8 of its patients)"),
    Preset("chexpert-6", "chexpert", "multilabel", SIX_CHEXPERT, "patients", (0.7, 0.1, 0.2), ("sex", "age_group"),
           SOURGET_BINS, min_age=18, optional_attributes=("race",),
           description="every frontal CheXpert image of adults with sex Male/Female, six conditions, split 70/10/20 "
                       "by patients (seeded); race joins the attributes with --demographics"),
    Preset("all-multilabel", "csv", "multilabel", (), "patients", (0.7, 0.1, 0.2), ("sex", "age_group"), (60,),
           description="every frontal image and every finding of the data, split 70/10/20 by patients (seeded)"),
)}
