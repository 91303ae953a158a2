"""From a folder of runs to tables: metrics with bootstrap intervals, seed summaries, paired comparisons.

``compute(runs, config)`` is pure (runs in, DataFrames out); ``analyze(config)`` reads the runs,
computes, and writes the report folder atomically.

Resampling: patients are redrawn within the strata of the analysed attributes (all of a
patient's images together; ``bootstrap.patient_counts``). All runs evaluated on the same test
images share one (R, N) matrix of bootstrap counts (images aligned by ``image_id``), so the
intervals of different methods come from the same resamples, a paired comparison is a
subtraction of replicate arrays, and the interval of a mean over seeds (or zero-shot prompt
draws) is the percentile interval of the mean of their replicates.
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfair.analysis import metrics as M
from cxrfair.analysis.bootstrap import interval, patient_counts
from cxrfair.analysis.runs import METHODS, Run, parse_run_id, read_runs, run_attributes
from cxrfair.errors import CxrfairError

# A 95% percentile interval from a few dozen replicates rests on the one or two most extreme of
# them and moves with the seed by more than the effects it is meant to bound.
MIN_BOOTSTRAP = 100
# Codes other tools write for the cohort's groups (the cohort builder reads the same ones);
# anything else that is not a declared group, whatever its case, is an error.
GROUP_SYNONYMS = {"sex": {"male": "M", "female": "F"}}
SHORT_NAMES = {"age_group": "age"}
CROSS = "×"  # crossed attribute "sex×age", groups like "M×young"
METRIC_COLUMNS = ["run_id", "model", "method", "seed", "split", "metric", "attribute", "group", "class",
                  "value", "ci_low", "ci_high"]


@dataclass(frozen=True)
class AnalyzeConfig:
    """Options of ``cxrfair analyze``."""

    runs_dir: Path  # folder of run folders (RUNS/<run_id>/)
    out: Path  # report folder to write (replaced only with force)
    n_boot: int = 1000  # bootstrap replicates: 0 = point estimates only, else at least MIN_BOOTSTRAP
    attributes: tuple[str, ...] = ("sex", "age_group")  # attribute columns; their cross is added and stratifies the bootstrap
    split: str = "test"  # split the metrics are computed on
    seed: int = 0  # seed of the bootstrap draws
    level: float = 0.95  # interval coverage
    force: bool = False  # replace an existing report folder
    figures: bool = True  # draw PNG figures (off for quick tests)

    def __post_init__(self):
        if self.n_boot < 0 or 0 < self.n_boot < MIN_BOOTSTRAP:
            raise CxrfairError(f"--bootstrap {self.n_boot}: use 0 (point estimates, no intervals) or at least "
                               f"{MIN_BOOTSTRAP} replicates (default 1000) for percentile intervals")
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
    seeds: pd.DataFrame  # model, method, tag, metric, attribute, group, class, n_seeds, mean, sd, ci_low, ci_high
    comparisons: pd.DataFrame  # model, baseline, baseline_runs, n_baseline, method, run_id, seed, metric, ..., delta, ci_low, ci_high
    config: AnalyzeConfig
    notes: list[str] = field(default_factory=list)


def tag_of(run: Run) -> str:
    """What a run is apart from model, method and seed: runs with equal tags differ only by seed.

    From ``parse_run_id`` (run identity lives in ``runs.RunKey``). Zero-shot runs of one prompt
    set carry the draw as their seed and ``-d<draw>`` in the tag; the draw suffix is dropped so
    the draws of one prompt set are summarised like seeds. A mitigation other than ``erm`` is
    part of the tag (``groupdro-sex__best``), so mitigated and plain runs are never averaged.
    """
    key = parse_run_id(run.run_id)
    tag = key.tag
    if "draw" in run.meta:
        tag = re.sub(rf"-d{re.escape(str(run.meta['draw']))}$", "", tag)
    return tag if key.mitigation == "erm" else f"{key.mitigation}-{key.sensitive}__{tag}"


def check_runs(runs: list[Run]) -> None:
    """Refuse what would mix or mislabel runs: several cohorts, run ids off the convention.

    Runs of different cohorts have different test sets; side by side in one table (or averaged
    as seeds) they would read as one experiment.
    """
    first = runs[0]
    for run in runs:
        key = parse_run_id(run.run_id)
        if key.method != run.method:
            raise CxrfairError(f"run {run.run_id}: run.json says method {run.method!r} but the run id says "
                               f"{key.method!r}; fix one of them")
        if run.meta["cohort_hash"] != first.meta["cohort_hash"]:
            raise CxrfairError(
                f"runs {first.run_id} (cohort {str(first.meta['cohort_hash'])[:12]}) and {run.run_id} "
                f"(cohort {str(run.meta['cohort_hash'])[:12]}) come from different cohorts; analyze one "
                "cohort's runs at a time (move the others into their own RUNS folder)")


def describe_intervals(config: AnalyzeConfig) -> str:
    """One paragraph saying how intervals are made, for the report and README."""
    if not config.n_boot:
        return "No bootstrap (--bootstrap 0): point estimates only, no intervals."
    return (f"{100 * config.level:.0f}% percentile intervals from {config.n_boot} bootstrap replicates (seed "
            f"{config.seed}) of the {config.split} split, resampling patients with replacement within each "
            f"{' × '.join(config.attributes)} stratum: all of a patient's images are drawn together, and a "
            "patient whose images fall in several strata belongs to that of their first image (by image_id). "
            "Every run on the same test images uses the same resamples. A mean over seeds (or over the "
            "prompt draws of a zero-shot prompt set) takes its interval from the mean of the runs' "
            "replicates; paired comparisons subtract the baseline's draw-averaged replicates.")


def crossed_name(attributes) -> str:
    """``("sex", "age_group") -> "sex×age"``."""
    return CROSS.join(SHORT_NAMES.get(a, a) for a in attributes)


def stratum_name(attributes) -> str:
    """The attribute whose groups are the bootstrap strata: the cross of all analysed attributes."""
    return crossed_name(attributes) if len(attributes) > 1 else attributes[0]


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


def group_labels(rows: pd.DataFrame, attributes, run: Run,
                 recoded: dict | None = None) -> dict[str, tuple[np.ndarray, list[str]]]:
    """{attribute: ((N,) labels, levels)} for each attribute and, with two or more, their cross.

    Attributes declared in the run (``runs.run_attributes``) are normalised to their declared
    groups; codes that changed are added to ``recoded[(column, changes)]`` (a list of run ids).
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
    key: tuple  # test-set key: image ids, patient ids and strata (all that the resamples depend on)
    values: dict  # {(metric, attribute, group, class): float}
    replicates: dict | None  # same keys: (R,) replicate values; None without bootstrap


def _patients(rows: pd.DataFrame, run: Run) -> np.ndarray:
    """(N,) patient ids as strings; an empty one would silently pool images into one patient."""
    if rows["patient_id"].isna().any():
        image = rows.loc[rows["patient_id"].isna(), "image_id"].iloc[0]
        raise CxrfairError(f"run {run.run_id}: column patient_id is empty for image {image}; the bootstrap "
                           "resamples patients, so every image needs its patient")
    return rows["patient_id"].astype(str).to_numpy(dtype=str)


def _evaluate(run: Run, config: AnalyzeConfig, counts: dict, rng, recoded: dict) -> _Evaluated:
    """Metrics of one run and, with bootstrap, their replicates on the shared resamples of its test set."""
    rows = _split_rows(run, config.split)
    attrs = group_labels(rows, config.attributes, run, recoded)
    strata = attrs[stratum_name(config.attributes)][0]
    key = (tuple(rows["image_id"]), tuple(_patients(rows, run)), tuple(strata))
    if config.n_boot and key not in counts:
        counts[key] = patient_counts(key[1], strata, config.n_boot, rng)  # (R, N), one per test set
    y = rows["label"].map({c: i for i, c in enumerate(run.classes)}).to_numpy()
    probs = rows[[f"p_{c}" for c in run.classes]].to_numpy(dtype=np.float64)
    values = M.evaluate_all(y, probs, run.classes, attrs)
    reps = M.evaluate_all(y, probs, run.classes, attrs, weights=counts[key]) if config.n_boot else None
    return _Evaluated(run, key, values, reps)


def compute(runs: list[Run], config: AnalyzeConfig, progress=None) -> Results:
    """Evaluate every run on ``config.split`` with bootstrap intervals; build all tables.

    Args:
        runs: from ``read_runs`` (one cohort; ``check_runs``).
        config: options.
        progress: optional wrapper for the run loop (e.g. tqdm).

    Returns:
        Results.
    """
    check_runs(runs)
    rng = np.random.default_rng(config.seed)
    counts: dict[tuple, np.ndarray] = {}
    recoded: dict = {}
    evaluated = [_evaluate(run, config, counts, rng, recoded) for run in (progress(runs) if progress else runs)]
    runs_df = _runs_table(evaluated, config)
    notes = _recoding_notes(recoded)
    return Results(
        metrics=_metrics_table(evaluated, config),
        runs=runs_df,
        seeds=_seeds_table(evaluated, runs_df, config, notes),
        comparisons=_comparisons_table(evaluated, runs_df, config, notes),
        config=config,
        notes=notes,
    )


def _recoding_notes(recoded: dict) -> list[str]:
    """One note per column and set of recoded group codes, so a reader sees what was read how."""
    return [f"column {col}: code(s) {', '.join(f'{a!r} → {b}' for a, b in changes)} read as the declared "
            f"groups in {len(ids)} run(s) (e.g. {ids[0]})" for (col, changes), ids in recoded.items()]


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


def _nanmean0(x: np.ndarray) -> np.ndarray:
    """Mean over axis 0 skipping NaN (a seed where a metric is undefined); NaN if all are."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=0)


def _average(evs: list[_Evaluated]) -> tuple[dict, dict | None]:
    """Mean over runs of every metric's value and, when they share one test set, of its replicates.

    The mean of replicate r over runs is the seed mean on resample r, so percentiles of these
    means are the interval of the seed mean (not a mean of intervals).

    Returns:
        ({key: float}, {key: (R,)}); replicates None without bootstrap or when test sets differ.
    """
    keys = list(evs[0].values)
    values = {k: float(_nanmean0(np.array([e.values.get(k, np.nan) for e in evs]))) for k in keys}
    if evs[0].replicates is None or any(e.key != evs[0].key for e in evs):
        return values, None
    return values, {k: _nanmean0(np.stack([e.replicates[k] for e in evs])) for k in keys}


SEED_COLUMNS = ["model", "method", "tag", "metric", "attribute", "group", "class", "n_seeds", "mean", "sd",
                "ci_low", "ci_high"]


def _seeds_table(evaluated, runs_df, config: AnalyzeConfig, notes: list[str]) -> pd.DataFrame:
    """Runs that differ only by seed (or zero-shot draw): mean, sd (ddof=1) and the mean's interval.

    ``n_seeds`` counts the runs where the metric is defined; the mean and its replicates skip the others.
    """
    tags = dict(zip(runs_df["run_id"], runs_df["tag"]))
    groups = defaultdict(list)
    for e in evaluated:
        groups[(e.run.model, e.run.method, tags[e.run.run_id])].append(e)
    records = []
    for (model, method, tag), evs in groups.items():
        values, reps = _average(evs)
        if config.n_boot and reps is None:
            notes.append(f"{model} {method} {tag}: its runs are on different test images; their mean has no interval")
        for k, v in values.items():
            per_run = np.array([e.values.get(k, np.nan) for e in evs])
            ok = per_run[~np.isnan(per_run)]
            lo, hi = interval(reps[k], config.level) if reps else (np.nan, np.nan)
            sd = float(np.std(ok, ddof=1)) if len(ok) > 1 else np.nan
            records.append((model, method, tag, *k, len(ok), v, sd, float(lo), float(hi)))
    return pd.DataFrame.from_records(records, columns=SEED_COLUMNS)


def baseline_method(methods) -> str:
    """The method others are compared against: zero-shot if present, else the first in METHODS order."""
    return min(methods, key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS))


COMPARISON_COLUMNS = ["model", "baseline", "baseline_runs", "n_baseline", "method", "run_id", "seed", "split",
                      "metric", "attribute", "group", "class", "delta", "ci_low", "ci_high"]


def _comparisons_table(evaluated, runs_df, config: AnalyzeConfig, notes: list[str]) -> pd.DataFrame:
    """Paired bootstrap: each primary run minus its model's baseline on the same resamples.

    The baseline is the mean of the baseline method's primary runs (for zero-shot, every prompt
    draw of the chosen set), value and replicates alike; ``baseline_runs`` lists them.
    """
    if not config.n_boot:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    by_id = {e.run.run_id: e for e in evaluated}
    prim = runs_df[runs_df["primary"]]
    records = []
    for model, df in prim.groupby("model", sort=True):
        base = baseline_method(df["method"].unique())
        base_evs = [by_id[i] for i in df.loc[df["method"] == base].sort_values("seed")["run_id"]]
        values, reps = _average(base_evs)
        if reps is None:
            notes.append(f"{model}: its {base} runs are on different test images; not compared")
            continue
        names = ";".join(e.run.run_id for e in base_evs)
        for b in (by_id[i] for i in _in_method_order(df[df["method"] != base])["run_id"]):
            if b.key != base_evs[0].key or b.run.classes != base_evs[0].run.classes:
                notes.append(f"{b.run.run_id} vs {names}: different test images or classes; not compared")
                continue
            for k, v in b.values.items():
                lo, hi = interval(b.replicates[k] - reps[k], config.level)
                records.append((model, base, names, len(base_evs), b.run.method, b.run.run_id, b.run.seed,
                                config.split, *k, float(v - values[k]), float(lo), float(hi)))
    return pd.DataFrame.from_records(records, columns=COMPARISON_COLUMNS)


def _in_method_order(df: pd.DataFrame) -> pd.DataFrame:
    rank = df["method"].map(lambda m: METHODS.index(m) if m in METHODS else len(METHODS))
    return df.assign(_rank=rank).sort_values(["_rank", "method", "seed"]).drop(columns="_rank")


def _check_out(config: AnalyzeConfig) -> None:
    """Refuse an --out that would replace the runs themselves (before any work)."""
    out, runs = Path(config.out).resolve(), Path(config.runs_dir).resolve()
    if out == runs or out in runs.parents:
        raise CxrfairError(f"--out {config.out}: is or holds the runs folder {config.runs_dir}; write the report elsewhere")


def analyze(config: AnalyzeConfig) -> Path:
    """Read ``config.runs_dir``, compute everything, write the report folder; returns report.html."""
    from tqdm.auto import tqdm

    from cxrfair.analysis.report import write_report
    from cxrfair.io import atomic_dir

    _check_out(config)
    # Open the output first: an existing --out (without --force) is refused before any work.
    with atomic_dir(config.out, force=config.force) as tmp:
        runs = read_runs(config.runs_dir)
        results = compute(runs, config, progress=lambda xs: tqdm(xs, desc=f"metrics × {config.n_boot} bootstrap", unit="run"))
        write_report(results, tmp)
    return Path(config.out) / "report.html"
