"""The study cohort: a dataset's files -> a patient-disjoint, split image list (cohort.csv + cohort.json).

A reader (``cxrfair.extract.datasets``: nih, chexpert, mimic, csv) turns the user's files into
one standard table; a preset (``cohort_presets.PRESETS``) says which images to keep, how to
split them and which attributes to compare; this module applies the rules and writes the folder
(format in docs/CONTRACTS.md, "Cohort").

- Multi-class presets (``nih-6x200``, Sun et al.; docs/datasets.md): single-label images of each class, a fixed
  number per class x (sex, age band) cell (a short cell takes all it has and the other sex of
  the same band makes up the shortfall), split with exact per-class totals, patient-disjoint.
- Multi-label presets (``mimic-sourget``, ``chexpert-6``, ``nih-neatx-pneumothorax``,
  ``all-multilabel``): every image that passes the filters (frontal, sex known, age known and in
  the bins, every sensitive attribute known), one ``y_<Condition>`` target per condition, split
  by the dataset's official split or by patients.

Public surface: ``CohortConfig`` (``CohortConfig.from_preset(name, **overrides)``),
``build_cohort(config) -> Cohort``, ``load_cohort(folder) -> Cohort``, ``Cohort`` (``.table``,
``.meta``, ``.classes``, ``.hash``, ``.task``, ``.attributes``, ``.targets()``,
``.image_paths()``), ``composition_table``, plus the pieces (``read_nih_metadata``,
``sample_cohort``, ``split_cohort``, ``deal_patients``, ``cohort_hash``, ``find_images``, ...).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from cxrfair import __version__
from cxrfair.errors import CxrfairError
from cxrfair.io import atomic_dir, sha256_file

from .cohort_format import (
    AGE_GROUPS, COLUMNS, EXTRA_ORDER, FORMAT, GROUPS, HASH_COLUMNS, ML_COLUMNS, SEXES, SPLITS, VERSION, Cohort,
    cell_texts, cohort_hash, composition_table, count_composition, count_multilabel, load_cohort, write_cohort_files,
)
from .cohort_presets import PRESETS, SPLIT_RULES, UNCERTAIN, Preset
from .cohort_select import (
    age_labels, attribute_groups, bin_ages, cell_quotas, check_groups, check_multilabel, parse_age_bins,
    resolve_names, sample_cohort, select_rows, targets, warn_empty_groups,
)
from .cohort_split import deal_patients, patient_strata, split_cohort, split_targets
from .datasets import OPTIONS, DatasetTable, Sources, get_reader, read_dataset
from .datasets.base import MAX_AGE, parse_names
from .datasets.nih import read_nih_metadata, vendored_metadata

VIEWS = ("frontal", "all")
# Standard-table columns that never reach cohort.csv (the split column and y_ targets replace them).
NOT_CARRIED = {"frontal", "official_split", "label", "labels", "line", "group"}
# Standard columns that are never a sensitive attribute (drain is a shortcut, the rest ids or image facts).
NOT_ATTRIBUTES = NOT_CARRIED | {"drain", "view", "study_id", "study_date", "patient_key", "path", "image_id",
                                "patient_id", "age", "split", "sex", "age_group", "text"}


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class CohortConfig:
    """What to build and where. None = the preset's rule; validated once on construction
    (CxrfairError names the option)."""

    out: Path  # output folder for cohort.csv + cohort.json
    metadata: Path | None = None  # the dataset's main file (MIMIC: its folder); NIH default: the vendored v2020 file
    images: Path | None = None  # images root; None = paths as the metadata gives them
    preset: str = "nih-6x200"  # rules started from; cohort.json says "custom" once one is changed
    dataset: str | None = None  # reader: a key of datasets.READERS (default: the preset's)
    # The reader's own files and settings given, by key (datasets.OPTIONS: drains, mimic_iv, columns, ...),
    # each in its Option's form; from_preset takes them as keywords too (drains=PATH, columns="path=P,...").
    options: dict = field(default_factory=dict)
    diseases: tuple[str, ...] | None = None  # classes / conditions, in class order
    per_group: int | None = None  # multi-class: images per class x (sex, age band) cell
    age_threshold: int | None = None  # the paper's young/old cut (same as age_bins=(t,))
    age_bins: tuple[int, ...] | None = None  # age group edges (module cohort_select.bin_ages)
    attributes: tuple[str, ...] | None = None  # sensitive attributes; None = the preset's (+ optional ones present)
    uncertain: str | None = None  # multi-label: ignore | zeros | ones
    split: tuple[float, float, float] | None = None  # train/val/test ratio, normalised to sum 1
    split_rule: str | None = None  # exact | patients | official
    min_age: int | None = None  # leave out younger patients
    views: str | None = None  # frontal | all
    max_train: int | None = None  # at most this many training images (whole patients, seeded)
    seed: int = 0  # seeds sampling and splits
    force: bool = False  # replace an existing output folder

    def __post_init__(self) -> None:
        p = _preset(self.preset)
        for name in ("out", "metadata", "images"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "options", _reader_options(self.options))
        self._check_values(p)
        defaults = dict(dataset=p.dataset, diseases=p.classes, per_group=p.per_group, age_bins=p.age_bins,
                        uncertain=p.uncertain, split=p.split, split_rule=p.split_rule, min_age=p.min_age, views=p.views)
        if self.age_threshold is not None:
            defaults["age_bins"] = (self.age_threshold,)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "diseases", tuple(self.diseases))
        object.__setattr__(self, "split", _check_split(self.split))
        if p.task == "multiclass" and self.per_group is None:
            raise CxrfairError(f"--preset {p.name}: multi-class presets need --per-group")

    def _check_values(self, p: Preset) -> None:
        if self.diseases is not None:
            object.__setattr__(self, "diseases", tuple(self.diseases))
            _check_diseases(self.diseases)
        if self.per_group is not None and (p.task != "multiclass" or self.per_group < 1):
            raise CxrfairError(f"--per-group {self.per_group}: must be at least 1, and applies to multi-class presets "
                               f"(nih-6x200), not {p.name}")
        if self.age_threshold is not None:
            if not 0 < self.age_threshold <= MAX_AGE:
                raise CxrfairError(f"--age-threshold {self.age_threshold}: must be between 1 and {MAX_AGE}")
            if self.age_bins is not None:
                raise CxrfairError("--age-threshold and --age-bins: give one (--age-bins 60 is the same as --age-threshold 60)")
        if self.age_bins is not None:
            object.__setattr__(self, "age_bins", parse_age_bins(self.age_bins))
        _check_choice("--uncertain", self.uncertain, UNCERTAIN)
        _check_choice("--split", self.split_rule, SPLIT_RULES)
        _check_choice("--views", self.views, VIEWS)
        if self.attributes is not None:
            object.__setattr__(self, "attributes", _check_attributes(tuple(self.attributes)))
        for name, lo in (("seed", 0), ("min_age", 0), ("max_train", 1)):
            value = getattr(self, name)
            if value is not None and value < lo:
                raise CxrfairError(f"--{name.replace('_', '-')} {value}: must be at least {lo}")

    @classmethod
    def from_preset(cls, name: str = "nih-6x200", **overrides) -> "CohortConfig":
        """The preset's rules with ``overrides`` (None values keep the preset's value). Text forms of
        list options are parsed: ``diseases="Edema, Effusion"``, ``split="7,1,2"`` or ``"official"``,
        ``age_bins="18,25"``, ``attributes="sex,race"``, ``columns="path=P,sex=S"``, ``labels="A,B"``."""
        _preset(name)
        given = {k: v for k, v in overrides.items() if v is not None}
        options = {**given.pop("options", {}), **{k: given.pop(k) for k in list(given) if k in OPTIONS}}
        given["options"] = _reader_options(options)
        for key in ("diseases", "attributes"):
            if isinstance(given.get(key), str):
                given[key] = parse_names(given[key])
        if isinstance(given.get("split"), str):
            if given["split"].strip() == "official":
                given["split_rule"] = given.pop("split").strip()
            else:
                given["split"] = parse_split(given["split"])
        return cls(**{**given, "preset": name})

    def sources(self) -> Sources:
        return Sources(metadata=self.metadata, **self.options)

    def source_files(self) -> list[tuple[str, Path, tuple[str, ...]]]:
        """``(key, path, files inside if a folder)`` of every file or folder the reader will read:
        ``metadata`` (or the reader's default file) and each path option given, as its reader declares them."""
        reader = get_reader(self.dataset)
        meta = reader.METADATA
        out = []
        metadata = self.metadata or (meta.default() if meta.default else None)
        if metadata is not None:
            out.append(("metadata", Path(metadata), meta.files))
        for option in reader.OPTIONS:
            if option.is_path and self.options.get(option.key) is not None:
                out.append((option.key, Path(self.options[option.key]), option.files))
        return out

    def rules(self) -> dict:
        """The rules a preset fixes, as resolved (recorded under cohort.json ``parameters``)."""
        out = dict(diseases=list(self.diseases), per_group=self.per_group, age_bins=list(self.age_bins),
                   split=list(self.split), split_rule=self.split_rule, min_age=self.min_age, views=self.views)
        if _preset(self.preset).task == "multiclass":
            out["age_threshold"] = self.age_bins[0] if len(self.age_bins) == 1 else None
        else:
            out.update(uncertain=self.uncertain, max_train=self.max_train)
        return out

    def preset_label(self, attributes: Iterable[str] | None = None) -> str:
        """``preset`` when the rules are the preset's own, else ``"custom"`` (recorded in cohort.json).

        ``attributes``: the resolved attribute list; it must be the preset's (plus optional ones)."""
        p = _preset(self.preset)
        same = ([d.lower() for d in self.diseases] == [d.lower() for d in p.classes]
                and (self.per_group, self.age_bins, self.split, self.split_rule, self.min_age, self.views, self.uncertain)
                == (p.per_group, p.age_bins, _check_split(p.split), p.split_rule, p.min_age, p.views, p.uncertain))
        if attributes is not None:
            extra = [a for a in attributes if a not in p.attributes]
            same &= list(attributes)[: len(p.attributes)] == list(p.attributes) and set(extra) <= set(p.optional_attributes)
        return self.preset if same else "custom"


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise CxrfairError(f"--preset {name}: unknown preset; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def _check_choice(option: str, value, allowed) -> None:
    if value is not None and value not in allowed:
        raise CxrfairError(f"{option} {value}: expected one of {', '.join(allowed)}")


def _reader_options(options) -> dict:
    """The reader options given, each in its Option's form (``Option.parse``); unknown keys are a
    CxrfairError naming the known ones. Options not given (None / empty) are left out."""
    unknown = [k for k in options if k not in OPTIONS]
    if unknown:
        raise CxrfairError(f"{unknown[0]}: not an option of any dataset reader; known: {', '.join(OPTIONS)}")
    parsed = {k: OPTIONS[k].parse(v) for k, v in options.items()}
    return {k: v for k, v in parsed.items() if v is not None}


def parse_split(text: str) -> tuple[float, float, float]:
    """``"0.7,0.1,0.2"`` (or ``"7,1,2"``) -> three floats; CxrfairError naming --split otherwise."""
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise CxrfairError(f"--split {text}: expected three numbers such as 0.7,0.1,0.2, or 'official'") from None
    return _check_split(parts)


def _check_split(parts) -> tuple[float, float, float]:
    parts = tuple(float(x) for x in parts)
    if len(parts) != 3 or not all(np.isfinite(parts)) or min(parts) <= 0:
        raise CxrfairError(f"--split {','.join(f'{p:g}' for p in parts)}: expected three positive numbers "
                           "(train,val,test) such as 0.7,0.1,0.2")
    total = sum(parts)
    return tuple(round(p / total, 12) for p in parts)


def _check_diseases(diseases: tuple[str, ...]) -> None:
    if not diseases:
        raise CxrfairError("--diseases: empty; give at least one finding, e.g. Edema,Effusion")
    dupes = sorted({d for d in diseases if diseases.count(d) > 1})
    if dupes:
        raise CxrfairError(f"--diseases: {', '.join(dupes)} given twice; list each finding once")
    bad = [d for d in diseases if "|" in d or "," in d]
    if bad:
        raise CxrfairError(f"--diseases: '{bad[0]}' contains '|' or ','; give single findings separated by commas")


def _check_attributes(attributes: tuple[str, ...]) -> tuple[str, ...]:
    if not attributes or len(set(attributes)) != len(attributes):
        raise CxrfairError(f"--attributes {','.join(attributes)}: give each attribute once, e.g. sex,age_group,race")
    if attributes[:2] != ("sex", "age_group"):
        # Every cohort carries sex and age_group columns; the analysis compares at least these two.
        raise CxrfairError(f"--attributes {','.join(attributes)}: must start with sex,age_group (then e.g. race)")
    return attributes


# --------------------------------------------------------------------------------------------
# Build


def build_cohort(config: CohortConfig) -> Cohort:
    """Read the dataset, choose and split the rows, resolve images and write ``config.out`` atomically.

    Every check happens before anything is written; a CxrfairError leaves no output behind.
    """
    data = read_dataset(config.dataset, config.sources())
    preset = PRESETS[config.preset]
    attributes = _attribute_names(config, preset, data)
    _check_needs(config, preset, data, attributes)
    rows, excluded = _filter(data, config, attributes)
    if preset.task == "multiclass":
        table, classes = _multiclass(rows, data, config)
    else:
        table, classes, dropped = _multilabel(rows, data, config, attributes)
        excluded.update(dropped)
    specs = {a: _attribute_spec(a, table[a], config.age_bins) for a in attributes}
    if preset.task == "multilabel":  # no test image in a group: its metrics undefined, refused
        check_groups(table, specs, f"cohort from metadata {data.metadata}")
    # Balanced sampling fills a short sex from the other one, so a group can still end up empty.
    warn_empty_groups(table, specs, SPLITS, f"cohort from metadata {data.metadata}")
    table["path"] = _paths(table, data, config.images)
    table = _order(table, classes, preset.task)
    texts = {c: cell_texts(table[c]) for c in table.columns}  # once, for the hash and the file
    meta = _cohort_json(config, preset, data, table, classes, specs, excluded, texts)
    inputs = [config.images, *(path for _, path, _ in config.source_files())]
    with atomic_dir(config.out, force=config.force, inputs=inputs, writes=("cohort.csv", "cohort.json")) as tmp:
        write_cohort_files(tmp, table, meta, texts)
    return Cohort(table=table, meta=meta, folder=config.out)


def _attribute_names(config: CohortConfig, preset: Preset, data: DatasetTable) -> list[str]:
    if config.attributes is not None:
        reserved = [a for a in config.attributes[2:] if a in NOT_ATTRIBUTES or a in data.findings]
        if reserved:
            raise CxrfairError(f"--attributes: '{reserved[0]}' is not a sensitive attribute (a shortcut, id, finding or "
                               "image property); attributes are sex, age_group, race or a csv column mapped as NAME=COL")
        missing = [a for a in config.attributes[2:] if not data.has(a)]
        if missing:
            how = _how(data.dataset).get(missing[0])
            raise CxrfairError(f"--attributes: '{missing[0]}' is not in the data of --dataset {data.dataset}"
                               + (f" ({missing[0]} needs {how})" if how else ""))
        return list(config.attributes)
    return list(preset.attributes) + [a for a in preset.optional_attributes if data.has(a)]


def _how(dataset: str) -> dict[str, str]:
    """How to give standard data (race, the official split, ...) to ``dataset``: its reader's ``HOW``."""
    return getattr(get_reader(dataset), "HOW", {})


def _attribute_spec(name: str, values: pd.Series, bins: tuple[int, ...]) -> dict:
    """``{"groups": [...], "reference": first group}`` (M, the youngest band, White)."""
    groups = attribute_groups(name, values, bins)
    return {"groups": groups, "reference": groups[0]}


def _check_needs(config: CohortConfig, preset: Preset, data: DatasetTable, attributes: list[str]) -> None:
    """A preset the data cannot fill stops here, naming what to pass."""
    how = {"official_split": "the dataset's split file", "race": "race data", **_how(data.dataset)}
    needs = [n for n in preset.needs if n != "race" or "race" in attributes]
    if config.split_rule == "official" and "official_split" not in needs:
        needs.append("official_split")
    for need in needs:
        if not data.has(need):
            raise CxrfairError(f"--preset {preset.name}: needs {need.replace('_', ' ')} data, which --dataset "
                               f"{data.dataset} has only with {how.get(need, need)}")
    if config.options.get("official_split") is not None and config.split_rule != "official":
        raise CxrfairError(f"--official-split: --preset {preset.name} splits by its own rule ({config.split_rule}); "
                           "pass --split official to use the official lists")


def _filter(data: DatasetTable, config: CohortConfig, attributes: list[str]) -> tuple[pd.DataFrame, dict]:
    """Keep the rows every rule allows; counts of rows dropped, by the first rule that dropped them."""
    t = data.table
    age = t["age"].to_numpy(dtype=float)
    age_group = bin_ages(age, config.age_bins)
    steps = []
    if config.views == "frontal":
        steps.append(("not_frontal", t["frontal"].to_numpy(dtype=bool)))
    if config.split_rule == "official":
        steps.append(("no_official_split", (t["official_split"] != "").to_numpy()))
    steps += [("sex_unknown", (t["sex"] != "").to_numpy()), ("age_unknown", ~np.isnan(age))]
    if config.min_age is not None:
        steps.append(("below_min_age", np.nan_to_num(age, nan=-1) >= config.min_age))
    steps.append(("age_outside_bins", age_group != ""))
    for a in attributes[2:]:
        values = t[a].to_numpy()
        if a == "race":  # a known race outside the race groups (the race maps' "other")
            steps.append(("race_other", values != "other"))
        steps.append((f"{a}_unknown", values != ""))
    rows, dropped = select_rows(t.assign(age_group=age_group), steps)
    if rows.empty:
        raise CxrfairError(f"metadata {data.metadata}: no image passes the cohort's rules (dropped: "
                           f"{', '.join(f'{k} {v}' for k, v in dropped.items())}); check the files and options")
    return rows.assign(age=rows["age"].astype("int64")), dropped


def _multiclass(rows: pd.DataFrame, data: DatasetTable, config: CohortConfig) -> tuple[pd.DataFrame, list[str]]:
    """Balanced single-label sampling and the exact per-class split (Sun et al.)."""
    if "label" not in rows.columns:
        raise CxrfairError(f"--preset {config.preset}: needs one label per image, which --dataset {data.dataset} "
                           "does not give" + (f" (add {_how(data.dataset)['label']})" if "label" in _how(data.dataset) else ""))
    classes = resolve_names(config.diseases, data.findings, "--diseases", data.label_file)
    bands = age_labels(config.age_bins)
    table = sample_cohort(rows.drop(columns=list(data.findings)), classes,
                          config.per_group, config.seed, data.label_file, bands)
    table["group"] = table["age_group"] + "_" + table["sex"]
    groups = tuple(f"{a}_{s}" for a in bands for s in SEXES)
    table["split"] = split_cohort(table, classes, config.split, config.seed, groups=groups)
    return table, classes


def _multilabel(rows: pd.DataFrame, data: DatasetTable, config: CohortConfig,
                attributes: list[str]) -> tuple[pd.DataFrame, list[str], dict]:
    """Every kept image, one target per condition, split by the rule; checks each condition fits."""
    option = "--diseases" if config.diseases != PRESETS[config.preset].classes else f"--preset {config.preset}"
    classes = resolve_names(config.diseases or data.findings, data.findings, option, data.label_file)
    table = pd.concat([rows.drop(columns=list(data.findings)), targets(rows[classes], config.uncertain)], axis=1)
    table["split"] = _split_multilabel(table, config, attributes, classes)
    dropped = {}
    if config.max_train is not None:
        table, n = _cap_train(table, config.max_train, config.seed)
        dropped["max_train"] = n
    check_multilabel(table, classes, SPLITS, f"cohort from metadata {data.metadata}")
    return table, classes, dropped


def _split_multilabel(table: pd.DataFrame, config: CohortConfig, attributes: list[str], classes: list[str]) -> np.ndarray:
    """(N,) split per row: dealt by patients, or the official split (val dealt out of train if it has none)."""
    strata_columns = attributes + [f"y_{c}" for c in classes]
    if config.split_rule == "patients":
        block, strata = patient_strata(table, strata_columns)
        return np.asarray(SPLITS)[deal_patients(strata, config.split, config.seed)][block]
    split = table["official_split"].to_numpy().copy()
    if not (split == "val").any():
        train = split == "train"
        block, strata = patient_strata(table[train], strata_columns)
        ratio = (config.split[0], config.split[1])
        split[train] = np.asarray(["train", "val"])[deal_patients(strata, ratio, config.seed, salt="val")][block]
    return split


def _cap_train(table: pd.DataFrame, n: int, seed: int) -> tuple[pd.DataFrame, int]:
    """Keep whole training patients, in seeded random order, while the training images stay <= n."""
    train = (table["split"] == "train").to_numpy()
    patients, block = np.unique(table.loc[train, "patient_id"].to_numpy(), return_inverse=True)
    order = np.random.default_rng([seed, zlib.crc32(b"max-train")]).permutation(len(patients))
    sizes = np.bincount(block)[order]
    keep_patient = np.zeros(len(patients), dtype=bool)
    keep_patient[order[np.cumsum(sizes) <= n]] = True
    keep = ~train
    keep[train] = keep_patient[block]
    return table[keep].reset_index(drop=True), int((~keep).sum())


# --------------------------------------------------------------------------------------------
# Images, order, cohort.json


def find_images(root: Path, names: Iterable[str], option: str = "--images") -> dict[str, str]:
    """Locate image files by name anywhere under ``root`` (NIH: ``images_001/images/...``).

    Returns:
        name -> path relative to ``root`` (POSIX); the first match in sorted walk order wins.
    Raises:
        CxrfairError with the count and first few names of images that are not there.
    """
    root = Path(root)
    if not root.is_dir():
        raise CxrfairError(f"{option} {root}: not a folder; pass the folder of the NIH download (holding images_*/)")
    wanted, found = set(names), {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(wanted.intersection(filenames) - found.keys()):
            found[f] = Path(dirpath, f).relative_to(root).as_posix()
    missing = sorted(wanted - found.keys())
    if missing:
        first = ", ".join(missing[:5])
        raise CxrfairError(f"{option} {root}: {len(missing)} of {len(wanted)} cohort images not found "
                           f"(first: {first}{', ...' if len(missing) > 5 else ''}); point {option} at the folder "
                           "that holds the NIH images_*/images/ folders")
    return found


def check_images(root: Path, paths: Iterable[str], option: str = "--images") -> None:
    """Every ``root/path`` must be a file; CxrfairError with the count and first few missing."""
    root = Path(root)
    if not root.is_dir():
        raise CxrfairError(f"{option} {root}: not a folder; pass the folder the metadata's image paths start from")
    paths = list(paths)
    missing = [p for p in paths if not os.path.isfile(os.path.join(root, p))]
    if missing:
        raise CxrfairError(f"{option} {root}: {len(missing)} of {len(paths)} cohort images not found (first: "
                           f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); point {option} at the "
                           "folder the metadata's image paths start from")


def _paths(table: pd.DataFrame, data: DatasetTable, images: Path | None) -> list[str]:
    if images is None:
        return table["path"].tolist()
    if getattr(get_reader(data.dataset), "SEARCH_IMAGES", False):  # NIH nests images in images_00k/images/: search
        found = find_images(images, table["image_id"])
        return [found[i] for i in table["image_id"]]
    check_images(images, table["path"])
    return table["path"].tolist()


def _order(table: pd.DataFrame, classes: list[str], task: str) -> pd.DataFrame:
    """Contract order. Rows: split (train, val, test), then label in class order (multi-class),
    then image_id. Columns: the contract's, then extras, then (multi-label) the y_ targets."""
    keys = [np.array(table["image_id"].tolist()), table["split"].map({s: i for i, s in enumerate(SPLITS)}).to_numpy()]
    if task == "multiclass":
        keys.insert(1, table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy())
    table = table.iloc[np.lexsort(keys)]  # numpy sorts 400k ids several times faster than pandas
    first = COLUMNS if task == "multiclass" else ML_COLUMNS
    ys = [f"y_{c}" for c in classes] if task == "multilabel" else []
    rest = [c for c in table.columns if c not in first and c not in ys and c not in NOT_CARRIED]
    extras = [c for c in EXTRA_ORDER if c in rest] + [c for c in rest if c not in EXTRA_ORDER]
    return table[first + extras + ys].reset_index(drop=True)


def _cohort_json(config: CohortConfig, preset: Preset, data: DatasetTable, table: pd.DataFrame, classes: list[str],
                 specs: dict, excluded: dict, texts: dict[str, list[str]]) -> dict:
    meta = {"format": FORMAT, "version": VERSION, "dataset": data.dataset, "task": preset.task,
            "preset": config.preset_label(specs), "classes": classes, "attributes": specs,
            "age_bins": list(config.age_bins)}
    parameters = {**config.rules(), "diseases": classes}
    if preset.task == "multiclass":
        groups = [f"{a}_{s}" for a in age_labels(config.age_bins) for s in SEXES]
        parameters.update(groups=groups, fill_rule="a short sex takes all it has; the other sex of the same age band fills the rest")
        counts = count_composition(table, classes, tuple(groups))
    else:
        meta["uncertain"] = config.uncertain
        counts = count_multilabel(table, classes, specs)
    if "drain" in table.columns:
        meta["shortcuts"] = ["drain"]
    return {**meta, "parameters": parameters, "seed": config.seed,
            "images_root": str(config.images.resolve()) if config.images is not None else None,
            "metadata_source": {"path": str(data.metadata.resolve()), "sha256": sha256_file(data.metadata)},
            "sources": [{"role": role, "path": str(Path(p).resolve()), "sha256": sha256_file(p)} for role, p in data.files],
            "counts": counts, "excluded": excluded, "notes": data.notes,
            "hash": cohort_hash(table, classes, preset.task, specs, texts), "cxrfair_version": __version__}


__all__ = [
    "AGE_GROUPS", "COLUMNS", "FORMAT", "GROUPS", "HASH_COLUMNS", "ML_COLUMNS", "PRESETS", "SPLITS", "VERSION",
    "Cohort", "CohortConfig", "build_cohort", "cell_quotas", "check_images", "cohort_hash", "composition_table",
    "count_composition", "deal_patients", "find_images", "load_cohort", "parse_split", "read_nih_metadata",
    "sample_cohort", "split_cohort", "split_targets", "vendored_metadata",
]
