"""`cxrfair run CONFIG` and `cxrfair demo`: thin wrappers over cxrfair.pipeline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from cxrfair.config import load_config
from cxrfair.pipeline import demo_config, run_experiment


@click.command("run")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print the plan (what runs, what is reused) and stop.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Override the config's `out` folder.")
def run(config: Path, dry_run: bool, out: Path | None) -> None:
    """Run the experiment described by the TOML file CONFIG.

    Steps whose outputs are complete and match the config (same cohort hash and settings) are
    reused, so an interrupted run is resumed by repeating the same command. See
    configs/paper.toml for the paper's full protocol.
    """
    cfg = load_config(config)
    if out is not None:
        cfg = dataclasses.replace(cfg, out=out.resolve())
    report = run_experiment(cfg, dry_run=dry_run, echo=click.echo, source=str(config))
    if report is not None:
        click.echo(f"Report: {report}")


@click.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True,
              help="Folder for the synthetic data, caches, runs and report.")
@click.option("--dry-run", is_flag=True, help="Print the plan and stop.")
def demo(out: Path, dry_run: bool) -> None:
    """The whole pipeline on synthetic NIH-format data with the tiny model, on CPU in minutes.

    Synthesises X-ray-like images with planted disease patterns, group differences and chest
    drains, builds the paper's 6x200 cohort from them, extracts tiny-clip embeddings, runs
    zero-shot, linear and MLP probes, LoRA and full fine-tuning, attribute leakage and embedding
    geometry, group thresholds on the linear probe, and writes the report (with the drain
    shortcut test). Rerunning reuses finished steps.
    """
    report = run_experiment(demo_config(out.resolve()), dry_run=dry_run, echo=click.echo)
    if report is not None:
        click.echo(f"Report: {report}")
