"""cxrfair.analysis: the run format, metrics with bootstrap intervals, figures and the report.

Imports stay light (numpy + pandas): no torch or jax ever, and matplotlib only when figures
are drawn (``figures``, ``report``).

Public surface:
    run format (runs.py): ``write_run, make_predictions, read_run, read_runs, run_is_complete,
        Run, METHODS, TASKS, V1_ATTRIBUTES, run_attributes``;
    metrics (metrics.py): ``accuracy, f1, f1_macro, var_f1, roc_auc, auc_macro, tpr, fpr, fnr,
        selection_rate, ece, ece_paper, confusion_counts, by_group, GROUP_METRICS, evaluate_all,
        METRIC_DEFINITIONS`` (one sentence per metric name of either task, for reports),
        ``metric_definitions(task)``; multi-label metrics live in ``multilabel`` (``evaluate_multilabel``,
        ``choose_thresholds``, ...);
    bootstrap (bootstrap.py): ``patient_counts, patient_strata, merge_small_strata, stratified_indices,
        resample_counts, interval``;
    pipeline (analyze.py): ``AnalyzeConfig, Results, compute, analyze, describe_intervals,
        shortcut_subsets, shortcut_metrics`` (the ``cxrfair analyze`` command);
    mitigation (mitigation.py): mitigated runs against ERM trained the same way, ``Results.mitigation`` /
        ``tradeoff``, the strength chosen on validation; its tables and trade-off figure in
        ``mitigation_figures``, laid out by ``sections.mitigation``.
"""

from cxrfair.analysis.analyze import (
    AnalyzeConfig,
    Results,
    analyze,
    compute,
    describe_intervals,
    shortcut_metrics,
    shortcut_subsets,
)
from cxrfair.analysis.bootstrap import (
    interval,
    merge_small_strata,
    patient_counts,
    patient_strata,
    resample_counts,
    stratified_indices,
)
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
    metric_definitions,
    roc_auc,
    selection_rate,
    tpr,
    var_f1,
)
from cxrfair.analysis.runs import (
    METHODS,
    TASKS,
    V1_ATTRIBUTES,
    Run,
    make_predictions,
    prob_columns,
    read_run,
    read_runs,
    run_attributes,
    run_is_complete,
    write_run,
)

__all__ = [
    "AnalyzeConfig", "GROUP_METRICS", "METHODS", "METRIC_DEFINITIONS", "Results", "Run", "TASKS", "V1_ATTRIBUTES",
    "accuracy", "analyze", "auc_macro", "by_group", "compute", "confusion_counts", "describe_intervals", "ece",
    "ece_paper", "evaluate_all", "f1", "f1_macro", "fnr", "fpr", "interval", "make_predictions",
    "merge_small_strata", "metric_definitions", "patient_counts", "patient_strata", "prob_columns", "read_run",
    "read_runs", "resample_counts", "roc_auc", "run_attributes", "run_is_complete", "selection_rate",
    "shortcut_metrics", "shortcut_subsets", "stratified_indices", "tpr", "var_f1", "write_run",
]
