"""``cxrfair cohort build`` and ``cxrfair cohort synth``: thin click wrappers (library in cohort.py, synth.py).

Importing this module imports only click (``cxrfair --help`` stays fast): the library, and the
dataset readers whose declarations give ``build`` its ``--dataset`` choices, its reader-specific
options and the dataset list of its help, are imported when ``build`` is run or asked for help.
"""

from __future__ import annotations

from pathlib import Path

import click

PATH = click.Path(path_type=Path)
BUILD_HELP = """Build a cohort (cohort.csv + cohort.json) from a dataset's own files.

\b
Datasets and the files each reads:
{datasets}

\b
Presets (--preset; options below override a preset's rules, and cohort.json then says "custom"):
  nih-6x200               multi-class, 6 findings x 50 per sex x age band, exact 7:1:2 (Sun et al.)
  mimic-sourget           MIMIC official split, 6 conditions, sex / 5 age bins / race W,B,A
  nih-neatx-pneumothorax  NIH official test list + NEATX drains, binary Pneumothorax
  chexpert-6              every frontal adult CheXpert image, 6 conditions, 70/10/20 by patients
  all-multilabel          every frontal image and finding, 70/10/20 by patients (csv default)
"""


class ReaderCommand(click.Command):
    """``cohort build``: ``--dataset``'s choices, the reader-specific options (after ``--images``)
    and the dataset list of the help come from the readers' declarations (``datasets.READERS``),
    read on first use."""

    _readers_added = False

    def _add_readers(self) -> None:
        if self._readers_added:
            return
        from cxrfair.extract.datasets import OPTIONS, READERS, help_text, readers_of

        self._readers_added = True
        at = next(i for i, p in enumerate(self.params) if p.name == "images") + 1
        self.params[at:at] = [_reader_option(o, readers_of(o.key), len(READERS)) for o in OPTIONS.values()]
        dataset = next(p for p in self.params if p.name == "dataset")
        dataset.type = click.Choice(list(READERS))
        self.help = BUILD_HELP.format(datasets=help_text())

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        self._add_readers()
        return super().get_params(ctx)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._add_readers()
        super().format_help(ctx, formatter)


def _reader_option(option, users: list[str], n_readers: int) -> click.Option:
    """The click option of a reader's declared ``Option`` (paths as Path, the rest as text)."""
    prefix = "" if len(users) == n_readers else f"{', '.join(users)}: "
    return click.Option([option.flag], type=PATH if option.is_path else str, default=None,
                        help=f"{prefix}{option.help}.")


@click.group()
def cohort() -> None:
    """Build a cohort from NIH, CheXpert, MIMIC-CXR or any CSV; or synthesise data in their layouts."""


@cohort.command(cls=ReaderCommand, help=BUILD_HELP)
@click.option("--dataset", default=None, help="Reader for the files  [default: the preset's]")
@click.option("--metadata", type=PATH, default=None, help="The dataset's metadata file (MIMIC: its folder); see above.")
@click.option("--images", type=PATH, default=None,
              help="Images root: the folder the metadata's paths start from (NIH: searched recursively).")
@click.option("--preset", default=None,
              help="Cohort rules (list above)  [default: nih-6x200; with --dataset, that dataset's first preset]")
@click.option("--diseases", default=None, help="Comma-separated classes / conditions, in order  [default: the preset's]")
@click.option("--attributes", default=None, help="Sensitive attributes, e.g. sex,age_group,race  [default: the preset's]")
@click.option("--age-bins", default=None, help="Age group edges: 18,25,50,65,80 (left-closed bins) or 60 (young/old).")
@click.option("--age-threshold", type=int, default=None, help="Same as --age-bins N (the paper's young/old cut).")
@click.option("--uncertain", type=click.Choice(["ignore", "zeros", "ones"]), default=None,
              help="Multi-label: uncertain (-1) labels masked, or read as 0 or 1  [default: ignore]")
@click.option("--per-group", type=int, default=None, help="Multi-class: images per class x group  [default: 50]")
@click.option("--split", default=None, help="train,val,test ratio (e.g. 0.7,0.1,0.2), or 'official'.")
@click.option("--min-age", type=int, default=None, help="Leave out younger patients  [default: the preset's]")
@click.option("--all-views", is_flag=True, help="Keep lateral and other non-AP/PA views.")
@click.option("--max-train", type=int, default=None, help="At most N training images (whole patients, seeded).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds sampling and split.")
@click.option("--out", type=PATH, required=True, help="Output folder (cohort.csv, cohort.json).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def build(preset, all_views, out, **options) -> None:
    from cxrfair.extract.cohort import CohortConfig, build_cohort, composition_table
    from cxrfair.extract.cohort_presets import DEFAULT_PRESET

    preset = preset or DEFAULT_PRESET.get(options["dataset"], "nih-6x200")
    config = CohortConfig.from_preset(preset, out=out, views="all" if all_views else None, **options)
    result = build_cohort(config)
    click.echo(composition_table(result))
    dropped = ", ".join(f"{k} {v}" for k, v in result.meta.get("excluded", {}).items())
    click.echo(f"wrote {out}/cohort.csv ({len(result.table)} images, {result.meta['dataset']}, preset "
               f"{result.meta['preset']}, hash {result.hash[:12]})" + (f"; left out: {dropped}" if dropped else ""))


@cohort.command()
@click.option("--format", "fmt", type=click.Choice(["nih", "chexpert", "mimic"]), default="nih", show_default=True,
              help="Layout and file names of the real dataset to imitate.")
@click.option("--out", type=PATH, required=True, help="Output folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--size", type=int, default=64, show_default=True, help="Image side in pixels.")
@click.option("--per-cell", type=int, default=64, show_default=True,
              help="nih: single-label images per disease x group (the nih-6x200 preset needs >= 50).")
@click.option("--patients", type=int, default=None, help="chexpert / mimic: number of patients  [default: 400]")
@click.option("--no-images", is_flag=True, help="Metadata files only (for benchmarks at full size).")
@click.option("--reports", is_flag=True,
              help="mimic: also mimic-cxr-reports.zip, one synthetic free-text report per study saying what its labels say.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def synth(fmt, out, seed, size, per_cell, patients, no_images, reports, force) -> None:
    """Synthetic chest X-rays in a real dataset's layout with planted group differences (see synth_info.json)."""
    from cxrfair.extract.synth import SynthConfig, build_command, make_synth

    info = make_synth(SynthConfig(out=out, format=fmt, seed=seed, size=size, per_cell=per_cell, patients=patients,
                                  images=not no_images, reports=reports, force=force))
    click.echo(f"wrote {out}: {info['images']} images of {info['size']} px from {info['patients']} patients "
               f"({fmt} layout); build a cohort with\n  {build_command(info, out)}")
