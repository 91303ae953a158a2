"""Sharded extraction under ``torchrun`` and the merge of its parts into one cache.

Each rank takes a disjoint contiguous shard of cohort rows and runs the ordinary (resumable)
extraction into its own part file ``FILE.h5.parts/part-RRRRR-of-WWWWW.h5`` (a complete cache of
those rows, with a ``shard`` attribute). When every rank is done, rank 0 merges the parts if it
can see them all (shared filesystem); otherwise ``cxrfair extract merge`` joins them later.
Merging checks that the parts agree on model, weights, cohort and precision and cover every row
exactly once.
"""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfair.errors import CxrfairError
from cxrfair.extract.cache import PromptScores, read_cache, write_cache
from cxrfair.extract.cohort import load_cohort
from cxrfair.extract.extractor import ExtractResult, check_existing_cache, extract

SAME = ("model", "weights_id", "cohort_hash", "precision")


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def shard_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of ``rank``: contiguous, disjoint, sizes differing by at most one."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def default_parts_dir(out: Path) -> Path:
    """``FILE.h5.parts/`` beside the final cache."""
    return Path(out).with_name(Path(out).name + ".parts")


def part_path(parts_dir: Path, rank: int, world: int) -> Path:
    """The part file of ``rank`` out of ``world``."""
    return Path(parts_dir) / f"part-{rank:05d}-of-{world:05d}.h5"


def extract_shard(config, rank: int, world: int, parts_dir: Path):
    """Run this rank's share of ``config`` into its part file; returns the ExtractResult."""
    n = len(load_cohort(config.cohort).table)
    start, stop = shard_rows(n, rank, world)
    shard = {"rank": rank, "world": world, "start": start, "stop": stop, "n_total": n}
    part = replace(config, out=part_path(parts_dir, rank, world), rows=(start, stop),
                   extra_attrs={**config.extra_attrs, "shard": shard})
    return extract(part)


def run_distributed(config, parts_dir: Path | None = None):
    """Under torchrun: extract this rank's shard, wait for all ranks, rank 0 merges into ``config.out``.

    Returns (this rank's ExtractResult, merged path or None).
    """
    import torch
    import torch.distributed as dist

    rank, world, local_rank = torchrun_env() or (0, 1, 0)
    parts_dir = Path(parts_dir or default_parts_dir(config.out))
    # Same rule as a single-process run: a complete cache for this model and cohort is left alone.
    existing = check_existing_cache(config.out, config.model, load_cohort(config.cohort).hash, config.force)
    if existing is not None:
        return ExtractResult(config.out, "exists", existing, [], 0.0, 0.0), None
    if config.device in ("auto", "cuda") and torch.cuda.is_available():
        config = replace(config, device=f"cuda:{local_rank}")
    # gloo only carries the barrier (no tensors), so it works for CPU and GPU ranks alike.
    dist.init_process_group("gloo", timeout=timedelta(hours=24))
    try:
        result = extract_shard(config, rank, world, parts_dir)
        dist.barrier()
        merged = None
        parts = [part_path(parts_dir, r, world) for r in range(world)]
        if rank == 0 and all(p.is_file() for p in parts):
            merged = merge_parts(parts, config.out, force=config.force)
        dist.barrier()
        return result, merged
    finally:
        dist.destroy_process_group()


def find_parts(parts_dir: Path) -> list[Path]:
    """The part files in ``parts_dir`` (sorted), or a CxrfairError if there are none."""
    parts = sorted(Path(parts_dir).glob("part-*-of-*.h5"))
    if not parts:
        raise CxrfairError(f"--parts-dir {parts_dir}: no part-*-of-*.h5 files; run the sharded extraction first")
    return parts


def merge_parts(parts: list[Path], out: Path, force: bool = False) -> Path:
    """Join part caches into ``out`` after checking they agree and cover every cohort row once."""
    if Path(out).exists() and not force:
        raise CxrfairError(f"--out {out}: already exists; pass --force to replace it")
    caches = sorted((read_cache(p) for p in parts), key=lambda c: _shard(c)["start"])
    _check_agree(caches)
    _check_coverage(caches)
    first = caches[0]
    text = first.text
    for c in caches[1:]:
        _check_text(text, c)
    attrs = {k: v for k, v in first.attrs.items() if k not in ("shard", "format", "format_version", "complete",
                                                                "embed_dim", "classes", "n_images", "created")}
    attrs["skipped_images"] = [s for c in caches for s in c.attrs.get("skipped_images", [])]
    attrs["merged_from"] = [{"file": Path(c.path).name, **_shard(c)} for c in caches]
    write_cache(out, image_embeddings=np.concatenate([c.image_embeddings for c in caches]),
                cohort_table=pd.concat([c.table for c in caches], ignore_index=True), classes=first.classes,
                text=text, attrs=attrs, prompt_scores=_merged_scores(caches))
    return Path(out)


def _merged_scores(caches):
    """The parts' prompt scores stacked in row order (GLoRIA caches), or None."""
    scores = [c.prompt_scores for c in caches]
    if all(s is None for s in scores):
        return None
    if any(s is None or s.prompts != scores[0].prompts for s in scores):
        raise CxrfairError("parts: their prompt scores differ (some parts have none, or other prompts); "
                           "merge only parts of the same extraction")
    return PromptScores(scores[0].prompts, np.concatenate([s.global_sim for s in scores]),
                        np.concatenate([s.local_sim for s in scores]))


def _shard(cache) -> dict:
    shard = cache.attrs.get("shard")
    if not isinstance(shard, dict):
        raise CxrfairError(f"part {cache.path}: not a shard of a sharded extraction (no 'shard' attribute)")
    return shard


def _check_agree(caches) -> None:
    first = caches[0]
    for c in caches[1:]:
        diff = [f"{k} {first.attrs.get(k)!r} vs {c.attrs.get(k)!r}" for k in SAME if c.attrs.get(k) != first.attrs.get(k)]
        if c.classes != first.classes:
            diff.append("classes")
        if diff:
            raise CxrfairError(f"parts {first.path} and {c.path} differ ({'; '.join(diff)}); "
                               "merge only parts of the same extraction")


def _check_coverage(caches) -> None:
    shards = [_shard(c) for c in caches]
    n, world = shards[0]["n_total"], shards[0]["world"]
    if len(shards) != world or any(s["n_total"] != n or s["world"] != world for s in shards):
        raise CxrfairError(f"parts: {len(shards)} file(s) given, but the extraction had {world} shards; "
                           "pass every part (or --parts-dir) of one run")
    expected = 0
    for c, s in zip(caches, shards):
        if s["start"] > expected:
            raise CxrfairError(f"parts: rows {expected}..{s['start'] - 1} of {n} are missing (no part covers them); "
                               "pass every part of one run")
        if s["start"] < expected:
            raise CxrfairError(f"parts: part {c.path} covers rows from {s['start']}, already covered by another part; "
                               "pass each part of one run once")
        expected = s["stop"]
    if expected != n:
        raise CxrfairError(f"parts: rows {expected}..{n - 1} of {n} are missing; pass every part of one run")


def _check_text(text: dict, cache) -> None:
    # Every rank embeds the same prompts with the same weights; a mismatch means mixed runs.
    for name, te in text.items():
        other = cache.text.get(name)
        if other is None or not np.allclose(other.embeddings, te.embeddings, atol=1e-4):
            raise CxrfairError(f"part {cache.path}: text embeddings of prompt set {name!r} differ from the first part's")


__all__ = ["default_parts_dir", "extract_shard", "find_parts", "merge_parts", "part_path", "run_distributed",
           "shard_rows", "torchrun_env"]
