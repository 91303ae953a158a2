"""From a folder of runs to tables: metrics with bootstrap intervals, seed summaries, paired comparisons.

``compute(runs, config)`` is pure (runs in, DataFrames out); ``analyze(config)`` reads the runs,
computes, and writes the report folder atomically.

Resampling: all runs evaluated on the same test images share one (R, N) matrix of bootstrap
counts (images aligned by ``image_id``), so the intervals of different methods come from the
same resamples and a paired comparison is a subtraction of replicate arrays.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfair.analysis import metrics as M
from cxrfair.analysis.bootstrap import interval, resample_counts, stratified_indices
from cxrfair.analysis.runs import METHODS, Run, read_runs
from cxrfair.errors import CxrfairError

# Reference level first: gaps are A − A' with A = M / young (PAPER.md §4).
REFERENCE_LEVELS = {"sex": ("M", "F"), "age_group": ("young", "old")}
SHORT_NAMES = {"age_group": "age"}
CROSS = "×"  # crossed attribute "sex×age", groups like "M×young"
METRIC_COLUMNS = ["run_id", "model", "method", "seed", "split", "metric", "attribute", "group", "class",
                  "value", "ci_low", "ci_high"]


@dataclass(frozen=True)
class AnalyzeConfig:
    """Options of ``cxrfair analyze``."""

    runs_dir: Path  # folder of run folders (RUNS/<run_id>/)
    out: Path  # report folder to write (replaced only with force)
    n_boot: int = 1000  # bootstrap replicates; 0 = point estimates only
    attributes: tuple[str, ...] = ("sex", "age_group")  # binary attributes; their cross is added
    split: str = "test"  # split the metrics are computed on
    seed: int = 0  # seed of the bootstrap draws
    level: float = 0.95  # interval coverage
    force: bool = False  # replace an existing report folder
    figures: bool = True  # draw PNG figures (off for quick tests)

    def __post_init__(self):
        if self.n_boot < 0:
            raise CxrfairError(f"--bootstrap {self.n_boot}: must be 0 or more")
        if self.split not in ("train", "val", "test"):
            raise CxrfairError(f"--split {self.split}: must be train, val or test")
        if not self.attributes or len(set(self.attributes)) != len(self.attributes):
            raise CxrfairError(f"--attributes {','.join(self.attributes)}: give distinct attribute columns")
        if not 0 < self.level < 1:
            raise CxrfairError(f"level {self.level}: must be between 0 and 1")


@dataclass
class Results:
    """Everything the report is made of (all DataFrames in long format)."""

    metrics: pd.DataFrame  # METRIC_COLUMNS
    runs: pd.DataFrame  # run_id, model, method, seed, tag, n_images, primary
    seeds: pd.DataFrame  # model, method, tag, metric, attribute, group, class, n_seeds, mean, sd
    comparisons: pd.DataFrame  # model, baseline, baseline_run, method, run_id, seed, metric, ..., delta, ci_low, ci_high
    config: AnalyzeConfig
    notes: list[str] = field(default_factory=list)


def tag_of(run: Run) -> str:
    """What a run is apart from model, method and seed: runs with equal tags differ only by seed.

    From the run_id convention ``<model>__<method>__<tag>__s<seed>``. Zero-shot runs of one
    prompt set carry the draw as their seed and ``-d<draw>`` in the tag; the draw suffix is
    dropped so the draws of one prompt set are summarised like seeds.
    """
    parts = re.sub(r"__s-?\d+$", "", run.run_id).split("__")
    tag = "__".join(parts[2:]) if len(parts) > 2 and parts[1] == run.method else "__".join(parts)
    if "draw" in run.meta:
        tag = re.sub(rf"-d{re.escape(str(run.meta['draw']))}$", "", tag)
    return tag


def crossed_name(attributes) -> str:
    """``("sex", "age_group") -> "sex×age"``."""
    return CROSS.join(SHORT_NAMES.get(a, a) for a in attributes)


def levels_of(attribute: str, values: np.ndarray) -> list[str]:
    """Group levels in reference order: known ones first (M, F / young, old), then others sorted."""
    known = list(REFERENCE_LEVELS.get(attribute, ()))
    return known + sorted(set(values.tolist()) - set(known))


def group_labels(rows: pd.DataFrame, attributes, run_id: str) -> dict[str, tuple[np.ndarray, list[str]]]:
    """{attribute: ((N,) labels, levels)} for each attribute and, with two or more, their cross."""
    out = {}
    for a in attributes:
        if a not in rows.columns:
            raise CxrfairError(f"run {run_id}: predictions.csv has no attribute column {a}; "
                               f"choose --attributes among the columns it has")
        if rows[a].isna().any():
            image = rows.loc[rows[a].isna(), "image_id"].iloc[0]
            raise CxrfairError(f"run {run_id}: attribute column {a} is empty for image {image}; "
                               "fill it in or leave it out of --attributes")
        values = rows[a].astype(str).to_numpy(dtype=str)
        out[a] = (values, levels_of(a, values))
    if len(attributes) > 1:
        labels = [out[a][0] for a in attributes]
        crossed = labels[0]
        for lab in labels[1:]:
            crossed = np.char.add(np.char.add(crossed.astype(str), CROSS), lab)
        levels = [CROSS.join(t) for t in itertools.product(*(out[a][1] for a in attributes))]
        out[crossed_name(attributes)] = (crossed, levels)
    return out


def _split_rows(run: Run, split: str) -> pd.DataFrame:
    rows = run.split(split)
    if rows.empty:
        raise CxrfairError(f"run {run.run_id}: predictions.csv has no rows with split == {split!r} "
                           f"(column split); choose --split among {sorted(run.predictions['split'].unique())}")
    return rows.sort_values("image_id", kind="stable")  # canonical order shared by every run


@dataclass
class _Evaluated:
    run: Run
    key: tuple  # test-set key: the image ids
    values: dict
    replicates: dict | None


def compute(runs: list[Run], config: AnalyzeConfig, progress=None) -> Results:
    """Evaluate every run on ``config.split`` with bootstrap intervals; build all tables.

    Args:
        runs: from ``read_runs``.
        config: options.
        progress: optional wrapper for the run loop (e.g. tqdm).

    Returns:
        Results.
    """
    rng = np.random.default_rng(config.seed)
    counts: dict[tuple, np.ndarray] = {}  # one count matrix per distinct test set
    evaluated = []
    loop = progress(runs) if progress else runs
    for run in loop:
        rows = _split_rows(run, config.split)
        attrs = group_labels(rows, config.attributes, run.run_id)
        key = tuple(rows["image_id"])
        if key not in counts and config.n_boot:
            # Stratify by the cross of all attributes: the sex × age cells by default.
            strata = attrs[crossed_name(config.attributes)][0] if len(config.attributes) > 1 else attrs[config.attributes[0]][0]
            counts[key] = resample_counts(stratified_indices(strata, config.n_boot, rng), len(rows))
        y = rows["label"].map({c: i for i, c in enumerate(run.classes)}).to_numpy()
        probs = rows[[f"p_{c}" for c in run.classes]].to_numpy(dtype=np.float64)
        values = M.evaluate_all(y, probs, run.classes, attrs)
        reps = M.evaluate_all(y, probs, run.classes, attrs, weights=counts[key]) if config.n_boot else None
        evaluated.append(_Evaluated(run, key, values, reps))
    runs_df = _runs_table(evaluated, config)
    notes: list[str] = []
    return Results(
        metrics=_metrics_table(evaluated, config),
        runs=runs_df,
        seeds=_seeds_table(evaluated, runs_df),
        comparisons=_comparisons_table(evaluated, runs_df, config, notes),
        config=config,
        notes=notes,
    )


def _metrics_table(evaluated: list[_Evaluated], config: AnalyzeConfig) -> pd.DataFrame:
    records = []
    for ev in evaluated:
        r = ev.run
        for (metric, attr, group, cls), v in ev.values.items():
            lo, hi = interval(ev.replicates[(metric, attr, group, cls)], config.level) if ev.replicates else (np.nan, np.nan)
            records.append((r.run_id, r.model, r.method, r.seed, config.split, metric, attr, group, cls,
                            float(v), float(lo), float(hi)))
    return pd.DataFrame.from_records(records, columns=METRIC_COLUMNS)


def _val_accuracy(run: Run) -> float:
    rows = run.split("val")
    if rows.empty:
        return np.nan
    y, p = run.arrays("val")
    return float(M.accuracy(y, p))


def _runs_table(evaluated: list[_Evaluated], config: AnalyzeConfig) -> pd.DataFrame:
    """One row per run; ``primary`` marks the tag per (model, method) that tables and figures show.

    With several tags (e.g. zero-shot prompt sets) for one model and method, the primary one is
    the tag a run marks with ``prompt_set_selected: true`` (the probe's choice on val), else the
    best mean validation accuracy over seeds (as the paper picks prompts, but on val, not test).
    """
    df = pd.DataFrame([{
        "run_id": e.run.run_id, "model": e.run.model, "method": e.run.method, "seed": e.run.seed,
        "tag": tag_of(e.run), "n_images": len(e.key), "val_accuracy": _val_accuracy(e.run),
        "selected": bool(e.run.meta.get("prompt_set_selected", False)),
    } for e in evaluated])
    score = df.groupby(["model", "method", "tag"], sort=False).agg(
        selected=("selected", "any"), val_accuracy=("val_accuracy", "mean")).reset_index()
    score["val_accuracy"] = score["val_accuracy"].fillna(-1.0)
    best = score.sort_values(["model", "method", "selected", "val_accuracy", "tag"],
                             ascending=[True, True, False, False, True]).drop_duplicates(["model", "method"])
    primary = set(zip(best["model"], best["method"], best["tag"]))
    df["primary"] = [(m, me, t) in primary for m, me, t in zip(df["model"], df["method"], df["tag"])]
    return df.drop(columns="selected")


def _seeds_table(evaluated: list[_Evaluated], runs_df: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd (ddof=1; NaN for one seed) over runs that differ only by seed."""
    m = _metrics_long(evaluated, runs_df)
    keys = ["model", "method", "tag", "metric", "attribute", "group", "class"]
    g = m.groupby(keys, sort=False)["value"]
    out = g.agg(n_seeds="count", mean="mean", sd="std").reset_index()
    return out


def _metrics_long(evaluated, runs_df) -> pd.DataFrame:
    tags = dict(zip(runs_df["run_id"], runs_df["tag"]))
    rec = [(e.run.model, e.run.method, tags[e.run.run_id], e.run.seed, *k, float(v))
           for e in evaluated for k, v in e.values.items()]
    return pd.DataFrame.from_records(rec, columns=["model", "method", "tag", "seed", "metric", "attribute", "group", "class", "value"])


def baseline_method(methods) -> str:
    """The method others are compared against: zero-shot if present, else the first in METHODS order."""
    return min(methods, key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS))


def _comparisons_table(evaluated, runs_df, config: AnalyzeConfig, notes: list[str]) -> pd.DataFrame:
    """Paired bootstrap: each primary run minus its model's baseline run on the same resamples.

    The baseline run has the same seed if one exists, else the baseline's lowest seed.
    """
    cols = ["model", "baseline", "baseline_run", "method", "run_id", "seed", "split", "metric", "attribute",
            "group", "class", "delta", "ci_low", "ci_high"]
    if not config.n_boot:
        return pd.DataFrame(columns=cols)
    by_id = {e.run.run_id: e for e in evaluated}
    prim = runs_df[runs_df["primary"]]
    records = []
    for model, df in prim.groupby("model", sort=True):
        base = baseline_method(df["method"].unique())
        base_runs = df[df["method"] == base].sort_values("seed")
        others = df[df["method"] != base]
        rank = others["method"].map(lambda m: METHODS.index(m) if m in METHODS else len(METHODS))
        for _, row in others.assign(_rank=rank).sort_values(["_rank", "method", "seed"]).iterrows():
            same = base_runs[base_runs["seed"] == row["seed"]]
            a = by_id[(same if len(same) else base_runs).iloc[0]["run_id"]]
            b = by_id[row["run_id"]]
            if a.key != b.key or a.run.classes != b.run.classes:
                notes.append(f"{b.run.run_id} vs {a.run.run_id}: different test images or classes; not compared")
                continue
            for k, v in b.values.items():
                d = b.replicates[k] - a.replicates[k]
                lo, hi = interval(d, config.level)
                records.append((model, base, a.run.run_id, b.run.method, b.run.run_id, b.run.seed, config.split,
                                *k, float(v - a.values[k]), float(lo), float(hi)))
    return pd.DataFrame.from_records(records, columns=cols)


def analyze(config: AnalyzeConfig) -> Path:
    """Read ``config.runs_dir``, compute everything, write the report folder; returns report.html."""
    from tqdm.auto import tqdm

    from cxrfair.analysis.report import write_report
    from cxrfair.io import atomic_dir

    runs = read_runs(config.runs_dir)
    results = compute(runs, config, progress=lambda xs: tqdm(xs, desc=f"metrics × {config.n_boot} bootstrap", unit="run"))
    with atomic_dir(config.out, force=config.force) as tmp:
        write_report(results, tmp)
    return Path(config.out) / "report.html"
