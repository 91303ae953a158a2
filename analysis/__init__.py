"""cxrfair.analysis: from a folder of runs to tables, figures and the report (``cxrfair analyze``).

Imports stay light (numpy + pandas): no torch or jax ever, and matplotlib only when figures
are drawn (``figures``, ``mitigation_figures``, ``embedding_figures``). What every stage shares
(the run format, group metrics, bootstrap intervals, the mitigation table) lives one floor down
in ``cxrfair.core``. This package re-exports nothing: import from the module that owns a name.

Modules, each importing only those listed after it (and ``cxrfair.core``):
    cli, postprocess_cli   the click commands ``cxrfair analyze`` / ``cxrfair postprocess``
    analyze                the command: read runs, ``engine.compute``, write the report folder
    render                 the report folder: sections laid out as report.md / report.html, CSVs, figures
    sections               the page, in order (``SECTIONS``); embedding_report: its embedding sections
    mitigation_figures, figures, embedding_figures   the figures (matplotlib)
    report                 building blocks (Figure, Table, Section), ``ReportData``, table builders
    curves, findings       ROC / reliability points; the findings' verdicts and sentences
    engine                 runs -> ``Results``: metrics, intervals, seeds, comparisons (pure)
    mitigation             mitigated runs vs ERM: paired deltas, trade-off, strength chosen on validation
    shortcut               the shortcut test
    runsets                tags, the cohort check, the runs table (primary tags), the baseline method
    replicates             ``Evaluated`` runs; replicate matrices, seed means (the paired arithmetic)
    config                 ``AnalyzeConfig``, its resolution against the runs, interval description
    groups                 attribute declarations, group codes, crossed attributes
    postprocess            group thresholds / class offsets fitted on validation (``cxrfair postprocess``)
"""
