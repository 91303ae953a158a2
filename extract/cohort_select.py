"""Choosing a cohort's rows from a dataset's standard table: filters, age bins, attributes, sampling, targets.

Everything here works on the standard table of ``cxrfair.extract.datasets`` and knows nothing of
any dataset's own layout.
"""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from cxrfair.errors import CxrfairError, CxrfairWarning

from .datasets.base import RACE_GROUPS

SEXES = ("M", "F")


# --------------------------------------------------------------------------------------------
# Age bins


def age_labels(bins: tuple[int, ...]) -> list[str]:
    """``(60,)`` -> young/old; ``(18, 25, 80)`` -> 18-25, 25-80, 80+ (left-closed)."""
    if len(bins) == 1:
        return ["young", "old"]
    return [f"{a}-{b}" for a, b in zip(bins, bins[1:])] + [f"{bins[-1]}+"]


def bin_ages(age: np.ndarray, bins: tuple[int, ...]) -> np.ndarray:
    """(N,) age group per age: one edge = young (< edge) / old; several = the left-closed bin,
    ``""`` below the first edge or for NaN ages."""
    labels = np.array(age_labels(bins) + [""], dtype=object)
    if len(bins) == 1:
        idx = np.where(np.isnan(age), 2, (age >= bins[0]).astype(int))
    else:
        idx = np.searchsorted(np.asarray(bins), np.nan_to_num(age, nan=-1.0), side="right") - 1
        idx = np.where((idx < 0) | np.isnan(age), len(bins), idx)
    return labels[idx].astype(str)


def parse_age_bins(text: str | Iterable[int]) -> tuple[int, ...]:
    """``"18,25,50,65,80"`` or ``"60"`` -> strictly increasing ints in 1..120; CxrfairError naming --age-bins."""
    try:
        edges = tuple(int(x) for x in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        raise CxrfairError(f"--age-bins {text}: expected whole years such as 18,25,50,65,80 or 60") from None
    if not edges or any(b <= a for a, b in zip(edges, edges[1:])) or not 0 < edges[0] or edges[-1] > 120:
        raise CxrfairError(f"--age-bins {','.join(map(str, edges))}: expected increasing ages between 1 and 120, "
                           "such as 18,25,50,65,80 (left-closed bins) or 60 (young/old)")
    return edges


# --------------------------------------------------------------------------------------------
# Filters


def select_rows(table: pd.DataFrame, steps: list[tuple[str, np.ndarray]]) -> tuple[pd.DataFrame, dict[str, int]]:
    """Apply boolean keep-masks in order; returns the kept rows and, per step, how many rows it dropped."""
    keep = np.ones(len(table), dtype=bool)
    dropped = {}
    for reason, mask in steps:
        n = int((keep & ~mask).sum())
        if n:
            dropped[reason] = n
        keep &= mask
    return table[keep].reset_index(drop=True), dropped


def attribute_groups(name: str, values: pd.Series, bins: tuple[int, ...]) -> list[str]:
    """Groups of an attribute in report order: sex M, F; age bins in order; race White, Black, Asian
    (then any other names a csv gives); other attributes sorted."""
    if name == "sex":
        return list(SEXES)
    if name == "age_group":
        return age_labels(bins)
    present = set(values) - {""}
    if name == "race":
        return [g for g in RACE_GROUPS if g in present] + sorted(present - set(RACE_GROUPS) - {"other"})
    return sorted(present)


def resolve_names(wanted: Iterable[str], known: Iterable[str], option: str, path: Path) -> list[str]:
    """Map requested findings to the data's spelling (case-insensitive); unknown -> CxrfairError."""
    known = list(known)
    by_lower = {k.lower(): k for k in known}
    out = []
    for d in wanted:
        if d.lower() not in by_lower:
            raise CxrfairError(f"{option}: '{d}' is not a finding in metadata {path}; known findings: {', '.join(known)}")
        out.append(by_lower[d.lower()])
    return out


# --------------------------------------------------------------------------------------------
# Multi-class: balanced sampling (Sun et al.)


def _cell_rng(seed: int, *key: str) -> np.random.Generator:
    # One stream per cell, keyed by name, so adding or dropping a disease leaves the others' draws alone.
    return np.random.default_rng([seed, zlib.crc32("/".join(key).encode())])


def cell_quotas(available: dict[str, int], per_group: int) -> dict[str, int] | None:
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


def sample_cohort(meta: pd.DataFrame, diseases: list[str], per_group: int, seed: int, path: Path,
                  bands: Iterable[str] = ("young", "old")) -> pd.DataFrame:
    """Draw the single-label images of each disease x (age band, sex) cell (Sun et al.'s rules).

    Args:
        meta: standard-table rows with ``label`` (the single finding, or ``""``) and ``age_group``.
    Returns:
        The chosen rows of ``meta``, ``len(diseases) * len(bands) * 2 * per_group`` rows.
    """
    single = meta[meta["label"].isin(diseases)]
    chosen = []
    for disease in diseases:
        for band in bands:
            pools = {s: single[(single["label"] == disease) & (single["age_group"] == band) & (single["sex"] == s)]
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
    return pd.concat(chosen).reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Multi-label targets


def targets(findings: pd.DataFrame, uncertain: str) -> pd.DataFrame:
    """Finding codes (1 / 0 / -1 / NaN blank) -> targets 1.0 / 0.0 / NaN (masked).

    Blank is 0 (not mentioned = absent, the CheXpert-labeler convention). Uncertain -1 becomes NaN
    under ``ignore``, 0 under ``zeros``, 1 under ``ones``.
    """
    v = findings.to_numpy(dtype=np.float64)
    v = np.where(np.isnan(v), 0.0, v)
    fill = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[uncertain]
    return pd.DataFrame(np.where(v == -1, fill, v), columns=[f"y_{c}" for c in findings.columns], index=findings.index)


def check_multilabel(table: pd.DataFrame, classes: list[str], splits: tuple[str, ...], where: str) -> None:
    """Every condition needs a positive and a negative in every split (else no loss, AUC or threshold)."""
    split = table["split"].to_numpy(dtype=object)
    masks = {s: split == s for s in splits}
    for c in classes:
        y = table[f"y_{c}"].to_numpy()
        for s, in_s in masks.items():
            pos, neg = int((y[in_s] == 1).sum()), int((y[in_s] == 0).sum())
            if not pos or not neg:
                raise CxrfairError(f"{where}: condition {c} has {pos} positive and {neg} negative images in {s}; "
                                   "every condition needs both in every split: use more data, drop the condition "
                                   "(--diseases) or change --split")


def check_groups(table: pd.DataFrame, attributes: dict[str, dict], where: str) -> None:
    """Every group of every attribute needs test images (else its metrics are undefined)."""
    test = table[table["split"] == "test"]
    for name, spec in attributes.items():
        have = set(test[name])
        missing = [g for g in spec["groups"] if g not in have]
        if missing:
            raise CxrfairError(f"{where}: attribute {name} has no test image of group {missing[0]}; use more data "
                               "or leave the attribute out (--attributes)")


def empty_groups(table: pd.DataFrame, attributes: dict[str, dict], splits: Iterable[str]) -> list[tuple[str, str, str]]:
    """``(attribute, group, split)`` for every declared group with no row in a split, in declaration order."""
    present = {(a, s): set(table.loc[table["split"] == s, a]) for a in attributes for s in splits}
    return [(a, g, s) for a, spec in attributes.items() for g in spec["groups"] for s in splits
            if g not in present[a, s]]


def warn_empty_groups(table: pd.DataFrame, attributes: dict[str, dict], splits: Iterable[str], where: str) -> None:
    """A CxrfairWarning naming each sensitive group with no images in a split (e.g. every F cell 0 of
    an all-male metadata): its metrics would be undefined or missing from the report."""
    empty: dict[tuple[str, str], list[str]] = {}
    for a, g, s in empty_groups(table, attributes, splits):
        empty.setdefault((a, g), []).append(s)
    for (a, g), in_splits in empty.items():
        warnings.warn(f"{where}: sensitive group {a}={g} has no images in {', '.join(in_splits)}; its metrics there "
                      "are undefined (check the metadata, or leave the attribute out with --attributes)",
                      CxrfairWarning, stacklevel=3)
