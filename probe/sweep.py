"""Linear / MLP probe sweeps: the grid, chunking to a memory budget, selection, writing runs.

``run_sweep`` takes arrays and returns a ``SweepResult``; ``probe_cache`` is the I/O edge used
by the CLI (cache in, runs + ``<model>__<method>__sweep.csv`` out).

Selection: the configuration with the lowest validation loss (each lane's best epoch), averaged
over seeds; ties go to the first in grid order. One run per seed is written for it.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfair.errors import CxrfairError

METHODS = ("linear", "mlp")


@dataclass(frozen=True)
class SweepConfig:
    """A probe sweep: the grid, the seeds and the paper's training recipe."""

    method: str = "linear"  # "linear" or "mlp"
    lrs: tuple = (1e-4, 3e-4, 1e-3, 3e-3)  # peak learning rates (cosine-annealed to 0)
    weight_decays: tuple = (0.0, 1e-4, 1e-2)  # AdamW decoupled weight decay
    hiddens: tuple = (256, 512)  # MLP hidden widths (ignored by the linear probe)
    seeds: tuple = (0, 1, 2)  # each seed fixes initialisation and data order
    epochs: int = 150  # paper: 150
    batch_size: int = 64  # paper: 64
    memory_budget_mb: float = 1024.0  # estimated working set per compiled chunk

    def validate(self) -> "SweepConfig":
        """Raise CxrfairError naming the option that is unusable; return self."""
        if self.method not in METHODS:
            raise CxrfairError(f"method {self.method!r}: expected one of {', '.join(METHODS)}")
        grid = {"--lr": self.lrs, "--weight-decay": self.weight_decays, "--seeds": self.seeds}
        if self.method == "mlp":
            grid["--hidden"] = self.hiddens
        for option, values in grid.items():
            if len(values) == 0:
                raise CxrfairError(f"{option}: the grid is empty; give at least one value")
        _check(all(math.isfinite(v) and v > 0 for v in self.lrs), "--lr", "learning rates must be positive numbers")
        _check(all(math.isfinite(v) and v >= 0 for v in self.weight_decays), "--weight-decay", "weight decays must be >= 0")
        _check(self.method != "mlp" or all(int(h) >= 1 for h in self.hiddens), "--hidden", "hidden widths must be >= 1")
        _check(len(set(self.seeds)) == len(self.seeds), "--seeds", "seeds must be distinct")
        _check(self.epochs >= 1, "--epochs", "must be >= 1")
        _check(self.batch_size >= 1, "--batch-size", "must be >= 1")
        _check(self.memory_budget_mb > 0, "--memory-budget", "must be > 0 MB")
        return self

    def configurations(self) -> list[dict]:
        """The grid in a fixed order: hidden (MLP), then lr, then weight decay."""
        hiddens = [int(h) for h in self.hiddens] if self.method == "mlp" else [0]
        return [{"lr": float(lr), "weight_decay": float(wd), "hidden": h}
                for h, lr, wd in itertools.product(hiddens, self.lrs, self.weight_decays)]


def _check(ok: bool, option: str, why: str) -> None:
    if not ok:
        raise CxrfairError(f"{option}: {why}")


@dataclass
class SweepResult:
    """Everything a sweep measured, as NumPy.

    Attributes:
        configs: K configurations (``SweepConfig.configurations`` order).
        seeds: S seeds.
        table: one row per configuration × seed (the ``sweep.csv`` rows).
        selected: index into ``configs`` of the chosen configuration.
        best_val_loss, best_epoch: (S, K); best_epoch 0-based.
        train_loss, val_loss: (S, K, E) per-epoch curves.
        val_probs: (S, K, Nv, C); test_probs: (S, K, Nt, C), from each lane's kept parameters.
        timings: seconds (``compile``, ``train``, ``total``) and the chunk plan.
    """

    configs: list
    seeds: tuple
    table: pd.DataFrame
    selected: int
    best_val_loss: np.ndarray
    best_epoch: np.ndarray
    train_loss: np.ndarray
    val_loss: np.ndarray
    val_probs: np.ndarray
    test_probs: np.ndarray
    timings: dict = field(default_factory=dict)

    @property
    def best_config(self) -> dict:
        return self.configs[self.selected]


# ---------------------------------------------------------------- chunking


def lane_bytes(dim: int, n_classes: int, max_hidden: int, batch_size: int, n_eval: int, epochs: int) -> int:
    """Rough working set of one lane (bytes): parameters and their copies, activations, outputs.

    Parameters are held ~8 times (params, best params, Adam mu and nu, gradients, updates and
    XLA's loop double-buffering); activations of a step and of evaluation ~4 times.
    """
    width = max_hidden if max_hidden else n_classes
    n_params = dim * width + width + (max_hidden * n_classes + n_classes if max_hidden else 0)
    activations = 4 * (batch_size + n_eval) * (width + n_classes)
    outputs = 2 * epochs + n_eval * n_classes
    return 4 * (8 * n_params + activations + outputs)


def plan_chunks(n_seeds: int, n_configs: int, per_lane: int, budget_bytes: float) -> tuple[int, int]:
    """(seeds per chunk, configurations per chunk) whose lanes fit ``budget_bytes``.

    Configurations are kept together first, since lanes that share a seed share each matmul.
    At least one lane per chunk, whatever the budget.
    """
    lanes = max(1, int(budget_bytes // max(per_lane, 1)))
    configs = min(n_configs, lanes)
    seeds = min(n_seeds, max(1, lanes // configs))
    return seeds, configs


def _pad(values: np.ndarray, size: int) -> np.ndarray:
    # Chunks all have one shape so one executable serves them; padding repeats the last entry.
    return np.concatenate([values, np.repeat(values[-1:], max(0, size - len(values)), axis=0)])


# ---------------------------------------------------------------- the sweep


def run_sweep(x: dict, y: dict, n_classes: int, cfg: SweepConfig) -> SweepResult:
    """Train every configuration × seed of ``cfg`` and select one on validation loss.

    Args:
        x: split -> (N_split, D) float32 features for "train", "val", "test".
        y: split -> (N_split,) int labels for "train", "val".
        n_classes: C.
        cfg: the sweep (validated here).
    """
    from cxrfair.probe import train

    configs = cfg.validate().configurations()
    hyper = {k: np.array([c[k] for c in configs]) for k in ("lr", "weight_decay", "hidden")}
    recipe = train.Recipe(n_classes=n_classes, epochs=cfg.epochs, batch_size=cfg.batch_size,
                          max_hidden=int(hyper["hidden"].max()))
    data = train.Data(np.asarray(x["train"], np.float32), np.asarray(y["train"], np.int32),
                      np.asarray(x["val"], np.float32), np.asarray(y["val"], np.int32), np.asarray(x["test"], np.float32))
    per_lane = lane_bytes(x["train"].shape[1], n_classes, recipe.max_hidden, cfg.batch_size,
                          len(x["val"]) + len(x["test"]), cfg.epochs)
    s_chunk, k_chunk = plan_chunks(len(cfg.seeds), len(configs), per_lane, cfg.memory_budget_mb * 2**20)
    seeds = np.array(cfg.seeds)

    t0 = time.perf_counter()
    program = _program(recipe, tuple(a.shape for a in data), s_chunk, k_chunk)
    t1 = time.perf_counter()
    lanes = _run_chunks(program, data, hyper, seeds, s_chunk, k_chunk)
    timings = {"compile_s": t1 - t0, "train_s": time.perf_counter() - t1, "seeds_per_chunk": s_chunk,
               "configs_per_chunk": k_chunk, "chunks": math.ceil(len(seeds) / s_chunk) * math.ceil(len(configs) / k_chunk)}
    return _result(configs, tuple(int(s) for s in seeds), lanes, y["val"], timings)


@functools.lru_cache(maxsize=8)
def _program(recipe, shapes: tuple, s_chunk: int, k_chunk: int):
    """The compiled sweep for one chunk shape; every chunk (padded) and every later sweep of the
    same shapes reuses it, so compile time is paid once per process."""
    import jax

    from cxrfair.probe import train

    f32, i32 = jax.numpy.float32, jax.numpy.int32
    spec = jax.ShapeDtypeStruct
    data = train.Data(spec(shapes[0], f32), spec(shapes[1], i32), spec(shapes[2], f32), spec(shapes[3], i32), spec(shapes[4], f32))
    hyper = train.Hyper(spec((k_chunk,), f32), spec((k_chunk,), f32), spec((k_chunk,), i32))
    return train.train_sweep.lower(spec((s_chunk, 2), jax.numpy.uint32), hyper, data, recipe).compile()


def _run_chunks(program, data, hyper: dict, seeds: np.ndarray, s_chunk: int, k_chunk: int) -> dict:
    """Run the compiled program over (seed chunk, config chunk) blocks; (S, K, ...) NumPy arrays."""
    import jax

    from cxrfair.probe.train import seed_keys

    n_configs = len(hyper["lr"])
    rows = []
    for s0 in range(0, len(seeds), s_chunk):
        keys, n_s = seed_keys(_pad(seeds[s0:s0 + s_chunk], s_chunk)), len(seeds[s0:s0 + s_chunk])
        row = []
        for k0 in range(0, n_configs, k_chunk):
            idx = np.arange(k0, min(k0 + k_chunk, n_configs))
            out = jax.device_get(program(keys, _hyper(hyper, idx, k_chunk), data))
            row.append({f: getattr(out, f)[:n_s, :len(idx)] for f in out._fields})  # drop the padding
        rows.append({f: np.concatenate([r[f] for r in row], axis=1) for f in row[0]})
    return {f: np.concatenate([r[f] for r in rows], axis=0) for f in rows[0]}


def _hyper(hyper: dict, idx: np.ndarray, size: int):
    from cxrfair.probe.train import Hyper

    idx = _pad(idx, size)
    return Hyper(np.asarray(hyper["lr"][idx], np.float32), np.asarray(hyper["weight_decay"][idx], np.float32),
                 np.asarray(hyper["hidden"][idx], np.int32))


def _result(configs: list, seeds: tuple, lanes: dict, y_val: np.ndarray, timings: dict) -> SweepResult:
    val_acc = (lanes["val_probs"].argmax(-1) == np.asarray(y_val)).mean(-1)  # (S, K)
    mean_loss = lanes["best_val_loss"].mean(0)  # a lane that diverged from epoch 1 keeps inf
    if not np.isfinite(mean_loss).any():
        raise CxrfairError("every configuration diverged (validation loss NaN/inf from the first epoch); lower --lr")
    selected = int(np.argmin(mean_loss))  # argmin takes the first of ties
    rows = [{"config": k, "lr": c["lr"], "weight_decay": c["weight_decay"], "hidden": c["hidden"], "seed": s,
             "best_val_loss": float(lanes["best_val_loss"][i, k]), "best_epoch": int(lanes["best_epoch"][i, k]) + 1,
             "val_accuracy": float(val_acc[i, k]), "selected": k == selected}
            for k, c in enumerate(configs) for i, s in enumerate(seeds)]
    return SweepResult(configs, seeds, pd.DataFrame(rows), selected, lanes["best_val_loss"], lanes["best_epoch"],
                       lanes["train_loss"], lanes["val_loss"], lanes["val_probs"], lanes["test_probs"], timings)


# ---------------------------------------------------------------- writing


def probe_cache(cache_path: Path | str, out: Path | str, cfg: SweepConfig, force: bool = False) -> list[Path]:
    """Sweep a cache's features and write one run per seed of the selected configuration.

    Also writes ``out/<model>__<method>__sweep.csv`` (every configuration × seed). Every check
    that can fail (cache, grid, runs folder) happens before training, so nothing is half-written.

    Returns:
        The run folders written.
    """
    from cxrfair.analysis.runs import RunKey, safe_name
    from cxrfair.probe.inputs import check_runs_dir, load_inputs

    cfg.validate()
    t0 = time.perf_counter()
    inputs = load_inputs(cache_path)
    run_ids = [RunKey(safe_name(inputs.model), cfg.method, "best", int(s)).run_id for s in cfg.seeds]
    check_runs_dir(out, inputs.cohort_hash, run_ids, force)
    result = run_sweep(inputs.x, inputs.y, len(inputs.classes), cfg)
    result.timings["total_s"] = time.perf_counter() - t0
    return write_sweep(out, inputs, cfg, result, run_ids, force)


def write_sweep(out, inputs, cfg: SweepConfig, result: SweepResult, run_ids: list[str], force: bool) -> list[Path]:
    """Write the selected configuration's runs (one per seed), then the sweep table."""
    from cxrfair.analysis.runs import make_predictions, write_run
    from cxrfair.io import atomic_path
    from cxrfair.probe.train import count_params

    best, k = result.best_config, result.selected
    dim = inputs.x["train"].shape[1]
    paths = []
    for i, (seed, run_id) in enumerate(zip(result.seeds, run_ids)):
        probs = np.concatenate([result.val_probs[i, k], result.test_probs[i, k]])
        meta = {
            "run_id": run_id, "model": inputs.model, "method": cfg.method, "seed": int(seed),
            "classes": inputs.classes, "cohort_hash": inputs.cohort_hash,
            "hyperparameters": _hyperparameters(cfg, best),
            "selected_epoch": int(result.best_epoch[i, k]) + 1,  # 1-based: epoch 1 is the first pass
            "trainable_params": count_params(dim, len(inputs.classes), best["hidden"]),
            "timings": {key: v for key, v in result.timings.items() if key.endswith("_s")},
            "curves": {"train_loss": result.train_loss[i, k].tolist(), "val_loss": result.val_loss[i, k].tolist()},
            "source": inputs.source,
            "notes": (f"selected by lowest validation loss (best epoch, mean over {len(result.seeds)} seeds) "
                      f"among {len(result.configs)} configurations; see {_sweep_name(run_id)}"),
        }
        paths.append(write_run(out, meta, make_predictions(inputs.rows, probs, inputs.classes), force=force))
    with atomic_path(Path(out) / _sweep_name(run_ids[0])) as tmp:
        result.table.to_csv(tmp, index=False)
    return paths


def _sweep_name(run_id: str) -> str:
    from cxrfair.analysis.runs import parse_run_id

    return parse_run_id(run_id).sweep_file


def _hyperparameters(cfg: SweepConfig, best: dict) -> dict:
    from cxrfair.probe.train import ADAM_B1, ADAM_B2, ADAM_EPS

    chosen = {"lr": best["lr"], "weight_decay": best["weight_decay"]}
    if cfg.method == "mlp":
        chosen["hidden"] = best["hidden"]
    return {**chosen, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "optimizer": "adamw",
            "betas": [ADAM_B1, ADAM_B2], "eps": ADAM_EPS, "schedule": "cosine annealing to 0 over all steps",
            "last_batch": "kept, padded and masked (drop_last=False)",
            "selection": "lowest best-epoch validation loss, mean over seeds",
            "grid": {"lr": list(cfg.lrs), "weight_decay": list(cfg.weight_decays),
                     **({"hidden": list(cfg.hiddens)} if cfg.method == "mlp" else {})},
            "seeds": list(cfg.seeds)}
