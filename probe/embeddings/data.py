"""A cache read for embedding analysis: features, cohort rows, sensitive attributes, conditions.

Shared by ``leakage`` and ``geometry``. Also holds the two resampling helpers both use (a
patient-grouped split and a patient bootstrap), each one small function so that either can be
swapped for a shared implementation without touching the analyses.

Attributes: a cohort v2 cache names its sensitive attributes in the ``attributes`` attr
(``{column: {"groups": [...], "reference": group}}``, docs/CONTRACTS.md "Cohort"); a v1
cache has sex (M/F) and age_group (young/old). Any other categorical column of the cohort
table (``view``, ``drain``, ...) can be requested by name; its groups are its values, sorted.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfair.core.bootstrap import resample_counts, stratified_indices
from cxrfair.errors import CxrfairError
from cxrfair.extract.cache import read_cache

V1_ATTRIBUTES = {"sex": {"groups": ["M", "F"], "reference": "M"},
                 "age_group": {"groups": ["young", "old"], "reference": "young"}}
MAX_GROUPS = 20  # more distinct values than this is a continuous column, not a group attribute


@dataclass(frozen=True)
class Attribute:
    """One attribute to analyse.

    Attributes:
        name: the cohort column.
        groups: group values in order (the reference first for the cohort's own attributes).
        codes: (N,) int index into ``groups``; -1 where the value is missing.
        requested: named by the user (problems are errors) rather than defaulted (skipped rows).
    """

    name: str
    groups: tuple
    codes: np.ndarray
    requested: bool

    @property
    def reference(self) -> str:
        return self.groups[0]


@dataclass(frozen=True)
class EmbeddingData:
    """One cache's rows for embedding analysis.

    Attributes:
        x: (N, D) float32 image embeddings as the encoder output them.
        table: the N cohort rows, same order (index 0..N-1).
        model, cohort_hash, source: from the cache.
        task: "multiclass" or "multilabel".
        classes: class / condition names.
        sensitive: the cohort's sensitive attributes, ``{column: {"groups", "reference"}}``.
        text: prompt set -> (..., D) float32 class text embeddings ((draws, C, D), or
            (draws, C, 2, D) for multi-label sets).
    """

    x: np.ndarray
    table: pd.DataFrame
    model: str
    cohort_hash: str
    source: str
    task: str
    classes: list
    sensitive: dict
    text: dict

    @property
    def patients(self) -> np.ndarray:
        return self.table["patient_id"].to_numpy()


def load_embedding_data(cache_path: Path | str, cohort_splits: tuple = ()) -> EmbeddingData:
    """Read a cache (optionally only the rows of some cohort splits); CxrfairError if unusable."""
    cache = read_cache(cache_path)
    where = f"cache {cache_path}"
    x = np.asarray(cache.image_embeddings, dtype=np.float32)
    table = cache.table.reset_index(drop=True)
    keep = _split_rows(table, cohort_splits, where)
    bad = ~np.isfinite(x).all(axis=1) & keep
    if bad.any():
        raise CxrfairError(f"{where}: {int(bad.sum())} image embedding(s) are NaN or infinite (first: "
                           f"{table['image_id'].iloc[int(np.flatnonzero(bad)[0])]}); re-run `cxrfair extract --force`")
    attrs = cache.attrs
    text = {name: np.asarray(te.embeddings, dtype=np.float32) for name, te in cache.text.items()}
    return EmbeddingData(x[keep], table[keep].reset_index(drop=True), str(cache.model), str(cache.cohort_hash),
                         str(cache_path), str(attrs.get("task") or "multiclass"), list(cache.classes),
                         _sensitive(attrs.get("attributes"), where), text)


def _split_rows(table: pd.DataFrame, cohort_splits: tuple, where: str) -> np.ndarray:
    if not cohort_splits:
        return np.ones(len(table), dtype=bool)
    have = sorted(set(table["split"].astype(str)))
    for s in cohort_splits:
        if s not in have:
            raise CxrfairError(f"--cohort-split {s}: {where} has no rows in that split (it has {', '.join(have)})")
    return table["split"].isin(cohort_splits).to_numpy()


def _sensitive(value, where: str) -> dict:
    """The cohort's sensitive attributes from the cache attr (JSON or dict); v1 default if absent."""
    if value is None or value == "":
        return V1_ATTRIBUTES
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise CxrfairError(f"{where}: attr 'attributes' is not JSON; re-run `cxrfair extract`") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) and "groups" in v for v in value.values()):
        raise CxrfairError(f"{where}: attr 'attributes' should map column -> {{groups, reference}}; re-run `cxrfair extract`")
    return value


# ---------------------------------------------------------------- attributes


def resolve_attributes(data: EmbeddingData, requested: tuple = ()) -> list[Attribute]:
    """The attributes to analyse: those named (checked: a column with 2..MAX_GROUPS groups), or
    every sensitive attribute of the cohort (one missing from the cache's table is an error)."""
    table = data.table
    if requested:
        unknown = [a for a in requested if a not in table.columns]
        if unknown:
            known = [c for c in table.columns if _is_categorical(table[c])]
            raise CxrfairError(f"--attributes {unknown[0]}: not a column of cache {data.source}; "
                               f"known attributes: {', '.join(data.sensitive)} (other columns: {', '.join(c for c in known if c not in data.sensitive)})")
        return [_attribute(table, name, data.sensitive.get(name), True) for name in dict.fromkeys(requested)]
    missing = [name for name in data.sensitive if name not in table.columns]
    if missing:  # the cohort declares it: leaving it out would drop it from the analysis unseen
        raise CxrfairError(f"cache {data.source}: the cohort declares sensitive attribute {missing[0]} but the cache's "
                           f"cohort rows have no column {missing[0]}; re-run `cxrfair extract --force` on the cohort, "
                           "or name the attributes to analyse with --attributes")
    return [_attribute(table, name, spec, False) for name, spec in data.sensitive.items()]


def _is_categorical(column: pd.Series) -> bool:
    return 2 <= column.dropna().nunique() <= MAX_GROUPS


def _attribute(table: pd.DataFrame, name: str, spec: dict | None, requested: bool) -> Attribute:
    values = _as_text(table[name])
    present = sorted(set(values.dropna()))
    if spec is not None:
        declared = [str(g) for g in spec["groups"]]
        ref = str(spec.get("reference", declared[0]))
        unknown = [v for v in present if v not in declared]
        if unknown:
            raise CxrfairError(f"column {name}: value {unknown[0]!r} is not one of the cohort's groups {declared}; rebuild the cohort")
        groups = [g for g in [ref] + [g for g in declared if g != ref] if g in present]
    else:
        if len(present) > MAX_GROUPS:
            raise CxrfairError(f"--attributes {name}: has {len(present)} distinct values; leakage and geometry "
                               f"need a categorical column with at most {MAX_GROUPS} groups (e.g. age_group, not age)")
        groups = present
    index = {g: i for i, g in enumerate(groups)}
    codes = values.map(index).fillna(-1).to_numpy(dtype=np.int64)
    return Attribute(name, tuple(groups), codes, requested)


def _as_text(column: pd.Series) -> pd.Series:
    """Values as strings (1.0 -> "1"), missing (NaN, empty) as NaN."""
    def text(v):
        if pd.isna(v) or (isinstance(v, str) and not v.strip()):
            return np.nan
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)
    return column.map(text)


def group_problem(attr: Attribute, split: np.ndarray | None, minimum: int) -> str | None:
    """Why ``attr`` cannot be analysed (one group; a group with fewer than ``minimum`` images in a
    split), or None. ``split``: (N,) int 0/1/2 for train/val/test, or None (all rows as one)."""
    if len(attr.groups) < 2:
        return f"attribute {attr.name}: has one group ({', '.join(attr.groups) or 'none'}) among the rows analysed; it needs two or more"
    parts = {"all rows": np.ones(len(attr.codes), bool)} if split is None else {
        name: split == i for i, name in enumerate(SPLIT_NAMES)}
    for where, rows in parts.items():
        counts = np.bincount(attr.codes[rows & (attr.codes >= 0)], minlength=len(attr.groups))
        low = int(np.argmin(counts))
        if counts[low] < minimum:
            return (f"attribute {attr.name}: group {attr.groups[low]} has {counts[low]} image(s) in the {where} "
                    f"split, fewer than the minimum {minimum}; use more images or lower --min-group")
    return None


def conditions(data: EmbeddingData) -> list[tuple[str, np.ndarray]]:
    """Label conditions ``(name, (N,) bool)``: ``label=<class>`` per class (multi-class), or
    ``y_<C>=1`` / ``y_<C>=0`` per condition (multi-label; uncertain rows in neither)."""
    table = data.table
    if data.task == "multilabel":
        out = []
        for c in data.classes:
            col = pd.to_numeric(table.get(f"y_{c}"), errors="coerce") if f"y_{c}" in table else None
            if col is not None:
                out += [(f"y_{c}=1", (col == 1).to_numpy()), (f"y_{c}=0", (col == 0).to_numpy())]
        return out
    if "label" not in table:
        return []
    return [(f"label={c}", (table["label"] == c).to_numpy()) for c in data.classes]


# ---------------------------------------------------------------- resampling


SPLIT_NAMES = ("train", "val", "test")


def patient_split(patients, strata, fractions: tuple, seed: int) -> np.ndarray:
    """Patient-grouped split, stratified: (N,) int 0 = train, 1 = val, 2 = test.

    Each patient takes the stratum of their first image. Within a stratum, patients are shuffled
    and patient j of n lands at quantile (j + u) / n with one random offset u per stratum, cut at
    the cumulative fractions: every stratum is split in proportion (to within one patient) and a
    stratum of one patient lands in a split with probability equal to its fraction.

    Args:
        patients: (N,) patient id of each image.
        strata: (N,) stratum label of each image (strings).
        fractions: (train, val, test), positive, summing to 1.
        seed: fixes the split.
    """
    rng = np.random.default_rng(seed)
    code, first = _patient_codes(patients)
    stratum = np.asarray(strata).astype(str)[first]  # (P,)
    cuts = np.cumsum(fractions)[:-1]
    assign = np.empty(len(first), dtype=np.int64)
    for s in sorted(set(stratum.tolist())):
        members = rng.permutation(np.flatnonzero(stratum == s))
        quantile = (np.arange(len(members)) + rng.random()) / len(members)
        assign[members] = np.searchsorted(cuts, quantile, side="right")
    return assign[code]


def _patient_codes(patients) -> tuple[np.ndarray, np.ndarray]:
    """(N,) patient index in [0, P) (sorted ids) and (P,) row of each patient's first image."""
    _, first, code = np.unique(np.asarray(patients), return_index=True, return_inverse=True)
    return code.reshape(-1), first


def permute_by_patient(codes: np.ndarray, patients, split: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shuffle an attribute across patients within each split: (N,) codes -> (N,) codes.

    Each patient keeps one value (their first image's) for all their images, drawn without
    replacement from the patients of the same split, so each split keeps its patients' group counts.
    """
    out = codes.copy()
    patients = np.asarray(patients)
    for s in np.unique(split):
        rows = np.flatnonzero(split == s)
        code, first = _patient_codes(patients[rows])
        out[rows] = rng.permutation(codes[rows][first])[code]
    return out


def patient_counts(patients, strata, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Stratified patient bootstrap as an (R, N) matrix of image counts (metric ``weights``).

    Patients are redrawn with replacement within their stratum (their first image's); each image
    counts as often as its patient was drawn. The one place the embedding analyses resample.
    """
    code, first = _patient_codes(patients)
    per_patient = resample_counts(stratified_indices(np.asarray(strata)[first], n_boot, rng), len(first))  # (R, P)
    return per_patient[:, code]


def seeded_rng(seed: int, purpose: str, *keys) -> np.random.Generator:
    """A generator that depends only on the seed and what it is for (an attribute, a condition,
    a permutation number), not on the order in which analyses run or which others were asked for."""
    words = [zlib.crc32(str(k).encode()) for k in (purpose, *keys)]
    return np.random.default_rng([int(seed), *words])
