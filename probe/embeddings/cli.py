"""``cxrfair embeddings leakage|geometry``: what frozen image embeddings reveal about attributes.

Imports click and the analyses (NumPy and pandas) at module level; JAX loads only when a linear or
MLP probe trains, matplotlib only when the figures are written.
"""

from __future__ import annotations

from pathlib import Path

import click

from cxrfair.errors import CxrfairError
from cxrfair.probe.embeddings.geometry import GeometryConfig, geometry_cache
from cxrfair.probe.embeddings.leakage import MIN_PERMUTATIONS, LeakageConfig, leakage_cache

_cache = click.option("--cache", required=True, type=click.Path(path_type=Path), help="Embedding cache (.h5) from `cxrfair extract`.")
_out = click.option("--out", required=True, type=click.Path(path_type=Path),
                    help="Output folder, written whole (one folder per model and analysis, e.g. work/embeddings/<model>/leakage).")
_attributes = click.option("--attributes", default="", help="Comma-separated cohort columns [default: the cohort's sensitive attributes].")
_rows = click.option("--cohort-split", "cohort_split", default="", help="Comma-separated cohort splits to use [default: every row].")
_seed = click.option("--seed", default=0, show_default=True, type=int, help="Fixes splits, shuffles and resamples.")
_boot = click.option("--bootstrap", default=1000, show_default=True, type=int, help="Patient-bootstrap replicates per interval.")
_min = click.option("--min-group", default=10, show_default=True, type=int, help="Fewest images per group (per split for leakage).")
_force = click.option("--force", is_flag=True, help="Replace an existing --out folder.")


def _words(text: str) -> tuple:
    return tuple(w.strip() for w in text.split(",") if w.strip())


def _numbers(text: str, option: str, kind=float) -> tuple:
    try:
        return tuple(kind(w) for w in _words(text))
    except ValueError:
        raise CxrfairError(f"{option} {text!r}: expected comma-separated numbers") from None


@click.group("embeddings")
def embeddings() -> None:
    """Attribute leakage and geometry of frozen image embeddings (Sourget et al.)."""


@embeddings.command("leakage")
@_cache
@_out
@_attributes
@click.option("--probes", default="linear,mlp,knn", show_default=True, help="Any of linear, mlp, knn.")
@click.option("--permutations", default=MIN_PERMUTATIONS, show_default=True, type=int,
              help=f"Reruns of the whole pipeline on the attribute shuffled across patients (the chance level; "
                   f"0: none; fewer than {MIN_PERMUTATIONS} runs with a note on the chance level's sd).")
@_boot
@click.option("--fractions", default="0.6,0.2,0.2", show_default=True, help="Train, val, test shares of patients.")
@_min
@click.option("--conditional/--no-conditional", default=True, show_default=True, help="Also within each label condition.")
@_rows
@_seed
@_force
def leakage(cache: Path, out: Path, attributes: str, probes: str, permutations: int, bootstrap: int, fractions: str,
            min_group: int, conditional: bool, cohort_split: str, seed: int, force: bool) -> None:
    """Predict each attribute from the embeddings: linear, MLP and kNN probes.

    Patient-grouped train/val/test split; each probe chosen on validation; test ROC-AUC with a
    patient-bootstrap 95% interval and a measured chance level. Writes leakage.csv,
    leakage_permutations.csv, leakage_split.csv, leakage.json and leakage.png.
    """
    cfg = LeakageConfig(attributes=_words(attributes), probes=_words(probes), fractions=_numbers(fractions, "--fractions"),
                        seed=seed, n_boot=bootstrap, n_perm=permutations, min_group=min_group, conditional=conditional,
                        cohort_splits=_words(cohort_split))
    result = leakage_cache(cache, out, cfg, force=force)
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {len(result.table)} leakage row(s) for {result.meta['model']} to {out} "
               f"({result.meta['timings_s']['total']:.1f} s)")


@embeddings.command("geometry")
@_cache
@_out
@_attributes
@click.option("--components", default=10, show_default=True, type=int, help="Principal components kept and tested.")
@click.option("--normalize", default="l2", show_default=True, type=click.Choice(["l2", "standard", "none"]),
              help="Feature transform before PCA and centroids.")
@click.option("--permutations", default=1000, show_default=True, type=int, help="Patient shuffles per component test.")
@_boot
@click.option("--top", default=20, show_default=True, type=int, help="Dimensions per group pair in centroids.png.")
@_min
@_rows
@_seed
@_force
def geometry(cache: Path, out: Path, attributes: str, components: int, normalize: str, permutations: int, bootstrap: int,
             top: int, min_group: int, cohort_split: str, seed: int, force: bool) -> None:
    """PCA by attribute, group tests along the components, centroid differences, modality gap.

    Writes pca.csv, pca_scores.csv, pca_tests.csv, centroids.csv, modality_gap.csv (when the
    cache has text embeddings), geometry.json, pca.png and centroids.png.
    """
    cfg = GeometryConfig(attributes=_words(attributes), components=components, normalize=normalize, n_perm=permutations,
                         n_boot=bootstrap, top=top, min_group=min_group, seed=seed, cohort_splits=_words(cohort_split))
    result = geometry_cache(cache, out, cfg, force=force)
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote the geometry of {result.meta['model']} ({len(result.attributes)} attribute(s)) to {out}")
