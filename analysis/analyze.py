"""The command ``cxrfair analyze RUNS/ --out REPORT/``: read the runs, compute, write the report folder.

``analyze(config)`` reads ``config.runs_dir``, calls the engine (``engine.compute``: metrics with
bootstrap intervals, seed summaries, paired comparisons, mitigation tables; pure), writes the
report (``render.write_report``: CSVs, figures, report.md/html) and the remaining tables
(``write_tables``), all into a folder that appears atomically. Options: ``config.AnalyzeConfig``.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from tqdm.auto import tqdm

from cxrfair.analysis.config import MIN_BOOTSTRAP, AnalyzeConfig
from cxrfair.analysis.embedding_report import embeddings_root
from cxrfair.analysis.engine import Results, compute
from cxrfair.analysis.render import write_report
from cxrfair.core import metrics as M
from cxrfair.core import multilabel as ML
from cxrfair.core.runs import read_runs
from cxrfair.errors import CxrfairError
from cxrfair.io import atomic_dir, write_json_atomic

# Re-exported for callers outside cxrfair.analysis that import them from here (benchmarks/scale.py,
# benchmarks/analyze_multilabel.py); new code imports them from their home, named on each line.
from cxrfair.analysis.engine import in_blocks  # noqa: F401  (engine)
from cxrfair.analysis.groups import group_labels  # noqa: F401  (groups)
from cxrfair.analysis.config import stratum_name  # noqa: F401  (config)
from cxrfair.analysis.shortcut import shortcut_metrics, shortcut_subsets  # noqa: F401  (shortcut)


# The top-level names a report folder holds (render.write_report + write_tables): what --force may replace.
REPORT_FILES = ("report.md", "report.html", "figures", "analysis.json", *(f"{t}.csv" for t in (
    "metrics", "comparisons", "findings", "seeds", "runs", "roc", "reliability", "thresholds", "shortcut", "mitigation",
    "tradeoff", "fewshot")))


def _check_out(config: AnalyzeConfig) -> None:
    """Refuse an --out that would replace the runs themselves (before any work)."""
    out, runs = Path(config.out).resolve(), Path(config.runs_dir).resolve()
    if out == runs or out in runs.parents:
        raise CxrfairError(f"--out {config.out}: is or holds the runs folder {config.runs_dir}; write the report elsewhere")


def resolve_embeddings(config: AnalyzeConfig) -> AnalyzeConfig:
    """``config`` with ``embeddings`` the folder the report will read, or "none" (``embedding_report.embeddings_root``)."""
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
    (when a run has a mitigation), fewshot.csv (when a run is few-shot) and analysis.json (replacing the
    layout's, with the resolved attributes, strata and rules)."""
    folder = Path(folder)
    if len(results.thresholds):
        results.thresholds.to_csv(folder / "thresholds.csv", index=False)
    if len(results.shortcut):
        results.shortcut.to_csv(folder / "shortcut.csv", index=False)
    if results.mitigation is not None:
        results.mitigation.to_csv(folder / "mitigation.csv", index=False)
        results.tradeoff.to_csv(folder / "tradeoff.csv", index=False)
    if results.fewshot is not None:
        results.fewshot.to_csv(folder / "fewshot.csv", index=False)
    write_json_atomic(folder / "analysis.json", analysis_record(results))


def analyze(config: AnalyzeConfig) -> Path:
    """Read ``config.runs_dir``, compute everything, write the report folder; returns report.html."""
    _check_out(config)
    config = resolve_embeddings(config)  # a bad --embeddings folder is refused before any work
    # Open the output first: an existing --out (without --force) is refused before any work.
    inputs = (config.runs_dir, None if config.embeddings == "none" else config.embeddings)
    with atomic_dir(config.out, force=config.force, inputs=inputs, writes=REPORT_FILES) as tmp:
        runs = read_runs(config.runs_dir)
        results = compute(runs, config, progress=lambda xs: tqdm(xs, desc=f"metrics × {config.n_boot} bootstrap", unit="run"))
        write_report(results, tmp, runs)
        write_tables(results, tmp)
    return Path(config.out) / "report.html"
