"""The shortcut test (``--shortcut``, Sourget et al.'s chest-drain test, issue 14): a class's AUC on
its positives with a binary column set against those without, on the same resamples (paired).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrfair.analysis.config import AnalyzeConfig
from cxrfair.analysis.replicates import Evaluated
from cxrfair.analysis.runsets import split_rows
from cxrfair.core import multilabel as ML
from cxrfair.core.bootstrap import interval
from cxrfair.core.runs import Run, label_columns
from cxrfair.errors import CxrfairError

# Run automatically when the predictions carry this column and the task has this class (issue 14).
AUTO_SHORTCUT = ("drain", "Pneumothorax")
SHORTCUT_COLUMNS = ["run_id", "model", "method", "seed", "split", "column", "class",
                    "auc_with", "auc_with_ci_low", "auc_with_ci_high",
                    "auc_without", "auc_without_ci_low", "auc_without_ci_high",
                    "delta", "ci_low", "ci_high", "n_pos_with", "n_pos_without", "n_pos_unknown", "n_neg"]


def shortcut_subsets(rows: pd.DataFrame, run: Run, column: str, cls: str) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """The two labelings of the shortcut test on ``rows`` (Sourget et al.'s chest-drain test, issue 14).

    "With": the positives of ``cls`` whose ``column`` is 1, plus every negative. "Without": the
    positives whose ``column`` is 0, plus the same negatives. Positives with ``column`` empty are
    in neither; negatives count whatever their ``column`` (empty included), and masked
    multi-label targets are in neither. Every image of ``rows`` is considered (not only the
    annotated ones).

    Args:
        rows: prediction rows of the analysed split. run: their run (task, classes).
        column: a binary column (1 / 0 / empty). cls: a class (multi-class: one-vs-rest on
            ``label``) or condition (multi-label: ``y_<cls>``).

    Returns:
        ((N,) y_with, (N,) y_without) in {1, 0, NaN} (NaN: not in the subset), and the counts
        {n_pos_with, n_pos_without, n_pos_unknown, n_neg}. CxrfairError naming the run, column or
        class when the column is absent or not binary, the class unknown, or a subset lacks
        positives or negatives.
    """
    where = f"run {run.run_id}"
    if cls not in run.classes:
        raise CxrfairError(f"{where}: --shortcut-class {cls} is not a class of the run ({', '.join(run.classes)})")
    flag = _binary_column(rows, column, where)
    if run.task == "multilabel":
        y = rows[label_columns([cls])[0]].to_numpy(dtype=np.float64)
        pos, neg = y == 1, y == 0
    else:
        pos = (rows["label"] == cls).to_numpy()
        neg = ~pos
    subsets = tuple(np.where(pos & (flag == v), 1.0, np.where(neg, 0.0, np.nan)) for v in (1, 0))
    counts = {"n_pos_with": int((pos & (flag == 1)).sum()), "n_pos_without": int((pos & (flag == 0)).sum()),
              "n_pos_unknown": int((pos & np.isnan(flag)).sum()), "n_neg": int(neg.sum())}
    for name, n in (("with", counts["n_pos_with"]), ("without", counts["n_pos_without"])):
        if not n:
            raise CxrfairError(f"{where}: no {cls} positive {name} the shortcut ({column} == {int(name == 'with')}) "
                               f"in the {rows['split'].iloc[0]} split; the shortcut test needs both subsets")
    if not counts["n_neg"]:
        raise CxrfairError(f"{where}: no {cls} negatives in the {rows['split'].iloc[0]} split; AUC needs negatives")
    return subsets, counts


def _binary_column(rows: pd.DataFrame, column: str, where: str) -> np.ndarray:
    """(N,) float in {1, 0, NaN} from a column holding 1, 0 or empty; CxrfairError otherwise."""
    if column not in rows.columns:
        raise CxrfairError(f"{where}: predictions.csv has no column {column} for --shortcut; choose a binary column "
                           "it has (e.g. drain, from a cohort built with --drains)")
    raw = rows[column]
    values = pd.to_numeric(raw, errors="coerce")
    bad = (values.isna() & raw.notna()) | ~(values.isna() | values.isin((0, 1)))
    if bad.any():
        shown = sorted(set(raw[bad].astype(str)))[:5]
        raise CxrfairError(f"{where}: --shortcut column {column} has value(s) {shown}; a shortcut column holds 1, 0 "
                           "or empty (unknown)")
    return values.to_numpy(dtype=np.float64)


def shortcut_metrics(subsets: tuple[np.ndarray, np.ndarray], score: np.ndarray, column: str, cls: str,
                     *, weights=None) -> dict:
    """AUC with / without the shortcut and their difference, keyed like the metrics table.

    Args:
        subsets: (y_with, y_without) from ``shortcut_subsets``. score: (N,) p of ``cls``.
        weights: (N,) or (R, N) bootstrap counts: both AUCs on the same resamples (paired).

    Returns:
        {("shortcut_auc_with" | "shortcut_auc_without" | "shortcut_delta", column, "", cls): (...)}.
    """
    with_, without = (ML.auc(y, score, weights=weights) for y in subsets)
    return {("shortcut_auc_with", column, "", cls): with_, ("shortcut_auc_without", column, "", cls): without,
            ("shortcut_delta", column, "", cls): with_ - without}


def shortcut_request(runs: list[Run], config: AnalyzeConfig, notes: list[str]) -> tuple[str, str] | None:
    """(column, class) of the shortcut test, checked on every run before any metric; None when off.

    Explicit (``--shortcut``): bad input is an error. Automatic (``AUTO_SHORTCUT`` when every
    run has the column and the class): bad input is a note and the test is skipped.
    """
    if config.shortcut == "none":
        return None
    auto = config.shortcut == "auto"
    column, cls = AUTO_SHORTCUT if auto else (config.shortcut, config.shortcut_class)
    if auto and not all(column in r.predictions.columns and cls in r.classes for r in runs):
        return None
    try:
        for run in runs:
            shortcut_subsets(split_rows(run, config.split), run, column, cls)
    except CxrfairError as e:
        if not auto:
            raise
        notes.append(f"automatic shortcut test ({column}, {cls}) skipped: {e}")
        return None
    return column, cls


def shortcut_table(evaluated: list[Evaluated], config: AnalyzeConfig) -> pd.DataFrame:
    """One row per run: both AUCs and their difference with intervals, and the images counted."""
    records = []
    for e in evaluated:
        if not e.shortcut:
            continue
        column, cls = config.shortcut, config.shortcut_class
        cells = []
        for metric in ("shortcut_auc_with", "shortcut_auc_without", "shortcut_delta"):
            k = (metric, column, "", cls)
            lo, hi = interval(e.replicates[k], config.level) if e.replicates else (np.nan, np.nan)
            cells += [float(e.values[k]), float(lo), float(hi)]
        records.append((e.run.run_id, e.run.model, e.run.method, e.run.seed, config.split, column, cls, *cells,
                        *e.shortcut.values()))
    return pd.DataFrame.from_records(records, columns=SHORTCUT_COLUMNS)
