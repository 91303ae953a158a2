"""Benchmark: a mitigation sweep (strengths x configurations x seeds) as one compiled JAX program
against the same configurations one by one in a plain PyTorch loop, measured in the same run.

    .venv/bin/python benchmarks/mitigation_sweep.py [--epochs 150] [--torch-lanes 4] [--mitigations groupdro,reweight]
    .venv/bin/python benchmarks/mitigation_sweep.py --mitigations groupdro,fairot --torch-lanes 0 [--grid demo] [--repeat 3]

Workload: the paper's linear probe (840 train / 120 val / 240 test features of 512 dims, 6
classes, two sensitive groups), AdamW + cosine annealing, batch 64, best-validation-loss epoch;
grid: 4 strengths x 4 learning rates x 4 weight decays x 4 seeds = 256 lanes per mitigation.
GroupDRO (q over 12 (group, class) cells, updated every step) and reweight (cell weights) on
the AdamW path; fairot (the batch's debiased Sinkhorn divergence to each group's scores, every
step) has no PyTorch lane here. With several mitigations the last line prints each one's JAX
training time over the first's on the same grid (fairot / groupdro: the Sinkhorn term's cost).
``--grid demo`` is the demo's AdamW grid (1 lr x 2 weight decays x 2 seeds, 50 epochs; the
strengths stay 4). JAX: ``run_sweep``'s training time (compilation reported apart). PyTorch:
the same loss and update, one lane at a time; ``--torch-lanes`` lanes are timed and the mean
is extrapolated to all 256 (the loop's cost does not depend on the hyperparameters), after one
untimed one-epoch lane (PyTorch's warm-up).

This script may import torch; the probe stage itself never does.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

N_TRAIN, N_VAL, N_TEST, DIM, N_CLASSES, N_GROUPS = 840, 120, 240, 512, 6, 2
STRENGTHS = {"groupdro": (0.01, 0.03, 0.1, 0.3), "reweight": (0.25, 0.5, 0.75, 1.0), "fairot": (0.0, 0.1, 1.0, 10.0)}
LRS, WDS, SEEDS = (1e-4, 3e-4, 1e-3, 3e-3), (0.0, 1e-4, 1e-3, 1e-2), (0, 1, 2, 3)
GRIDS = {"paper": (LRS, WDS, SEEDS), "demo": ((3e-3,), (0.0, 1e-2), (0, 1))}  # demo: cxrfair.pipeline's demo probe grid


def data(seed: int = 0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(N_CLASSES, DIM)) * 0.3
    x, y, g = {}, {}, {}
    for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)):
        y[split] = (np.arange(n) % N_CLASSES).astype(np.int32)
        g[split] = (rng.uniform(size=n) < 0.3).astype(np.int32)
        x[split] = (means[y[split]] * np.where(g[split] == 1, 0.5, 1.0)[:, None] + rng.normal(size=(n, DIM))).astype(np.float32)
    return x, y, {"train": g["train"], "val": g["val"], "names": ["a", "b"]}


def jax_sweep(mitigation: str, x, y, groups, epochs: int, grid: str = "paper", budget_mb: float = 4096) -> dict:
    from cxrfair.probe.sweep import SweepConfig, run_sweep

    lrs, wds, seeds = GRIDS[grid]
    cfg = SweepConfig(solver="adamw", lrs=lrs, weight_decays=wds, seeds=seeds, epochs=epochs, mitigation=mitigation,
                      sensitive="g", strengths=STRENGTHS[mitigation], memory_budget_mb=budget_mb)
    res = run_sweep(x, y, N_CLASSES, cfg, groups)
    return {"compile_s": res.timings["compile_s"], "train_s": res.timings["train_s"], "lanes": len(seeds) * len(res.configs),
            "chunks": res.timings.get("chunks", 1)}


def torch_lane(mitigation: str, strength: float, lr: float, wd: float, seed: int, x, y, groups, epochs: int) -> None:
    """One configuration, the textbook way: nn.Linear, AdamW, CosineAnnealingLR, randperm batches."""
    import torch

    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x["train"]), torch.from_numpy(y["train"]).long()
    cell = torch.from_numpy(groups["train"]).long() * N_CLASSES + yt
    xv, yv = torch.from_numpy(x["val"]), torch.from_numpy(y["val"]).long()
    counts = torch.bincount(cell, minlength=N_GROUPS * N_CLASSES).float()
    raw = torch.where(counts > 0, counts.clamp(min=1) ** -strength, torch.zeros_like(counts))
    weights = raw * counts.sum() / (counts * raw).sum()
    q = (counts > 0).float() / (counts > 0).sum()
    model = torch.nn.Linear(DIM, N_CLASSES)
    steps = epochs * math.ceil(N_TRAIN / 64)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    best, best_state = float("inf"), None
    for _ in range(epochs):
        for idx in torch.randperm(N_TRAIN).split(64):
            losses = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx], reduction="none")
            if mitigation == "reweight":
                loss = (losses * weights[cell[idx]]).mean()
            else:
                onehot = torch.nn.functional.one_hot(cell[idx], len(counts)).float()
                cell_loss = losses @ onehot / onehot.sum(0).clamp(min=1)
                q = q * torch.exp(strength * cell_loss.detach())
                q = q / q.sum()
                loss = q @ cell_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            val = torch.nn.functional.cross_entropy(model(xv), yv).item()
        if val < best:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: 150 (paper grid), 50 (demo grid)")
    parser.add_argument("--torch-lanes", type=int, default=4, help="0: JAX only")
    parser.add_argument("--mitigations", default="groupdro,reweight")
    parser.add_argument("--grid", choices=tuple(GRIDS), default="paper")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the mitigations in turn this many times; the ratio uses each one's fastest run "
                             "(on a shared machine the load moves between runs)")
    parser.add_argument("--memory-budget-mb", type=float, default=4096,
                        help="the sweep's lane-chunk budget (default: every lane in one chunk)")
    args = parser.parse_args()
    epochs = args.epochs or (150 if args.grid == "paper" else 50)
    names = args.mitigations.split(",")
    unknown = [n for n in names if n not in STRENGTHS]
    if unknown:
        parser.error(f"--mitigations: {', '.join(unknown)} not in {', '.join(STRENGTHS)}")
    x, y, groups = data()
    times = {}
    for _ in range(args.repeat):
        print(f"load average {os.getloadavg()[0]:.2f} {time.strftime('%H:%M:%S', time.gmtime())} UTC", flush=True)
        for mitigation in names:
            jx = jax_sweep(mitigation, x, y, groups, epochs, args.grid, args.memory_budget_mb)
            times[mitigation] = min(times.get(mitigation, math.inf), jx["train_s"])
            line = (f"{mitigation}: {jx['lanes']} lanes, {epochs} epochs | JAX one program: train {jx['train_s']:.2f} s "
                    f"(+ compile {jx['compile_s']:.1f} s)" + (f" in {jx['chunks']} chunks" if jx["chunks"] > 1 else ""))
            if args.torch_lanes and mitigation != "fairot":
                line += " | " + torch_comparison(mitigation, x, y, groups, epochs, args.torch_lanes, jx)
            print(line, flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} {time.strftime('%H:%M:%S', time.gmtime())} UTC", flush=True)
    if len(times) > 1:
        first = names[0]
        fastest = " (fastest of each)" if args.repeat > 1 else ""
        print("same grid, JAX training time over " + first + f"'s{fastest}: "
              + ", ".join(f"{n} {t / times[first]:.2f}x" for n, t in times.items() if n != first))


def torch_comparison(mitigation: str, x, y, groups, epochs: int, lanes: int, jx: dict) -> str:
    import torch

    torch.set_num_threads(1)  # the lanes are small; one thread is PyTorch's fastest here
    # One untimed lane first: PyTorch's first calls (kernel dispatch set-up, allocator) are its
    # warm-up, as JAX's compilation is reported apart.
    torch_lane(mitigation, STRENGTHS[mitigation][0], LRS[0], WDS[0], 99, x, y, groups, 1)
    t0 = time.perf_counter()
    for i in range(lanes):
        torch_lane(mitigation, STRENGTHS[mitigation][i % 4], LRS[i % 4], WDS[0], i, x, y, groups, epochs)
    per_lane = (time.perf_counter() - t0) / lanes
    torch_total = per_lane * jx["lanes"]
    return (f"PyTorch one by one: {per_lane:.2f} s/lane x {jx['lanes']} = {torch_total:.1f} s (extrapolated from "
            f"{lanes}) | ratio {torch_total / jx['train_s']:.1f}x (with compile "
            f"{torch_total / (jx['train_s'] + jx['compile_s']):.1f}x)")


if __name__ == "__main__":
    main()
