"""Time per fine-tuning step and the share of it spent waiting for data.

Runs the real training path (``Prefetcher`` over a uint8 image cache -> ``train_step``) on
random pixels, so it measures compute and the data path, not PNG decoding (done once, before
training, by ``finetune.data.image_cache``). Goal: data wait < 5% of step time.

- tiny-clip (2 layers, width 64, 64 px) on CPU, fp32, LoRA and full;
- when CUDA is available: a ViT-B/16-sized open_clip model (``ViT-B-16-quickgelu``, random
  weights, 224 px) in bf16 autocast, LoRA and full. Skipped cleanly without a GPU.
- ``--vit-cpu N``: the same ViT-B/16 on CPU in fp32, N steps of ``--vit-cpu-batch`` images (what
  a step costs at real model size without a GPU; slow).

Usage: python benchmarks/finetune_step.py [--steps 30] [--batch-size 64] [--threads 1] [--vit-cpu 0]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from cxrfair.extract.models.openclip import OPENCLIP_VIT_LORA
from cxrfair.extract.preprocess import Preprocess
from cxrfair.extract.registry import load_model
from cxrfair.finetune import data as fdata
from cxrfair.finetune import train as T
from cxrfair.finetune.config import FinetuneConfig
from cxrfair.finetune.sampler import index_batches


def bench(fm, method: str, size: int, batch: int, steps: int, device: torch.device, bf16: bool,
          memmap_dir: Path | None = None) -> dict:
    """Train ``steps`` steps after 3 warm-up steps; returns ms/step, data-wait % and images/s.

    ``memmap_dir``: serve the pixels from an ``np.memmap`` file there (the big-cohort path)
    instead of an in-memory array.
    """
    cfg = FinetuneConfig(model=fm.spec.name, cohort=".", out=".", method=method, batch_size=batch)
    model = T.build_classifier(fm, 6, cfg).to(device)
    state = T.create_state(model, cfg, total_steps=steps + 3)
    rt = T.Runtime(device, bf16=bf16, normalize=fm.preprocess.normalize)
    n = batch * (steps + 3)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (min(n, 4096), 3, size, size), dtype=np.uint8)  # cache rows are reused
    if memmap_dir is not None:
        mm = np.memmap(memmap_dir / "pixels.u8", dtype=np.uint8, mode="w+", shape=pixels.shape)
        mm[:] = pixels
        mm.flush()
        pixels = np.memmap(memmap_dir / "pixels.u8", dtype=np.uint8, mode="r", shape=pixels.shape)
    labels = rng.integers(0, 6, len(pixels))
    order = np.arange(n) % len(pixels)
    warm, timed = order[: 3 * batch], order[3 * batch:]
    T.train_epoch(state, fdata.Prefetcher(pixels, labels, index_batches(warm, batch), device), rt)
    stats = T.train_epoch(state, fdata.Prefetcher(pixels, labels, index_batches(timed, batch), device), rt)
    return {"method": method, "trainable": T.count_trainable(model), "ms_per_step": 1e3 * stats["seconds"] / steps,
            "wait_pct": 100 * stats["wait"] / stats["seconds"], "images_per_s": stats["images"] / stats["seconds"]}


def vit_b16(device: torch.device):
    """A random ViT-B/16 CLIP image tower behind the registry interface fine-tuning uses."""
    import open_clip

    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None, device=device)
    spec = SimpleNamespace(name="vit-b16-random", lora_targets=OPENCLIP_VIT_LORA)
    return SimpleNamespace(spec=spec, image_encoder=model.visual, embed_dim=512, preprocess=Preprocess(size=224, resize=224))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)  # the dev machines share 2 cores
    p.add_argument("--vit-cpu", type=int, default=0, help="timed ViT-B/16 steps on CPU (0: skip)")
    p.add_argument("--vit-cpu-batch", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # open_clip's "no pretrained weights" notice
    rows = []
    cpu = torch.device("cpu")
    for method in ("lora", "full"):
        rows.append({"model": "tiny-clip (64 px)", "device": f"CPU x{args.threads}", "precision": "fp32",
                     **bench(load_model("tiny-clip"), method, 64, args.batch_size, args.steps, cpu, bf16=False)})
    with tempfile.TemporaryDirectory() as tmp:
        rows.append({"model": "tiny-clip (64 px), memmap cache", "device": f"CPU x{args.threads}", "precision": "fp32",
                     **bench(load_model("tiny-clip"), "lora", 64, args.batch_size, args.steps, cpu, False, Path(tmp))})
    for method in ("lora", "full") if args.vit_cpu else ():
        rows.append({"model": "ViT-B/16 (224 px)", "device": f"CPU x{args.threads}", "precision": "fp32",
                     **bench(vit_b16(cpu), method, 224, args.vit_cpu_batch, args.vit_cpu, cpu, bf16=False)})
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        for method in ("lora", "full"):
            rows.append({"model": "ViT-B/16 (224 px)", "device": torch.cuda.get_device_name(), "precision": "bf16",
                         **bench(vit_b16(gpu), method, 224, args.batch_size, args.steps, gpu, bf16=True)})
    else:
        print("CUDA not available: ViT-B/16 bf16 benchmark skipped")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, batch {args.batch_size}, "
          f"{args.steps} timed steps, load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d')}")
    print("| model | device | precision | method | trainable params | ms/step | data wait | images/s |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['device']} | {r['precision']} | {r['method']} | {r['trainable']:,} | "
              f"{r['ms_per_step']:.1f} | {r['wait_pct']:.2f}% | {r['images_per_s']:.0f} |")


if __name__ == "__main__":
    main()
