"""``cxrfair models list`` and ``cxrfair extract [merge]``: thin click wrappers.

Only click is imported at module level; the library (torch, open_clip) loads inside commands.
"""

from __future__ import annotations

from pathlib import Path

import click

from cxrfair.errors import CxrfairError


@click.group()
def models() -> None:
    """List the foundation models in the registry."""


@models.command("list")
def list_models() -> None:
    """Table of models: encoders, cached embedding, weights source and licence, zero-shot, LoRA targets.

    "dim" and "cached embedding" say what extraction stores by default (the joint-space projection
    for image-text models); "pre-projection" is the dimension of the features before that
    projection a model also offers (``encode_image_unprojected``), "-" where it has none.
    """
    from cxrfair.extract.registry import list_specs

    header = ("name", "image encoder", "text encoder", "dim", "cached embedding", "pre-projection", "weights source",
              "licence", "zero-shot", "LoRA targets")
    rows = [(s.name, s.image_encoder, s.text_encoder or "-", str(s.embed_dim), s.embedding,
             str(s.unprojected_dim or "-"), s.weights_source, s.license or "-",
             "yes" if s.zero_shot else "no", _targets(s.lora_targets)) for s in list_specs()]
    click.echo(_table(header, rows))


def _targets(t) -> str:
    return "-" if not t else t if isinstance(t, str) else ",".join(t)


def _table(header: tuple, rows: list[tuple]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


@click.group(invoke_without_command=True)
@click.option("--model", help="Registry name (see `cxrfair models list`).")
@click.option("--cohort", type=click.Path(path_type=Path), help="Cohort folder (cohort.csv + cohort.json).")
@click.option("--out", type=click.Path(path_type=Path), help="The HDF5 cache to write (FILE.h5).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per forward pass.")
@click.option("--workers", type=int, default=2, show_default=True, help="DataLoader decode workers.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="Weights file or folder (overrides env var / hub cache).")
@click.option("--images", type=click.Path(path_type=Path), default=None, help="Images root, overriding the cohort's.")
@click.option("--force", is_flag=True, help="Start over: discard partial progress and any existing cache at --out.")
@click.option("--skip-bad", is_flag=True, help="Leave unreadable images out (recorded in the cache) instead of failing.")
@click.option("--parts-dir", type=click.Path(path_type=Path), default=None, help="Under torchrun: where ranks write parts [FILE.h5.parts].")
@click.option("--prompt-scores/--no-prompt-scores", default=True, show_default=True,
              help="GLoRIA models: also store every image's global and local similarity to every prompt "
                   "(what GLoRIA's own zero-shot scoring needs; slower extraction). Ignored by other models.")
@click.pass_context
def extract(ctx, model, cohort, out, batch_size, workers, device, precision, weights, images, force, skip_bad, parts_dir,
            prompt_scores) -> None:
    """Embed a cohort with one model into an HDF5 cache (resumable; sharded under torchrun)."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [f"--{n}" for n, v in (("model", model), ("cohort", cohort), ("out", out)) if not v]
    if missing:
        raise CxrfairError(f"extract needs {', '.join(missing)} (see `cxrfair extract --help`)")
    from cxrfair.extract.distributed import run_distributed, torchrun_env
    from cxrfair.extract.extractor import ExtractConfig
    from cxrfair.extract.extractor import extract as run_extract

    config = ExtractConfig(model=model, cohort=cohort, out=out, batch_size=batch_size, workers=workers, device=device,
                           precision=precision, weights=weights, images=images, force=force, skip_bad=skip_bad,
                           prompt_scores=prompt_scores)
    if torchrun_env():
        result, merged = run_distributed(config, parts_dir)
        if result.status == "exists" and result.path == out:
            return _report(result)
        click.echo(f"rank part {result.path}: {result.n_images} images ({result.status})"
                   + (f"; merged into {merged}" if merged else ""))
        return
    result = run_extract(config)
    _report(result)


def _report(result) -> None:
    if result.status == "exists":
        click.echo(f"{result.path}: already complete for this model and cohort ({result.n_images} images); "
                   "left alone (pass --force to redo)")
        return
    skipped = f", skipped {len(result.skipped)} unreadable image(s) (listed in attrs skipped_images)" if result.skipped else ""
    click.echo(f"wrote {result.path}: {result.n_images} images in {result.seconds:.1f} s "
               f"({result.images_per_s:.1f} images/s){skipped}")


@extract.command()
@click.argument("parts", nargs=-1, type=click.Path(path_type=Path))
@click.option("--parts-dir", type=click.Path(path_type=Path), default=None, help="Folder holding part-*-of-*.h5.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The merged cache (FILE.h5).")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
def merge(parts, parts_dir, out, force) -> None:
    """Join the part files of a sharded extraction into one cache (checks model, cohort, coverage)."""
    from cxrfair.extract.distributed import find_parts, merge_parts

    if bool(parts) == bool(parts_dir):
        raise CxrfairError("merge needs either PARTS... or --parts-dir (not both)")
    files = list(parts) or find_parts(parts_dir)
    for f in files:
        if not f.is_file():
            raise CxrfairError(f"part {f}: no such file")
    path = merge_parts(files, out, force=force)
    click.echo(f"merged {len(files)} part(s) into {path}")
