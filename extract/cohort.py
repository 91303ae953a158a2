"""The study cohort: NIH ChestX-ray14 metadata -> a balanced, patient-disjoint, split image list.

The preset ``nih-6x200`` is PAPER.md §1: single-label images of six diseases, four groups
(sex M/F x age band young < 60 <= old), 50 images per disease x group (a short cell takes all it
has and the other sex of the same age band makes up the shortfall), split 7:1:2 per disease with
no patient in two splits. The result is a folder with ``cohort.csv`` and ``cohort.json`` (format in
docs/CONTRACTS.md, "Cohort").

Public surface:

- ``CohortConfig`` (frozen dataclass; ``CohortConfig.from_preset(name, **overrides)``)
- ``build_cohort(config) -> Cohort``: read, sample, split, write atomically.
- ``load_cohort(folder) -> Cohort``: read back and validate (hash included).
- ``read_nih_metadata(path) -> DataFrame``: both ``Data_Entry_2017.csv`` (trailing empty column)
  and ``Data_Entry_2017_v2020.csv``, gzipped or not, validated.
- ``sample_cohort``, ``split_cohort``, ``find_images``, ``cohort_hash``, ``composition_table``.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from cxrfair.errors import CxrfairError
from cxrfair.io import atomic_dir, sha256_file

FORMAT = "cxrfair-cohort"
VERSION = 1
COLUMNS = ["image_id", "path", "patient_id", "label", "sex", "age", "age_group", "split"]
HASH_COLUMNS = ["image_id", "patient_id", "label", "sex", "age", "age_group", "split"]
SPLITS = ("train", "val", "test")
SEXES = ("M", "F")
AGE_GROUPS = ("young", "old")
# Group order used in tables and cohort.json: young male, young female, old male, old female.
GROUPS = tuple(f"{a}_{s}" for a in AGE_GROUPS for s in SEXES)

# NIH column -> our column. The first five are required; View Position becomes the extra `view`.
NIH_COLUMNS = {
    "Image Index": "image_id",
    "Finding Labels": "labels",
    "Patient ID": "patient_id",
    "Patient Age": "age",
    "Patient Gender": "sex",
}
NIH_OPTIONAL = {"View Position": "view"}
MAX_AGE = 120  # older is a data-entry error (the 2017 release had ages such as 413)
SEX_CODES = {"M": "M", "F": "F", "MALE": "M", "FEMALE": "F"}

PRESETS = {
    "nih-6x200": dict(
        diseases=("Cardiomegaly", "Effusion", "Atelectasis", "Pneumothorax", "Edema", "Consolidation"),
        per_group=50,
        age_threshold=60,
        split=(0.7, 0.1, 0.2),
    ),
}
VENDORED_METADATA = "data/Data_Entry_2017_v2020.csv.gz"


def vendored_metadata() -> Path:
    """Path of the vendored NIH ``Data_Entry_2017_v2020.csv.gz`` (see extract/data/README.md)."""
    return Path(str(resources.files("cxrfair.extract").joinpath(VENDORED_METADATA)))


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class CohortConfig:
    """What to build and where; validated once on construction (CxrfairError names the option)."""

    out: Path  # output folder for cohort.csv + cohort.json
    metadata: Path | None = None  # NIH Data_Entry_2017*.csv[.gz]; None = the vendored v2020 file
    images: Path | None = None  # NIH images root, searched recursively; None = paths are file names
    preset: str = "nih-6x200"  # rules started from; cohort.json says "custom" once one is changed
    diseases: tuple[str, ...] = PRESETS["nih-6x200"]["diseases"]  # classes, in class order
    per_group: int = 50  # images per disease x (sex, age band) cell
    age_threshold: int = 60  # age >= this is "old", below is "young"
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train/val/test ratio, normalised to sum 1
    seed: int = 0  # seeds both the sampling and the split
    force: bool = False  # replace an existing output folder

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise CxrfairError(f"--preset {self.preset}: unknown preset; known: {', '.join(PRESETS)}")
        object.__setattr__(self, "out", Path(self.out))
        for name in ("metadata", "images"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "diseases", tuple(self.diseases))
        _check_diseases(self.diseases)
        if self.per_group < 1:
            raise CxrfairError(f"--per-group {self.per_group}: must be at least 1")
        if not 0 < self.age_threshold <= MAX_AGE:
            raise CxrfairError(f"--age-threshold {self.age_threshold}: must be between 1 and {MAX_AGE}")
        object.__setattr__(self, "split", _check_split(self.split))
        if self.seed < 0:
            raise CxrfairError(f"--seed {self.seed}: must be a non-negative integer")

    @classmethod
    def from_preset(cls, name: str = "nih-6x200", **overrides) -> "CohortConfig":
        """The preset's rules with ``overrides`` (None values keep the preset's value)."""
        if name not in PRESETS:
            raise CxrfairError(f"--preset {name}: unknown preset; known: {', '.join(PRESETS)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if isinstance(given.get("diseases"), str):
            given["diseases"] = parse_list(given["diseases"])
        if isinstance(given.get("split"), str):
            given["split"] = parse_split(given["split"])
        return cls(**{**PRESETS[name], **given, "preset": name})

    def rules(self) -> dict:
        """The sampling and split rules (the part of the config a preset fixes)."""
        return dict(diseases=list(self.diseases), per_group=self.per_group,
                    age_threshold=self.age_threshold, split=list(self.split))

    def preset_label(self) -> str:
        """``preset`` when the rules are the preset's own, else ``"custom"`` (recorded in cohort.json)."""
        p = PRESETS[self.preset]
        same = ([d.lower() for d in self.diseases] == [d.lower() for d in p["diseases"]]
                and (self.per_group, self.age_threshold, self.split) == (p["per_group"], p["age_threshold"], _check_split(p["split"])))
        return self.preset if same else "custom"


def parse_list(text: str) -> tuple[str, ...]:
    """``"Edema, Effusion"`` -> ``("Edema", "Effusion")``."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_split(text: str) -> tuple[float, float, float]:
    """``"0.7,0.1,0.2"`` (or ``"7,1,2"``) -> three floats; CxrfairError naming --split otherwise."""
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise CxrfairError(f"--split {text}: expected three numbers such as 0.7,0.1,0.2") from None
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
    bad = [d for d in diseases if "|" in d]
    if bad:
        raise CxrfairError(f"--diseases: '{bad[0]}' contains '|'; give single findings separated by commas")


# --------------------------------------------------------------------------------------------
# Reading NIH metadata


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
    raw = _read_csv(path)
    missing = [c for c in NIH_COLUMNS if c not in raw.columns]
    if missing:
        raise CxrfairError(
            f"metadata {path}: missing column(s) {', '.join(repr(c) for c in missing)}; expected the NIH "
            f"ChestX-ray14 columns ({', '.join(list(NIH_COLUMNS) + list(NIH_OPTIONAL))}, ...)")
    if raw.empty:
        raise CxrfairError(f"metadata {path}: no rows; pass the NIH Data_Entry_2017*.csv[.gz]")
    cols = {**NIH_COLUMNS, **{k: v for k, v in NIH_OPTIONAL.items() if k in raw.columns}}
    df = raw[list(cols)].rename(columns=cols)
    df = df.apply(lambda col: _map_unique(col, str.strip))
    df["line"] = np.arange(len(df)) + 2  # header is line 1
    df["image_id"] = _check_image_ids(df, path)
    df["patient_id"] = _parse_int(df, "patient_id", "Patient ID", path, 0, None)
    df["age"] = _parse_int(df, "age", "Patient Age", path, 0, MAX_AGE, strip_suffix="Y")
    df["sex"] = _parse_sex(df, path)
    return df.reset_index(drop=True)


def _read_csv(path: Path) -> pd.DataFrame:
    """All columns as str; drops the empty trailing column of the 2017 release."""
    if not path.is_file():
        raise CxrfairError(f"metadata {path}: file not found (or not a file); pass --metadata Data_Entry_2017*.csv[.gz]")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, compression="infer")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CxrfairError(f"metadata {path}: not a readable CSV ({reason}); pass the NIH Data_Entry_2017*.csv[.gz]") from None
    empty = [c for c in raw.columns if str(c).startswith("Unnamed:") and (raw[c] == "").all()]
    return raw.drop(columns=empty)


def _map_unique(col: pd.Series, f) -> pd.Series:
    """``col.map(f)`` computed once per distinct value (metadata columns repeat a lot; 112k rows)."""
    codes, uniques = pd.factorize(col)
    mapped = np.array([f(u) for u in uniques] + [None], dtype=object)
    return pd.Series(mapped[codes], index=col.index, name=col.name)


def _bad_rows(df: pd.DataFrame, bad: pd.Series) -> str:
    """'3 rows, first on line 12 (image X, value 'v')' for an error message."""
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
    text = _map_unique(df[col], lambda v: v.upper().removesuffix(strip_suffix)) if strip_suffix else df[col]
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
    sex = _map_unique(df["sex"], lambda v: SEX_CODES.get(v.upper()))
    bad = sex.isna()
    if bad.any():
        value = df.loc[bad, "sex"].iloc[0]
        raise CxrfairError(f"metadata {path}: column 'Patient Gender' has an unknown code '{value}' in "
                           f"{_bad_rows(df, bad)}; allowed codes are M and F")
    return sex.astype(str)


# --------------------------------------------------------------------------------------------
# Sampling


def known_findings(meta: pd.DataFrame) -> list[str]:
    """Every finding named in ``labels`` (sorted)."""
    return sorted({f.strip() for labels in meta["labels"].unique() for f in labels.split("|")} - {""})


def resolve_diseases(diseases: Iterable[str], meta: pd.DataFrame, path: Path) -> list[str]:
    """Map the requested findings to the data's spelling (case-insensitive); unknown -> CxrfairError."""
    known = known_findings(meta)
    by_lower = {k.lower(): k for k in known}
    out = []
    for d in diseases:
        if d.lower() not in by_lower:
            raise CxrfairError(f"--diseases: '{d}' is not a finding in metadata {path}; "
                               f"known findings: {', '.join(known)}")
        out.append(by_lower[d.lower()])
    return out


def add_age_group(meta: pd.DataFrame, threshold: int) -> pd.DataFrame:
    """Add ``age_group`` ('young' if age < threshold else 'old') and ``group`` ('<age_group>_<sex>')."""
    age_group = np.where(meta["age"] >= threshold, "old", "young")
    return meta.assign(age_group=age_group, group=[f"{a}_{s}" for a, s in zip(age_group, meta["sex"])])


def _cell_rng(seed: int, *key: str) -> np.random.Generator:
    # One stream per cell, keyed by name, so adding or dropping a disease leaves the others' draws alone.
    return np.random.default_rng([seed, zlib.crc32("/".join(key).encode())])


def cell_quotas(available: dict[str, int], per_group: int) -> dict[str, int]:
    """How many images each sex of one (disease, age band) takes.

    Args:
        available: sex -> number of single-label images, e.g. ``{"M": 53, "F": 47}``.
    Returns:
        sex -> quota; a short sex takes all it has, the other sex makes up the shortfall
        (``{"M": 53, "F": 47}`` for 50 each), so the band always has ``2 * per_group``.
        Returns None when the band as a whole has too few images.
    """
    short = {s: n for s, n in available.items() if n < per_group}
    if not short:
        return {s: per_group for s in available}
    if len(short) == len(available):
        return None
    (s_short, n_short), = short.items()
    (s_other,) = set(available) - {s_short}
    need = 2 * per_group - n_short
    return {s_short: n_short, s_other: need} if available[s_other] >= need else None


def sample_cohort(meta: pd.DataFrame, diseases: list[str], per_group: int, seed: int, path: Path) -> pd.DataFrame:
    """Draw the single-label images of each disease x group (PAPER.md §1 rules).

    Args:
        meta: ``read_nih_metadata`` output with ``age_group`` (see ``add_age_group``).
    Returns:
        The chosen rows of ``meta`` with a ``label`` column, ``len(diseases) * 4 * per_group`` rows.
    """
    single = meta[meta["labels"].isin(diseases)]
    chosen = []
    for disease in diseases:
        for band in AGE_GROUPS:
            pools = {s: single[(single["labels"] == disease) & (single["age_group"] == band) & (single["sex"] == s)]
                     .sort_values("image_id") for s in SEXES}
            quota = cell_quotas({s: len(p) for s, p in pools.items()}, per_group)
            if quota is None:
                have = " + ".join(f"{len(p)} {s}" for s, p in pools.items())
                raise CxrfairError(
                    f"cell {band} {disease}: metadata {path} has only {have} single-label images, "
                    f"{2 * per_group} needed ({per_group} per sex, short sex filled from the other); "
                    f"lower --per-group or drop {disease} from --diseases")
            for s, pool in pools.items():
                idx = _cell_rng(seed, disease, band, s).choice(len(pool), size=quota[s], replace=False)
                chosen.append(pool.iloc[np.sort(idx)])
    return pd.concat(chosen).rename(columns={"labels": "label"}).reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Patient-disjoint stratified split


def split_targets(n: int, ratio: tuple[float, float, float]) -> np.ndarray:
    """Largest-remainder rounding of ``n * ratio``: (3,) ints summing to n (ties go to train, val, test)."""
    ideal = n * np.asarray(ratio, dtype=float)
    base = np.floor(ideal + 1e-9).astype(int)
    # Rounded so float noise (28 * 0.2 = 5.6000000000000005) does not break ties against train.
    order = np.argsort(-np.round(ideal - base, 9), kind="stable")
    base[order[: n - base.sum()]] += 1
    return base


@dataclass
class _SplitProblem:
    """Patient blocks and targets. B: (P, K) images of each patient per cell; M: (K, D) cell -> disease;
    T: (3, D) exact disease targets; I: (3, K) ideal (fractional) cell counts."""

    B: np.ndarray
    M: np.ndarray
    T: np.ndarray
    I: np.ndarray
    W: float = 1000.0  # a disease total off by one costs more than any cell imbalance we accept

    def cost_terms(self, C: np.ndarray) -> float:
        """Cost of cell counts C (3, K): W * sum |disease - T| + sum (cell - ideal)^2."""
        return self.W * np.abs(C @ self.M - self.T).sum() + ((C - self.I) ** 2).sum()


def _greedy(p: _SplitProblem, order: np.ndarray) -> np.ndarray:
    """Assign blocks in ``order`` one by one to the split whose cost drops most. Returns (P,) split index."""
    C = np.zeros_like(p.I)
    assign = np.empty(len(p.B), dtype=int)
    for i in order:
        b = p.B[i]
        deltas = [p.cost_terms(C + np.eye(3)[s][:, None] * b) for s in range(3)]
        s = int(np.argmin(deltas))
        assign[i] = s
        C[s] += b
    return assign


def _move_deltas(p: _SplitProblem, C: np.ndarray, assign: np.ndarray) -> np.ndarray:
    """(P, 3) cost change of moving each block to each split (0 for its own split)."""
    E, Dv = C - p.I, C @ p.M - p.T  # (3, K), (3, D)
    Bd = p.B @ p.M  # (P, D)
    src = assign
    # Leaving the source split.
    out_cells = (p.B**2 - 2 * p.B * E[src]).sum(1)
    out_dis = (np.abs(Dv[src] - Bd) - np.abs(Dv[src])).sum(1)
    deltas = np.zeros((len(p.B), 3))
    for t in range(3):
        in_cells = (p.B**2 + 2 * p.B * E[t]).sum(1)
        in_dis = (np.abs(Dv[t] + Bd) - np.abs(Dv[t])).sum(1)
        deltas[:, t] = np.where(src == t, 0.0, out_cells + in_cells + p.W * (out_dis + in_dis))
    return deltas


def _swap_deltas(p: _SplitProblem, C: np.ndarray, i: np.ndarray, j: np.ndarray, s: int, t: int) -> np.ndarray:
    """(len(i), len(j)) cost change of exchanging block i (in split s) with block j (in split t)."""
    E, Dv = C - p.I, C @ p.M - p.T
    d = p.B[j][None, :, :] - p.B[i][:, None, :]  # (I, J, K): what split s gains
    dd = d @ p.M
    cells = (2 * d**2 + 2 * d * (E[s] - E[t])).sum(-1)
    dis = (np.abs(Dv[s] + dd) - np.abs(Dv[s]) + np.abs(Dv[t] - dd) - np.abs(Dv[t])).sum(-1)
    return cells + p.W * dis


def _best_swap(p: _SplitProblem, C: np.ndarray, assign: np.ndarray, chunk: int = 256) -> tuple[float, tuple]:
    """The best pairwise exchange between two splits: (delta, (block a, block b, split of a, split of b))."""
    best = (np.inf, ())
    for s, t in ((0, 1), (0, 2), (1, 2)):
        i, j = np.flatnonzero(assign == s), np.flatnonzero(assign == t)
        for lo in range(0, len(i), chunk):  # chunks bound memory at chunk * len(j) * K
            sw = _swap_deltas(p, C, i[lo:lo + chunk], j, s, t)
            if sw.size and sw.min() < best[0]:
                a, b = np.unravel_index(np.argmin(sw), sw.shape)
                best = (sw[a, b], (i[lo + a], j[b], s, t))
    return best


def _local_search(p: _SplitProblem, assign: np.ndarray, max_rounds: int = 5_000) -> np.ndarray:
    """Repair: apply the best single move, or if none helps the best swap, while the cost drops."""
    assign = assign.copy()
    for _ in range(max_rounds):
        C = np.stack([p.B[assign == s].sum(0) for s in range(3)])
        moves = _move_deltas(p, C, assign)
        if moves.min() < -1e-9:
            blk, to = np.unravel_index(np.argmin(moves), moves.shape)
            assign[blk] = to
            continue
        delta, (a, b, s, t) = _best_swap(p, C, assign)
        if delta > -1e-9:
            break
        assign[a], assign[b] = t, s
    return assign


def split_cohort(table: pd.DataFrame, classes: list[str], ratio: tuple[float, float, float], seed: int,
                 restarts: int = 20) -> pd.Series:
    """Assign whole patients to train/val/test.

    Each disease gets exactly its largest-remainder share of ``ratio`` (140/20/40 of 200 for
    7:1:2); each (disease, group) cell lands as close to the ratio as the patients allow. A
    patient may have images in several diseases and groups, so patients are the unit: a greedy
    pass (largest patients first, seeded tie order) then best-improvement moves and swaps; if a
    disease total is still off, up to ``restarts`` more tries from seeded random orders.

    Args:
        table: rows with ``label``, ``group``, ``patient_id``.
    Returns:
        (N,) Series of 'train'/'val'/'test' aligned with ``table``.
    Raises:
        CxrfairError if no patient-disjoint assignment with exact disease totals was found.
    """
    cells = [(c, g) for c in classes for g in GROUPS]
    cell_idx = pd.MultiIndex.from_tuples(cells).get_indexer(pd.MultiIndex.from_arrays([table["label"], table["group"]]))
    patients, block = np.unique(table["patient_id"].to_numpy(), return_inverse=True)
    B = np.zeros((len(patients), len(cells)))
    np.add.at(B, (block, cell_idx), 1)
    M = np.kron(np.eye(len(classes)), np.ones((len(GROUPS), 1)))  # (K, D)
    n_cell = B.sum(0)
    T = np.stack([split_targets(int(n), ratio) for n in n_cell @ M], axis=1).astype(float)
    p = _SplitProblem(B=B, M=M, T=T, I=np.outer(ratio, n_cell))
    rng = np.random.default_rng([seed, zlib.crc32(b"split")])
    for attempt in range(restarts + 1):
        # First try: largest patients first (ties in seeded order); then seeded random orders,
        # which get lumpy small cohorts out of local optima the moves and swaps cannot leave.
        perm = rng.permutation(len(patients))
        order = perm[np.argsort(-B.sum(1)[perm], kind="stable")] if attempt == 0 else perm
        assign = _local_search(p, _greedy(p, order))
        C = np.stack([B[assign == s].sum(0) for s in range(3)])
        off = np.abs(C @ M - T).sum(0)
        if not off.any():
            break
    if off.any():
        bad = classes[int(np.flatnonzero(off)[0])]
        raise CxrfairError(f"--split: could not split {bad} into exact {'/'.join(map(str, T[:, np.flatnonzero(off)[0]].astype(int)))} "
                           "train/val/test without putting a patient in two splits; try another --seed or --split")
    return pd.Series(np.asarray(SPLITS)[assign[block]], index=table.index, name="split")


# --------------------------------------------------------------------------------------------
# Images


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


# --------------------------------------------------------------------------------------------
# The cohort object, hash, table


@dataclass(frozen=True, eq=False)
class Cohort:
    """A built or loaded cohort. ``table``: cohort.csv rows (COLUMNS + extras); ``meta``: cohort.json."""

    table: pd.DataFrame
    meta: dict
    folder: Path | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def hash(self) -> str:
        return self.meta["hash"]

    def image_paths(self, images_root: Path | str | None = None) -> list[Path]:
        """Absolute image paths; ``images_root`` overrides the root recorded in cohort.json."""
        root = images_root if images_root is not None else self.meta.get("images_root")
        if root is None:
            raise CxrfairError(f"cohort {self.folder}: built without --images, so it has no images root; "
                               "pass the NIH images folder (images_root)")
        root = Path(root).resolve()
        return [root / p for p in self.table["path"]]


def cohort_hash(table: pd.DataFrame, classes: list[str]) -> str:
    """SHA-256 over the classes and the HASH_COLUMNS of every row, in order (not the paths).

    Text hashed: ``classes:<c1>|<c2>|...\\n`` then one ``v1,v2,...\\n`` line per row.
    """
    h = hashlib.sha256(("classes:" + "|".join(classes) + "\n").encode())
    cols = [table[c].astype("int64").tolist() if c in ("patient_id", "age") else table[c].astype(str).tolist()
            for c in HASH_COLUMNS]
    h.update("".join(",".join(map(str, row)) + "\n" for row in zip(*cols)).encode())
    return h.hexdigest()


def count_composition(table: pd.DataFrame, classes: list[str]) -> dict:
    """Counts for cohort.json: totals, per split, per label x split and per label x group x split."""
    def by_split(rows: pd.DataFrame) -> dict:
        return {s: int((rows["split"] == s).sum()) for s in SPLITS}

    return {
        "images": int(len(table)),
        "patients": int(table["patient_id"].nunique()),
        "split": by_split(table),
        "patients_per_split": {s: int(table.loc[table["split"] == s, "patient_id"].nunique()) for s in SPLITS},
        "label_split": {c: by_split(table[table["label"] == c]) for c in classes},
        "label_group_split": {c: {g: by_split(table[(table["label"] == c) & (_groups(table) == g)]) for g in GROUPS}
                              for c in classes},
    }


def _groups(table: pd.DataFrame) -> pd.Series:
    return table["age_group"] + "_" + table["sex"]


def composition_table(cohort: Cohort) -> str:
    """Plain-text table: one row per label x group, columns train/val/test/total, plus totals."""
    counts = cohort.meta["counts"]["label_group_split"]
    head = f"{'label':<16}{'group':<10}" + "".join(f"{s:>7}" for s in SPLITS) + f"{'total':>7}"
    lines = [head, "-" * len(head)]
    for c in cohort.classes:
        for g in GROUPS:
            n = [counts[c][g][s] for s in SPLITS]
            lines.append(f"{c:<16}{g:<10}" + "".join(f"{x:>7}" for x in n) + f"{sum(n):>7}")
    tot = [cohort.meta["counts"]["split"][s] for s in SPLITS]
    lines += ["-" * len(head), f"{'all':<26}" + "".join(f"{x:>7}" for x in tot) + f"{sum(tot):>7}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Build and load


def build_cohort(config: CohortConfig) -> Cohort:
    """Read the metadata, sample, split, resolve images and write ``config.out`` atomically."""
    metadata = config.metadata or vendored_metadata()
    meta = add_age_group(read_nih_metadata(metadata), config.age_threshold)
    classes = resolve_diseases(config.diseases, meta, metadata)
    table = sample_cohort(meta, classes, config.per_group, config.seed, metadata)
    table["split"] = split_cohort(table, classes, config.split, config.seed)
    table["path"] = _paths(table["image_id"], config.images)
    table = _order(table, classes)
    info = _cohort_json(config, table, classes, metadata)
    cohort = Cohort(table=table, meta=info, folder=config.out)
    with atomic_dir(config.out, force=config.force) as tmp:
        table.to_csv(tmp / "cohort.csv", index=False, lineterminator="\n")
        (tmp / "cohort.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return cohort


def _paths(image_ids: pd.Series, images: Path | None) -> list[str]:
    if images is None:
        return image_ids.tolist()
    found = find_images(images, image_ids)
    return [found[i] for i in image_ids]


def _order(table: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Contract order: split (train, val, test), label in class order, image_id; COLUMNS then extras."""
    key = pd.DataFrame({"s": table["split"].map({s: i for i, s in enumerate(SPLITS)}),
                        "l": table["label"].map({c: i for i, c in enumerate(classes)}), "i": table["image_id"]})
    table = table.loc[key.sort_values(["s", "l", "i"]).index]
    extras = [c for c in ("view",) if c in table.columns]
    return table[COLUMNS + extras].reset_index(drop=True)


def _cohort_json(config: CohortConfig, table: pd.DataFrame, classes: list[str], metadata: Path) -> dict:
    from cxrfair import __version__

    return {
        "format": FORMAT,
        "version": VERSION,
        "preset": config.preset_label(),
        "classes": classes,
        "parameters": {**config.rules(), "diseases": classes, "groups": list(GROUPS),
                       "fill_rule": "a short sex takes all it has; the other sex of the same age band fills the rest"},
        "seed": config.seed,
        "images_root": str(config.images.resolve()) if config.images is not None else None,
        "metadata_source": {"path": str(Path(metadata).resolve()), "sha256": sha256_file(metadata)},
        "counts": count_composition(table, classes),
        "hash": cohort_hash(table, classes),
        "cxrfair_version": __version__,
    }


def load_cohort(folder: Path | str) -> Cohort:
    """Read ``folder/cohort.csv`` + ``cohort.json`` and check them against each other.

    Raises:
        CxrfairError naming the file and the problem (missing, foreign format, columns, values,
        hash mismatch).
    """
    folder = Path(folder)
    meta = _load_json(folder / "cohort.json")
    table = _load_csv(folder / "cohort.csv", meta["classes"])
    if cohort_hash(table, meta["classes"]) != meta["hash"]:
        raise CxrfairError(f"cohort {folder / 'cohort.csv'}: content does not match the hash in cohort.json "
                           "(edited or mixed up?); rebuild with `cxrfair cohort build`")
    return Cohort(table=table, meta=meta, folder=folder)


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise CxrfairError(f"cohort {path}: not found; build the cohort with `cxrfair cohort build --out {path.parent}`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CxrfairError(f"cohort {path}: not valid JSON ({e}); rebuild the cohort") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CxrfairError(f"cohort {path}: not a cxrfair cohort file (format != {FORMAT!r}); rebuild the cohort")
    if meta.get("version") != VERSION:
        raise CxrfairError(f"cohort {path}: version {meta.get('version')!r}, this cxrfair reads {VERSION}; rebuild the cohort")
    missing = [k for k in ("classes", "hash", "counts") if k not in meta]
    if missing:
        raise CxrfairError(f"cohort {path}: missing field(s) {', '.join(missing)}; rebuild the cohort")
    return meta


def _load_csv(path: Path, classes: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise CxrfairError(f"cohort {path}: not found; rebuild the cohort")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise CxrfairError(f"cohort {path}: not a readable CSV ({e}); rebuild the cohort") from None
    if list(table.columns[: len(COLUMNS)]) != COLUMNS:
        raise CxrfairError(f"cohort {path}: columns {list(table.columns)}; expected {', '.join(COLUMNS)} first")
    for col in ("patient_id", "age"):
        num = pd.to_numeric(table[col], errors="coerce")
        if num.isna().any():
            raise CxrfairError(f"cohort {path}: column '{col}' has non-integer values; rebuild the cohort")
        table[col] = num.astype("int64")
    allowed = {"label": set(classes), "sex": set(SEXES), "age_group": set(AGE_GROUPS), "split": set(SPLITS)}
    for col, ok in allowed.items():
        bad = sorted(set(table[col]) - ok)
        if bad:
            raise CxrfairError(f"cohort {path}: column '{col}' has unexpected value(s) {bad}; allowed {sorted(ok)}")
    return table


__all__ = [
    "COLUMNS", "GROUPS", "PRESETS", "SPLITS", "Cohort", "CohortConfig", "build_cohort", "cell_quotas",
    "cohort_hash", "composition_table", "find_images", "load_cohort", "parse_split", "read_nih_metadata",
    "sample_cohort", "split_cohort", "split_targets", "vendored_metadata",
]
