"""What the report is made of: its building blocks (``Figure``, ``Table``, ``Section``), its data
(``ReportData``: the analysis results plus what is derived from them once) and the table builders
that turn results into formatted tables. Nothing here draws or writes a file.

The page is a list of sections (``sections.SECTIONS``): each is a small function of
``ReportData`` returning ``Section``s built from these blocks, or nothing when its data is
absent; ``render`` lays them out and writes the report folder (its layout is documented there).
Imports go one way: ``render`` -> ``sections`` -> this module (and the figure modules) ->
``curves``, ``findings`` -> ``cxrfair.core``; never back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from cxrfair.analysis.curves import reliability_table, roc_table
from cxrfair.analysis.findings import findings_table
from cxrfair.analysis.provenance import Provenance, provenance
from cxrfair.core.metrics import GROUP_METRICS
from cxrfair.core.runs import METHODS, read_run

GAP_COLUMNS = [s.name for s in GROUP_METRICS]
SUMMARY_KEYS = ["model", "method", "metric", "attribute", "group", "class"]


# ----------------------------------------------------------------------------- building blocks


@dataclass(frozen=True)
class Figure:
    """One figure: drawn only when the report has figures on."""

    name: str  # file name under figures/, unique in the report
    caption: str  # one or two sentences under the image (markdown-lite)
    draw: Callable[[], object]  # () -> matplotlib Figure


@dataclass(frozen=True)
class Table:
    """One table of strings. Columns beyond ``visible`` value columns fold into a <details> block."""

    df: pd.DataFrame
    caption: str = ""  # shown above the table (markdown-lite)
    index: tuple[str, ...] = ("model", "method")  # key columns, repeated in the folded part
    visible: int = 6  # value columns shown open; the rest fold away
    collapsed: bool = False  # fold the whole table (long reference tables)
    stacked: bool = False  # intervals under their values (narrow cells for many columns)
    titles: dict | None = None  # {column: definition}, shown when hovering a column name
    beside: bool = True  # may sit beside its figure (False: a wide table, always below it)


@dataclass(frozen=True)
class Section:
    """One section of the page: anchor id, title, prose, then its figures, its tables, notes, folded details."""

    id: str  # anchor (``#id``), unique in the report
    title: str
    prose: tuple[str, ...] = ()  # paragraphs (markdown-lite: `code`, **bold**, [a](#id), "- " lists, "### " headings)
    figures: tuple[Figure, ...] = ()
    tables: tuple[Table, ...] = ()
    notes: tuple[str, ...] = ()  # paragraphs after the figures and tables
    details: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (summary, paragraphs) folded after the tables
    folded: bool = False  # reference material: the title shows, the body opens on a click


class ReportData:
    """What sections are built from: the analysis results plus things derived from them once.

    Args:
        results: ``analyze.Results``.
        runs: the runs analysed (``Run``); when None they are read again from
            ``results.config.runs_dir`` if it exists (for curves and zero-shot settings).
    """

    def __init__(self, results, runs=None):
        self.results = results
        self._runs = runs

    @property
    def config(self):
        return self.results.config

    @cached_property
    def summary(self) -> pd.DataFrame:
        return summary(self.results)

    @cached_property
    def attributes(self) -> list[str]:
        """The analysed attributes in order, the crossed one last (``Results.attributes``), e.g.
        ``["sex", "age_group", "sex×age"]``; the shortcut column is never one."""
        declared = list(getattr(self.results, "attributes", None) or {})
        if declared:
            return declared
        m = self.results.metrics
        return list(dict.fromkeys(a for a, k in zip(m["attribute"], m["metric"]) if a and not k.startswith("shortcut_")))

    @property
    def task(self) -> str:
        return getattr(self.results, "task", "multiclass")

    @cached_property
    def primary_runs(self) -> list:
        """The runs tables and figures show (``primary`` in runs.csv); [] if they cannot be read."""
        prim = set(self.results.runs.loc[self.results.runs["primary"], "run_id"])
        if self._runs is not None:
            return [r for r in self._runs if r.run_id in prim]
        folder = Path(self.config.runs_dir)
        paths = [folder / rid for rid in sorted(prim) if (folder / rid).is_dir()]
        return [read_run(p) for p in paths] if len(paths) == len(prim) else []

    @cached_property
    def roc(self) -> pd.DataFrame:
        return roc_table(self.primary_runs, self.config.split, self.config.attributes, cross=self.config.cross)

    @cached_property
    def reliability(self) -> pd.DataFrame:
        return reliability_table(self.primary_runs, self.config.split, self.config.attributes, cross=self.config.cross)

    @cached_property
    def chance(self) -> dict[str, float]:
        """{model: chance-level utility}: multi-class, the test split's most frequent class share
        (accuracy of always predicting it); multi-label, a macro AUC of 0.5; NaN without readable runs."""
        out: dict[str, float] = {}
        for run in self.primary_runs:
            if run.model in out:
                continue
            if self.task == "multilabel":
                out[run.model] = 0.5
                continue
            y, _ = run.arrays(self.config.split)
            out[run.model] = float(np.bincount(y).max() / len(y)) if len(y) else np.nan
        return out

    @cached_property
    def at_chance(self) -> frozenset:
        """(model, method) pairs whose utility interval does not lie above the chance level."""
        metric = "auc_macro" if self.task == "multilabel" else "accuracy"
        s = self.summary
        u = s[(s["metric"] == metric) & (s["attribute"] == "") & (s["group"] == "") & (s["class"] == "")]
        return frozenset((r.model, r.method) for r in u.itertuples()
                         if r.model in self.chance and not r.ci_low > self.chance[r.model])

    @cached_property
    def findings(self) -> pd.DataFrame:
        return findings_table(self.results.comparisons, at_chance=self.at_chance, alpha=1 - self.config.level)

    @cached_property
    def provenance(self) -> Provenance:
        """What the primary runs' files say about their images and weights (the demo banner)."""
        return provenance(self.primary_runs)

    @cached_property
    def definitions(self) -> dict[str, str]:
        """One-sentence definitions of this task's metrics (``Results.definitions``)."""
        return dict(self.results.definitions)


# ----------------------------------------------------------------------------- summary and tables


def summary(results) -> pd.DataFrame:
    """Primary runs' metrics over seeds: one row per (model, method, metric, attribute, group, class).

    Returns:
        DataFrame with value (mean over seeds), ci_low, ci_high (the interval of that mean, from
        the seed-averaged bootstrap replicates; ``results.seeds``), sd (over seeds; NaN with one
        seed) and n_seeds.
    """
    prim = results.runs.loc[results.runs["primary"], ["model", "method", "tag"]].drop_duplicates()
    t = results.seeds.merge(prim, on=["model", "method", "tag"]).rename(columns={"mean": "value"})
    return t[SUMMARY_KEYS + ["value", "ci_low", "ci_high", "sd", "n_seeds"]].reset_index(drop=True)


def fmt(value, lo=np.nan, hi=np.nan, sd=np.nan, n: int = 1, scale: float = 100.0, digits: int = 1) -> str:
    """``49.4 [43.1, 55.6]`` (in % by default), `` ±1.2`` (sd over seeds) appended for n > 1; – for NaN."""
    if value is None or not np.isfinite(value):
        return "–"
    s = f"{scale * value:.{digits}f}"
    if np.isfinite(lo) and np.isfinite(hi):
        s += f" [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"
    if n > 1 and np.isfinite(sd):
        s += f" ±{scale * sd:.{digits}f}"
    return s


def slug(s: str) -> str:
    """An anchor/file-name-safe form: ``sex×age`` -> ``sex_x_age``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s.replace("×", "_x_")).strip("-")


def _cells(t: pd.DataFrame) -> pd.Series:
    return pd.Series([fmt(r.value, r.ci_low, r.ci_high, r.sd, int(r.n_seeds)) for r in t.itertuples()], index=t.index)


def _order(df: pd.DataFrame) -> pd.DataFrame:
    key = df["method"].map(lambda m: METHODS.index(m) if m in METHODS else len(METHODS))
    return df.assign(_k=key).sort_values(["model", "_k"]).drop(columns="_k")


def wide(t: pd.DataFrame, col: str, names: dict | None = None) -> pd.DataFrame:
    """Summary rows -> one row per model · method, one formatted column per value of ``col``, then ``seeds``."""
    if t.empty:
        return pd.DataFrame()
    t = _order(t.assign(cell=_cells(t)))
    w = t.pivot_table(index=["model", "method"], columns=col, values="cell", aggfunc="first", sort=False)
    cols = [c for c in (names or dict.fromkeys(t[col])) if c in w.columns]
    w = w[cols].rename(columns=names or {})
    seeds = t.groupby(["model", "method"], sort=False)["n_seeds"].max()
    return w.assign(seeds=seeds.reindex(w.index).to_numpy()).reset_index()


def table_utility(s: pd.DataFrame) -> pd.DataFrame:
    """Accuracy, macro F1, macro AUC and ECE per model × method."""
    names = {"accuracy": "Accuracy", "f1_macro": "Macro F1", "auc_macro": "Macro AUC", "ap_macro": "Macro AP",
             "adjusted_auprc_macro": "Macro adjusted AUPRC", "ece": "ECE (binned)", "ece_macro": "Macro ECE"}
    t = s[s["metric"].isin(names) & (s["attribute"] == "") & (s["class"] == "")]
    return wide(t, "metric", names)


def table_class_f1(s: pd.DataFrame) -> pd.DataFrame:
    """Var_F1 and class-wise F1 per model × method."""
    v = s[(s["metric"] == "var_f1") & (s["attribute"] == "")]
    w = wide(s[(s["metric"] == "f1") & (s["attribute"] == "")], "class")
    if w.empty or v.empty:
        return w
    v = wide(v, "metric", {"var_f1": "Var_F1"}).drop(columns="seeds")
    return v.merge(w, on=["model", "method"], how="right")[list(v.columns) + list(w.columns[2:])]


# Shown first in the group-fairness table, in this order; any other gap metric follows.
FAIRNESS_FIRST = ("f1_gap", "f1_gap_abs", "eqodds", "eqodds_worst", "ece_gap", "worst_group_accuracy")


def table_fairness(s: pd.DataFrame, attribute: str) -> pd.DataFrame:
    """Every group-fairness metric of one attribute per model × method (headline metrics first)."""
    t = s[(s["attribute"] == attribute) & (s["group"] == "") & (s["class"] == "")]
    present = list(dict.fromkeys(t["metric"]))
    order = [m for m in FAIRNESS_FIRST if m in present] + [m for m in GAP_COLUMNS if m in present and m not in FAIRNESS_FIRST]
    order += sorted(m for m in present if m not in order)
    return wide(t, "metric", {m: m for m in order})


def table_group_metric(s: pd.DataFrame, attribute: str, metric: str, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """``metric`` within each group of one attribute per model × method, then ``extra`` gap metrics."""
    t = s[(s["attribute"] == attribute) & (s["group"] != "") & (s["metric"] == metric) & (s["class"] == "")]
    w = wide(t, "group")
    g = s[(s["attribute"] == attribute) & (s["group"] == "") & s["metric"].isin(extra)]
    if w.empty or g.empty:
        return w
    g = wide(g, "metric", {m: m for m in extra}).drop(columns="seeds")
    return w.drop(columns="seeds").merge(g, on=["model", "method"], how="left").assign(seeds=w["seeds"].to_numpy())


def table_group_f1(s: pd.DataFrame, attribute: str) -> pd.DataFrame:
    """Macro F1 within each group of one attribute per model × method."""
    return table_group_metric(s, attribute, "f1_macro")


def table_class_metric(s: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``metric`` per class (condition) on the whole split, one column per class, per model × method."""
    return wide(s[(s["metric"] == metric) & (s["attribute"] == "") & (s["class"] != "")], "class")


def table_condition_groups(s: pd.DataFrame, attribute: str, metric: str = "auc",
                           extra: tuple[str, ...] = ("auc_gap", "worst_group_auc", "es_auc")) -> pd.DataFrame:
    """Multi-label: ``metric`` of each condition within each group of one attribute, then ``extra``
    per-condition gap metrics; one row per model × method × condition."""
    t = s[(s["attribute"] == attribute) & (s["class"] != "")]
    per = t[(t["metric"] == metric) & (t["group"] != "")]
    if per.empty:
        return pd.DataFrame()
    per = _order(per.assign(cell=_cells(per)))
    keys = ["model", "method", "class"]
    w = per.pivot_table(index=keys, columns="group", values="cell", aggfunc="first", sort=False)
    w = w[list(dict.fromkeys(per["group"]))]
    g = t[(t["group"] == "") & t["metric"].isin(extra)]
    if not g.empty:
        g = g.assign(cell=_cells(g)).pivot_table(index=keys, columns="metric", values="cell", aggfunc="first", sort=False)
        w = w.join(g[[m for m in extra if m in g.columns]])
    seeds = per.groupby(keys, sort=False)["n_seeds"].max()
    return w.assign(seeds=seeds.reindex(w.index).to_numpy()).reset_index().rename(columns={"class": "condition"})


def table_thresholds(thresholds: pd.DataFrame, primary: set) -> pd.DataFrame:
    """Multi-label: each primary run's decision threshold per condition (and the validation
    positives / negatives it was chosen on), one row per run."""
    t = thresholds[thresholds["run_id"].isin(primary)]
    if t.empty:
        return pd.DataFrame()
    cell = [("–" if not np.isfinite(r.threshold) else f"{r.threshold:.3f}") + f" ({r.n_val_pos}+/{r.n_val_neg}−)"
            for r in t.itertuples()]
    w = _order(t.assign(cell=cell)).pivot_table(index=["model", "method", "seed"], columns="class", values="cell",
                                                aggfunc="first", sort=False)
    return w[list(dict.fromkeys(t["class"]))].reset_index()


def table_shortcut(shortcut: pd.DataFrame) -> pd.DataFrame:
    """The shortcut test per run: AUC with and without the shortcut, their paired difference, the images counted."""
    if shortcut.empty:
        return pd.DataFrame()
    t = _order(shortcut)
    cells = {name: [fmt(getattr(r, k), getattr(r, lo), getattr(r, hi)) for r in t.itertuples()]
             for name, k, lo, hi in (("AUC with", "auc_with", "auc_with_ci_low", "auc_with_ci_high"),
                                     ("AUC without", "auc_without", "auc_without_ci_low", "auc_without_ci_high"),
                                     ("difference", "delta", "ci_low", "ci_high"))}
    out = t[["model", "method", "seed"]].assign(**cells)
    return out.assign(**{"positives with / without / unknown": [f"{a} / {b} / {c}" for a, b, c in zip(
        t["n_pos_with"], t["n_pos_without"], t["n_pos_unknown"])], "negatives": t["n_neg"].to_numpy()}).reset_index(drop=True)


def table_comparisons(c: pd.DataFrame, metrics=("accuracy", "f1_macro", "f1_gap", "f1_gap_abs", "eqodds", "ece_gap")) -> pd.DataFrame:
    """Paired differences (method − baseline, in points) for headline metrics, one row per run pair."""
    t = c[c["metric"].isin(metrics) & (c["group"] == "") & (c["class"] == "")]
    if t.empty:
        return pd.DataFrame()
    t = t.assign(col=np.where(t["attribute"] == "", t["metric"], t["metric"] + " " + t["attribute"]),
                 cell=[fmt(r.delta, r.ci_low, r.ci_high) for r in t.itertuples()])
    w = t.pivot_table(index=["model", "baseline", "method", "seed"], columns="col", values="cell",
                      aggfunc="first", sort=False)
    return w.reset_index()


def table_fewshot(fewshot: pd.DataFrame, attribute: str) -> pd.DataFrame:
    """Few-shot: one row per model · method · setting (zero-shot, each K, all); the utility metrics
    overall and within each group of ``attribute``, then its gap metrics (``Results.fewshot``)."""
    t = fewshot[(fewshot["attribute"] == "") | (fewshot["attribute"] == attribute)]
    if t.empty:
        return pd.DataFrame()
    t = t.assign(col=np.where(t["group"] != "", t["metric"] + " " + t["group"].astype(str), t["metric"]),
                 cell=[fmt(r.mean, r.ci_low, r.ci_high, r.sd, int(r.n_seeds)) for r in t.itertuples()])
    keys = ["model", "method", "setting"]
    w = t.pivot_table(index=keys, columns="col", values="cell", aggfunc="first", sort=False)
    seeds = t.groupby(keys, sort=False)["n_seeds"].max()
    return w[list(dict.fromkeys(t["col"]))].assign(seeds=seeds.reindex(w.index).to_numpy()).reset_index()
