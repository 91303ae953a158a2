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
SOLVERS = ("lbfgs", "adamw")
SELECTIONS = ("loss", "accuracy")
SELECTION_TEXT = {"loss": "lowest validation loss, mean over seeds",
                  "accuracy": "highest validation accuracy, mean over seeds (ties: lower validation loss)"}
# Default L2 penalties per method (linear: sklearn C = 1/(l2*N), for N = 840 from C ~ 1200 to
# C ~ 0.12). The MLP's two weight layers share the penalty and need more of it (measured on the
# demo cache: benchmarks/RESULTS.md, "Probes against a tuned logistic regression").
L2_GRIDS = {"linear": (1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
            "mlp": (1e-3, 3e-3, 1e-2, 2e-2, 3e-2, 1e-1)}


@dataclass(frozen=True)
class SweepConfig:
    """A probe sweep: the grid, the seeds and the solver.

    Default: standardised features and full-batch L-BFGS over an L2 grid, which reaches a tuned
    scikit-learn ``LogisticRegression``. The paper's recipe is ``solver="adamw",
    standardize=False`` (AdamW, cosine annealing, batch 64, 150 epochs, grid over lr x weight decay).
    """

    method: str = "linear"  # "linear" or "mlp"
    solver: str = "lbfgs"  # "lbfgs" (full batch, L2 grid) or "adamw" (the paper's minibatch recipe)
    standardize: bool = True  # z-score features with the training split's mean and sd first
    l2s: tuple | None = None  # L-BFGS: L2 penalties l2/2*||W||^2 (sklearn C = 1/(l2*N)); None: L2_GRIDS[method]
    lrs: tuple = (1e-4, 3e-4, 1e-3, 3e-3)  # AdamW: peak learning rates (cosine-annealed to 0)
    weight_decays: tuple = (0.0, 1e-4, 1e-2)  # AdamW: decoupled weight decay
    hiddens: tuple = (256, 512)  # MLP hidden widths (ignored by the linear probe)
    seeds: tuple = (0, 1, 2)  # each seed fixes initialisation (and AdamW's data order)
    epochs: int = 150  # AdamW; paper: 150
    batch_size: int = 64  # AdamW; paper: 64
    max_iter: int = 1000  # L-BFGS: iterations at most
    select: str = "loss"  # choose the configuration by mean validation "loss" or "accuracy" (ties: loss)
    memory_budget_mb: float = 1024.0  # estimated working set per compiled chunk

    @property
    def l2_grid(self) -> tuple:
        """The L2 grid in force (``l2s``, or the method's default)."""
        return tuple(self.l2s) if self.l2s is not None else L2_GRIDS.get(self.method, L2_GRIDS["linear"])

    def validate(self) -> "SweepConfig":
        """Raise CxrfairError naming the option that is unusable; return self."""
        if self.method not in METHODS:
            raise CxrfairError(f"method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.solver not in SOLVERS:
            raise CxrfairError(f"--solver {self.solver!r}: expected one of {', '.join(SOLVERS)}")
        grid = {"--seeds": self.seeds}
        grid |= {"--l2": self.l2_grid} if self.solver == "lbfgs" else {"--lr": self.lrs, "--weight-decay": self.weight_decays}
        if self.method == "mlp":
            grid["--hidden"] = self.hiddens
        for option, values in grid.items():
            if len(values) == 0:
                raise CxrfairError(f"{option}: the grid is empty; give at least one value")
        _check(all(math.isfinite(v) and v > 0 for v in self.lrs), "--lr", "learning rates must be positive numbers")
        _check(all(math.isfinite(v) and v >= 0 for v in self.weight_decays), "--weight-decay", "weight decays must be >= 0")
        _check(all(math.isfinite(v) and v >= 0 for v in self.l2_grid), "--l2", "L2 penalties must be numbers >= 0")
        _check(self.select in SELECTIONS, "--select", f"choose one of {', '.join(SELECTIONS)}")
        _check(self.method != "mlp" or all(_is_int(h) and h >= 1 for h in self.hiddens), "--hidden",
               "hidden widths must be whole numbers >= 1, e.g. 256,512")
        _check(len(set(self.seeds)) == len(self.seeds), "--seeds", "seeds must be distinct")
        _check(self.epochs >= 1, "--epochs", "must be >= 1")
        _check(self.batch_size >= 1, "--batch-size", "must be >= 1")
        _check(self.max_iter >= 1, "--max-iter", "must be >= 1")
        _check(self.memory_budget_mb > 0, "--memory-budget", "must be > 0 MB")
        return self

    def configurations(self) -> list[dict]:
        """The grid in a fixed order: hidden (MLP), then lr and weight decay (AdamW) or l2 (L-BFGS).

        Every configuration has all four keys; those the solver does not use are NaN.
        """
        hiddens = [int(h) for h in self.hiddens] if self.method == "mlp" else [0]
        nan = float("nan")
        if self.solver == "lbfgs":
            return [{"lr": nan, "weight_decay": nan, "l2": float(l2), "hidden": h}
                    for h, l2 in itertools.product(hiddens, self.l2_grid)]
        return [{"lr": float(lr), "weight_decay": float(wd), "l2": nan, "hidden": h}
                for h, lr, wd in itertools.product(hiddens, self.lrs, self.weight_decays)]


def _check(ok: bool, option: str, why: str) -> None:
    if not ok:
        raise CxrfairError(f"{option}: {why}")


def _is_int(value) -> bool:
    try:
        return float(value) == int(value)
    except (TypeError, ValueError, OverflowError):
        return False


@dataclass
class SweepResult:
    """Everything a sweep measured, as NumPy.

    Attributes:
        configs: K configurations (``SweepConfig.configurations`` order).
        seeds: S seeds.
        table: one row per configuration × seed (the ``sweep.csv`` rows).
        selected: index into ``configs`` of the chosen configuration.
        best_val_loss, best_epoch: (S, K); best_epoch 0-based (L-BFGS: iterations run).
        train_loss, val_loss: (S, K, E) per-epoch (L-BFGS: per-iteration) curves.
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
    feature_stats: dict | None = None  # {"mean": (D,), "std": (D,)} of the training split if standardised

    @property
    def best_config(self) -> dict:
        return self.configs[self.selected]


# ---------------------------------------------------------------- chunking


# Copies of the parameters a lane holds. AdamW: params, best params, Adam mu and nu, gradients,
# updates and XLA's loop double-buffering. L-BFGS: 2 x 10 memory pairs, params, gradients, the
# line search's trial point, direction and gradient, and double-buffering.
ADAMW_COPIES, LBFGS_COPIES = 8, 30


def lane_bytes(dim: int, n_classes: int, max_hidden: int, batch_size: int, n_eval: int, epochs: int,
               copies: int = ADAMW_COPIES) -> int:
    """Rough working set of one lane (bytes): parameters and their copies, activations, outputs.

    ``batch_size`` is the rows of one step (the training split for full-batch L-BFGS) and
    ``epochs`` the length of the curves; activations of a step and of evaluation count ~4 times.
    """
    width = max_hidden if max_hidden else n_classes
    n_params = dim * width + width + (max_hidden * n_classes + n_classes if max_hidden else 0)
    activations = 4 * (batch_size + n_eval) * (width + n_classes)
    outputs = 2 * epochs + n_eval * n_classes
    return 4 * (copies * n_params + activations + outputs)


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
    hyper = {k: np.array([c[k] for c in configs]) for k in ("lr", "weight_decay", "hidden", "l2")}
    recipe = train.Recipe(n_classes=n_classes, epochs=cfg.epochs, batch_size=cfg.batch_size,
                          max_hidden=int(hyper["hidden"].max()), solver=cfg.solver, max_iter=cfg.max_iter)
    stats = feature_stats(x["train"]) if cfg.standardize else None
    x = {k: standardize(v, stats) for k, v in x.items()}
    data = train.Data(np.asarray(x["train"], np.float32), np.asarray(y["train"], np.int32),
                      np.asarray(x["val"], np.float32), np.asarray(y["val"], np.int32), np.asarray(x["test"], np.float32))
    per_lane = lane_bytes(x["train"].shape[1], n_classes, recipe.max_hidden,
                          len(x["train"]) if cfg.solver == "lbfgs" else cfg.batch_size,
                          len(x["val"]) + len(x["test"]), cfg.max_iter if cfg.solver == "lbfgs" else cfg.epochs,
                          copies=LBFGS_COPIES if cfg.solver == "lbfgs" else ADAMW_COPIES)
    s_chunk, k_chunk = plan_chunks(len(cfg.seeds), len(configs), per_lane, cfg.memory_budget_mb * 2**20)
    seeds = np.array(cfg.seeds)

    t0 = time.perf_counter()
    program = _program(recipe, tuple(a.shape for a in data), s_chunk, k_chunk)
    t1 = time.perf_counter()
    lanes = _run_chunks(program, data, hyper, seeds, s_chunk, k_chunk)
    timings = {"compile_s": t1 - t0, "train_s": time.perf_counter() - t1, "seeds_per_chunk": s_chunk,
               "configs_per_chunk": k_chunk, "chunks": math.ceil(len(seeds) / s_chunk) * math.ceil(len(configs) / k_chunk)}
    return _result(configs, tuple(int(s) for s in seeds), lanes, y["val"], timings, stats, cfg.solver, cfg.select)


def feature_stats(x_train: np.ndarray) -> dict:
    """Per-feature mean and sd (ddof 0) of the training split: ``{"mean": (D,), "std": (D,)}``.

    A constant feature gets sd 1 (it is only centred), so standardising never divides by 0.
    """
    x = np.asarray(x_train, np.float64)
    std = x.std(0)
    return {"mean": x.mean(0).astype(np.float32), "std": np.where(std > 1e-12, std, 1.0).astype(np.float32)}


def standardize(x: np.ndarray, stats: dict | None) -> np.ndarray:
    """(N, D) features z-scored with ``stats`` (from ``feature_stats``); unchanged if None."""
    if stats is None:
        return np.asarray(x, np.float32)
    return ((np.asarray(x, np.float32) - stats["mean"]) / stats["std"]).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _program(recipe, shapes: tuple, s_chunk: int, k_chunk: int):
    """The compiled sweep for one chunk shape; every chunk (padded) and every later sweep of the
    same shapes reuses it, so compile time is paid once per process."""
    import jax

    from cxrfair.probe import train

    f32, i32 = jax.numpy.float32, jax.numpy.int32
    spec = jax.ShapeDtypeStruct
    data = train.Data(spec(shapes[0], f32), spec(shapes[1], i32), spec(shapes[2], f32), spec(shapes[3], i32), spec(shapes[4], f32))
    hyper = train.Hyper(spec((k_chunk,), f32), spec((k_chunk,), f32), spec((k_chunk,), i32), spec((k_chunk,), f32))
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
    # Keys a solver does not use are NaN in the grid; the program gets 0 for them.
    value = lambda k, dtype: np.nan_to_num(np.asarray(hyper[k][idx], np.float64)).astype(dtype)  # noqa: E731
    return Hyper(value("lr", np.float32), value("weight_decay", np.float32), value("hidden", np.int32), value("l2", np.float32))


def _result(configs: list, seeds: tuple, lanes: dict, y_val: np.ndarray, timings: dict, stats: dict | None,
            solver: str, select: str = "loss") -> SweepResult:
    val_acc = (lanes["val_probs"].argmax(-1) == np.asarray(y_val)).mean(-1)  # (S, K)
    mean_loss = lanes["best_val_loss"].mean(0)  # a lane that diverged from epoch 1 keeps inf
    mean_loss = np.where(np.isfinite(mean_loss), mean_loss, np.inf)
    if not np.isfinite(mean_loss).any():
        fix = "lower --lr" if solver == "adamw" else "check the features, or try --solver adamw"
        raise CxrfairError(f"every configuration diverged (validation loss NaN/inf from the start); {fix}")
    selected = select_config(mean_loss, val_acc.mean(0), select)
    rows = [{"config": k, "lr": c["lr"], "weight_decay": c["weight_decay"], "l2": c["l2"], "hidden": c["hidden"], "seed": s,
             "best_val_loss": float(lanes["best_val_loss"][i, k]), **_progress(solver, lanes["best_epoch"][i, k]),
             "val_accuracy": float(val_acc[i, k]), "selected": k == selected}
            for k, c in enumerate(configs) for i, s in enumerate(seeds)]
    return SweepResult(configs, seeds, pd.DataFrame(rows), selected, lanes["best_val_loss"], lanes["best_epoch"],
                       lanes["train_loss"], lanes["val_loss"], lanes["val_probs"], lanes["test_probs"], timings, stats)


def select_config(mean_loss: np.ndarray, mean_acc: np.ndarray, select: str) -> int:
    """Index of the chosen configuration: lowest mean validation loss, or (``"accuracy"``) highest
    mean validation accuracy with ties to the lower loss; then the first in grid order."""
    if select == "accuracy":
        order = np.lexsort((np.arange(len(mean_loss)), mean_loss, -mean_acc))
        return int(order[0])
    return int(np.argmin(mean_loss))  # argmin takes the first of ties


def _progress(solver: str, value) -> dict:
    # AdamW keeps its best epoch (1-based); L-BFGS its final iterate after this many iterations.
    if solver == "lbfgs":
        return {"best_epoch": None, "iterations": int(value)}
    return {"best_epoch": int(value) + 1, "iterations": None}


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
        steps = int(result.best_epoch[i, k])
        meta = {
            "run_id": run_id, "model": inputs.model, "method": cfg.method, "seed": int(seed),
            "classes": inputs.classes, "cohort_hash": inputs.cohort_hash,
            "hyperparameters": _hyperparameters(cfg, best) | ({"iterations": steps} if cfg.solver == "lbfgs" else {}),
            # 1-based epoch of the kept AdamW parameters; L-BFGS keeps its final iterate (no epochs).
            "selected_epoch": steps + 1 if cfg.solver == "adamw" else None,
            "trainable_params": count_params(dim, len(inputs.classes), best["hidden"]),
            "timings": {key: v for key, v in result.timings.items() if key.endswith("_s")},
            "curves": _curves(result, i, k, cfg.solver),
            "solver": cfg.solver, "standardize": cfg.standardize,
            **({"standardization": _stats_meta(result.feature_stats, len(inputs.x["train"]))} if cfg.standardize else {}),
            "source": inputs.source,
            "notes": _notes(cfg, result, run_id),
        }
        paths.append(write_run(out, meta, make_predictions(inputs.rows, probs, inputs.classes), force=force))
    with atomic_path(Path(out) / _sweep_name(run_ids[0])) as tmp:
        result.table.to_csv(tmp, index=False)
    return paths


def _curves(result: SweepResult, i: int, k: int, solver: str) -> dict:
    # L-BFGS curves are per iteration; after convergence they repeat, so they are cut there.
    n = max(int(result.best_epoch[i, k]), 1) if solver == "lbfgs" else result.train_loss.shape[-1]
    return {"train_loss": result.train_loss[i, k, :n].tolist(), "val_loss": result.val_loss[i, k, :n].tolist()}


def _stats_meta(stats: dict, n_train: int) -> dict:
    """The training-split statistics every split was standardised with (run.json ``standardization``)."""
    return {"fitted_on": "train", "n": n_train, "ddof": 0, "rule": "(x - mean) / std; std 0 -> 1",
            "mean": [float(v) for v in stats["mean"]], "std": [float(v) for v in stats["std"]]}


def _notes(cfg: SweepConfig, result: SweepResult, run_id: str) -> str:
    how = ("full-batch L-BFGS to convergence (final iterate)" if cfg.solver == "lbfgs"
           else "AdamW, cosine annealing, best-validation-loss epoch kept")
    feats = "features standardised with the training split's mean and sd" if cfg.standardize else "raw features"
    return (f"{how}; {feats}; selected by {SELECTION_TEXT[cfg.select]} ({len(result.seeds)} seeds) "
            f"among {len(result.configs)} configurations; see {_sweep_name(run_id)}")


def _sweep_name(run_id: str) -> str:
    from cxrfair.analysis.runs import parse_run_id

    return parse_run_id(run_id).sweep_file


def _hyperparameters(cfg: SweepConfig, best: dict) -> dict:
    """run.json ``hyperparameters``: the chosen values, the solver's settings and the grid."""
    hidden = {"hidden": best["hidden"]} if cfg.method == "mlp" else {}
    hidden_grid = {"hidden": list(cfg.hiddens)} if cfg.method == "mlp" else {}
    common = {"selection": SELECTION_TEXT[cfg.select], "seeds": list(cfg.seeds)}
    if cfg.solver == "lbfgs":
        from cxrfair.probe.train import GTOL

        return {"l2": best["l2"], **hidden, "optimizer": "lbfgs", "batch": "full training split",
                "objective": "mean cross-entropy + l2/2 * ||weights||^2 (biases not penalised)",
                "max_iter": cfg.max_iter, "gtol": GTOL, "memory_size": 10,
                "linesearch": "zoom (strong Wolfe)", **common, "grid": {"l2": list(cfg.l2_grid), **hidden_grid}}
    from cxrfair.probe.train import ADAM_B1, ADAM_B2, ADAM_EPS

    return {"lr": best["lr"], "weight_decay": best["weight_decay"], **hidden, "epochs": cfg.epochs,
            "batch_size": cfg.batch_size, "optimizer": "adamw", "betas": [ADAM_B1, ADAM_B2], "eps": ADAM_EPS,
            "schedule": "cosine annealing to 0 over all steps", "last_batch": "kept, padded and masked (drop_last=False)",
            **common, "grid": {"lr": list(cfg.lrs), "weight_decay": list(cfg.weight_decays), **hidden_grid}}
