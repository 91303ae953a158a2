"""``cxrfair models list``, ``cxrfair weights fetch`` and ``cxrfair extract [merge]``: thin click wrappers.

Only click is imported at module level; the library (torch, open_clip) loads inside commands.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import click

from cxrfair.errors import CxrfairError
from cxrfair.options import MODEL_HELP


@click.group()
def models() -> None:
    """List the foundation models in the registry."""


# Every field of a model's row, in the order of --format json / csv (the text table shows a few).
FIELDS = ("name", "image_encoder", "text_encoder", "dim", "cached_embedding", "pre_projection", "weights_source",
          "weights_env", "fetch", "licence", "zero_shot", "lora_targets", "description")
# The text table: (field, header, width at most); 98 characters with the separators.
TEXT_COLUMNS = (("name", "name", 19), ("image_encoder", "image encoder", 28), ("dim", "dim", 4),
                ("zero_shot", "zs", 3), ("fetch", "weights", 13), ("licence", "licence", 21))


@models.command("list")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "csv"]), default="text", show_default=True,
              help="text: a table for a terminal (100 columns, long values cut with …); json / csv: every field, "
                   "whole.")
def list_models(fmt: str) -> None:
    """The models in the registry: encoders, cached embedding, weights source and licence, zero-shot, LoRA targets.

    \b
    weights: `weights fetch` = `cxrfair weights fetch NAME` downloads them;
             by hand = a page only a browser can download from (the command prints it);
             random = a tiny test model.
    "dim" / cached_embedding say what extraction stores by default (the joint-space projection for
    image-text models); pre_projection is the dimension of the features before it ("-": none).
    Where weights are looked for: --weights PATH, then weights_env, then ~/.cache/cxrfair/NAME/,
    then the Hugging Face hub cache (docs/models.md).
    Any other model by name (open_clip:ARCH/TAG, hf:ORG/NAME, hf:PATH, ...) works with every
    --model without being listed here (docs/models.md, "Any model by name").
    """
    # Lazy like every command here: the registry and the model modules load only when run.
    from cxrfair.extract.fetch import SOURCES
    from cxrfair.extract.registry import list_specs

    rows = [_row(s, SOURCES.get(s.name)) for s in list_specs()]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=1))
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ",".join(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
        click.echo(buf.getvalue(), nl=False)
    else:
        header = tuple(h for _, h, _ in TEXT_COLUMNS)
        cells = [tuple(_cut(_text(r[k]), w) for k, _, w in TEXT_COLUMNS) for r in rows]
        click.echo(_table(header, cells))
        click.echo("every field, whole: --format json | csv; weights: cxrfair weights fetch NAME")


def _row(s, sources) -> dict:
    """A model's row: plain JSON values, every one of FIELDS."""
    fetch = "random" if s.tiny else "-" if not sources else "by hand" if any(f.manual for f in sources) else "weights fetch"
    targets = [] if not s.lora_targets else [s.lora_targets] if isinstance(s.lora_targets, str) else list(s.lora_targets)
    return {"name": s.name, "image_encoder": s.image_encoder, "text_encoder": s.text_encoder or "", "dim": s.embed_dim,
            "cached_embedding": s.embedding, "pre_projection": s.unprojected_dim, "weights_source": s.weights_source,
            "weights_env": s.weights_env or "", "fetch": fetch, "licence": s.license or "", "zero_shot": s.zero_shot,
            "lora_targets": targets, "description": s.description}


def _text(value) -> str:
    return "yes" if value is True else "no" if value is False else "-" if value in (None, "") else str(value)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(header: tuple, rows: list[tuple]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


@click.group()
def weights() -> None:
    """Download a model's released weights to where cxrfair looks for them."""


@weights.command("fetch")
@click.argument("model")
@click.option("--to", type=click.Path(path_type=Path), default=None,
              help="Folder to put the files in  [default: ~/.cache/cxrfair/MODEL, where cxrfair looks first]")
def fetch_weights(model: str, to: Path | None) -> None:
    """Download MODEL's weights from the source `cxrfair models list` names.

    URL downloads resume where an interrupted one stopped (MODEL's files keep a .part until whole)
    and are checked against the checksum the source publishes, where it publishes one; Hugging
    Face hub files come through huggingface_hub. Offline (HF_HUB_OFFLINE=1 or no network), and for
    files only a browser can download, it prints what to download and where to put each file.
    """
    from cxrfair.extract.fetch import Unreachable, fetch

    bar = _ByteBar()
    try:
        paths = fetch(model, to, progress=bar.update, say=lambda text: (bar.close(), click.echo(text)))
    except Unreachable as e:
        bar.close()
        click.echo(str(e))
        raise CxrfairError(f"model {model}: weights not (all) fetched; download the files above by hand") from None
    finally:
        bar.close()
    click.echo(f"model {model}: {len(paths)} file(s) in {paths[0].parent}")


class _ByteBar:
    """A tqdm bar on stderr, opened on the first progress report of each download."""

    def __init__(self) -> None:
        self.bar = None

    def update(self, have: int, total: int | None) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=0, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
        self.bar.update(have - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@click.group(invoke_without_command=True)
@click.option("--model", help=MODEL_HELP)
@click.option("--cohort", type=click.Path(path_type=Path), help="Cohort folder (cohort.csv + cohort.json).")
@click.option("--out", type=click.Path(path_type=Path),
              help="Folder for the cache: OUT/<model>.h5 (OUT/<model>-unprojected.h5 with --features unprojected).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per forward pass.")
@click.option("--workers", type=int, default=2, show_default=True, help="DataLoader decode workers.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="Weights file or folder (overrides env var / hub cache).")
@click.option("--images", type=click.Path(path_type=Path), default=None, help="Images root, overriding the cohort's.")
@click.option("--force", is_flag=True, help="Start over: discard partial progress and any existing cache at --out.")
@click.option("--skip-bad", is_flag=True, help="Leave unreadable images out (recorded in the cache) instead of failing.")
@click.option("--parts-dir", type=click.Path(path_type=Path), default=None,
              help="Under torchrun: where ranks write parts [OUT/<model>.h5.parts].")
@click.option("--prompt-scores/--no-prompt-scores", default=True, show_default=True,
              help="GLoRIA models: also store every image's global and local similarity to every prompt "
                   "(what GLoRIA's own zero-shot scoring needs; slower extraction). Ignored by other models.")
@click.option("--features", type=click.Choice(["projected", "unprojected"]), default="projected", show_default=True,
              help="projected: the joint image-text space (what zero-shot compares with text). unprojected: the image "
                   "encoder's features before that projection (models that have one; no text sets, so probes only).")
@click.pass_context
def extract(ctx, model, cohort, out, batch_size, workers, device, precision, weights, images, force, skip_bad, parts_dir,
            prompt_scores, features) -> None:
    """Embed a cohort with one model into an HDF5 cache (resumable; sharded under torchrun)."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [f"--{n}" for n, v in (("model", model), ("cohort", cohort), ("out", out)) if not v]
    if missing:
        raise CxrfairError(f"extract needs {', '.join(missing)} (see `cxrfair extract --help`)")
    from cxrfair.extract.registry import resolve_name

    model = resolve_name(model)  # contrastive:FOLDER -> the adapted model's registered name (extract.adapted)
    out = _out_folder(out, ctx) / cache_name(model, features)
    from cxrfair.extract.distributed import run_distributed, torchrun_env
    from cxrfair.extract.extractor import ExtractConfig
    from cxrfair.extract.extractor import extract as run_extract

    config = ExtractConfig(model=model, cohort=cohort, out=out, batch_size=batch_size, workers=workers, device=device,
                           precision=precision, weights=weights, images=images, force=force, skip_bad=skip_bad,
                           prompt_scores=prompt_scores, features=features)
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


def cache_name(model: str, features: str) -> str:
    """The cache's file name in the --out folder (the pipeline's cache/<model>.h5 for projected features);
    a by-name model's ``:`` and ``/`` become ``-`` (``hf:org/name`` -> ``hf-org-name.h5``)."""
    from cxrfair.core.runs import safe_name  # lazy like the library everywhere in this module

    stem = safe_name(model)
    return f"{stem}.h5" if features == "projected" else f"{stem}-{features}.h5"


def _out_folder(out: Path, ctx: click.Context) -> Path:
    """--out as a folder; a FILE.h5 (the old meaning) is refused naming the folder to pass instead."""
    if out.suffix == ".h5":
        raise click.UsageError(f"--out {out}: --out is a folder now (the cache goes to OUT/<model>.h5); "
                               f"pass --out {out.parent}", ctx=ctx)
    return out


@extract.command()
@click.argument("parts", nargs=-1, type=click.Path(path_type=Path))
@click.option("--parts-dir", type=click.Path(path_type=Path), default=None, help="Folder holding part-*-of-*.h5.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for the merged cache: OUT/<model>.h5, named after the parts' model and features.")
@click.option("--force", is_flag=True, help="Replace an existing merged cache.")
@click.pass_context
def merge(ctx, parts, parts_dir, out, force) -> None:
    """Join the part files of a sharded extraction into one cache (checks model, cohort, coverage)."""
    from cxrfair.extract.cache import read_cache
    from cxrfair.extract.distributed import find_parts, merge_parts

    out = _out_folder(out, ctx)
    if bool(parts) == bool(parts_dir):
        raise CxrfairError("merge needs either PARTS... or --parts-dir (not both)")
    files = list(parts) or find_parts(parts_dir)
    for f in files:
        if not f.is_file():
            raise CxrfairError(f"part {f}: no such file")
    first = read_cache(files[0])
    path = merge_parts(files, out / cache_name(first.model, first.attrs.get("features", "projected")), force=force)
    click.echo(f"merged {len(files)} part(s) into {path}")
