"""The engine: runs in, tables out. Metrics with bootstrap intervals, seed summaries, paired comparisons.

``compute(runs, config)`` is pure (runs in, ``Results`` of DataFrames out; no file is read or
written); the command ``analyze.analyze`` reads the runs, calls it and writes the report folder.

Both tasks of the run format: multi-class runs go through ``metrics.evaluate_all`` (arg-max
predictions), multi-label runs through ``multilabel.evaluate_multilabel`` at thresholds chosen
per run on its validation rows (``multilabel.choose_thresholds``). Attributes, their groups and
reference groups come from the runs (run.json ``attributes``, else the v1 sex / age_group; ``groups``).

Resampling: patients are redrawn within strata (the cross of ``config.cross``, by default the
first two attributes; strata of fewer than ``MIN_STRATUM_PATIENTS`` patients pooled), all of a
patient's images together (``bootstrap.patient_counts``). All runs evaluated on the same test
images share one (R, N) matrix of bootstrap counts (images aligned by ``image_id``), so the
intervals of different methods come from the same resamples and a paired comparison is a
subtraction of replicate arrays. A mean over seeds (or zero-shot prompt draws) averages its runs'
replicates (the patients-only interval) and is widened by the seeds' variance: seeds.csv by
``replicates.seed_widened``, the paired deltas (comparisons, mitigation) by
``replicates.delta_interval`` (both arms' seed variances, Welch–Satterthwaite), whose p-value
inverts that interval; Holm adjusts it (``core.bootstrap.holm``). The shortcut
test (``--shortcut``, ``shortcut``) uses the same resamples for its two AUCs, so their difference
is paired too; so are the mitigation deltas (``mitigation``).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import pandas as pd

from cxrfair.analysis import mitigation as MIT
from cxrfair.analysis.config import MIN_STRATUM_PATIENTS, AnalyzeConfig, resolve, strata_attributes, stratum_name
from cxrfair.analysis.fewshot import fewshot_table
from cxrfair.analysis.groups import crossed_name, group_labels
from cxrfair.analysis.replicates import Evaluated, average, delta_interval, replicate_matrix, seed_variance, seed_widened
from cxrfair.analysis.runsets import baseline_method, check_runs, in_method_order, runs_table, split_rows
from cxrfair.analysis.shortcut import SHORTCUT_COLUMNS, shortcut_metrics, shortcut_request, shortcut_subsets, shortcut_table
from cxrfair.core import metrics as M
from cxrfair.core import multilabel as ML
from cxrfair.core.bootstrap import holm, merge_small_strata, patient_counts
from cxrfair.core.intervals import interval_method, intervals_by_metric
from cxrfair.core.runs import Run, run_attributes, targets_and_probs
from cxrfair.errors import CxrfairError

# value: the plug-in estimate (fairlearn's); ci_low, ci_high: the interval of the metric's method
# (``core.intervals.INTERVAL_METHODS``, named in ``interval``); value_bc: the estimate that interval is
# centred on (the bias-corrected one for a biased gap, else equal to value).
METRIC_COLUMNS = ["run_id", "model", "method", "seed", "split", "metric", "attribute", "group", "class",
                  "value", "ci_low", "ci_high", "value_bc", "interval"]


@dataclass
class Results:
    """Everything the report is made of (all DataFrames in long format).

    ``config`` is the one analysed: its ``attributes``, ``cross`` and ``shortcut`` resolved from
    the runs (``analysis_record`` gives the JSON form).
    """

    metrics: pd.DataFrame  # METRIC_COLUMNS
    runs: pd.DataFrame  # run_id, model, method, seed, tag, n_images, val_accuracy, val_auc_macro, primary
    seeds: pd.DataFrame  # model, method, tag, metric, attribute, group, class, n_seeds, mean, sd, ci_low, ci_high
    comparisons: pd.DataFrame  # COMPARISON_COLUMNS: ..., delta, ci_low, ci_high, n_seeds, p_value, p_holm, holm_m, seed_var_known
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
    # Few-shot probes by K next to zero-shot and the whole-split probe (``fewshot.FEWSHOT_COLUMNS``);
    # None when no run is few-shot.
    fewshot: pd.DataFrame | None = None

    @property
    def definitions(self) -> dict[str, str]:
        """{metric name: one sentence} for this task's metrics.csv."""
        return M.metric_definitions(self.task)


THRESHOLD_COLUMNS = ["run_id", "model", "method", "seed", "class", "threshold", "n_val_pos", "n_val_neg"]


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
    notes: list[str] = check_runs(runs)
    config = resolve(runs, config)
    shortcut = shortcut_request(runs, config, notes)
    config = replace(config, shortcut=shortcut[0] if shortcut else "none", shortcut_class=shortcut and shortcut[1])
    ctx = Context(config, np.random.default_rng(config.seed), shortcut)
    evaluated = [_evaluate(run, ctx) for run in (progress(runs) if progress else runs)]
    runs_df = runs_table(evaluated)
    notes = _recoding_notes(ctx.recoded) + _pooling_notes(ctx) + _task_notes(evaluated, config) + notes
    mitigation, tradeoff = MIT.mitigation_tables(evaluated, runs_df, config, notes)
    metrics = _metrics_table(evaluated, config)
    notes += _interval_notes(metrics, {a: len(lev) for e in evaluated for a, lev in e.levels.items()})
    seeds = _seeds_table(evaluated, runs_df, config, notes)
    return Results(
        metrics=metrics,
        runs=runs_df,
        seeds=seeds,
        comparisons=_comparisons_table(evaluated, runs_df, config, notes),
        config=config,
        notes=notes,
        task=runs[0].task,
        attributes=_attribute_table(evaluated[0], runs[0], config),
        strata={"attributes": list(strata_attributes(config)), "min_patients": MIN_STRATUM_PATIENTS,
                "pooled": sorted({s for names in ctx.pooled.values() for s in names})},
        thresholds=_thresholds_table(evaluated),
        shortcut=shortcut_table(evaluated, config),
        mitigation=mitigation,
        tradeoff=tradeoff,
        fewshot=fewshot_table(runs_df, seeds, runs[0].task),
    )


def _pooling_notes(ctx: Context) -> list[str]:
    return [f"bootstrap strata with fewer than {MIN_STRATUM_PATIENTS} patients pooled into one: {', '.join(names)}"
            for names in dict.fromkeys(tuple(v) for v in ctx.pooled.values() if v)]


def _task_notes(evaluated: list[Evaluated], config: AnalyzeConfig) -> list[str]:
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


def _attribute_table(ev: Evaluated, run: Run, config: AnalyzeConfig) -> dict:
    """{attribute: {groups, reference, declared[, of]}} for the analysed attributes and the cross."""
    declared = run_attributes(run)
    out = {a: {"groups": list(ev.levels[a]), "reference": ev.levels[a][0] if ev.levels[a] else None,
               "declared": a in declared} for a in config.attributes}
    if config.cross:
        name = crossed_name(config.cross)
        out[name] = {"groups": list(ev.levels[name]), "reference": ev.levels[name][0], "declared": False,
                     "of": list(config.cross)}
    return out


def _recoding_notes(recoded: dict) -> list[str]:
    """One note per column and set of recoded group codes, so a reader sees what was read how."""
    return [f"column {col}: code(s) {', '.join(f'{a!r} → {b}' for a, b in changes)} read as the declared "
            f"groups in {len(ids)} run(s) (e.g. {ids[0]})" for (col, changes), ids in recoded.items()]


# ----------------------------------------------------------------------------- evaluating one run


def _patients(rows: pd.DataFrame, run: Run) -> np.ndarray:
    """(N,) patient ids as strings; an empty one would silently pool images into one patient."""
    if rows["patient_id"].isna().any():
        image = rows.loc[rows["patient_id"].isna(), "image_id"].iloc[0]
        raise CxrfairError(f"run {run.run_id}: column patient_id is empty for image {image}; the bootstrap "
                           "resamples patients, so every image needs its patient")
    return rows["patient_id"].astype(str).to_numpy(dtype=str)


@dataclass
class Context:
    """What every run's evaluation shares: the resolved config and the resamples per test set."""

    config: AnalyzeConfig
    rng: np.random.Generator
    shortcut: tuple[str, str] | None  # (column, class) of the shortcut test, None when off
    counts: dict = field(default_factory=dict)  # test-set key -> (R, N) bootstrap counts
    recoded: dict = field(default_factory=dict)  # (column, changes) -> run ids
    pooled: dict = field(default_factory=dict)  # test-set key -> names of the pooled strata


def resamples(ctx: Context, rows: pd.DataFrame, run: Run, strata: np.ndarray) -> tuple[tuple, np.ndarray | None]:
    """The test-set key and its (R, N) bootstrap counts, drawn once per distinct test set."""
    key = (tuple(rows["image_id"]), tuple(_patients(rows, run)), tuple(strata))
    if ctx.config.n_boot and key not in ctx.counts:
        merged, ctx.pooled[key] = merge_small_strata(key[1], strata, MIN_STRATUM_PATIENTS)
        # Compact integer counts (uint8: 40 MB for 1,000 x 40,000), made float block by block in ``_add``.
        ctx.counts[key] = patient_counts(key[1], merged, ctx.config.n_boot, ctx.rng, dtype=None)
    return key, ctx.counts.get(key)


def _evaluate(run: Run, ctx: Context) -> Evaluated:
    """Metrics of one run and, with bootstrap, their replicates on the shared resamples of its test set."""
    config = ctx.config
    rows = split_rows(run, config.split)
    attrs = group_labels(rows, config.attributes, run, ctx.recoded, cross=config.cross)
    key, weights = resamples(ctx, rows, run, attrs[stratum_name(config)][0])
    targets, probs = targets_and_probs(rows, run.classes, run.task)
    ev = Evaluated(run, key, {}, {} if weights is not None else None, {a: lev for a, (_, lev) in attrs.items()})
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


def _add(ev: Evaluated, score, weights: np.ndarray | None) -> None:
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


# ----------------------------------------------------------------------------- tables


def _metrics_table(evaluated: list[Evaluated], config: AnalyzeConfig) -> pd.DataFrame:
    """One row per run and metric key: plug-in value, its interval by the metric's method, value_bc."""
    records = []
    for ev in evaluated:
        r, keys = ev.run, list(ev.values)
        est = np.array([float(ev.values[k]) for k in keys])
        if ev.replicates:
            # All intervals of a run at once: one sort of its (R, K) replicates per method.
            lo, hi, bc, methods = intervals_by_metric(replicate_matrix(ev, keys), est, keys, config.level)
        else:
            lo = hi = bc = np.full(len(keys), np.nan)
            methods = [""] * len(keys)
        records.extend((r.run_id, r.model, r.method, r.seed, config.split, *k, est[i], float(lo[i]), float(hi[i]),
                        float(bc[i]), methods[i]) for i, k in enumerate(keys))
    return pd.DataFrame.from_records(records, columns=METRIC_COLUMNS)


def _interval_notes(metrics: pd.DataFrame, n_groups: dict[str, int]) -> list[str]:
    """One sentence per interval method used (naming its metrics and why), one for the metrics whose
    coverage the simulation could not confirm (``n_groups``: {attribute: its number of groups}),
    and one per metric whose interval excludes its plug-in value somewhere (how often, and why)."""
    used = metrics[metrics["interval"] != ""]
    names = list(dict.fromkeys(used["metric"]))
    by_reason: dict[tuple[str, str], list[str]] = defaultdict(list)
    for n in names:
        spec = interval_method(n)
        by_reason[(spec.method, spec.why)].append(n)
    notes = [f"Intervals ({method}) of {', '.join(ms)}: {why}." for (method, why), ms in by_reason.items()]
    unchecked = list(dict.fromkeys(r.metric for r in used[["metric", "attribute"]].drop_duplicates().itertuples()
                                   if not interval_method(r.metric).checked(n_groups.get(r.attribute))))
    if unchecked:
        named = [n if not interval_method(n).coverage_checked
                 else f"{n} (attributes of more than {interval_method(n).checked_groups} groups)" for n in unchecked]
        notes.append(f"The intervals of {', '.join(named)} are not coverage-checked (benchmarks/coverage.py did not "
                     "find 90–99% coverage of a true gap of 0.05 or more there, or did not simulate them; the method "
                     "notes above say which): read them as approximate.")
    for name, rows in used.groupby("metric", sort=False):
        above, below = int((rows["value"] > rows["ci_high"]).sum()), int((rows["value"] < rows["ci_low"]).sum())
        if not above + below:
            continue
        side = "above" if above >= below else "below"
        head = f"{name}: {above + below} of {len(rows)} intervals exclude the plug-in value ({side} them): "
        if interval_method(name).method == "percentile":
            # The replicates sit on one side of the estimate: the percentile interval inherits their bias.
            notes.append(head + f"its bootstrap replicates are biased {'downward' if side == 'above' else 'upward'} "
                                "in groups this small, and its percentile "
                                "interval inherits that bias; read those rows with care.")
        else:
            notes.append(head + f"the plug-in {name} is biased {'upward' if side == 'above' else 'downward'} in "
                                "samples this small and the interval corrects for it (metrics.csv value_bc: the "
                                "bias-corrected estimate).")
    return notes


def _thresholds_table(evaluated: list[Evaluated]) -> pd.DataFrame:
    """Multi-label: one row per run and condition, its validation threshold and what it was chosen on."""
    records = []
    for e in (e for e in evaluated if e.thresholds is not None):
        for j, c in enumerate(e.run.classes):
            records.append((e.run.run_id, e.run.model, e.run.method, e.run.seed, c, float(e.thresholds[j]),
                            int(e.threshold_counts[0, j]), int(e.threshold_counts[1, j])))
    return pd.DataFrame.from_records(records, columns=THRESHOLD_COLUMNS)


SEED_COLUMNS = ["model", "method", "tag", "metric", "attribute", "group", "class", "n_seeds", "mean", "sd",
                "ci_low", "ci_high"]


def _seeds_table(evaluated, runs_df, config: AnalyzeConfig, notes: list[str]) -> pd.DataFrame:
    """Runs that differ only by seed (or zero-shot draw): mean, sd (ddof=1) and the mean's interval.

    The interval is the mean's patients-only interval, by each metric's method (``core.intervals``),
    widened by the seed variance (``replicates.seed_widened``: each side in quadrature with
    t_{S−1} · sd / √S), so seeds that disagree widen it; the seeds-then-patients bootstrap covered
    only 0.77–0.85 with 2–3 seeds (RESULTS.md, "Seed means"). ``n_seeds`` counts the runs where the
    metric is defined; the mean and its replicates skip the others; with one run the seed variance
    is unknown (a note says so) and the interval is its patients-only one.
    """
    tags = dict(zip(runs_df["run_id"], runs_df["tag"]))
    groups = defaultdict(list)
    for e in evaluated:
        groups[(e.run.model, e.run.method, tags[e.run.run_id])].append(e)
    records, single, pairs = [], [], []
    for (model, method, tag), evs in groups.items():
        keys, per_run, means, reps = average(evs)  # patients only: the seeds enter through seed_widened
        if config.n_boot and reps is None:
            notes.append(f"{model} {method} {tag}: its runs are on different test images; their mean has no interval")
        single += [f"{model} {method} {tag}"] if len(evs) == 1 else []
        pairs += [f"{model} {method} {tag}"] if len(evs) == 2 else []
        # Each metric's own method (core.intervals), as metrics.csv: a seed mean of a gap is biased like one run's.
        lo, hi = (seed_widened(means, *intervals_by_metric(reps, means, keys, config.level)[:2], per_run, config.level)
                  if reps is not None else (np.full(len(keys), np.nan),) * 2)
        # The widening can reach past the metric's range (an AUC above 1 with two seeds): clip, as every interval is.
        specs = [interval_method(k[0]) for k in keys]
        lo, hi = (np.clip(x, [sp.low for sp in specs], [sp.high for sp in specs]) for x in (lo, hi))
        n = (~np.isnan(per_run)).sum(axis=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # fewer than two defined runs: NaN, set below
            sd = np.where(n > 1, np.nanstd(per_run, axis=0, ddof=1), np.nan)
        records.extend((model, method, tag, *k, int(n[i]), float(means[i]), float(sd[i]), float(lo[i]), float(hi[i]))
                       for i, k in enumerate(keys))
    if single and config.n_boot:
        notes.append(f"one run only (n_seeds = 1), so the seed variance is unknown and their intervals cover the "
                     f"test patients alone: {', '.join(single)}")
    if pairs and config.n_boot:
        notes.append(f"two runs only (n_seeds = 2): their seed-mean intervals carry t_1 = 12.7 times the seeds' "
                     f"sd / √2 (they covered in the simulation, but are wide; 3+ seeds give usable ones): "
                     f"{', '.join(pairs)}")
    return pd.DataFrame.from_records(records, columns=SEED_COLUMNS)


COMPARISON_COLUMNS = ["model", "baseline", "baseline_runs", "n_baseline", "method", "run_id", "seed", "split",
                      "metric", "attribute", "group", "class", "delta", "ci_low", "ci_high", "n_seeds", "p_value",
                      "p_holm", "holm_m", "seed_var_known"]


def _comparisons_table(evaluated, runs_df, config: AnalyzeConfig, notes: list[str]) -> pd.DataFrame:
    """Paired bootstrap: each primary run, and the mean of a method's primary runs, minus its model's baseline.

    The baseline is the mean of the baseline method's primary runs (for zero-shot, every prompt
    draw of the chosen set), value and replicates alike; ``baseline_runs`` lists them. Per run
    (``seed`` set, ``n_seeds`` 1) the delta is conditional on that run; a method with several
    primary runs also gets a seed-mean row (``seed`` empty, ``run_id`` its runs ``;``-joined,
    ``n_seeds`` of them), the delta a reader should quote. Each delta's replicates are the plain
    seed means' on the shared patient resamples, subtracted; its interval and ``p_value`` come
    from ``replicates.delta_interval``: widened by the seed variance of each seed mean in it (the
    baseline's, and on a seed-mean row the method's too: independent trainings, Welch). The
    two-level bootstrap used before under-covered with 2–3 seeds (RESULTS.md, "Interval coverage,
    part 3"). ``seed_var_known`` is false where one of those means has a single defined run (its
    seed variance unknown: the interval covers the patients and the other arm only). ``p_holm``:
    the Holm adjustment within a family of ``holm_m`` rows (``_holm_within``).
    """
    if not config.n_boot:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    by_id = {e.run.run_id: e for e in evaluated}
    prim = runs_df[runs_df["primary"]]
    records, replicates, seed_terms, n_seeds = [], [], [], []
    for model, df in prim.groupby("model", sort=True):
        base = baseline_method(df["method"].unique())
        base_evs = [by_id[i] for i in df.loc[df["method"] == base].sort_values("seed")["run_id"]]
        if any(e.key != base_evs[0].key for e in base_evs):
            notes.append(f"{model}: its {base} runs are on different test images; not compared")
            continue
        names = ";".join(e.run.run_id for e in base_evs)
        baselines: dict[tuple, tuple] = {}  # the baseline averaged once per set of metric keys
        compared = defaultdict(list)  # method -> its compared runs, in seed order
        for b in (by_id[i] for i in in_method_order(df[df["method"] != base])["run_id"]):
            if b.key != base_evs[0].key or b.run.classes != base_evs[0].run.classes:
                notes.append(f"{b.run.run_id} vs {names}: different test images or classes; not compared")
                continue
            if tuple(b.values) not in baselines:
                baselines[tuple(b.values)] = average(base_evs, list(b.values))
            keys, base_runs, base_values, base_reps = baselines[tuple(b.values)]
            compared[b.run.method].append(b)
            records.extend((model, base, names, len(base_evs), b.run.method, b.run.run_id, b.run.seed, config.split,
                            *k, float(b.values[k] - base_values[i])) for i, k in enumerate(keys))
            replicates.append(replicate_matrix(b, keys) - base_reps)
            seed_terms.append(seed_variance([base_runs]))  # the run itself is given: only the baseline's seeds
            n_seeds += [1] * len(keys)
        for method, evs in compared.items():
            if len(evs) < 2 or any(e.run.classes != evs[0].run.classes for e in evs):
                continue
            keys, per_run, means, reps = average(evs)
            _, base_runs, base_values, base_reps = average(base_evs, keys)
            records.extend((model, base, names, len(base_evs), method, ";".join(e.run.run_id for e in evs), None,
                            config.split, *k, float(means[i] - base_values[i])) for i, k in enumerate(keys))
            replicates.append(reps - base_reps)
            seed_terms.append(seed_variance([per_run, base_runs]))
            n_seeds += [len(evs)] * len(keys)
    if not records:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    reps = np.concatenate(replicates, axis=1)  # (R, rows): all rows' intervals and p-values in one call
    v, df, known = (np.concatenate(x) for x in zip(*seed_terms))
    out = pd.DataFrame.from_records(records, columns=COMPARISON_COLUMNS[:13])
    lo, hi, p = delta_interval(out["delta"].to_numpy(), reps, v, df, config.level)
    out["seed"] = out["seed"].astype("Int64")  # empty on a seed-mean row
    out = out.assign(ci_low=lo, ci_high=hi, n_seeds=n_seeds, p_value=p)
    unknown = sorted(set(out.loc[~known, "model"] + " " + out.loc[~known, "method"]))
    if unknown:
        notes.append("comparisons where a seed mean has one defined run (one run, or a metric undefined in the "
                     "others; comparisons.csv seed_var_known = false): that side's seed variance is unknown, so the "
                     "interval covers the test patients and the other side's seeds only (train 2+ seeds, 3+ for "
                     f"usable intervals): {', '.join(unknown)}")
    return _holm_within(out, ["model", "method", "run_id", "attribute"]).assign(seed_var_known=known)


def _holm_within(table: pd.DataFrame, comparison: list[str]) -> pd.DataFrame:
    """``p_holm`` and ``holm_m``: Holm-adjusted ``p_value`` within each family of rows.

    A family is one question about one comparison: the rows sharing the ``comparison`` columns
    (model, method, run or seed mean, attribute: "is it more accurate?" for attribute "", "is it
    fairer by sex?" for sex), split into its headline rows (``group`` and ``class`` empty: the
    overall metrics or the attribute's gaps, what the findings state) and its per-group /
    per-class rows. ``holm_m`` is the family's number of defined p-values. Families are kept
    small on purpose: with R replicates no bootstrap p is below 2 / (R + 1), so a family of m
    tests can reach α only if 2m / (R + 1) < α (m ≤ 24 at R = 1,000, α = 0.05).
    """
    detail = (table["group"] != "") | (table["class"] != "")
    family = table[comparison].astype(str).agg("|".join, axis=1) + np.where(detail, "|detail", "|overall")
    p_holm, m = np.full(len(table), np.nan), np.zeros(len(table), dtype=np.int64)
    for rows in pd.Series(np.arange(len(table))).groupby(family.to_numpy(), sort=False):
        idx = rows[1].to_numpy()
        p_holm[idx] = holm(table["p_value"].to_numpy()[idx])
        m[idx] = int(np.isfinite(table["p_value"].to_numpy()[idx]).sum())
    return table.assign(p_holm=p_holm, holm_m=m)
