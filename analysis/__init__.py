"""cxrfair.analysis: from a folder of runs to tables, figures and the report (``cxrfair analyze``).

Imports stay light (numpy + pandas): no torch or jax ever, and matplotlib only when figures
are drawn (``figures``, ``report``). What every stage shares (the run format, group metrics,
bootstrap intervals, the mitigation table) lives one floor down in ``cxrfair.core``.

Public surface:
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
__all__ = [
    "AnalyzeConfig", "Results", "analyze", "compute", "describe_intervals", "shortcut_metrics", "shortcut_subsets",
]
