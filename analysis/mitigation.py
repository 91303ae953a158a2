"""Mitigated runs against plain training (ERM): paired bootstrap deltas and the utility–fairness trade-off.

A mitigated run (run id ``<model>__<method>+<mitigation>-<attr>__<tag>__s<seed>``) is paired
with the ERM run of the same model, method and seed (``find_erm``), preferably one trained and
selected the same way (``recipe``: solver, grid and the validation rule that chose the
configuration; a pairing that differs in any is flagged ``like_for_like`` false and
``unlike_reason`` says in what). Both were evaluated by ``engine.compute`` on the same (R, N)
patient-bootstrap counts of the same test images, so a delta's replicate r is the mitigated run's
metric on resample r minus the ERM run's on the same resample. Over seeds, the per-pair deltas are
averaged (NaN-skipping, as ``seeds.csv``): the replicates' percentile interval is the patients-only
one, widened by the seed variance of the mean of the S per-pair deltas (t_{S−1} · sd / √S in
quadrature, ``replicates.delta_interval``; ``p_value`` inverts that interval, ``p_holm`` is Holm
within the group's rows). The pairing is by seed: a mitigated run and its ERM counterpart share the
seed (initialisation, data order), so their difference is the unit; were the two trainings
independent, the per-pair sd would still estimate both arms' seed variance. With one pair the seed
variance is unknown (``seed_var_known`` false): the interval covers the patients only.

Tables (``mitigation_tables``):
    mitigation.csv  one row per model × method × mitigation × sensitive × tag × metric:
                    utility and the targeted gaps of the run's ``sensitive`` attribute,
                    ERM and mitigated means over the paired seeds, delta with interval.
    tradeoff.csv    one row per model × method × sensitive × mitigation × strength, ERM included:
                    the trade-off axes (``TRADEOFF_AXES``) with intervals and a Pareto flag.

numpy + pandas only, like the rest of ``cxrfair.analysis``.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

import numpy as np
import pandas as pd

from cxrfair.analysis.replicates import (average, delta_interval, nanmean0, replicate_matrix, seed_variance,
                                        seed_widened)
from cxrfair.analysis.runsets import base_tag, tag_of
from cxrfair.core.bootstrap import holm
from cxrfair.core.intervals import intervals_by_metric, with_components
from cxrfair.core.multilabel import auc_macro
from cxrfair.core.mitigations import MITIGATIONS
from cxrfair.core.runs import FINETUNE_METHODS, RunKey, parse_run_id

# What mitigation.csv reports, per task: utility on the whole split, then the gaps of the
# run's sensitive attribute (metric names of metrics.GROUP_METRICS / multilabel.GROUP_METRICS).
UTILITY_METRICS = {"multiclass": ("accuracy", "f1_macro"), "multilabel": ("auc_macro",)}
GAP_METRICS = {"multiclass": ("f1_gap", "f1_gap_abs", "eqodds", "worst_group_accuracy"),
               "multilabel": ("auc_gap", "eqodds", "worst_group_auc")}
# (x, y) of the trade-off: utility and the equalised-odds gap (Sun et al. eq. 3, defined for both tasks).
TRADEOFF_AXES = {"multiclass": ("accuracy", "eqodds"), "multilabel": ("auc_macro", "eqodds")}
# Which direction is an improvement: "higher", "lower", or "zero" for signed gaps (A − A').
_HIGHER = {"accuracy", "f1_macro", "auc_macro", "worst_group_accuracy", "worst_group_auc"}
_SIGNED = {"f1_gap", "auc_gap", "fnr_gap"}
# Training settings outside the grid that an ERM counterpart must share (run.json ``hyperparameters``).
RECIPE_KEYS = ("epochs", "batch_size", "max_iter")
STRENGTH_TAG = re.compile(r"^st(?P<strength>[0-9.eE+-]+)$")

MITIGATION_COLUMNS = ["model", "method", "mitigation", "sensitive", "strength", "tag", "metric", "erm", "mitigated",
                      "delta", "ci_low", "ci_high", "n_seeds", "excludes_zero", "erm_tag", "erm_run", "solver", "erm_solver",
                      "like_for_like", "better", "selected", "p_value", "p_holm", "holm_m", "unlike_reason",
                      "seed_var_known"]
TRADEOFF_COLUMNS = ["model", "method", "sensitive", "mitigation", "strength", "tag", "solver", "n_seeds", "utility_metric",
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
    """{(model, method): tag} of the primary tag when it is an ERM one (``runsets.runs_table``)."""
    erm_ids = {e.run.run_id for e in evaluated if not is_mitigated(e)}
    prim = runs_df[runs_df["primary"] & runs_df["run_id"].isin(erm_ids)]
    return {(m, me): t for m, me, t in zip(prim["model"], prim["method"], prim["tag"])}


def solver_of(run) -> str:
    """How the run was trained: run.json ``solver`` (probes: ``lbfgs`` | ``adamw``; a post-processed run
    carries its source's); fine-tuning, which records none, is always AdamW; else ``unknown``."""
    solver = run.meta.get("solver")
    if solver:
        return str(solver)
    return "adamw" if run.method in FINETUNE_METHODS else "unknown"


def selection_of(run) -> str:
    """The validation rule that chose the run's configuration within its grid, as the run records it.

    Probes write it in words in run.json ``hyperparameters.selection`` (every run, ERM included; the
    same rule gives the same words), mitigated probes also as ``select``; "" when the run records
    none (fine-tuning, which has no grid to choose from: its one configuration keeps its
    lowest-validation-loss checkpoint, ERM and mitigated alike).
    """
    hp = run.meta.get("hyperparameters") or {}
    return str(hp.get("selection") or run.meta.get("select") or "")


RECIPE_PARTS = ("solver", "grid", "selection")  # what ``recipe`` returns, for ``unlike_reason``


def recipe(run) -> tuple[str, str, str]:
    """(solver, grid, selection) an ERM counterpart must share with a mitigated run for a like-for-like delta.

    The grid is run.json ``hyperparameters.grid`` without the mitigation's ``strength`` axis (probes),
    else the chosen ``lr`` and ``weight_decay`` (fine-tuning), plus the ``RECIPE_KEYS`` settings; the
    selection is the validation rule that chose within that grid (``selection_of``): a mitigated
    sweep chosen by worst-group accuracy against an ERM sweep chosen by loss would credit the
    mitigation with what the rule alone changes (it may pick another L2 on the same objective).
    """
    hp = run.meta.get("hyperparameters") or {}
    grid = hp.get("grid")
    grid = ({k: v for k, v in grid.items() if k != "strength"} if isinstance(grid, dict)
            else {k: hp.get(k) for k in ("lr", "weight_decay")})
    grid |= {k: hp.get(k) for k in RECIPE_KEYS}
    return solver_of(run), json.dumps(grid, sort_keys=True, default=str), selection_of(run)


def unlike_reason(mitigated, erm) -> str:
    """What differs between the recipes of a (mitigated, ERM) pair of runs: ``solver``, ``grid``, ``selection``
    ``+``-joined; "" for a like-for-like pair."""
    return "+".join(part for part, a, b in zip(RECIPE_PARTS, recipe(mitigated), recipe(erm)) if a != b)


def is_erm_like(ev) -> bool:
    """Plain training: an ``erm`` run, or the strength-0 run of a mitigation whose zero is ERM (the table's
    ``zero_is_erm``: its ``st0`` run is an ERM run trained by the mitigation's own solver and grid)."""
    key = parse_run_id(ev.run.run_id)
    if key.shots is not None:  # trained on K images per class: never the counterpart of a whole-split run
        return False
    if key.mitigation == "erm":
        return True
    adversary = ev.run.meta.get("adversary") or {}
    return (MITIGATIONS[key.mitigation].zero_is_erm and _strength(ev.run) == 0
            and adversary.get("kind", "grl") == "grl")  # the projection rule still projects at λ = 0


def _same_seed_erm_like(ev, by_id: dict) -> list:
    """ERM-like runs of the mitigated run's model, method and seed other than itself: erm runs first, then
    strength-0 runs of the same sensitive attribute, then of others; ``st0`` before a ``best`` that chose
    strength 0 (the same configuration), then run id order."""
    sensitive = parse_run_id(ev.run.run_id).sensitive

    def rank(e):
        key = parse_run_id(e.run.run_id)
        return (key.mitigation != "erm", key.sensitive != sensitive, key.tag != "st0", e.run.run_id)

    return sorted((e for e in by_id.values() if e is not ev and is_erm_like(e) and e.run.model == ev.run.model
                   and e.run.method == ev.run.method and e.run.seed == ev.run.seed), key=rank)


def find_erm(ev, by_id: dict, primary: dict):
    """The ERM counterpart of a mitigated run, or None.

    In order: the run named by run.json ``source_run`` (post-processing) when it is an ERM run here;
    then, among plain-training runs of the same model, method and seed trained with the same solver
    and grid (``recipe``): the strength-0 run of its own sweep (``st0``, for a ``zero_is_erm`` mitigation), the
    ERM run with the same tag (``best`` vs ``best``), the ERM run with its model and method's primary
    tag, any other (an ERM run, then another sweep's ``st0``; an ``st0`` run never takes one of its
    own sweep); only when none shares the recipe, the
    ERM run with the same tag, else the primary tag — a pairing across solvers, grids or selection rules,
    which ``mitigation.csv`` flags (``like_for_like`` false, ``unlike_reason``) and the report notes.
    """
    source = by_id.get(ev.run.meta.get("source_run"))
    if source is not None and not is_mitigated(source):
        return source
    key = parse_run_id(ev.run.run_id)
    own_zero = by_id.get(RunKey(key.model, key.method, "st0", key.seed, key.mitigation, key.sensitive).run_id)
    same_tag = by_id.get(RunKey(key.model, key.method, key.tag, key.seed).run_id)
    tag = primary.get((ev.run.model, ev.run.method))
    prim = [e for e in by_id.values() if not is_mitigated(e) and e.run.model == ev.run.model
            and e.run.method == ev.run.method and e.run.seed == ev.run.seed and tag_of(e.run) == tag]
    prim = prim[0] if len(prim) == 1 else None
    ordered = [own_zero, same_tag, prim, *_same_seed_erm_like(ev, by_id)]
    mine = recipe(ev.run)
    # An st0 run is its sweep's ERM point: never paired within its own sweep (a `best` that chose 0 is the
    # same configuration), so its row shows what its solver and grid alone change. (That `best` does pair
    # with its st0: the selected mitigation is plain training, delta 0.)
    family = group_key(ev)[:4] if is_erm_like(ev) and STRENGTH_TAG.match(key.tag) else None
    for other in ordered:
        if (other is not None and other is not ev and is_erm_like(other) and recipe(other.run) == mine
                and (family is None or not is_mitigated(other) or group_key(other)[:4] != family)):
            return other
    for other in (same_tag, prim):
        if other is not None and not is_mitigated(other):
            return other
    return None


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
            if recipe(erm.run) != recipe(ev.run):
                note = unlike_note(ev, erm)
                notes.extend([note] if note not in notes else [])  # once for all seeds
            groups[group_key(ev)].append((ev, erm))
    return dict(groups)


def unlike_note(ev, erm) -> str:
    """The note of a pairing across solvers or grids (``like_for_like`` false), the same for every seed."""
    model, method, mitigation, sensitive, tag = group_key(ev)
    what = f"mitigation: {model} {method} {mitigation}-{sensitive} {tag} ({_trained(ev.run)}) against ERM " \
           f"{tag_of(erm.run)} ({_trained(erm.run)})"
    differs = unlike_reason(ev.run, erm.run).replace("+", " and ")
    if is_erm_like(ev):
        return (f"{what}: a strength-0 run is plain training, so this row measures the change of {differs} "
                "alone (like_for_like false)")
    return (f"{what}: no plain run of its seed shares its {differs}, so the delta mixes that change with the "
            "mitigation (like_for_like false, † in the report); give its sweep a strength-0 point (chosen by "
            "the same rule) or train an ERM run the same way")


def _trained(run) -> str:
    solver, grid, selection = recipe(run)
    return f"{solver}, grid {grid}" + (f", selected by {selection}" if selection else "")


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
        where the delta is defined; "per_pair": (pairs, K) each pair's delta; "replicates": (R, K)
        the mean over pairs of the per-pair replicate differences (patients only), or None without
        bootstrap or when the pairs are on different test sets}.
    """
    mit = np.array([[m.values.get(k, np.nan) for k in keys] for m, _ in pairs], dtype=np.float64)
    erm = np.array([[e.values.get(k, np.nan) for k in keys] for _, e in pairs], dtype=np.float64)
    out = {"erm": nanmean0(erm), "mitigated": nanmean0(mit), "delta": nanmean0(mit - erm), "per_pair": mit - erm,
           "n": (~np.isnan(mit - erm)).sum(axis=0), "replicates": None}
    first = pairs[0][0]
    if first.replicates is not None and all(m.key == first.key for m, _ in pairs):
        out["replicates"] = nanmean0(np.stack([replicate_matrix(m, keys) - replicate_matrix(e, keys) for m, e in pairs]))
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


def _mitigation_rows(gkey: tuple, pairs: list[tuple], task: str, level: float,
                     notes: list[str]) -> tuple[list[tuple], tuple]:
    """The group's rows of MITIGATION_COLUMNS up to ``better``, and the (K,) p-values, adjusted p-values, Holm
    family size (the group's metrics: one family per mitigated group) and ``seed_var_known``."""
    model, method, mitigation, sensitive, tag = gkey
    keys = metric_keys(task, sensitive)
    d = paired_delta(pairs, keys)
    v, df, known = seed_variance([d["per_pair"]])  # one arm: the pairs' differences
    if d["replicates"] is not None:
        lo, hi, p = delta_interval(d["delta"], d["replicates"], v, df, level)
    else:
        lo = hi = p = np.full(len(keys), np.nan)
    strength = common_strength([m for m, _ in pairs], notes)
    erm = pairing(pairs)
    rows = [(model, method, mitigation, sensitive, strength, tag, k[0], float(d["erm"][i]), float(d["mitigated"][i]),
             float(d["delta"][i]), float(lo[i]), float(hi[i]), int(d["n"][i]), bool(lo[i] > 0 or hi[i] < 0),
             *erm, better(k[0])) for i, k in enumerate(keys)]
    return rows, (p, holm(p), int(np.isfinite(p).sum()), known)


def _joined(values) -> str:
    return ";".join(dict.fromkeys(str(v) for v in values))


def pairing(pairs: list[tuple]) -> tuple[str, str, str, str, bool]:
    """(erm_tag, erm_run, solver, erm_solver, like_for_like) of one group's (mitigated, ERM) pairs:
    tags, run ids and solvers ``;``-joined over seeds; like_for_like when every pair shares its ``recipe``
    (solver, grid and selection rule)."""
    return (_joined(tag_of(e.run) for _, e in pairs), _joined(e.run.run_id for _, e in pairs),
            _joined(solver_of(m.run) for m, _ in pairs), _joined(solver_of(e.run) for _, e in pairs),
            all(recipe(m.run) == recipe(e.run) for m, e in pairs))


def mitigation_table(groups: dict, task: str, level: float, notes: list[str], chosen: dict | None = None) -> pd.DataFrame:
    """mitigation.csv: one row per group of ``pair_runs`` and metric of ``metric_keys``; ``selected`` from
    ``chosen`` (``chosen_strengths``; None: only runs that are no strength point)."""
    has_best = {f for f, gkeys in _families(groups).items() if any(g[4] == "best" for g in gkeys)}
    records = []
    for gkey, pairs in groups.items():
        rows, (p, p_holm, m, known) = _mitigation_rows(gkey, pairs, task, level, notes)
        why = _joined(unlike_reason(mit.run, erm.run) for mit, erm in pairs)
        records += [(*r, is_selected(gkey, r[4], chosen or {}, has_best), float(p[i]), float(p_holm[i]), m, why,
                     bool(known[i])) for i, r in enumerate(rows)]
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
    """(n_seeds, utility, lo, hi, gap, lo, hi) of the seed mean of ``evs`` (its interval as ``seeds.csv``'s)."""
    x, y = TRADEOFF_AXES[task]
    # The gap's per-group values come along: its interval (a band, core.intervals) is built from them.
    keys = with_components([(x, "", "", ""), (y, sensitive, "", "")], list(evs[0].values))
    # As seeds.csv: the patients-only interval widened by the seed variance (replicates.seed_widened).
    _, per_run, means, reps = average(evs, keys)
    lo, hi = (seed_widened(means, *intervals_by_metric(reps, means, keys, level)[:2], per_run, level)
              if reps is not None else (np.full(2, np.nan),) * 2)
    return (len(evs), x, float(means[0]), float(lo[0]), float(hi[0]), y, float(means[1]), float(lo[1]), float(hi[1]))


def _strength_groups(gkeys: list[tuple]) -> list[tuple]:
    """The groups of one mitigation that are trade-off points: its ``st<s>`` runs, else all its tags."""
    swept = [g for g in gkeys if STRENGTH_TAG.match(g[4])]
    return swept or gkeys


# ----------------------------------------------------------------------------- strength chosen on validation


def validation_scores(run, sensitive: str) -> dict[str, float]:
    """What the probes' selection rules read, from the run's validation predictions (never test).

    Multi-class: ``loss`` mean cross-entropy −log p(true class), ``accuracy``, and over the groups of
    ``sensitive`` with validation rows (empty values left out) ``worst_group`` the lowest group
    accuracy and ``gap`` highest − lowest. Multi-label: ``loss`` the masked binary cross-entropy (mean
    over a row's observed conditions, then over rows with one), ``accuracy`` the macro AUC and the
    group figures of the per-group macro AUC.
    """
    y, p = run.arrays("val")
    if len(y) == 0:
        return dict.fromkeys(("loss", "accuracy", "worst_group", "gap"), np.nan)
    groups = run.split("val")[sensitive].astype("string").to_numpy(dtype=object, na_value=None)
    have = np.array([g is not None and g != "" for g in groups], dtype=bool)
    loss, utility = _loss_and_utility(y, p, run.task)
    per_group = np.array([utility(have & (groups == g)) for g in dict.fromkeys(groups[have])], dtype=np.float64)
    per_group = per_group[~np.isnan(per_group)]  # a group where the metric is undefined (no positives) is left out
    worst, best = (per_group.min(), per_group.max()) if len(per_group) else (np.nan, np.nan)
    return {"loss": loss, "accuracy": utility(np.ones(len(y), dtype=bool)), "worst_group": worst, "gap": best - worst}


def _loss_and_utility(y: np.ndarray, p: np.ndarray, task: str):
    """(mean validation loss, utility(rows) -> float) of ``Run.arrays`` output: multi-class cross-entropy
    and accuracy; multi-label masked binary cross-entropy (per row over its observed conditions) and macro AUC."""
    if task == "multilabel":
        q, t = np.clip(p, 1e-12, 1 - 1e-12), np.nan_to_num(y)
        cell = np.where(np.isnan(y), np.nan, -(t * np.log(q) + (1 - t) * np.log(1 - q)))
        return float(nanmean0(nanmean0(cell.T))), lambda rows: float(auc_macro(y[rows], p[rows]))
    correct = p.argmax(1) == y
    loss = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))
    return loss, lambda rows: float(correct[rows].mean())


# The probes' rules (``probe.sweep.select_config``; the tests hold the two to the same answers).
SELECT_DEFAULT = "worst_group"
GAP_TOLERANCE = 0.01  # select gap: strengths within this much of the best validation utility compete


def select_index(means: dict[str, np.ndarray], select: str) -> int:
    """Index of the chosen candidate from validation ``means`` (name -> (K,)), as the probe sweeps choose.

    ``loss``: lowest loss. ``accuracy`` / ``worst_group``: highest, ties to the lower loss. ``gap``:
    smallest gap among candidates within GAP_TOLERANCE of the best accuracy, ties to the lower loss.
    Remaining ties go to the first candidate (NaN never wins).
    """
    loss = np.where(np.isnan(means["loss"]), np.inf, means["loss"])
    first = np.arange(len(loss))
    if select == "loss":
        return int(np.argmin(loss))
    if select in ("accuracy", "worst_group"):
        return int(np.lexsort((first, loss, -np.nan_to_num(means[select], nan=-np.inf)))[0])
    acc = np.nan_to_num(means["accuracy"], nan=-np.inf)
    near = acc >= acc.max() - GAP_TOLERANCE
    return int(np.lexsort((first, loss, np.where(near, np.nan_to_num(means["gap"], nan=np.inf), np.inf)))[0])


def choose_strength(by_group: dict, gkeys: list[tuple], notes: list[str]) -> float:
    """The strength of one model × method × mitigation × sensitive chosen on validation, or NaN.

    A family with a ``best`` run (probe sweeps) chose it while training: that run's strength. One
    without (fine-tuning: one ``st<s>`` run per strength) is chosen here among its ``st<s>`` runs by
    their run.json ``select`` rule (default ``worst_group``) on their validation predictions
    (``validation_scores``), each score the mean over the seeds; a single ``st<s>`` is its own choice.
    """
    best = [g for g in gkeys if g[4] == "best"]
    if best:
        return common_strength(by_group[best[0]], [])
    swept = [g for g in gkeys if STRENGTH_TAG.match(g[4])]
    strengths = [common_strength(by_group[g], []) for g in swept]
    swept = [g for g, v in zip(swept, strengths) if not np.isnan(v)]
    if len(swept) < 2:  # one strength trained: nothing to choose, it is the one (none: NaN)
        return common_strength(by_group[swept[0]], []) if swept else np.nan
    select = str(by_group[swept[0]][0].run.meta.get("select") or SELECT_DEFAULT)
    scores = [[validation_scores(e.run, g[3]) for e in by_group[g]] for g in swept]
    means = {k: np.array([nanmean0(np.array([s[k] for s in per], dtype=np.float64)) for per in scores])
             for k in ("loss", "accuracy", "worst_group", "gap")}
    chosen = swept[select_index(means, select)]
    notes.append(f"mitigation: {'__'.join(str(x) for x in chosen[:2])} {chosen[2]}-{chosen[3]}: strength "
                 f"{common_strength(by_group[chosen], []):g} ({chosen[4]}) chosen on validation by {select} "
                 f"among {len(swept)} strengths (mean over seeds)")
    return common_strength(by_group[chosen], [])


def is_selected(gkey: tuple, strength: float, chosen: dict, has_best: set) -> bool:
    """A group's mitigation.csv rows are the validation choice: a run that is no strength point (``best``,
    a post-processed run), or, in a family without ``best``, the ``st<s>`` whose strength it chose."""
    if not STRENGTH_TAG.match(gkey[4]):
        return True
    value = chosen.get(gkey[:4], np.nan)
    return gkey[:4] not in has_best and not np.isnan(strength) and strength == value


def _families(groups) -> dict:
    """{(model, method, mitigation, sensitive): [group keys]}."""
    families = defaultdict(list)
    for g in groups:
        families[g[:4]].append(g)
    return families


def chosen_strengths(evaluated, groups: dict, notes: list[str]) -> dict:
    """{(model, method, mitigation, sensitive): strength chosen on validation} over the paired groups."""
    by_group = mitigated_by_group(evaluated)
    return {f: choose_strength(by_group, gkeys, notes) for f, gkeys in _families(groups).items()}


def mitigated_by_group(evaluated) -> dict:
    by_group = defaultdict(list)
    for e in evaluated:
        if is_mitigated(e):
            by_group[group_key(e)].append(e)
    return by_group


# ----------------------------------------------------------------------------- trade-off


def _erm_points(evaluated, model, method, tags, sensitive, task, level) -> list[tuple]:
    """One ERM point per counterpart tag (``tags``: the primary ERM tag first, then those ``find_erm`` used)."""
    rows = []
    for tag in dict.fromkeys(t for t in tags if t is not None):
        evs = [e for e in evaluated if is_erm_like(e) and e.run.model == model and e.run.method == method
               and tag_of(e.run) == tag]
        if evs:
            rows.append((model, method, sensitive, "erm", np.nan, tag, _joined(solver_of(e.run) for e in evs),
                         *_point(evs, task, sensitive, level), False))
    return rows


def tradeoff_table(evaluated, groups: dict, runs_df: pd.DataFrame, task: str, level: float,
                   chosen: dict) -> pd.DataFrame:
    """tradeoff.csv: per model × method × sensitive, the ERM points (its primary tag and every other
    counterpart the pairing used, e.g. an AdamW ``st0`` run; every seed) and one point per mitigation and
    strength (every seed of that tag), with the validation choice and the Pareto flag within the panel."""
    primary = primary_erm_tags(runs_df, evaluated)
    by_group = mitigated_by_group(evaluated)
    panels = defaultdict(list)
    for gkey in groups:
        panels[(gkey[0], gkey[1], gkey[3])].append(gkey)
    records = []
    for (model, method, sensitive), gkeys in panels.items():
        used = [tag_of(e.run) for g in gkeys for _, e in groups[g]]
        rows = _erm_points(evaluated, model, method, [primary.get((model, method)), *used], sensitive, task, level)
        for mitigation in dict.fromkeys(g[2] for g in gkeys):
            for g in _strength_groups([g for g in gkeys if g[2] == mitigation]):
                s = common_strength(by_group[g], [])
                value = chosen.get(g[:4], np.nan)
                rows.append((model, method, sensitive, mitigation, s, g[4], _joined(solver_of(e.run) for e in by_group[g]),
                             *_point(by_group[g], task, sensitive, level),
                             g[4] == "best" or (not np.isnan(s) and s == value)))
        u, gap = TRADEOFF_COLUMNS.index("utility"), TRADEOFF_COLUMNS.index("gap")
        flags = pareto_front([r[u] for r in rows], [r[gap] for r in rows])
        records += [(*r, bool(f)) for r, f in zip(rows, flags)]
    return pd.DataFrame.from_records(records, columns=TRADEOFF_COLUMNS)


def mitigation_tables(evaluated, runs_df: pd.DataFrame, config, notes: list[str]):
    """(mitigation.csv, tradeoff.csv) DataFrames, or (None, None) when no run has a mitigation.

    Args:
        evaluated: ``replicates.Evaluated`` runs (values and replicates on shared resamples).
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
    chosen = chosen_strengths(evaluated, groups, notes)
    return (mitigation_table(groups, task, config.level, notes, chosen),
            tradeoff_table(evaluated, groups, runs_df, task, config.level, chosen))
