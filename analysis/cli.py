"""``cxrfair analyze RUNS/ --out REPORT/``: metrics with bootstrap intervals, figures and a report.

Imports only click at module level; the library is imported inside the command.
"""

from __future__ import annotations

from pathlib import Path

import click


def _columns(text: str | None) -> tuple[str, ...] | None:
    """``"sex, race"`` -> ``("sex", "race")``; None stays None; ``none`` -> ()."""
    if text is None:
        return None
    return () if text.strip().lower() == "none" else tuple(a.strip() for a in text.split(",") if a.strip())


@click.command("analyze")
@click.argument("runs_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Report folder to write.")
@click.option("--bootstrap", "n_boot", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Bootstrap replicates: 0 for point estimates only (no intervals), else at least 100. "
                   "Patients are resampled within the strata of --cross (all of a patient's images together).")
@click.option("--attributes", default=None,
              help="Comma-separated attribute columns to compare groups on [default: every attribute the runs "
                   "declare (run.json attributes), else sex,age_group].")
@click.option("--cross", default=None,
              help="Comma-separated attributes crossed into one more attribute (sex×age); its cells are also the "
                   "bootstrap strata. 'none': no cross, strata by the first attribute [default: the first two attributes].")
@click.option("--shortcut", default="auto", show_default=True, metavar="COLUMN",
              help="Binary column (1/0/empty) of the shortcut test, with --shortcut-class: AUC of the class on "
                   "positives with COLUMN=1 vs with COLUMN=0 (plus all negatives), paired interval, shortcut.csv. "
                   "'auto': drain + Pneumothorax when the runs have both; 'none': off.")
@click.option("--shortcut-class", default=None, metavar="CLASS", help="The class (condition) of --shortcut.")
@click.option("--embeddings", default="auto", show_default=True, metavar="DIR",
              help="Folder of `cxrfair embeddings leakage|geometry` outputs (DIR/<model>/leakage, DIR/<model>/geometry) "
                   "to add as report sections. 'auto': the embeddings/ folder next to RUNS_DIR when it has some; 'none': off.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1), help="Seed of the bootstrap draws (0 to 2^32-1).")
@click.option("--force", is_flag=True, help="Replace an existing report folder.")
def analyze(runs_dir: Path, out: Path, n_boot: int, attributes: str | None, cross: str | None, shortcut: str,
            shortcut_class: str | None, embeddings: str, split: str, seed: int, force: bool) -> None:
    """Read every run under RUNS_DIR (one cohort, multi-class or multi-label) and write metrics.csv,
    seeds.csv, comparisons.csv (+ thresholds.csv, shortcut.csv), figures, report.md and report.html to --out."""
    from cxrfair.analysis.analyze import AnalyzeConfig
    from cxrfair.analysis.analyze import analyze as run_analysis

    config = AnalyzeConfig(
        runs_dir=runs_dir, out=out, n_boot=n_boot, split=split, seed=seed, force=force,
        attributes=_columns(attributes) or (), cross=_columns(cross), shortcut=shortcut, shortcut_class=shortcut_class,
        embeddings=embeddings,
    )
    click.echo(run_analysis(config))
