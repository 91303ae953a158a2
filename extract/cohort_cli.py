"""``cxrfair cohort build`` and ``cxrfair cohort synth``: thin click wrappers (library in cohort.py, synth.py)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def cohort() -> None:
    """Build the study cohort from NIH metadata, or synthesise NIH-format data."""


@cohort.command()
@click.option("--metadata", type=click.Path(path_type=Path), default=None,
              help="NIH Data_Entry_2017*.csv[.gz]  [default: the vendored Data_Entry_2017_v2020.csv.gz]")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Folder of the NIH download; images are found recursively (images_001/images/...).")
@click.option("--preset", default="nih-6x200", show_default=True, help="Cohort rules (PAPER.md §1).")
@click.option("--diseases", default=None, help="Comma-separated findings, in class order  [default: the preset's six]")
@click.option("--per-group", type=int, default=None, help="Images per disease x group  [default: 50]")
@click.option("--age-threshold", type=int, default=None, help="Age from which a patient is 'old'  [default: 60]")
@click.option("--split", default=None, help="train,val,test ratio  [default: 0.7,0.1,0.2]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds sampling and split.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder (cohort.csv, cohort.json).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def build(metadata, images, preset, diseases, per_group, age_threshold, split, seed, out, force) -> None:
    """Sample the balanced, patient-disjoint cohort and write cohort.csv + cohort.json."""
    from cxrfair.extract.cohort import CohortConfig, build_cohort, composition_table

    config = CohortConfig.from_preset(preset, out=out, metadata=metadata, images=images, diseases=diseases,
                                      per_group=per_group, age_threshold=age_threshold, split=split,
                                      seed=seed, force=force)
    result = build_cohort(config)
    click.echo(composition_table(result))
    click.echo(f"wrote {out}/cohort.csv ({len(result.table)} images, preset {result.meta['preset']}, hash {result.hash[:12]})")


@cohort.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--size", type=int, default=64, show_default=True, help="Image side in pixels.")
@click.option("--per-cell", type=int, default=64, show_default=True,
              help="Single-label images per disease x group (the nih-6x200 preset needs >= 50).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def synth(out, seed, size, per_cell, force) -> None:
    """Synthetic chest X-rays in the NIH layout with planted group differences (see synth_info.json)."""
    from cxrfair.extract.synth import SynthConfig, make_synth

    info = make_synth(SynthConfig(out=out, seed=seed, size=size, per_cell=per_cell, force=force))
    click.echo(f"wrote {out}: {info['images']} images of {info['size']} px from {info['patients']} patients, "
               f"metadata {info['metadata']}; build the cohort with\n"
               f"  cxrfair cohort build --metadata {out}/{info['metadata']} --images {out} --out COHORT")
