"""``cxrfair analyze RUNS/ --out REPORT/``: metrics with bootstrap intervals, figures and a report.

Imports only click at module level; the library is imported inside the command.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("analyze")
@click.argument("runs_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Report folder to write.")
@click.option("--bootstrap", "n_boot", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Bootstrap replicates: 0 for point estimates only (no intervals), else at least 100. "
                   "Patients are resampled within the strata of --attributes (all of a patient's images together).")
@click.option("--attributes", default="sex,age_group", show_default=True,
              help="Comma-separated attribute columns; their cross (sex×age) is added and is the bootstrap strata.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the bootstrap draws.")
@click.option("--force", is_flag=True, help="Replace an existing report folder.")
def analyze(runs_dir: Path, out: Path, n_boot: int, attributes: str, split: str, seed: int, force: bool) -> None:
    """Read every run under RUNS_DIR (one cohort) and write metrics.csv, seeds.csv, comparisons.csv,
    figures, report.md and report.html to --out."""
    from cxrfair.analysis.analyze import AnalyzeConfig
    from cxrfair.analysis.analyze import analyze as run_analysis

    config = AnalyzeConfig(
        runs_dir=runs_dir, out=out, n_boot=n_boot, split=split, seed=seed, force=force,
        attributes=tuple(a.strip() for a in attributes.split(",") if a.strip()),
    )
    click.echo(run_analysis(config))
