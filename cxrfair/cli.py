"""The ``cxrfair`` console script: one click group whose subcommands live with their stage.

Subcommands are imported lazily so ``cxrfair --help`` stays fast and never imports torch or jax.
Every stage's CLI module imports only click at module level; the library code it calls is
imported inside the command.
"""

from __future__ import annotations

import importlib
import warnings

import click

from cxrfair import __version__
from cxrfair.errors import CxrfairError, CxrfairWarning

# name -> "module:attribute" of a click command or group; order is the order shown in --help.
COMMANDS = {
    "cohort": ("cxrfair.extract.cohort_cli:cohort", "Build a cohort from NIH, CheXpert, MIMIC-CXR or a CSV; or synthesise data."),
    "models": ("cxrfair.extract.cli:models", "List the foundation models in the registry."),
    "weights": ("cxrfair.extract.cli:weights", "Download a model's released weights (or say how, offline)."),
    "extract": ("cxrfair.extract.cli:extract", "Embed a cohort with one model into an HDF5 cache (resumable)."),
    "probe": ("cxrfair.probe.cli:probe", "Zero-shot, linear and MLP probes on cached embeddings (JAX)."),
    "embeddings": ("cxrfair.probe.embeddings.cli:embeddings", "Attribute leakage and geometry of cached image embeddings."),
    "finetune": ("cxrfair.finetune.cli:finetune", "LoRA or full fine-tuning of a model's image encoder."),
    "postprocess": ("cxrfair.analysis.postprocess_cli:postprocess", "Group thresholds / class offsets fitted on validation: a fairer run from any run."),
    "analyze": ("cxrfair.analysis.cli:analyze", "Metrics with bootstrap intervals, figures and a report from runs."),
    "run": ("cxrfair.pipeline_cli:run", "Run a whole experiment from a TOML config, skipping finished steps."),
    "demo": ("cxrfair.pipeline_cli:demo", "The whole pipeline on synthetic data with a tiny model (minutes, CPU)."),
}


class LazyGroup(click.Group):
    """A group that imports each subcommand on first use and turns CxrfairError into one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        target, _ = COMMANDS[name]
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table, so --help does not import every stage.
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, help_) in COMMANDS.items()])

    def invoke(self, ctx: click.Context):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", CxrfairWarning)
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except CxrfairError as e:
            raise click.ClickException(str(e)) from None


_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """CxrfairWarning as one ``Warning: ...`` line on stderr (no file and line); others as Python shows them."""
    if issubclass(category, CxrfairWarning):
        click.echo(f"Warning: {message}", err=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="cxrfair")
def main() -> None:
    """Measure how fair CLIP-style foundation models are on chest X-rays.

    Typical flow: cohort build -> extract (per model) -> probe / finetune -> analyze.
    `cxrfair demo` runs all of it on synthetic data; `cxrfair run CONFIG` runs an experiment.
    """
