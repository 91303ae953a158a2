"""Time per fine-tuning step with 1 process vs N DDP processes (Gloo on CPU, NCCL on GPUs), same global batch.

Each configuration runs as its own ``torchrun --standalone`` launch of this script's worker,
which trains through the real path (``sampler.plan_epoch`` -> ``Prefetcher`` -> ``train_step``
through DDP with the summed-gradient hook) on random pixels: 3 warm-up steps, then ``--steps``
timed steps of the global batch. The baseline is the plain single-process path (torchrun with
one process takes it: no process group, no DDP), measured in the same run, with 1 thread and
with as many threads as the N processes have together.

Usage: python benchmarks/finetune_ddp.py [--model tiny-clip] [--method lora] [--nproc 2]
       [--steps 20] [--batch-size 64] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args) -> None:
    """One process of a launch: train ``--steps`` steps and (rank 0) write the timing to ``--result``."""
    import logging

    import numpy as np
    import torch

    from cxrfair.extract.registry import load_model
    from cxrfair.finetune import data as fdata
    from cxrfair.finetune import distributed as D
    from cxrfair.finetune import train as T
    from cxrfair.finetune.config import FinetuneConfig
    from cxrfair.finetune.sampler import plan_epoch

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    with D.session(args.device) as d:
        device = T.resolve_device(args.device, d)
        fm = load_model(args.model, device=str(device))
        cfg = FinetuneConfig(model=args.model, cohort=".", out=".", method=args.method, batch_size=args.batch_size)
        model = D.sync_batchnorm(T.build_classifier(fm, 6, cfg).to(device), d, device)
        state = T.create_state(model, cfg, total_steps=args.steps + 3)
        state.ddp = D.wrap_ddp(model, d, device, fm.preprocess.size) if d.active else None
        rt = T.Runtime(device, bf16=device.type == "cuda", normalize=fm.preprocess.normalize)
        size, rng = fm.preprocess.size, np.random.default_rng(0)
        pixels = rng.integers(0, 256, (args.batch_size * 4, 3, size, size), dtype=np.uint8)
        labels = rng.integers(0, 6, len(pixels))

        def run(n_steps: int) -> dict:
            order = np.arange(n_steps * args.batch_size) % len(pixels)
            steps = plan_epoch(order, args.batch_size, d.rank, d.world)
            return T.train_epoch(state, fdata.Prefetcher(pixels, labels, steps, device), rt, d=d)

        run(3)
        d.barrier()
        t0 = time.perf_counter()
        stats = run(args.steps)
        d.barrier()
        seconds = time.perf_counter() - t0
        if d.main:
            Path(args.result).write_text(json.dumps({
                "world": d.world, "threads": args.threads, "ms_per_step": 1e3 * seconds / args.steps,
                "images_per_s": stats["images"] / seconds, "wait_pct": 100 * stats["wait"] / stats["seconds"],
                "trainable": T.count_trainable(model)}))


def launch(args, nproc: int, threads: int) -> dict:
    """One torchrun launch of the worker; its rank 0's timing."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               __file__, "--worker", "--result", str(result), "--threads", str(threads), "--model", args.model,
               "--method", args.method, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--device", args.device]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"launch with {nproc} process(es) failed:\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-clip")
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    rows = [launch(args, 1, 1)]
    if args.device == "cpu" and args.nproc > 1:
        rows.append(launch(args, 1, args.nproc))  # the same cores, used by threads instead of processes
    rows.append(launch(args, args.nproc, 1))
    base = rows[0]["ms_per_step"]
    try:
        load = f"{os.getloadavg()[0]:.1f}"
    except OSError:
        load = "?"
    print(f"{args.model} {args.method}, global batch {args.batch_size}, {args.steps} timed steps, device {args.device}, "
          f"{os.cpu_count()} CPUs, load {load}, {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}")
    print("| processes | threads each | ms/step | images/s | data wait | vs 1 process, 1 thread |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['world']} | {r['threads']} | {r['ms_per_step']:.1f} | {r['images_per_s']:.0f} | "
              f"{r['wait_pct']:.1f}% | {base / r['ms_per_step']:.2f}x |")


if __name__ == "__main__":
    main()
