"""cxrfair.analysis: the run format, metrics with bootstrap intervals, figures and the report.

Imports stay light (numpy + pandas): no torch or jax ever, and matplotlib only when figures
are drawn (``figures``, ``report``).

Public surface:
    run format (runs.py): ``write_run, make_predictions, read_run, read_runs, run_is_complete,
        Run, METHODS``;
    metrics (metrics.py): ``accuracy, f1, f1_macro, var_f1, roc_auc, auc_macro, tpr, fpr, fnr,
        selection_rate, ece, ece_paper, confusion_counts, by_group, GROUP_METRICS, evaluate_all,
        METRIC_DEFINITIONS`` (one sentence per metric name, for reports);
    bootstrap (bootstrap.py): ``patient_counts, patient_strata, stratified_indices, resample_counts, interval``;
    pipeline (analyze.py): ``AnalyzeConfig, compute, analyze, describe_intervals`` (the ``cxrfair analyze`` command).
"""

from cxrfair.analysis.analyze import AnalyzeConfig, analyze, compute, describe_intervals
from cxrfair.analysis.bootstrap import interval, patient_counts, patient_strata, resample_counts, stratified_indices
from cxrfair.analysis.metrics import (
    GROUP_METRICS,
    METRIC_DEFINITIONS,
    accuracy,
    auc_macro,
    by_group,
    confusion_counts,
    ece,
    ece_paper,
    evaluate_all,
    f1,
    f1_macro,
    fnr,
    fpr,
    roc_auc,
    selection_rate,
    tpr,
    var_f1,
)
from cxrfair.analysis.runs import (
    METHODS,
    Run,
    make_predictions,
    prob_columns,
    read_run,
    read_runs,
    run_is_complete,
    write_run,
)

__all__ = [
    "AnalyzeConfig", "GROUP_METRICS", "METHODS", "METRIC_DEFINITIONS", "Run", "accuracy", "analyze", "auc_macro",
    "by_group", "compute", "confusion_counts", "describe_intervals", "ece", "ece_paper", "evaluate_all", "f1",
    "f1_macro", "fnr", "fpr", "interval", "make_predictions", "patient_counts", "patient_strata", "prob_columns",
    "read_run", "read_runs", "resample_counts", "roc_auc",
    "run_is_complete", "selection_rate", "stratified_indices", "tpr", "var_f1", "write_run",
]
