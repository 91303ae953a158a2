"""Mitigated runs against plain training (ERM): paired bootstrap deltas and the utility–fairness trade-off.

A mitigated run (run id ``<model>__<method>+<mitigation>-<attr>__<tag>__s<seed>``) is paired
with the ERM run of the same model, method and seed (``find_erm``). Both were evaluated by
``analyze.compute`` on the same (R, N) patient-bootstrap counts of the same test images, so a
delta's replicate r is the mitigated run's metric on resample r minus the ERM run's on the same
resample; over seeds, the per-seed deltas are averaged replicate by replicate (NaN-skipping, as
``seeds.csv``), and the interval is the percentile interval of that mean.

Tables (``mitigation_tables``):
    mitigation.csv  one row per model × method × mitigation × sensitive × tag × metric:
                    utility and the targeted gaps of the run's ``sensitive`` attribute,
                    ERM and mitigated means over the paired seeds, delta with interval.
    tradeoff.csv    one row per model × method × sensitive × mitigation × strength, ERM included:
                    the trade-off axes (``TRADEOFF_AXES``) with intervals and a Pareto flag.

numpy + pandas only, like the rest of ``cxrfair.analysis``.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import pandas as pd

from cxrfair.analysis.analyze import _average, _nanmean0, _replicate_matrix, base_tag, tag_of
from cxrfair.analysis.bootstrap import interval
from cxrfair.analysis.runs import RunKey, parse_run_id

# What mitigation.csv reports, per task: utility on the whole split, then the gaps of the
# run's sensitive attribute (metric names of metrics.GROUP_METRICS / multilabel.GROUP_SPECS).
UTILITY_METRICS = {"multiclass": ("accuracy", "f1_macro"), "multilabel": ("auc_macro",)}
GAP_METRICS = {"multiclass": ("f1_gap", "f1_gap_abs", "eqodds", "worst_group_accuracy"),
               "multilabel": ("auc_gap", "eqodds", "worst_group_auc")}
# (x, y) of the trade-off: utility and the equalised-odds gap (PAPER eq. 3, defined for both tasks).
TRADEOFF_AXES = {"multiclass": ("accuracy", "eqodds"), "multilabel": ("auc_macro", "eqodds")}
# Which direction is an improvement: "higher", "lower", or "zero" for signed gaps (A − A').
_HIGHER = {"accuracy", "f1_macro", "auc_macro", "worst_group_accuracy", "worst_group_auc"}
_SIGNED = {"f1_gap", "auc_gap", "fnr_gap"}
STRENGTH_TAG = re.compile(r"^st(?P<strength>[0-9.eE+-]+)$")

MITIGATION_COLUMNS = ["model", "method", "mitigation", "sensitive", "strength", "tag", "metric", "erm", "mitigated",
                      "delta", "ci_low", "ci_high", "n_seeds", "excludes_zero", "erm_tag", "better"]
TRADEOFF_COLUMNS = ["model", "method", "sensitive", "mitigation", "strength", "tag", "n_seeds", "utility_metric",
                    "utility", "utility_ci_low", "utility_ci_high", "gap_metric", "gap", "gap_ci_low", "gap_ci_high",
                    "selected", "pareto"]


def better(metric: str) -> str:
    """``higher``, ``lower`` or ``zero`` (a signed gap is best at 0): how to read a delta of ``metric``."""
    return "higher" if metric in _HIGHER else "zero" if metric in _SIGNED else "lower"


def is_mitigated(ev) -> bool:
    return parse_run_id(ev.run.run_id).mitigation != "erm"


def _strength(run) -> float:
    s = run.meta.get("strength")
    return float(s) if s is not None else np.nan


def group_key(ev) -> tuple:
    """(model, method, mitigation, sensitive, tag) of a mitigated run: its seeds share it."""
    key = parse_run_id(ev.run.run_id)
    return ev.run.model, ev.run.method, key.mitigation, key.sensitive, base_tag(ev.run)


def primary_erm_tags(runs_df: pd.DataFrame, evaluated) -> dict:
    """{(model, method): tag} of the primary tag when it is an ERM one (``analyze._runs_table``)."""
    erm_ids = {e.run.run_id for e in evaluated if not is_mitigated(e)}
    prim = runs_df[runs_df["primary"] & runs_df["run_id"].isin(erm_ids)]
    return {(m, me): t for m, me, t in zip(prim["model"], prim["method"], prim["tag"])}


def find_erm(ev, by_id: dict, primary: dict):
    """The ERM counterpart of a mitigated run, or None.

    In order: the run named by run.json ``source_run`` (post-processing) when it is an ERM run
    here; the ERM run with the same model, method, tag and seed (``best`` vs ``best``); the ERM
    run of the same seed with its model and method's primary tag (a strength run ``st0.3`` vs
    the plain ``best``).
    """
    candidates = [ev.run.meta.get("source_run")]
    key = parse_run_id(ev.run.run_id)
    candidates.append(RunKey(key.model, key.method, key.tag, key.seed).run_id)
    for run_id in candidates:
        other = by_id.get(run_id)
        if other is not None and not is_mitigated(other):
            return other
    tag = primary.get((ev.run.model, ev.run.method))
    same = [e for e in by_id.values() if not is_mitigated(e) and e.run.model == ev.run.model
            and e.run.method == ev.run.method and e.run.seed == ev.run.seed and tag_of(e.run) == tag]
    return same[0] if len(same) == 1 else None


def pair_runs(evaluated, runs_df: pd.DataFrame, attributes, notes: list[str]) -> dict[tuple, list[tuple]]:
    """{group_key: [(mitigated, erm), ...] in seed order} for every mitigated run with a usable counterpart.

    A run without an ERM counterpart, on other test images than it, or whose sensitive
    attribute is not analysed gets a note and is left out (not an error: the other runs are
    still compared).
    """
    by_id = {e.run.run_id: e for e in evaluated}
    primary = primary_erm_tags(runs_df, evaluated)
    groups: dict[tuple, list[tuple]] = defaultdict(list)
    for ev in sorted((e for e in evaluated if is_mitigated(e)), key=lambda e: (group_key(e), e.run.seed)):
        sensitive = group_key(ev)[3]
        if sensitive not in attributes:
            notes.append(f"mitigation: run {ev.run.run_id} targets {sensitive}, which is not analysed; add it to "
                         "--attributes to compare it with ERM")
            continue
        erm = find_erm(ev, by_id, primary)
        if erm is None:
            notes.append(f"mitigation: run {ev.run.run_id} has no ERM counterpart (an erm run of {ev.run.model} "
                         f"{ev.run.method} seed {ev.run.seed}); not compared")
        elif erm.key != ev.key:
            notes.append(f"mitigation: run {ev.run.run_id} and its ERM counterpart {erm.run.run_id} are on different "
                         "test images; not compared")
        else:
            groups[group_key(ev)].append((ev, erm))
    return dict(groups)


def metric_keys(task: str, sensitive: str, metrics=None) -> list[tuple]:
    """(metric, attribute, group, class) keys: overall utility, then the gaps of ``sensitive``."""
    utility, gaps = UTILITY_METRICS[task], GAP_METRICS[task]
    keys = [(m, "", "", "") for m in utility] + [(m, sensitive, "", "") for m in gaps]
    return keys if metrics is None else [k for k in keys if k[0] in metrics]


def paired_delta(pairs: list[tuple], keys: list[tuple]) -> dict[str, np.ndarray]:
    """Seed-averaged paired differences, mitigated − ERM.

    Args:
        pairs: [(mitigated, erm) evaluated runs], one per seed, each pair on the same test set.
        keys: K metric keys.

    Returns:
        {"erm", "mitigated", "delta": (K,) NaN-skipping means over the pairs; "n": (K,) pairs
        where the delta is defined; "replicates": (R, K) mean over pairs of the per-pair replicate
        differences, or None without bootstrap or when the pairs are on different test sets}.
    """
    mit = np.array([[m.values.get(k, np.nan) for k in keys] for m, _ in pairs], dtype=np.float64)
    erm = np.array([[e.values.get(k, np.nan) for k in keys] for _, e in pairs], dtype=np.float64)
    out = {"erm": _nanmean0(erm), "mitigated": _nanmean0(mit), "delta": _nanmean0(mit - erm),
           "n": (~np.isnan(mit - erm)).sum(axis=0), "replicates": None}
    first = pairs[0][0]
    if first.replicates is not None and all(m.key == first.key for m, _ in pairs):
        out["replicates"] = _nanmean0(np.stack([_replicate_matrix(m, keys) - _replicate_matrix(e, keys)
                                                for m, e in pairs]))
    return out


def common_strength(evs, notes: list[str]) -> float:
    """The strength the runs of one group share; NaN (with a note) when their seeds selected different ones."""
    values = {_strength(e.run) for e in evs}
    if len(values) == 1:
        return values.pop()
    defined = sorted(v for v in values if not np.isnan(v))
    notes.append(f"mitigation: runs {evs[0].run.run_id} … differ in strength over seeds ({defined}); "
                 "strength left empty")
    return np.nan


def _mitigation_rows(gkey: tuple, pairs: list[tuple], task: str, level: float, notes: list[str]) -> list[tuple]:
    model, method, mitigation, sensitive, tag = gkey
    keys = metric_keys(task, sensitive)
    d = paired_delta(pairs, keys)
    if d["replicates"] is not None:
        lo, hi = interval(d["replicates"], level)
    else:
        lo = hi = np.full(len(keys), np.nan)
    strength = common_strength([m for m, _ in pairs], notes)
    erm_tag = ";".join(dict.fromkeys(tag_of(e.run) for _, e in pairs))
    return [(model, method, mitigation, sensitive, strength, tag, k[0], float(d["erm"][i]), float(d["mitigated"][i]),
             float(d["delta"][i]), float(lo[i]), float(hi[i]), int(d["n"][i]), bool(lo[i] > 0 or hi[i] < 0),
             erm_tag, better(k[0])) for i, k in enumerate(keys)]


def mitigation_table(groups: dict, task: str, level: float, notes: list[str]) -> pd.DataFrame:
    """mitigation.csv: one row per group of ``pair_runs`` and metric of ``metric_keys``."""
    records = [r for gkey, pairs in groups.items() for r in _mitigation_rows(gkey, pairs, task, level, notes)]
    return pd.DataFrame.from_records(records, columns=MITIGATION_COLUMNS)


def pareto_front(utility, gap) -> np.ndarray:
    """(P,) bool: points no other point dominates (utility ≥ and gap ≤, one of them strictly).

    Points with a NaN coordinate are never on the front and dominate nothing.
    """
    u, g = np.asarray(utility, dtype=np.float64), np.asarray(gap, dtype=np.float64)
    ok = ~(np.isnan(u) | np.isnan(g))
    ge, le = u[None, :] >= u[:, None], g[None, :] <= g[:, None]  # [i, j]: j at least as good as i
    strict = (u[None, :] > u[:, None]) | (g[None, :] < g[:, None])
    dominated = (ge & le & strict & ok[None, :]).any(axis=1)
    return ok & ~dominated


def _point(evs, task: str, sensitive: str, level: float) -> tuple:
    """(n_seeds, utility, lo, hi, gap, lo, hi) of the seed mean of ``evs``."""
    x, y = TRADEOFF_AXES[task]
    keys = [(x, "", "", ""), (y, sensitive, "", "")]
    _, _, means, reps = _average(evs, keys)
    lo, hi = interval(reps, level) if reps is not None else (np.full(2, np.nan),) * 2
    return (len(evs), x, float(means[0]), float(lo[0]), float(hi[0]), y, float(means[1]), float(lo[1]), float(hi[1]))


def _strength_groups(gkeys: list[tuple]) -> list[tuple]:
    """The groups of one mitigation that are trade-off points: its ``st<s>`` runs, else all its tags."""
    swept = [g for g in gkeys if STRENGTH_TAG.match(g[4])]
    return swept or gkeys


def tradeoff_table(evaluated, groups: dict, runs_df: pd.DataFrame, task: str, level: float,
                   notes: list[str]) -> pd.DataFrame:
    """tradeoff.csv: per model × method × sensitive, the ERM point (its primary tag, every seed) and one
    point per mitigation and strength (every seed of that tag), with the Pareto flag within the panel."""
    primary = primary_erm_tags(runs_df, evaluated)
    by_group = defaultdict(list)
    for e in evaluated:
        if is_mitigated(e):
            by_group[group_key(e)].append(e)
    panels = defaultdict(list)
    for gkey in groups:
        panels[(gkey[0], gkey[1], gkey[3])].append(gkey)
    records = []
    for (model, method, sensitive), gkeys in panels.items():
        rows = []
        erm = [e for e in evaluated if not is_mitigated(e) and e.run.model == model and e.run.method == method
               and tag_of(e.run) == primary.get((model, method))]
        if erm:
            rows.append((model, method, sensitive, "erm", np.nan, primary[(model, method)],
                         *_point(erm, task, sensitive, level), False))
        for mitigation in dict.fromkeys(g[2] for g in gkeys):
            mine = [g for g in gkeys if g[2] == mitigation]
            # The strength the sweep selected on validation (its ``best`` run), marked among the st<s> points.
            chosen = {v for v in (common_strength(by_group[g], []) for g in mine if g[4] == "best") if not np.isnan(v)}
            for g in _strength_groups(mine):
                s = common_strength(by_group[g], [])
                point = _point(by_group[g], task, sensitive, level)
                rows.append((model, method, sensitive, mitigation, s, g[4], *point,
                             g[4] == "best" or (not np.isnan(s) and s in chosen)))
        flags = pareto_front([r[8] for r in rows], [r[12] for r in rows])
        records += [(*r, bool(f)) for r, f in zip(rows, flags)]
    return pd.DataFrame.from_records(records, columns=TRADEOFF_COLUMNS)


def mitigation_tables(evaluated, runs_df: pd.DataFrame, config, notes: list[str]):
    """(mitigation.csv, tradeoff.csv) DataFrames, or (None, None) when no run has a mitigation.

    Args:
        evaluated: ``analyze._Evaluated`` runs (values and replicates on shared resamples).
        runs_df: the runs table (tags and primary flags). config: the resolved AnalyzeConfig.
        notes: appended with what could not be compared and why.
    """
    if not any(is_mitigated(e) for e in evaluated):
        return None, None
    task = evaluated[0].run.task
    erm_primary = primary_erm_tags(runs_df, evaluated)
    shown = runs_df.loc[runs_df["primary"]].groupby(["model", "method"], sort=False)["tag"].first()
    for (model, method), tag in shown.items():
        if (model, method) not in erm_primary:
            notes.append(f"{model} {method}: no erm run; the tables show its mitigated runs {tag} under the "
                         "method's name")
    groups = pair_runs(evaluated, runs_df, config.attributes, notes)
    return (mitigation_table(groups, task, config.level, notes),
            tradeoff_table(evaluated, groups, runs_df, task, config.level, notes))
