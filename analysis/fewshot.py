"""Few-shot curves: probes trained on K images per class, next to zero-shot and the whole-split probe.

A few-shot run (run id ``<model>__<method>-k<K>__best__s<seed>``, ``RunKey.shots``; written by
``cxrfair probe linear|mlp --shots K``) is summarised over its seeds like every other run: each
seed is its own draw of K images per class, so the draws are part of the seed variance, and the
interval of the mean is its patients-only interval widened by the seeds' variance (``engine``'s
``seeds.csv``, ``replicates.seed_widened``). This module computes no metric: ``fewshot_table`` selects the rows of the seed
summary (``Results.seeds``) for every K, and for the two references of each model: zero-shot
(``shots`` 0, its primary prompt set) and the same probe on the whole training split (``shots``
empty, setting ``all``, its primary tag). numpy + pandas only.
"""

from __future__ import annotations

import pandas as pd

from cxrfair.core.runs import parse_run_id

# What the few-shot table keeps, per task: utility on the whole split and within each group
# (``attribute`` "" = overall), then the attribute's gap metrics (``core.metrics.GROUP_METRICS`` /
# ``core.multilabel.GROUP_METRICS`` names; macro over classes, ``class`` "").
UTILITY = {"multiclass": ("accuracy", "auc_macro", "f1_macro"), "multilabel": ("auc_macro",)}
GAPS = {"multiclass": ("es_auc", "worst_group_accuracy", "eqodds", "f1_gap_abs", "dp_gap"),
        "multilabel": ("es_auc", "auc_gap", "worst_group_auc", "eqodds")}
ZERO_SHOT = "zeroshot"
FEWSHOT_COLUMNS = ["model", "method", "setting", "shots", "tag", "metric", "attribute", "group", "n_seeds", "mean", "sd",
                   "ci_low", "ci_high"]


def _setting(shots) -> str:
    return "all" if pd.isna(shots) else "zero-shot" if shots == 0 else f"{int(shots)}-shot"


def fewshot_table(runs: pd.DataFrame, seeds: pd.DataFrame, task: str) -> pd.DataFrame | None:
    """The few-shot curves as rows of the seed summary; None when no run is few-shot.

    Args:
        runs: ``Results.runs`` (run_id, model, method, tag, primary). seeds: ``Results.seeds``.
        task: ``multiclass`` | ``multilabel`` (which metrics, ``UTILITY`` / ``GAPS``).

    Returns:
        ``FEWSHOT_COLUMNS``: per model, method (a few-shot probe's, or ``zeroshot``) and setting
        (``zero-shot`` with ``shots`` 0, ``<K>-shot``, ``all`` with ``shots`` empty), the utility
        metrics overall (``attribute`` "") and per group, and the gap metrics per attribute
        (``group`` ""); ``mean`` is the mean over seeds (draws) and ``ci_low``/``ci_high`` the
        interval of that mean, exactly as ``seeds.csv``.
    """
    shots = runs["run_id"].map(lambda r: parse_run_id(r).shots)
    few = runs[shots.notna()]
    if few.empty:
        return None
    chosen = []  # (model, method, tag, shots)
    for (model, method), rows in few.groupby(["model", "method"], sort=True):
        for tag, k in sorted(set(zip(rows["tag"], shots[rows.index].astype(int))), key=lambda t: t[1]):
            chosen.append((model, method, tag, k))
        whole = runs[(runs["model"] == model) & (runs["method"] == method) & shots.isna() & runs["primary"]]
        chosen += [(model, method, t, pd.NA) for t in dict.fromkeys(whole["tag"])]
    for model in dict.fromkeys(few["model"]):
        zs = runs[(runs["model"] == model) & (runs["method"] == ZERO_SHOT) & runs["primary"]]
        chosen += [(model, ZERO_SHOT, t, 0) for t in dict.fromkeys(zs["tag"])]
    keys = pd.DataFrame(chosen, columns=["model", "method", "tag", "shots"]).assign(
        shots=lambda t: t["shots"].astype("Int64"))
    metrics = set(UTILITY[task]) | set(GAPS[task])
    t = seeds[(seeds["class"] == "") & seeds["metric"].isin(metrics)]
    utility = t["metric"].isin(UTILITY[task])
    # Utility overall and within groups; gaps per attribute only (their group is "").
    t = t[(utility & ((t["attribute"] == "") == (t["group"] == ""))) | (~utility & (t["attribute"] != ""))]
    t = t.merge(keys, on=["model", "method", "tag"])
    t = t.assign(setting=t["shots"].map(_setting))
    order = {m: i for i, m in enumerate((*UTILITY[task], *GAPS[task]))}
    t = t.assign(_m=t["metric"].map(order), _k=t["shots"].fillna(10**9), _z=t["method"] != ZERO_SHOT)  # zero-shot first
    t = t.sort_values(["model", "_z", "method", "_k", "_m"], kind="stable")
    return t[FEWSHOT_COLUMNS].reset_index(drop=True)
