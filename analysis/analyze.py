"""From a folder of runs to tables: metrics with bootstrap intervals, seed summaries, paired comparisons.

``compute(runs, config)`` is pure (runs in, DataFrames out); ``analyze(config)`` reads the runs,
computes, and writes the report folder atomically.

Both tasks of the run format: multi-class runs go through ``metrics.evaluate_all`` (arg-max
predictions), multi-label runs through ``multilabel.evaluate_multilabel`` at thresholds chosen
per run on its validation rows (``multilabel.choose_thresholds``). Attributes, their groups and
reference groups come from the runs (run.json ``attributes``, else the v1 sex / age_group).

Resampling: patients are redrawn within strata (the cross of ``config.cross``, by default the
first two attributes; strata of fewer than ``MIN_STRATUM_PATIENTS`` patients pooled), all of a
patient's images together (``bootstrap.patient_counts``). All runs evaluated on the same test
images share one (R, N) matrix of bootstrap counts (images aligned by ``image_id``), so the
intervals of different methods come from the same resamples, a paired comparison is a
subtraction of replicate arrays, and the interval of a mean over seeds (or zero-shot prompt
draws) is the percentile interval of the mean of their replicates. The shortcut test
(``--shortcut``) uses the same resamples for its two AUCs, so their difference is paired too.
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfair.core import metrics as M
from cxrfair.core import multilabel as ML
from cxrfair.core.bootstrap import interval, merge_small_strata, patient_counts
from cxrfair.core.runs import METHODS, Run, label_columns, parse_run_id, read_runs, run_attributes, targets_and_probs
from cxrfair.errors import CxrfairError

# A 95% percentile interval from a few dozen replicates rests on the one or two most extreme of
# them and moves with the seed by more than the effects it is meant to bound.
MIN_BOOTSTRAP = 100
# Within a stratum of n patients the bootstrap variance is (n - 1)/n of the plain one; strata
# smaller than this are pooled (bootstrap.merge_small_strata) so that tiny cells of a fine cross
# do not shrink the intervals.
MIN_STRATUM_PATIENTS = 5
# Run automatically when the predictions carry this column and the task has this class (issue 14).
AUTO_SHORTCUT = ("drain", "Pneumothorax")
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
    attributes: tuple[str, ...] = ()  # attribute columns; () = every attribute the runs declare
    split: str = "test"  # split the metrics are computed on
    seed: int = 0  # seed of the bootstrap draws
    level: float = 0.95  # interval coverage
    force: bool = False  # replace an existing report folder
    figures: bool = True  # draw PNG figures (off for quick tests)
    cross: tuple[str, ...] | None = None  # attributes crossed into one more (and the bootstrap strata); None = the first two, () = none
    shortcut: str = "auto"  # binary column of the shortcut test; "auto": drain + Pneumothorax when present; "none": off
    shortcut_class: str | None = None  # the class whose AUC the shortcut test compares (with an explicit shortcut)
    # Folder of `cxrfair embeddings leakage|geometry` outputs (<model>/leakage, <model>/geometry) shown in the
    # report: "auto" = the runs folder's sibling embeddings/ when it holds some, "none" = off, or a path.
    embeddings: str = "auto"

    def __post_init__(self):
        if self.n_boot < 0 or 0 < self.n_boot < MIN_BOOTSTRAP:
            raise CxrfairError(f"--bootstrap {self.n_boot}: use 0 (point estimates, no intervals) or at least "
                               f"{MIN_BOOTSTRAP} replicates (default 1000) for percentile intervals")
        if self.split not in ("train", "val", "test"):
            raise CxrfairError(f"--split {self.split}: must be train, val or test")
        if len(set(self.attributes)) != len(self.attributes):
            raise CxrfairError(f"--attributes {','.join(self.attributes)}: give distinct attribute columns")
        if self.cross is not None and (len(self.cross) == 1 or len(set(self.cross)) != len(self.cross)):
            raise CxrfairError(f"--cross {','.join(self.cross)}: give two or more distinct attributes, or none")
        if not 0 < self.level < 1:
            raise CxrfairError(f"level {self.level}: must be between 0 and 1")
        explicit = self.shortcut not in ("auto", "none")
        if explicit != (self.shortcut_class is not None):
            raise CxrfairError("--shortcut COLUMN and --shortcut-class CLASS go together (e.g. --shortcut drain "
                               f"--shortcut-class Pneumothorax); got --shortcut {self.shortcut} and --shortcut-class "
                               f"{self.shortcut_class}")


@dataclass
class Results:
    """Everything the report is made of (all DataFrames in long format).

    ``config`` is the one analysed: its ``attributes``, ``cross`` and ``shortcut`` resolved from
    the runs (``analysis_record`` gives the JSON form).
    """

    metrics: pd.DataFrame  # METRIC_COLUMNS
    runs: pd.DataFrame  # run_id, model, method, seed, tag, n_images, val_accuracy, val_auc_macro, primary
    seeds: pd.DataFrame  # model, method, tag, metric, attribute, group, class, n_seeds, mean, sd, ci_low, ci_high
    comparisons: pd.DataFrame  # model, baseline, baseline_runs, n_baseline, method, run_id, seed, metric, ..., delta, ci_low, ci_high
    config: AnalyzeConfig
    notes: list[str] = field(default_factory=list)
    task: str = "multiclass"  # "multiclass" | "multilabel"
    # The analysed attributes in order, each {"groups": [reference first, ...], "reference": g,
    # "declared": bool (False: groups as observed)}; the crossed attribute (if any) last, with "of": [columns].
    attributes: dict = field(default_factory=dict)
    strata: dict = field(default_factory=dict)  # {"attributes": [...], "min_patients": k, "pooled": [stratum names]}
    thresholds: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=THRESHOLD_COLUMNS))  # multi-label
    shortcut: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SHORTCUT_COLUMNS))  # per run
    # Mitigated runs against their ERM counterparts (``mitigation.MITIGATION_COLUMNS``, ``TRADEOFF_COLUMNS``);
    # None when no run has a mitigation.
    mitigation: pd.DataFrame | None = None
    tradeoff: pd.DataFrame | None = None

    @property
    def definitions(self) -> dict[str, str]:
        """{metric name: one sentence} for this task's metrics.csv."""
        return M.metric_definitions(self.task)


THRESHOLD_COLUMNS = ["run_id", "model", "method", "seed", "class", "threshold", "n_val_pos", "n_val_neg"]
SHORTCUT_COLUMNS = ["run_id", "model", "method", "seed", "split", "column", "class",
                    "auc_with", "auc_with_ci_low", "auc_with_ci_high",
                    "auc_without", "auc_without_ci_low", "auc_without_ci_high",
                    "delta", "ci_low", "ci_high", "n_pos_with", "n_pos_without", "n_pos_unknown", "n_neg"]


def tag_of(run: Run) -> str:
    """What a run is apart from model, method and seed: runs with equal tags differ only by seed.

    From ``parse_run_id`` (run identity lives in ``runs.RunKey``). Zero-shot runs of one prompt
    set carry the draw as their seed and ``-d<draw>`` in the tag; the draw suffix is dropped so
    the draws of one prompt set are summarised like seeds. A mitigation other than ``erm`` is
    part of the tag (``groupdro-sex__best``), so mitigated and plain runs are never averaged.
    """
    key = parse_run_id(run.run_id)
    tag = base_tag(run)
    return tag if key.mitigation == "erm" else f"{key.mitigation}-{key.sensitive}__{tag}"


def base_tag(run: Run) -> str:
    """The run id's tag without a zero-shot draw suffix (``clip-d3`` -> ``clip``) and without the mitigation."""
    tag = parse_run_id(run.run_id).tag
    if "draw" in run.meta:
        tag = re.sub(rf"-d{re.escape(str(run.meta['draw']))}$", "", tag)
    return tag


def check_runs(runs: list[Run]) -> None:
    """Refuse what would mix or mislabel runs: several cohorts or tasks, run ids off the convention.

    Runs of different cohorts have different test sets; side by side in one table (or averaged
    as seeds) they would read as one experiment.
    """
    first = runs[0]
    for run in runs:
        key = parse_run_id(run.run_id)
        if key.method != run.method:
            raise CxrfairError(f"run {run.run_id}: run.json says method {run.method!r} but the run id says "
                               f"{key.method!r}; fix one of them")
        if run.task != first.task:
            raise CxrfairError(f"runs {first.run_id} ({first.task}) and {run.run_id} ({run.task}) are of different "
                               "tasks; analyze one cohort's runs at a time (move the others into their own RUNS folder)")
        if run.meta["cohort_hash"] != first.meta["cohort_hash"]:
            raise CxrfairError(
                f"runs {first.run_id} (cohort {str(first.meta['cohort_hash'])[:12]}) and {run.run_id} "
                f"(cohort {str(run.meta['cohort_hash'])[:12]}) come from different cohorts; analyze one "
                "cohort's runs at a time (move the others into their own RUNS folder)")


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


def resolve(runs: list[Run], config: AnalyzeConfig) -> AnalyzeConfig:
    """``config`` with ``attributes`` and ``cross`` filled in from the runs and checked.

    ``attributes`` () becomes every declared attribute; ``cross`` None becomes the first two
    analysed attributes (none with one). CxrfairError for a ``--cross`` attribute not analysed.
    """
    declared = declared_attributes(runs)  # checked whatever --attributes says: references must agree
    attributes = config.attributes or tuple(declared)
    if not attributes:
        raise CxrfairError("the runs declare no attributes (run.json attributes is empty); name the columns to "
                           "compare groups on with --attributes")
    cross = default_cross(attributes) if config.cross is None else config.cross
    outside = [a for a in cross if a not in attributes]
    if outside:
        raise CxrfairError(f"--cross {','.join(cross)}: {', '.join(outside)} is not among the analysed attributes "
                           f"({', '.join(attributes)}); add it to --attributes or cross others")
    return replace(config, attributes=tuple(attributes), cross=tuple(cross))


def default_cross(attributes) -> tuple[str, ...]:
    """The attributes crossed by default: the first two (sex × age for the v1 cohort), none with one.

    Crossing all of them would give 2 × 5 × 3 = 30 cells for sex × five age bins × race, most too
    small to estimate a group metric; ``--cross`` names other ones.
    """
    return tuple(attributes[:2]) if len(attributes) > 1 else ()


def strata_attributes(config: AnalyzeConfig) -> tuple[str, ...]:
    """The attributes whose cross forms the bootstrap strata: ``cross``, else the first attribute."""
    return tuple(config.cross) if config.cross else tuple(config.attributes[:1])


def describe_intervals(config: AnalyzeConfig) -> str:
    """One paragraph saying how intervals are made, for the report and README (``config`` resolved)."""
    if not config.n_boot:
        return "No bootstrap (--bootstrap 0): point estimates only, no intervals."
    strata = strata_attributes(config) if config.attributes else ("the analysed attributes",)
    return (f"{100 * config.level:.0f}% percentile intervals from {config.n_boot} bootstrap replicates (seed "
            f"{config.seed}) of the {config.split} split, resampling patients with replacement within each "
            f"{' × '.join(strata)} stratum: all of a patient's images are drawn together, and a "
            "patient whose images fall in several strata belongs to that of their first image (by image_id). "
            f"Strata with fewer than {MIN_STRATUM_PATIENTS} patients are pooled into one (joined to the smallest "
            "other stratum if the pool is still that small). "
            "Every run on the same test images uses the same resamples. A mean over seeds (or over the "
            "prompt draws of a zero-shot prompt set) takes its interval from the mean of the runs' "
            "replicates; paired comparisons subtract the baseline's draw-averaged replicates.")


def crossed_name(attributes) -> str:
    """``("sex", "age_group") -> "sex×age"``."""
    return CROSS.join(SHORT_NAMES.get(a, a) for a in attributes)


def stratum_name(config: AnalyzeConfig) -> str:
    """The (possibly crossed) attribute whose groups are the bootstrap strata."""
    strata = strata_attributes(config)
    return crossed_name(strata) if len(strata) > 1 else strata[0]


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
    levels: dict  # {attribute: levels in reference order}, crossed attribute included
    thresholds: np.ndarray | None = None  # (C,) multi-label thresholds chosen on validation
    threshold_counts: np.ndarray | None = None  # (2, C) validation positives and negatives per condition
    shortcut: dict | None = None  # the shortcut test's image counts (``shortcut_subsets``)


def _patients(rows: pd.DataFrame, run: Run) -> np.ndarray:
    """(N,) patient ids as strings; an empty one would silently pool images into one patient."""
    if rows["patient_id"].isna().any():
        image = rows.loc[rows["patient_id"].isna(), "image_id"].iloc[0]
        raise CxrfairError(f"run {run.run_id}: column patient_id is empty for image {image}; the bootstrap "
                           "resamples patients, so every image needs its patient")
    return rows["patient_id"].astype(str).to_numpy(dtype=str)


@dataclass
class _Context:
    """What every run's evaluation shares: the resolved config and the resamples per test set."""

    config: AnalyzeConfig
    rng: np.random.Generator
    shortcut: tuple[str, str] | None  # (column, class) of the shortcut test, None when off
    counts: dict = field(default_factory=dict)  # test-set key -> (R, N) bootstrap counts
    recoded: dict = field(default_factory=dict)  # (column, changes) -> run ids
    pooled: dict = field(default_factory=dict)  # test-set key -> names of the pooled strata


def _resamples(ctx: _Context, rows: pd.DataFrame, run: Run, strata: np.ndarray) -> tuple[tuple, np.ndarray | None]:
    """The test-set key and its (R, N) bootstrap counts, drawn once per distinct test set."""
    key = (tuple(rows["image_id"]), tuple(_patients(rows, run)), tuple(strata))
    if ctx.config.n_boot and key not in ctx.counts:
        merged, ctx.pooled[key] = merge_small_strata(key[1], strata, MIN_STRATUM_PATIENTS)
        # Compact integer counts (uint8: 40 MB for 1,000 x 40,000), made float block by block in ``_add``.
        ctx.counts[key] = patient_counts(key[1], merged, ctx.config.n_boot, ctx.rng, dtype=None)
    return key, ctx.counts.get(key)


def _evaluate(run: Run, ctx: _Context) -> _Evaluated:
    """Metrics of one run and, with bootstrap, their replicates on the shared resamples of its test set."""
    config = ctx.config
    rows = _split_rows(run, config.split)
    attrs = group_labels(rows, config.attributes, run, ctx.recoded, cross=config.cross)
    key, weights = _resamples(ctx, rows, run, attrs[stratum_name(config)][0])
    targets, probs = targets_and_probs(rows, run.classes, run.task)
    ev = _Evaluated(run, key, {}, {} if weights is not None else None, {a: lev for a, (_, lev) in attrs.items()})
    if run.task == "multilabel":
        ev.thresholds, ev.threshold_counts = _validation_thresholds(run)
        score = partial(ML.evaluate_multilabel, targets, probs, run.classes, attrs, ev.thresholds)
    else:
        score = partial(M.evaluate_all, targets, probs, run.classes, attrs)
    _add(ev, score, weights)
    if ctx.shortcut:
        column, cls = ctx.shortcut
        subsets, ev.shortcut = shortcut_subsets(rows, run, column, cls)
        _add(ev, partial(shortcut_metrics, subsets, rows[f"p_{cls}"].to_numpy(dtype=np.float64), column, cls), weights)
    return ev


def _add(ev: _Evaluated, score, weights: np.ndarray | None) -> None:
    """Put ``score()``'s values and, with bootstrap, ``score(weights=(R, N) counts)``'s replicates into ``ev``."""
    ev.values.update(score())
    if weights is not None:
        ev.replicates.update(in_blocks(score, weights))


def in_blocks(score, weights: np.ndarray, chunk_bytes: int = ML.CHUNK_BYTES) -> dict:
    """``score(weights=W)`` for the (R, N) counts W, a block of replicates at a time, joined along R.

    Every replicate's values depend only on its own row, so this equals one call on all of W;
    blocks of ``chunk_bytes`` of float64 weights bound the metrics' (r, N) temporaries, which
    for 1,000 replicates of 40,000 images would otherwise be GBs.
    """
    rows = max(1, chunk_bytes // (8 * max(weights.shape[-1], 1)))
    parts = [score(weights=weights[i:i + rows].astype(np.float64)) for i in range(0, len(weights), rows)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _validation_thresholds(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(C,) decision thresholds and the (2, C) validation positives and negatives per condition.

    Max-F1 thresholds on the run's validation rows (``multilabel.THRESHOLD_RULE``), NaN without
    validation rows; a post-processed run (``cxrfair postprocess``) carries its own
    ``decision_thresholds`` in run.json, which must be used as they are: a new max-F1 choice on
    its rescaled scores would undo the group thresholds it encodes.
    """
    rows = run.split("val")
    C = len(run.classes)
    counts = np.zeros((2, C), dtype=np.int64)
    if not rows.empty:
        Y, P = targets_and_probs(rows, run.classes, "multilabel")
        counts = np.stack([(Y == 1).sum(0), (Y == 0).sum(0)])
    fixed = run.meta.get("decision_thresholds")
    if isinstance(fixed, dict):
        return np.array([np.nan if fixed.get(c) is None else float(fixed[c]) for c in run.classes]), counts
    if rows.empty:
        return np.full(C, np.nan), counts
    return ML.choose_thresholds(Y, P), counts


# ----------------------------------------------------------------------------- shortcut test


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


def _shortcut_request(runs: list[Run], config: AnalyzeConfig, notes: list[str]) -> tuple[str, str] | None:
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
            shortcut_subsets(_split_rows(run, config.split), run, column, cls)
    except CxrfairError as e:
        if not auto:
            raise
        notes.append(f"automatic shortcut test ({column}, {cls}) skipped: {e}")
        return None
    return column, cls




def compute(runs: list[Run], config: AnalyzeConfig, progress=None) -> Results:
    """Evaluate every run on ``config.split`` with bootstrap intervals; build all tables.

    Args:
        runs: from ``read_runs`` (one cohort and task; ``check_runs``).
        config: options; ``attributes``/``cross``/``shortcut`` left to their defaults are taken
            from the runs (``resolve``).
        progress: optional wrapper for the run loop (e.g. tqdm).

    Returns:
        Results (``config`` resolved).
    """
    check_runs(runs)
    config = resolve(runs, config)
    notes: list[str] = []
    shortcut = _shortcut_request(runs, config, notes)
    config = replace(config, shortcut=shortcut[0] if shortcut else "none", shortcut_class=shortcut and shortcut[1])
    ctx = _Context(config, np.random.default_rng(config.seed), shortcut)
    evaluated = [_evaluate(run, ctx) for run in (progress(runs) if progress else runs)]
    runs_df = _runs_table(evaluated)
    notes = _recoding_notes(ctx.recoded) + _pooling_notes(ctx) + _task_notes(evaluated, config) + notes
    from cxrfair.analysis import mitigation as MIT  # imports this module

    mitigation, tradeoff = MIT.mitigation_tables(evaluated, runs_df, config, notes)
    return Results(
        metrics=_metrics_table(evaluated, config),
        runs=runs_df,
        seeds=_seeds_table(evaluated, runs_df, config, notes),
        comparisons=_comparisons_table(evaluated, runs_df, config, notes),
        config=config,
        notes=notes,
        task=runs[0].task,
        attributes=_attribute_table(evaluated[0], runs[0], config),
        strata={"attributes": list(strata_attributes(config)), "min_patients": MIN_STRATUM_PATIENTS,
                "pooled": sorted({s for names in ctx.pooled.values() for s in names})},
        thresholds=_thresholds_table(evaluated),
        shortcut=_shortcut_table(evaluated, config),
        mitigation=mitigation,
        tradeoff=tradeoff,
    )


def _pooling_notes(ctx: _Context) -> list[str]:
    return [f"bootstrap strata with fewer than {MIN_STRATUM_PATIENTS} patients pooled into one: {', '.join(names)}"
            for names in dict.fromkeys(tuple(v) for v in ctx.pooled.values() if v)]


def _task_notes(evaluated: list[_Evaluated], config: AnalyzeConfig) -> list[str]:
    """What a reader must know about multi-label thresholds and the shortcut test's images."""
    notes = []
    if evaluated[0].run.task == "multilabel":
        notes.append(f"Thresholds (f1, tpr, fpr, fnr, eqodds, eqodds_worst, fnr_gap): {ML.THRESHOLD_RULE}; chosen "
                     "per run on its own validation rows (thresholds.csv).")
        if config.split == "val":
            notes.append("--split val: thresholds are chosen on the same rows the metrics are computed on, so "
                         "the threshold metrics are optimistic.")
        for e in evaluated:
            missing = [c for c, t in zip(e.run.classes, e.thresholds) if np.isnan(t)]
            if missing:
                notes.append(f"run {e.run.run_id}: no validation positives for {', '.join(missing)}; the threshold "
                             "metrics of these conditions are NaN")
    if evaluated[0].shortcut:
        k, (column, cls) = evaluated[0].shortcut, (config.shortcut, config.shortcut_class)
        notes.append(f"Shortcut test ({config.split} split): AUC of {cls} on its {k['n_pos_with']} positives with "
                     f"{column} = 1 plus all {k['n_neg']} negatives, vs its {k['n_pos_without']} positives with "
                     f"{column} = 0 plus the same negatives; {k['n_pos_unknown']} positives with {column} empty are "
                     f"in neither, negatives count whatever their {column}. Both AUCs use the same resamples, so "
                     "the interval of the difference is paired (shortcut.csv).")
    return notes


def _attribute_table(ev: _Evaluated, run: Run, config: AnalyzeConfig) -> dict:
    """{attribute: {groups, reference, declared[, of]}} for the analysed attributes and the cross."""
    declared = run_attributes(run)
    out = {a: {"groups": list(ev.levels[a]), "reference": ev.levels[a][0] if ev.levels[a] else None,
               "declared": a in declared} for a in config.attributes}
    if config.cross:
        name = crossed_name(config.cross)
        out[name] = {"groups": list(ev.levels[name]), "reference": ev.levels[name][0], "declared": False,
                     "of": list(config.cross)}
    return out


def _thresholds_table(evaluated: list[_Evaluated]) -> pd.DataFrame:
    """Multi-label: one row per run and condition, its validation threshold and what it was chosen on."""
    records = []
    for e in (e for e in evaluated if e.thresholds is not None):
        for j, c in enumerate(e.run.classes):
            records.append((e.run.run_id, e.run.model, e.run.method, e.run.seed, c, float(e.thresholds[j]),
                            int(e.threshold_counts[0, j]), int(e.threshold_counts[1, j])))
    return pd.DataFrame.from_records(records, columns=THRESHOLD_COLUMNS)


def _shortcut_table(evaluated: list[_Evaluated], config: AnalyzeConfig) -> pd.DataFrame:
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


def _recoding_notes(recoded: dict) -> list[str]:
    """One note per column and set of recoded group codes, so a reader sees what was read how."""
    return [f"column {col}: code(s) {', '.join(f'{a!r} → {b}' for a, b in changes)} read as the declared "
            f"groups in {len(ids)} run(s) (e.g. {ids[0]})" for (col, changes), ids in recoded.items()]


def _replicate_matrix(ev: _Evaluated, keys: list) -> np.ndarray:
    """(R, K) replicates of ``keys`` (a NaN column for a key the run lacks)."""
    missing = np.full(next(iter(ev.replicates.values())).shape, np.nan)
    return np.stack([ev.replicates.get(k, missing) for k in keys], axis=1)


def _metrics_table(evaluated: list[_Evaluated], config: AnalyzeConfig) -> pd.DataFrame:
    records = []
    for ev in evaluated:
        r, keys = ev.run, list(ev.values)
        # All intervals of a run in one call: one sort of its (R, K) replicates.
        lo, hi = interval(_replicate_matrix(ev, keys), config.level) if ev.replicates else (np.full(len(keys), np.nan),) * 2
        records.extend((r.run_id, r.model, r.method, r.seed, config.split, *k, float(ev.values[k]), float(lo[i]),
                        float(hi[i])) for i, k in enumerate(keys))
    return pd.DataFrame.from_records(records, columns=METRIC_COLUMNS)


def _val_scores(run: Run) -> tuple[float, float]:
    """(accuracy, macro AUC) on the run's validation rows; accuracy NaN for multi-label, both NaN without rows."""
    if run.split("val").empty:
        return np.nan, np.nan
    y, p = run.arrays("val")
    if run.task == "multilabel":
        return np.nan, float(ML.condition_metrics(y, p)["auc_macro"])
    return float(M.accuracy(y, p)), float(M.auc_macro(y, p))


def _runs_table(evaluated: list[_Evaluated]) -> pd.DataFrame:
    """One row per run; ``primary`` marks the tag per (model, method) that tables and figures show.

    With several tags (e.g. zero-shot prompt sets) for one model and method, the primary one is
    the tag a run marks with ``prompt_set_selected: true`` (the probe's choice on val), else the
    best mean validation score over seeds (as the paper picks prompts, but on val, not test):
    accuracy for multi-class runs, macro AUC for multi-label ones. Plain (``erm``) tags come
    first: a mitigated run is primary only for a model and method without any erm run (its
    mitigation section compares it with ERM instead).
    """
    df = pd.DataFrame([{
        "run_id": e.run.run_id, "model": e.run.model, "method": e.run.method, "seed": e.run.seed,
        "tag": tag_of(e.run), "n_images": len(e.key[0]),
        **dict(zip(("val_accuracy", "val_auc_macro"), _val_scores(e.run))),
        "selected": bool(e.run.meta.get("prompt_set_selected", False)),
        "erm": parse_run_id(e.run.run_id).mitigation == "erm",
    } for e in evaluated])
    criterion = "val_auc_macro" if evaluated[0].run.task == "multilabel" else "val_accuracy"
    score = df.groupby(["model", "method", "tag"], sort=False).agg(
        erm=("erm", "all"), selected=("selected", "any"), val=(criterion, "mean")).reset_index()
    score["val"] = score["val"].fillna(-1.0)
    best = score.sort_values(["model", "method", "erm", "selected", "val", "tag"],
                             ascending=[True, True, False, False, False, True]).drop_duplicates(["model", "method"])
    primary = set(zip(best["model"], best["method"], best["tag"]))
    df["primary"] = [(m, me, t) in primary for m, me, t in zip(df["model"], df["method"], df["tag"])]
    return df.drop(columns=["selected", "erm"])


def _nanmean0(x: np.ndarray) -> np.ndarray:
    """Mean over axis 0 skipping NaN (a seed where a metric is undefined); NaN if all are."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=0)


def _average(evs: list[_Evaluated], keys: list | None = None) -> tuple[list, np.ndarray, np.ndarray, np.ndarray | None]:
    """Mean over runs of every metric's value and, when they share one test set, of its replicates.

    The mean of replicate r over runs is the seed mean on resample r, so percentiles of these
    means are the interval of the seed mean (not a mean of intervals).

    Args:
        evs: the runs. keys: the metric keys (default: the first run's).

    Returns:
        (keys, (runs, K) values per run, (K,) means, (R, K) mean replicates or None without
        bootstrap or when test sets differ).
    """
    keys = list(evs[0].values) if keys is None else keys
    per_run = np.array([[e.values.get(k, np.nan) for k in keys] for e in evs], dtype=np.float64)
    if evs[0].replicates is None or any(e.key != evs[0].key for e in evs):
        return keys, per_run, _nanmean0(per_run), None
    reps = _nanmean0(np.stack([_replicate_matrix(e, keys) for e in evs]))
    return keys, per_run, _nanmean0(per_run), reps


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
        keys, per_run, means, reps = _average(evs)
        if config.n_boot and reps is None:
            notes.append(f"{model} {method} {tag}: its runs are on different test images; their mean has no interval")
        lo, hi = interval(reps, config.level) if reps is not None else (np.full(len(keys), np.nan),) * 2
        n = (~np.isnan(per_run)).sum(axis=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # fewer than two defined runs: NaN, set below
            sd = np.where(n > 1, np.nanstd(per_run, axis=0, ddof=1), np.nan)
        records.extend((model, method, tag, *k, int(n[i]), float(means[i]), float(sd[i]), float(lo[i]), float(hi[i]))
                       for i, k in enumerate(keys))
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
        if any(e.key != base_evs[0].key for e in base_evs):
            notes.append(f"{model}: its {base} runs are on different test images; not compared")
            continue
        names = ";".join(e.run.run_id for e in base_evs)
        baselines: dict[tuple, tuple] = {}  # the baseline averaged once per set of metric keys
        for b in (by_id[i] for i in _in_method_order(df[df["method"] != base])["run_id"]):
            if b.key != base_evs[0].key or b.run.classes != base_evs[0].run.classes:
                notes.append(f"{b.run.run_id} vs {names}: different test images or classes; not compared")
                continue
            if tuple(b.values) not in baselines:
                baselines[tuple(b.values)] = _average(base_evs, list(b.values))
            keys, _, base_values, base_reps = baselines[tuple(b.values)]
            lo, hi = interval(_replicate_matrix(b, keys) - base_reps, config.level)
            records.extend((model, base, names, len(base_evs), b.run.method, b.run.run_id, b.run.seed, config.split,
                            *k, float(b.values[k] - base_values[i]), float(lo[i]), float(hi[i]))
                           for i, k in enumerate(keys))
    return pd.DataFrame.from_records(records, columns=COMPARISON_COLUMNS)


def _in_method_order(df: pd.DataFrame) -> pd.DataFrame:
    rank = df["method"].map(lambda m: METHODS.index(m) if m in METHODS else len(METHODS))
    return df.assign(_rank=rank).sort_values(["_rank", "method", "seed"]).drop(columns="_rank")


def _check_out(config: AnalyzeConfig) -> None:
    """Refuse an --out that would replace the runs themselves (before any work)."""
    out, runs = Path(config.out).resolve(), Path(config.runs_dir).resolve()
    if out == runs or out in runs.parents:
        raise CxrfairError(f"--out {config.out}: is or holds the runs folder {config.runs_dir}; write the report elsewhere")


def resolve_embeddings(config: AnalyzeConfig) -> AnalyzeConfig:
    """``config`` with ``embeddings`` the folder the report will read, or "none" (``embedding_report.embeddings_root``)."""
    from cxrfair.analysis.embedding_report import embeddings_root

    root = embeddings_root(config)
    return replace(config, embeddings="none" if root is None else str(root))


def analysis_record(results: Results) -> dict:
    """analysis.json: the options used (resolved) and what the numbers rest on."""
    return {**asdict(results.config), "task": results.task, "attribute_groups": results.attributes,
            "strata": results.strata, "min_bootstrap": MIN_BOOTSTRAP,
            "threshold_rule": ML.THRESHOLD_RULE if results.task == "multilabel" else None,
            "shortcut_definition": (M.SHORTCUT_DEFINITIONS if len(results.shortcut) else None),
            "notes": list(results.notes)}


def write_tables(results: Results, folder: Path) -> None:
    """The files of the report folder that the report layout does not write: thresholds.csv
    (multi-label), shortcut.csv (when the shortcut test ran), mitigation.csv and tradeoff.csv
    (when a run has a mitigation) and analysis.json (replacing the
    layout's, with the resolved attributes, strata and rules)."""
    from cxrfair.io import write_json_atomic

    folder = Path(folder)
    if len(results.thresholds):
        results.thresholds.to_csv(folder / "thresholds.csv", index=False)
    if len(results.shortcut):
        results.shortcut.to_csv(folder / "shortcut.csv", index=False)
    if results.mitigation is not None:
        results.mitigation.to_csv(folder / "mitigation.csv", index=False)
        results.tradeoff.to_csv(folder / "tradeoff.csv", index=False)
    write_json_atomic(folder / "analysis.json", analysis_record(results))


def analyze(config: AnalyzeConfig) -> Path:
    """Read ``config.runs_dir``, compute everything, write the report folder; returns report.html."""
    from tqdm.auto import tqdm

    from cxrfair.analysis.report import write_report
    from cxrfair.io import atomic_dir

    _check_out(config)
    config = resolve_embeddings(config)  # a bad --embeddings folder is refused before any work
    # Open the output first: an existing --out (without --force) is refused before any work.
    with atomic_dir(config.out, force=config.force) as tmp:
        runs = read_runs(config.runs_dir)
        results = compute(runs, config, progress=lambda xs: tqdm(xs, desc=f"metrics × {config.n_boot} bootstrap", unit="run"))
        write_report(results, tmp, runs)
        write_tables(results, tmp)
    return Path(config.out) / "report.html"
