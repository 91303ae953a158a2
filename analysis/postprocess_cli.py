"""``cxrfair postprocess RUN --sensitive ATTR``: group thresholds / class offsets fitted on validation.

Imports only click at module level; the library is imported inside the command.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("postprocess")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--sensitive", required=True, help="Attribute whose groups are equalised (e.g. sex, age_group, race).")
@click.option("--constraint", default="equalized_odds", show_default=True,
              help="equalized_odds: equal TPR and FPR ((|ΔTPR| + |ΔFPR|) / 2); tpr: equal opportunity; "
                   "fpr: equal FPR.")
@click.option("--strength", default=0.02, show_default=True, type=float,
              help="Validation utility the fit may give up (accuracy for multi-class, F1 per condition for "
                   "multi-label), absolute, in [0, 1].")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Runs folder to write the new run into.  [default: the folder holding RUN]")
@click.option("--force", is_flag=True, help="Replace an existing post-processed run of the same id.")
def postprocess(run: Path, sensitive: str, constraint: str, strength: float, out: Path | None, force: bool) -> None:
    """Post-process RUN (any run folder: zero-shot, probe, LoRA, full) into a new run
    <model>__<method>+thresholds-<ATTR>__<tag>__s<seed>.

    Multi-class: per-(group, class) offsets on the log-probabilities; multi-label: per-(group,
    condition) thresholds. Both are fitted on the validation rows only, to make the groups' TPR/FPR
    as equal as possible while utility stays within --strength of the source's; test rows are only
    transformed. Needs each image's group at prediction time.
    """
    from cxrfair.analysis.postprocess import PostprocessConfig
    from cxrfair.analysis.postprocess import postprocess as run_postprocess

    config = PostprocessConfig(run=run, sensitive=sensitive, constraint=constraint, strength=strength,
                               out=out, force=force)
    click.echo(run_postprocess(config))
