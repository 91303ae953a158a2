"""Benchmark: a 64-configuration linear-probe sweep in JAX against a plain PyTorch loop, and the
default L-BFGS sweep against scikit-learn.

    .venv/bin/python benchmarks/probe_sweep.py [--torch-configs 3] [--repeats 3] [--skip-lbfgs]

Workload (the paper's linear probe): 840 train / 120 val / 240 test features of 512 dims,
6 classes, AdamW + cosine annealing over all steps, batch 64 (last batch kept), 150 epochs,
best-validation-loss epoch kept. Grid: 8 learning rates x 8 weight decays, one seed.

Measures
  - JAX training alone: the compiled ``train_sweep`` program (compile excluded), best of N runs.
  - PyTorch: the same recipe one configuration at a time (``torch_fit``), as the textbook loop
    with a DataLoader ("plain") and as a leaner loop indexing a randperm ("lean"); a few
    configurations of each are timed and the fastest is extrapolated to 64 (best case).
  - End to end: ``cxrfair probe linear`` in a subprocess on an HDF5 cache of the same features
    (Python start, imports, cache read, compilation, training and writing the runs).
  - The machine's matmul peak: a large ``jnp.dot`` timed in this script; the sweep's FLOP rate
    counts its matrix multiplies (forward x W and backward dW, padded rows included, plus the
    validation pass each epoch).
  - L-BFGS (the default solver since issue 11): the default linear sweep (standardised features,
    the default L2 grid, one seed, full batch) as one compiled *vmapped* program (``train_sweep``;
    since issue 27 ``run_sweep`` runs L-BFGS lanes one at a time instead, measured end to end
    against scikit-learn by ``benchmarks/probe_mlp.py``), against scikit-learn's
    ``LogisticRegression`` (lbfgs) fitted once per grid value at the same C = 1/(l2 N) on the
    same standardised features, with the same gradient tolerance (1e-4) and iteration cap.

This script may import torch; the probe stage itself never does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_TRAIN, N_VAL, N_TEST, DIM, N_CLASSES = 840, 120, 240, 512, 6
EPOCHS, BATCH = 150, 64
LRS = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2]
WDS = [0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


def features(seed: int = 0):
    """Overlapping classes with anisotropic noise (power-law spectrum), like image embeddings."""
    rng = np.random.default_rng(seed)
    axes, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    mix = axes * (3.0 / np.sqrt(np.arange(1, DIM + 1)))
    means = rng.normal(size=(N_CLASSES, DIM)) * 0.01
    x, y = {}, {}
    for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)):
        y[split] = (np.arange(n) % N_CLASSES).astype(np.int32)
        x[split] = (means[y[split]] + rng.normal(size=(n, DIM)) @ mix.T).astype(np.float32)
    return x, y


def jax_sweep(x, y, repeats: int) -> dict:
    import jax

    from cxrfair.probe import train
    from cxrfair.probe.sweep import SweepConfig, _hyper

    cfg = SweepConfig(solver="adamw", standardize=False, lrs=tuple(LRS), weight_decays=tuple(WDS), seeds=(0,),
                      epochs=EPOCHS, batch_size=BATCH)
    configs = cfg.configurations()
    hyper = _hyper({k: np.array([c[k] for c in configs]) for k in ("lr", "weight_decay", "hidden", "l2")},
                   np.arange(len(configs)), len(configs))
    data = train.Data(*(jax.numpy.asarray(a) for a in (x["train"], y["train"], x["val"], y["val"], x["test"])))
    recipe = train.Recipe(n_classes=N_CLASSES, epochs=EPOCHS, batch_size=BATCH)
    keys = train.seed_keys([0])
    t0 = time.perf_counter()
    program = train.train_sweep.lower(keys, hyper, data, recipe).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(program(keys, hyper, data))
        times.append(time.perf_counter() - t0)
    acc = (np.asarray(out.test_probs[0]).argmax(-1) == y["test"]).mean(-1)
    return {"compile_s": compile_s, "train_s": min(times), "train_runs_s": times, "lanes": len(configs),
            "best_test_acc": float(acc.max())}


def torch_fit(x, y, lr: float, wd: float, seed: int = 0, loader: bool = True) -> float:
    """The same recipe in plain PyTorch, one configuration; returns the best validation loss.

    ``loader=True`` is the textbook loop (``DataLoader(TensorDataset, batch_size=64,
    shuffle=True)``); ``loader=False`` indexes a ``randperm`` directly (leaner, faster).
    """
    import torch

    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x["train"]), torch.from_numpy(y["train"]).long()
    xv, yv = torch.from_numpy(x["val"]), torch.from_numpy(y["val"]).long()
    model = torch.nn.Linear(DIM, N_CLASSES)
    steps = math.ceil(N_TRAIN / BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS * steps)
    loss_fn = torch.nn.CrossEntropyLoss()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, yt), batch_size=BATCH, shuffle=True)
    best, best_state = math.inf, None
    for _ in range(EPOCHS):
        if loader:
            batches = iter(data)
        else:
            perm = torch.randperm(N_TRAIN)
            batches = ((xt[perm[i:i + BATCH]], yt[perm[i:i + BATCH]]) for i in range(0, N_TRAIN, BATCH))
        for xb, yb in batches:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            val = loss_fn(model(xv), yv).item()
        if val < best:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
    return best


def torch_baseline(x, y, n_configs: int, threads: int) -> dict:
    import torch

    # One thread by default: on 2 shared cores, 2 intra-op threads on these tiny ops spin-wait
    # against other jobs (0.7 to 37 s per configuration measured); 1 thread is stable.
    torch.set_num_threads(threads)
    out = {"threads": torch.get_num_threads(), "version": torch.__version__, "timed_configs": n_configs}
    for name, loader in (("plain", True), ("lean", False)):
        torch_fit(x, y, LRS[0], WDS[0], loader=loader)  # warm-up: first-call allocations
        times = []
        for k in range(n_configs):
            t0 = time.perf_counter()
            torch_fit(x, y, LRS[(3 * k) % 8], WDS[(5 * k) % 8], loader=loader)
            times.append(time.perf_counter() - t0)
        # The fastest configuration, extrapolated: the baseline's best case.
        out[name] = {"per_config_s": float(np.min(times)), "mean_config_s": float(np.mean(times)),
                     "config_times_s": times, "extrapolated_64_s": 64 * float(np.min(times))}
    return out


def end_to_end(x, y) -> dict:
    import pandas as pd

    from cxrfair.extract.cache import write_cache

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        emb = np.concatenate([x["train"], x["val"], x["test"]])
        labels = np.concatenate([y["train"], y["val"], y["test"]])
        splits = ["train"] * N_TRAIN + ["val"] * N_VAL + ["test"] * N_TEST
        table = pd.DataFrame({"image_id": [f"{i:08d}_000.png" for i in range(len(emb))], "path": "x.png",
                              "patient_id": np.arange(len(emb)), "label": [f"c{k}" for k in labels],
                              "sex": "M", "age": 40, "age_group": "young", "split": splits})
        write_cache(tmp / "cache.h5", image_embeddings=emb, cohort_table=table,
                    classes=[f"c{k}" for k in range(N_CLASSES)], text={},
                    attrs={"model": "bench", "weights_id": "none", "cohort_hash": "0" * 64, "logit_scale": 100.0})
        cli = Path(sys.executable).with_name("cxrfair")
        cmd = [str(cli), "probe", "linear", "--cache", str(tmp / "cache.h5"), "--out", str(tmp / "runs"),
               "--solver", "adamw", "--no-standardize", "--lr", ",".join(map(str, LRS)), "--weight-decay", ",".join(map(str, WDS)), "--seeds", "1",
               "--epochs", str(EPOCHS), "--batch-size", str(BATCH)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        wall = time.perf_counter() - t0
        meta = json.loads((tmp / "runs" / "bench__linear__best__s0" / "run.json").read_text())
    return {"wall_s": wall, "timings_in_run": meta["timings"]}


def lbfgs_vs_sklearn(x, y, repeats: int) -> dict:
    """The default linear sweep (L-BFGS, standardised, default L2 grid, one seed) against
    scikit-learn's LogisticRegression at the same C values, one fit after another."""
    import jax
    from sklearn.linear_model import LogisticRegression

    from cxrfair.probe import train
    from cxrfair.probe.sweep import SweepConfig, _hyper, feature_stats, standardize

    cfg = SweepConfig(seeds=(0,))
    stats = feature_stats(x["train"])
    xs = {k: standardize(v, stats) for k, v in x.items()}
    configs = cfg.configurations()
    hyper = _hyper({k: np.array([c[k] for c in configs]) for k in ("lr", "weight_decay", "hidden", "l2")},
                   np.arange(len(configs)), len(configs))
    data = train.Data(*(jax.numpy.asarray(a) for a in (xs["train"], y["train"], xs["val"], y["val"], xs["test"])))
    recipe = train.Recipe(n_classes=N_CLASSES, solver="lbfgs", max_iter=cfg.max_iter)
    keys = train.seed_keys([0])
    t0 = time.perf_counter()
    program = train.train_sweep.lower(keys, hyper, data, recipe).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(program(keys, hyper, data))
        times.append(time.perf_counter() - t0)
    sk_times, sk_iters, agree = [], [], []
    for k, l2 in enumerate(cfg.l2_grid):
        t0 = time.perf_counter()
        model = LogisticRegression(C=1 / (l2 * N_TRAIN), tol=recipe.gtol, max_iter=cfg.max_iter).fit(xs["train"], y["train"])
        sk_times.append(time.perf_counter() - t0)
        sk_iters.append(int(model.n_iter_[0]))
        agree.append(float(np.mean(model.predict(xs["test"]) == np.asarray(out.test_probs[0, k]).argmax(-1))))
    return {"configs": len(configs), "compile_s": compile_s, "train_s": min(times), "train_runs_s": times,
            "iterations": np.asarray(out.best_epoch[0]).tolist(), "sklearn_s": float(np.sum(sk_times)),
            "sklearn_per_config_s": sk_times, "sklearn_iterations": sk_iters, "test_prediction_agreement": agree,
            "speedup_vs_sklearn": float(np.sum(sk_times)) / min(times)}


def matmul_peak(n: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of a large float32 jnp.dot on this machine (best of ``repeats``)."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def sweep_flops(lanes: int) -> float:
    """Matmul FLOPs of the sweep: per step x W (2BDC) and dW (2BDC); per epoch the val pass."""
    steps = math.ceil(N_TRAIN / BATCH)
    per_lane = EPOCHS * (steps * 4 * BATCH * DIM * N_CLASSES + 2 * N_VAL * DIM * N_CLASSES)
    return lanes * per_lane


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch-configs", type=int, default=4, help="PyTorch configurations to time (then extrapolated to 64)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of the compiled sweep (best taken)")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch.set_num_threads for the baseline")
    ap.add_argument("--skip-cli", action="store_true")
    ap.add_argument("--skip-lbfgs", action="store_true")
    args = ap.parse_args()
    x, y = features()
    peak = matmul_peak()
    jx = jax_sweep(x, y, args.repeats)
    th = torch_baseline(x, y, args.torch_configs, args.torch_threads)
    e2e = None if args.skip_cli else end_to_end(x, y)
    lb = None if args.skip_lbfgs else lbfgs_vs_sklearn(x, y, args.repeats)
    rate = sweep_flops(jx["lanes"]) / jx["train_s"]
    result = {
        "machine": {"cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
        "jax": jx, "torch": th, "end_to_end": e2e, "lbfgs": lb,
        **{f"speedup_training_vs_{k}": th[k]["extrapolated_64_s"] / jx["train_s"] for k in ("plain", "lean")},
        **({} if e2e is None else {f"speedup_end_to_end_vs_{k}": th[k]["extrapolated_64_s"] / e2e["wall_s"]
                                   for k in ("plain", "lean")}),
        "matmul_peak_gflops": peak / 1e9, "sweep_gflops": rate / 1e9, "fraction_of_peak": rate / peak,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
