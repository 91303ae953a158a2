"""Extraction throughput: the whole image pipeline against the bare model forward, as a ratio.

    python benchmarks/extract_throughput.py [--size 512] [--images 192] [--workers 2] [--vitb16 48]

Pipeline = what ``cxrfair extract`` does per image: PNG decode + resize/crop in DataLoader workers,
uint8 batch to the device, normalise, ``encode_image``, and each chunk written atomically to the
partial folder (``embed_missing``). Bare = ``normalize`` + ``encode_image`` over the same batches,
already decoded and held in memory. ``busy`` = pipeline images/s / bare images/s: the share of
time the model would be computing if the forward were the only work. Goal: >= 0.9.

Models: ``tiny-clip`` (64 px input: decoding dominates on CPU) and, with ``--vitb16 N``, a
random-init ViT-B-16-quickgelu (the real clip-vit-b16 architecture) over N images.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxrfair.extract.cohort import CohortConfig, build_cohort
from cxrfair.extract.extractor import ExtractConfig, embed_missing, encode_batch, open_partial
from cxrfair.extract.registry import get_spec, load_model
from cxrfair.extract.synth import SynthConfig, make_synth


def make_data(root: Path, size: int, n_images: int) -> tuple[list[str], Path]:
    """Synthetic NIH PNGs of ``size`` px and a cohort; returns (image paths, cohort folder)."""
    per_group = max(1, n_images // 24)
    make_synth(SynthConfig(out=root / "nih", size=size, per_cell=per_group + 1))
    cohort = build_cohort(CohortConfig.from_preset("nih-6x200", out=root / "cohort", metadata=root / "nih" / "Data_Entry_2017.csv",
                                                   images=root / "nih", per_group=per_group))
    return [str(p) for p in cohort.image_paths()], root / "cohort"


def time_pipeline(fm, paths: list[str], batch: int, workers: int, root: Path) -> float:
    """Seconds for decode -> prepare -> forward -> chunk writes over ``paths``."""
    folder = root / f"partial-{fm.name}-{time.monotonic_ns()}"
    ident = {"model": fm.name, "weights_id": fm.weights_id, "cohort_hash": "bench", "precision": "fp32",
             "rows": [0, len(paths)], "chunk_rows": batch}
    open_partial(folder, ident, force=True)
    config = ExtractConfig(model=fm.name, cohort=root, out=root / "x.h5", batch_size=batch, workers=workers,
                           progress=False)
    t = time.perf_counter()
    embed_missing(fm, paths, folder, batch, config, torch.device("cpu"))
    seconds = time.perf_counter() - t
    shutil.rmtree(folder)
    return seconds


def time_bare(fm, paths: list[str], batch: int) -> float:
    """Seconds for normalize + encode_image alone, over the same batches preloaded as uint8 tensors."""
    pixels = []
    for p in paths:
        with Image.open(p) as im:
            pixels.append(fm.preprocess.prepare(im))
    batches = [torch.from_numpy(np.stack(pixels[i:i + batch])) for i in range(0, len(pixels), batch)]
    t = time.perf_counter()
    for b in batches:
        encode_batch(fm, b, torch.device("cpu"), "fp32")
    return time.perf_counter() - t


def time_decode(fm, paths: list[str], batch: int, workers: int) -> float:
    """Seconds for the DataLoader alone (decode + prepare + batching): the input side's ceiling."""
    from cxrfair.extract.extractor import make_loader

    t = time.perf_counter()
    for _ in make_loader(paths, list(range(len(paths))), fm.preprocess, batch, workers, False):
        pass
    return time.perf_counter() - t


def measure(fm, paths: list[str], batch: int, workers: int, root: Path, repeats: int) -> dict:
    """Best of ``repeats`` for each side (the machine is shared; the best run is the least disturbed)."""
    time_bare(fm, paths[:batch], batch)  # warm-up: allocator, kernels
    pipe = min(time_pipeline(fm, paths, batch, workers, root) for _ in range(repeats))
    bare = min(time_bare(fm, paths, batch) for _ in range(repeats))
    decode = min(time_decode(fm, paths, batch, workers) for _ in range(repeats))
    n = len(paths)
    # busy: share of pipeline time the forward needs. vs_bottleneck: pipeline against its slower
    # stage alone (decode or forward); near 1 means the stages overlap and nothing else costs.
    return {"model": fm.name, "images": n, "batch": batch, "workers": workers, "pipeline_img_s": n / pipe,
            "bare_img_s": n / bare, "decode_img_s": n / decode, "busy": bare / pipe, "vs_bottleneck": max(bare, decode) / pipe}


def vitb16_random():
    """The clip-vit-b16 architecture with random weights, behind the registry interface."""
    import open_clip

    from cxrfair.extract.models import openclip as oc

    spec = get_spec("clip-vit-b16")
    return oc.openclip_bundle(spec, oc.build_clip_vit_b16(), open_clip.get_tokenizer(oc.CLIP_ARCH), oc.CLIP_PREPROCESS,
                              "random-init(seed=0)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="PNG side in pixels")
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vitb16", type=int, default=0, help="also time a random ViT-B/16 over this many images")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cxrfair-bench-"))
    try:
        paths, _ = make_data(root, args.size, args.images)
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
              f"load {os.getloadavg()[0]:.1f}; {len(paths)} PNGs of {args.size} px")
        rows = [measure(load_model(m), paths, args.batch, args.workers, root, args.repeats)
                for m in ("tiny-clip", "tiny-biomedclip")]
        if args.vitb16:
            rows.append(measure(vitb16_random(), paths[:args.vitb16], 8, args.workers, root, 1))
        for r in rows:
            print(f"{r['model']:>16}: pipeline {r['pipeline_img_s']:7.1f} img/s | bare forward {r['bare_img_s']:7.1f} img/s"
                  f" | decode only {r['decode_img_s']:6.1f} img/s | busy {r['busy']:4.0%} | vs bottleneck {r['vs_bottleneck']:4.0%}"
                  f" ({r['images']} images, batch {r['batch']}, {r['workers']} workers)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
