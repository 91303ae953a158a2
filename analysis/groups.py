"""The groups metrics are computed over: attribute declarations, group codes, crossed attributes.

Attributes, their groups and reference groups come from the runs (run.json ``attributes``, else
the v1 sex / age_group; ``runs.run_attributes``). ``group_labels`` gives every analysed
attribute's (N,) labels and levels for one run's rows, the crossed attribute (``sex×age``)
included; the engine (``engine``) and the curves (``curves``) both read groups through it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from cxrfair.core.runs import Run, run_attributes
from cxrfair.errors import CxrfairError

# Codes other tools write for the cohort's groups (the cohort builder reads the same ones);
# anything else that is not a declared group, whatever its case, is an error.
GROUP_SYNONYMS = {"sex": {"male": "M", "female": "F"}}
SHORT_NAMES = {"age_group": "age"}
CROSS = "×"  # crossed attribute "sex×age", groups like "M×young"


def declared_attributes(runs: list[Run]) -> dict[str, dict]:
    """The attribute declaration every run shares (``runs.run_attributes``), in the first run's order.

    CxrfairError naming two runs whose declarations differ (groups, reference or columns).
    """
    first = run_attributes(runs[0])
    for run in runs[1:]:
        other = run_attributes(run)
        if _canonical(other) != _canonical(first):
            raise CxrfairError(f"runs {runs[0].run_id} and {run.run_id} declare different attributes "
                               f"({_describe(first)} vs {_describe(other)}; run.json attributes); analyze runs "
                               "of one cohort together")
    return first


def _canonical(attrs: dict) -> dict:
    return {str(c): ([str(g) for g in s["groups"]], str(s["reference"])) for c, s in attrs.items()}


def _describe(attrs: dict) -> str:
    return "; ".join(f"{c}: {'/'.join(map(str, s['groups']))} ref {s['reference']}" for c, s in attrs.items())


def default_cross(attributes) -> tuple[str, ...]:
    """The attributes crossed by default: the first two (sex × age for the v1 cohort), none with one.

    Crossing all of them would give 2 × 5 × 3 = 30 cells for sex × five age bins × race, most too
    small to estimate a group metric; ``--cross`` names other ones.
    """
    return tuple(attributes[:2]) if len(attributes) > 1 else ()


def crossed_name(attributes) -> str:
    """``("sex", "age_group") -> "sex×age"``."""
    return CROSS.join(SHORT_NAMES.get(a, a) for a in attributes)


def levels_of(values: np.ndarray, spec: dict | None) -> list[str]:
    """Group levels in reference order: a declared attribute's reference first, then its other
    groups as listed; an undeclared attribute's observed values, sorted."""
    if spec is None:
        return sorted(set(values.tolist()))
    ref = str(spec["reference"])
    return [ref] + [str(g) for g in spec["groups"] if str(g) != ref]


def normalise_groups(values: np.ndarray, column: str, groups: list[str], where: str) -> tuple[np.ndarray, dict]:
    """Map group codes onto the declared groups: case-insensitively, plus ``GROUP_SYNONYMS``.

    Args:
        values: (N,) str codes as read. column: the attribute. groups: its declared groups.
        where: the run, for the error.

    Returns:
        ((N,) codes as declared groups, {code read: group} for the codes that changed).
        CxrfairError naming the run, column and codes for anything that matches no group.
    """
    lookup = {g.casefold(): g for g in groups}
    lookup |= {k: v for k, v in GROUP_SYNONYMS.get(column, {}).items() if v in groups}
    mapping = {u: lookup.get(u.strip().casefold()) for u in set(values.tolist())}
    bad = sorted(u for u, g in mapping.items() if g is None)
    if bad:
        raise CxrfairError(f"{where}: predictions.csv column {column} has unknown group code(s) {bad[:5]}; expected "
                           f"{', '.join(groups)} (run.json attributes, or the v1 default); recode them or leave "
                           f"{column} out of --attributes")
    changed = {u: g for u, g in mapping.items() if u != g}
    return (pd.Series(values).map(mapping).to_numpy(dtype=str) if changed else values), changed


def group_labels(rows: pd.DataFrame, attributes, run: Run, recoded: dict | None = None,
                 cross=None) -> dict[str, tuple[np.ndarray, list[str]]]:
    """{attribute: ((N,) labels, levels)} for each attribute and, when ``cross`` names two or more, their cross.

    Attributes declared in the run (``runs.run_attributes``) are normalised to their declared
    groups; codes that changed are added to ``recoded[(column, changes)]`` (a list of run ids).
    ``cross`` None crosses the first two attributes (``default_cross``).
    """
    declared = run_attributes(run)
    out = {}
    for a in attributes:
        if a not in rows.columns:
            raise CxrfairError(f"run {run.run_id}: predictions.csv has no attribute column {a}; "
                               f"choose --attributes among the columns it has")
        if rows[a].isna().any():
            image = rows.loc[rows[a].isna(), "image_id"].iloc[0]
            raise CxrfairError(f"run {run.run_id}: attribute column {a} is empty for image {image}; "
                               "fill it in or leave it out of --attributes")
        values = rows[a].astype(str).to_numpy(dtype=str)
        spec = declared.get(a)
        if spec is not None:
            values, changed = normalise_groups(values, a, [str(g) for g in spec["groups"]], f"run {run.run_id}")
            if changed and recoded is not None:
                recoded.setdefault((a, tuple(sorted(changed.items()))), []).append(run.run_id)
        out[a] = (values, levels_of(values, spec))
    cross = default_cross(tuple(attributes)) if cross is None else tuple(cross)
    if cross:
        crossed = out[cross[0]][0].astype(str)
        for a in cross[1:]:
            crossed = np.char.add(np.char.add(crossed, CROSS), out[a][0])
        levels = [CROSS.join(t) for t in itertools.product(*(out[a][1] for a in cross))]
        out[crossed_name(cross)] = (crossed, levels)
    return out
