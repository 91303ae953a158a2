"""The option vocabulary every command shares (docs/cli.md), and refusals of retired spellings.

One meaning per option name across ``cxrfair``'s commands:

- ``--seeds``: the training seeds, one run per seed: ``3`` = seeds 0, 1, 2; ``0,4`` = those
  (``5,`` = seed 5 alone). ``--seed`` is the one random seed of a computation that is not
  repeated per seed (cohort sampling, bootstrap draws, leakage splits).
- ``--strength``: a comma list of mitigation strengths (probes: a grid axis chosen on
  validation; fine-tuning: one run per value); ``postprocess --strength``: its one utility budget.
- ``--cache``: an embedding cache file (``.h5``) that ``cxrfair extract`` wrote.
- ``--out``: always a folder.
- ``--track tensorboard|wandb|mlflow``: log training curves (fine-tuning, probe sweeps) into each
  run's ``tracking/`` folder (``cxrfair.tracking``); off by default; changes no result.

Imports only click, the error type and ``cxrfair.tracking`` (standard library only), so every
command's module can use it at no cost.
"""

from __future__ import annotations

from typing import Callable

import click

from cxrfair.errors import CxrfairError
from cxrfair.tracking import CHOICES as TRACK_CHOICES

MODEL_HELP = ("Registry name (see `cxrfair models list`), or any model by name: open_clip:ARCH/TAG, open_clip:ARCH "
              "with --weights FILE, open_clip:hf-hub:ORG/NAME, hf:ORG/NAME, or hf:PATH (a save_pretrained folder); "
              "docs/models.md.")
SEEDS_HELP = "Training seeds, one run each: K = seeds 0..K-1; a comma list = those seeds (5, = seed 5 alone)."


def parse_seeds(text: str, option: str = "--seeds") -> tuple[int, ...]:
    """``"3"`` -> (0, 1, 2); ``"0,4"`` -> (0, 4); ``"5,"`` -> (5,). CxrfairError naming ``option`` otherwise."""
    text = str(text).strip()
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise ValueError
            return tuple(range(count))
        seeds = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CxrfairError(f"{option} {text!r}: expected a count (3 = seeds 0,1,2) or a comma list of seeds "
                           "(0,4; 5, = seed 5 alone)") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise CxrfairError(f"{option} {text!r}: list each seed once, each >= 0")
    return seeds


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    """``"0.1,1"`` -> (0.1, 1.0); CxrfairError naming ``option`` for anything else."""
    try:
        values = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise CxrfairError(f"{option} {text!r}: expected comma-separated numbers, e.g. 0.1,1")
    return values


def track_option() -> Callable:
    """``--track``: the experiment tracking backend of a training command (default: off)."""
    return click.option("--track", type=click.Choice(TRACK_CHOICES), default=None,
                        help="Log training curves to <run>/tracking/: tensorboard (event files; pip install "
                             "cxrfair[track]), wandb (offline unless WANDB_MODE is set) or mlflow (a file: store there "
                             "unless MLFLOW_TRACKING_URI is set). Changes no result. [default: off]")


def renamed(old: str, new: str, how: str = "") -> Callable:
    """A hidden option ``old`` that stops the command with a usage error naming ``new`` (and ``how``)."""

    def refuse(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value is not None:
            raise click.UsageError(f"{old} was renamed {new}" + (f": {how}" if how else ""), ctx=ctx)

    return click.option(old, hidden=True, expose_value=False, default=None, callback=refuse)


__all__ = ["SEEDS_HELP", "parse_floats", "parse_seeds", "renamed", "track_option"]
