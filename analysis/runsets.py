"""Which runs go together: tags (runs equal but for the seed), the cohort check, the runs table
with the primary tag per model and method, and the baseline method others are compared with.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pandas as pd

from cxrfair.analysis.replicates import Evaluated
from cxrfair.core import metrics as M
from cxrfair.core import multilabel as ML
from cxrfair.core.runs import METHODS, PREDICTIONS_FILE, Run, id_difference, parse_run_id
from cxrfair.errors import CxrfairError


def tag_of(run: Run) -> str:
    """What a run is apart from model, method and seed: runs with equal tags differ only by seed.

    From ``parse_run_id`` (run identity lives in ``runs.RunKey``). Zero-shot runs of one prompt
    set carry the draw as their seed and ``-d<draw>`` in the tag; the draw suffix is dropped so
    the draws of one prompt set are summarised like seeds. A mitigation other than ``erm`` is
    part of the tag (``groupdro-sex__best``), so mitigated and plain runs are never averaged; so
    are a few-shot probe's shots (``k5__best``), so K-shot runs are never averaged with others.
    """
    key = parse_run_id(run.run_id)
    tag = base_tag(run) if key.shots is None else f"k{key.shots}__{base_tag(run)}"
    return tag if key.mitigation == "erm" else f"{key.mitigation}-{key.sensitive}__{tag}"


def base_tag(run: Run) -> str:
    """The run id's tag without a zero-shot draw suffix (``clip-d3`` -> ``clip``) and without the mitigation."""
    tag = parse_run_id(run.run_id).tag
    if "draw" in run.meta:
        tag = re.sub(rf"-d{re.escape(str(run.meta['draw']))}$", "", tag)
    return tag


def check_runs(runs: list[Run]) -> list[str]:
    """Refuse what would mix or mislabel runs: several cohorts or tasks, run ids off the convention,
    runs of one cohort on different images. Returns notes for the report.

    Runs of different cohorts have different test sets; side by side in one table (or averaged
    as seeds) they would read as one experiment. Runs of one cohort predict every val and test
    image of it, so a run whose images differ from the others' is damaged (a predictions.csv cut
    or edited, written before run.json recorded its rows) or built from a cache that left images
    out (``cxrfair extract --skip-bad``): its metrics are of other patients, and a note under the
    tables would not stop a reader from comparing them, so it is refused, named with its file and
    the image ids missing or extra.
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
    _check_same_images(runs)
    old = [r.run_id for r in runs if "rows" not in r.meta]
    if not old:
        return []
    shown = ", ".join(old[:3]) + (f" and {len(old) - 3} more" if len(old) > 3 else "")
    return [f"{len(old)} run(s) ({shown}) were written before run.json recorded their rows, so a cut or edited "
            f"{PREDICTIONS_FILE} among them is found only by comparing its images with the other runs'"]


def _check_same_images(runs: list[Run]) -> None:
    """CxrfairError naming the first run whose image ids of a split differ from most runs'."""
    for split in sorted({s for r in runs for s in r.predictions["split"].unique()}):
        ids = {r.run_id: frozenset(r.split(split)["image_id"].astype(str)) for r in runs}
        # The set most runs hold (ties: the larger set, as a cut file loses rows).
        common = max(Counter(ids.values()).items(), key=lambda kv: (kv[1], len(kv[0])))[0]
        for run in runs:
            if ids[run.run_id] != common:
                agree = sum(v == common for v in ids.values())
                raise CxrfairError(
                    f"run {run.run_id}: {run.path / PREDICTIONS_FILE} has other {split} images than {agree} other "
                    f"run(s) of its cohort ({id_difference(ids[run.run_id], common)}); rerun the step that wrote it, "
                    "or analyze it apart in its own RUNS folder (a cache extracted with --skip-bad leaves images out)")


def split_rows(run: Run, split: str) -> pd.DataFrame:
    """The run's rows of ``split`` in image_id order; CxrfairError when it has none."""
    rows = run.split(split)
    if rows.empty:
        raise CxrfairError(f"run {run.run_id}: predictions.csv has no rows with split == {split!r} "
                           f"(column split); choose --split among {sorted(run.predictions['split'].unique())}")
    return rows.sort_values("image_id", kind="stable")  # canonical order shared by every run


def _val_scores(run: Run) -> tuple[float, float]:
    """(accuracy, macro AUC) on the run's validation rows; accuracy NaN for multi-label, both NaN without rows."""
    if run.split("val").empty:
        return np.nan, np.nan
    y, p = run.arrays("val")
    if run.task == "multilabel":
        return np.nan, float(ML.condition_metrics(y, p)["auc_macro"])
    return float(M.accuracy(y, p)), float(M.auc_macro(y, p))


def runs_table(evaluated: list[Evaluated]) -> pd.DataFrame:
    """One row per run; ``primary`` marks the tag per (model, method) that tables and figures show.

    With several tags (e.g. zero-shot prompt sets) for one model and method, the primary one is
    the tag a run marks with ``prompt_set_selected: true`` (the probe's choice on val), else the
    best mean validation score over seeds (as the paper picks prompts, but on val, not test):
    accuracy for multi-class runs, macro AUC for multi-label ones. Plain (``erm``) tags come
    first: a mitigated run is primary only for a model and method without any erm run (its
    mitigation section compares it with ERM instead). Before them, probes trained on the whole
    training split: a few-shot tag is primary only where no other is (``fewshot`` shows them).
    """
    df = pd.DataFrame([{
        "run_id": e.run.run_id, "model": e.run.model, "method": e.run.method, "seed": e.run.seed,
        "tag": tag_of(e.run), "n_images": len(e.key[0]),
        **dict(zip(("val_accuracy", "val_auc_macro"), _val_scores(e.run))),
        "selected": bool(e.run.meta.get("prompt_set_selected", False)),
        "erm": parse_run_id(e.run.run_id).mitigation == "erm",
        "whole": parse_run_id(e.run.run_id).shots is None,
    } for e in evaluated])
    criterion = "val_auc_macro" if evaluated[0].run.task == "multilabel" else "val_accuracy"
    score = df.groupby(["model", "method", "tag"], sort=False).agg(
        whole=("whole", "all"), erm=("erm", "all"), selected=("selected", "any"), val=(criterion, "mean")).reset_index()
    score["val"] = score["val"].fillna(-1.0)
    best = score.sort_values(["model", "method", "whole", "erm", "selected", "val", "tag"],
                             ascending=[True, True, False, False, False, False, True]).drop_duplicates(["model", "method"])
    primary = set(zip(best["model"], best["method"], best["tag"]))
    df["primary"] = [(m, me, t) in primary for m, me, t in zip(df["model"], df["method"], df["tag"])]
    return df.drop(columns=["selected", "erm", "whole"])


# The reference every other method of a model is compared against, first present wins: the plain
# (ERM) linear probe on the model's own embeddings is the cheapest trained classifier, so a verdict
# against it asks "does this method beat a probe?". Zero-shot comes after it: an untuned zero-shot
# classifier can sit at chance, and a chance-level classifier has small gaps for free, so methods
# judged against it read "less fair" while every group improved. The report withholds fairness
# verdicts when the reference it gets is itself at chance (``analysis.headline``).
REFERENCE_ORDER = ("linear",) + tuple(m for m in METHODS if m != "linear")


def baseline_method(methods) -> str:
    """The method others are compared against: the first of ``REFERENCE_ORDER`` present (the linear
    probe, else zero-shot, then the rest in METHODS order); unknown methods last."""
    return min(methods, key=lambda m: REFERENCE_ORDER.index(m) if m in REFERENCE_ORDER else len(REFERENCE_ORDER))


def in_method_order(df: pd.DataFrame) -> pd.DataFrame:
    rank = df["method"].map(lambda m: METHODS.index(m) if m in METHODS else len(METHODS))
    return df.assign(_rank=rank).sort_values(["_rank", "method", "seed"]).drop(columns="_rank")
