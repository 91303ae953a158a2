"""Linear / MLP probe sweeps: the grid, running the lanes (L-BFGS one per device, warm-started;
AdamW vmapped in chunks that fit a memory budget), selection, writing runs.

``run_sweep`` takes arrays and returns a ``SweepResult``; ``probe_cache`` is the I/O edge used
by the CLI (cache in, runs + ``<model>__<method>__sweep.csv`` out).

Selection: the configuration with the lowest validation loss (each lane's best epoch), averaged
over seeds; ties go to the first in grid order. One run per seed is written for it.

Multi-label caches (targets (N, C) in {1, 0, NaN}) train the same sweep on the masked sigmoid
cross-entropy (``cxrfair.probe.train.task_losses``) and write one ``p_<C>`` per condition;
they are selected by validation loss (``--select accuracy`` is multi-class only), and the sweep
table's ``val_accuracy`` is empty and ``val_auc_macro`` (masked macro AUC) filled instead.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from cxrfair.core import mitigations
from cxrfair.core.multilabel import auc_macro
from cxrfair.core.runs import TRACKING_DIR, RunKey, check_runs_folder, parse_run_id, safe_name, write_run
from cxrfair.errors import CxrfairError, CxrfairWarning
from cxrfair.io import atomic_path
from cxrfair.probe.inputs import draw_shots, group_codes, load_inputs, short_note
from cxrfair.tracking import check_backend, open_tracker

# JAX is imported only where a sweep trains (``objectives``, ``train`` and ``jax`` inside the
# functions that need them): importing jax costs about 2 s, and ``import cxrfair.probe`` (CLI
# help, zero-shot, the kNN and geometry embedding analyses, config checks) needs none of it.

METHODS = ("linear", "mlp")
SOLVERS = ("lbfgs", "adamw")
SELECTIONS = ("loss", "accuracy", "worst_group", "gap")
SELECTION_TEXT = {"loss": "lowest validation loss, mean over seeds",
                  "accuracy": "highest validation accuracy, mean over seeds (ties: lower validation loss)",
                  "worst_group": "highest validation worst-group accuracy of the sensitive attribute, mean over seeds "
                                 "(ties: lower validation loss)",
                  "gap": "smallest validation accuracy gap (max - min over groups) of the sensitive attribute among "
                         "configurations within 0.01 of the best validation accuracy, mean over seeds (ties: lower loss)"}
GAP_TOLERANCE = 0.01  # --select gap: configurations within this much of the best validation accuracy compete
# MLP architectures: "skip" (the default) adds a linear skip connection to the paper's one hidden
# ReLU layer, so the MLP contains the linear probe; "plain" is the paper's MLP. On the demo cache
# no plain one-hidden-layer MLP (ours or scikit-learn's MLPClassifier, tuned on validation) came
# within 0.03 of a tuned logistic regression; the skip MLP does (benchmarks/RESULTS.md).
ARCHITECTURES = ("skip", "plain")
FORWARD_TEXT = {"linear": "logits = W x + b",
                "mlp": "logits = W2 relu(W1 x + b1) + b2 (one hidden ReLU layer)",
                "mlp+skip": "logits = W0 x + W2 relu(W1 x + b1) + b2 (one hidden ReLU layer and a linear skip connection)"}
# Default L2 penalties per architecture (linear: sklearn C = 1/(l2*N), for N = 840 from C ~ 1200
# to C ~ 0.12). The plain MLP's two weight layers share the penalty and need more of it; the skip
# MLP penalises its hidden branch (W1, W2) with l2 and its skip weight W0 with l2_skip, whose grid
# spans the linear probe's usual choices (measured on the demo cache: benchmarks/RESULTS.md,
# "Probes against a tuned logistic regression").
L2_GRIDS = {"linear": (1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
            "mlp": (1e-3, 3e-3, 1e-2, 2e-2, 3e-2, 1e-1),
            "mlp+skip": (1e-2, 1e-1, 1.0)}
L2_SKIP_GRID = (1e-5, 1e-4, 1e-3)
# Few-shot probes (``shots``): with N = C x K training rows the penalty must go far higher. A
# penalty l2 on the mean loss is sklearn's C = 1/(l2 N): for 5-shot binary (N = 10) the default
# grid's largest, 1e-2, is C = 10, next to no regularisation for 10 points that are always
# separable in hundreds of dimensions (the weights grow until max_iter). This grid reaches
# C = 1e-3 there (l2 = 100), and still holds the default grid's upper part for larger K.
FEWSHOT_L2_GRIDS = {"linear": (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0, 100.0),
                    "mlp": (1e-2, 1e-1, 1.0, 10.0, 100.0),
                    "mlp+skip": (1e-1, 1.0, 10.0)}
FEWSHOT_L2_SKIP_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0)
# L-BFGS MLP lanes stop once an iteration lowers the objective by at most FTOL * max(|f|, 1): on
# the demo cache they never reach the gradient tolerance and otherwise run to max_iter. The
# (convex) linear probe keeps the gradient test only (ftol 0), which matches scikit-learn.
FTOL = {"linear": 0.0, "mlp": 1e-5}
# L-BFGS iterations at most. The MLP's lanes run in one vmapped loop until the slowest is done, so
# its cap sets the sweep's cost; on the demo cache 300 chose as 1,000 did (benchmarks/RESULTS.md).
MAX_ITER = {"linear": 1000, "mlp": 300}
# L-BFGS: the full-batch loss streams the training split in tiles of about this many bytes of
# features (``train.streamed_loss``), each tile's forward and backward pass while it is in cache:
# at 100k x 64, 7-8 ms per objective and gradient against 28-55 ms whole; at 50k x 512, tiles of
# 1-2k rows were best (benchmarks/RESULTS.md, issue 27). 0: the whole split at once (the MLP: not measured).
TILE_BYTES = {"linear": 2 * 2**20, "mlp": 0}
# L-BFGS: the validation loss is evaluated every this many iterations (and at each lane's last,
# which selection reads); run.json's val_loss curve is null in between. For the MLP the validation
# pass cost ~9% of an iteration (benchmarks/RESULTS.md, issue 27); for the linear probe little.
VAL_EVERY = {"linear": 1, "mlp": 10}
# L-BFGS warm starts: along this key each lane starts from the previous lane's solution (same
# seed, same other values): the regularisation path, from the largest value down (the families in
# WARM_ASCENDING: from the smallest up). l2 penalises an MLP's ReLU layer (W1, W2), and W1 = W2 = 0
# is a stationary point (zero gradient for both): a path that reaches it at a large l2 never leaves.
# The skip MLP does not chain at all (an empty path): every lane starts its skip weight W0 and
# bias b2 from the linear probe's solution at its l2_skip (``linear_starts``; LINEAR_START) and its
# branch W1, b1, W2 from its seed's initialisation, so the branch is alive at every l2 and the
# objective alone decides whether it stays on; where it does not, W0 starts at that lane's exact
# solution. Its chains from l2 = 1 down had left the branch off in every lane (||W2|| <= 0.04 at
# l2 = 0.01: a linear probe in disguise); walked upwards instead they cost 6,820 / 6,814
# iterations on the demo caches against 6,064 / 6,043 lane by lane, and on one cache stopped the
# larger-l2 lanes short of the linear solution (validation loss 1.0656 against 1.0599)
# (benchmarks/RESULTS.md, issue 27, fourth round). The linear start is there because W0 is an
# ill-conditioned linear problem at l2_skip 1e-5 (~500 iterations), which the linear program
# solves ~17x cheaper per iteration (third round).
WARM_PATHS = {"linear": ("l2",), "mlp": ("l2",), "mlp+skip": ()}
# The families whose lanes start W0 and b2 from the linear probe (``linear_starts``).
LINEAR_START = ("mlp+skip",)
# The families whose warm-start chains walk their penalty from the smallest value up: none. The
# plain MLP's default grid (l2 <= 0.1) does not switch its layer off; walked upwards it cost more
# iterations (8,452 against 7,462 on the seed-0 demo cache, 4,494 against 3,860 on planted XOR) and
# its selection's validation loss was mixed (0.931 against 0.9197 on the cache, 0.5189 against
# 0.5289 on XOR) (benchmarks/RESULTS.md, issue 27, fourth round). A knob that
# ``benchmarks/probe_mlp_branch.py --plain`` measures.
WARM_ASCENDING: tuple = ()


# The SweepConfig fields only one solver reads, with their CLI options; the other solver ignores them.
SOLVER_OPTIONS = {"lbfgs": {"l2s": "--l2", "max_iter": "--max-iter", "l2s_skip": "--l2-skip", "ftol": "--ftol",
                             "warm_start": "--warm-start"},
                  "adamw": {"lrs": "--lr", "weight_decays": "--weight-decay", "epochs": "--epochs",
                            "batch_size": "--batch-size", "memory_budget_mb": "--memory-budget"}}


@dataclass(frozen=True)
class SweepConfig:
    """A probe sweep: the grid, the seeds and the solver.

    Default: standardised features and full-batch L-BFGS over an L2 grid, which reaches a tuned
    scikit-learn ``LogisticRegression``. The paper's recipe is ``solver="adamw",
    standardize=False`` (AdamW, cosine annealing, batch 64, 150 epochs, grid over lr x weight decay).
    """

    method: str = "linear"  # "linear" or "mlp"
    solver: str | None = None  # "lbfgs" (full batch, L2 grid) or "adamw" (minibatch); None: the mitigation's probe_solver (core.mitigations)
    standardize: bool = True  # z-score features with the training split's mean and sd first
    l2s: tuple | None = None  # L-BFGS: L2 penalties l2/2*||W||^2 (sklearn C = 1/(l2*N)); None: L2_GRIDS[method]
    lrs: tuple = (1e-4, 3e-4, 1e-3, 3e-3)  # AdamW: peak learning rates (cosine-annealed to 0)
    weight_decays: tuple = (0.0, 1e-4, 1e-2)  # AdamW: decoupled weight decay
    hiddens: tuple = (256, 512)  # MLP hidden widths (ignored by the linear probe)
    architecture: str = "skip"  # MLP: "skip" (hidden ReLU layer + linear skip connection) or "plain" (the paper's)
    l2s_skip: tuple | None = None  # L-BFGS skip MLP: penalties l2_skip/2*||W0||^2 on the skip weight; None: L2_SKIP_GRID
    ftol: float | None = None  # L-BFGS: stop once an iteration lowers the objective by <= ftol*max(|f|,1); None: FTOL[method]
    seeds: tuple = (0, 1, 2)  # each seed fixes initialisation (and AdamW's data order)
    epochs: int = 150  # AdamW; paper: 150
    batch_size: int = 64  # AdamW; paper: 64
    max_iter: int | None = None  # L-BFGS: iterations at most; None: MAX_ITER[method]
    select: str | None = None  # "loss", "accuracy", "worst_group", "gap"; None: loss (erm), worst_group (mitigations)
    memory_budget_mb: float = 1024.0  # AdamW: estimated working set per compiled chunk (L-BFGS runs one lane per device)
    mitigation: str = "erm"  # one of core.mitigations.names(PROBE) (docs/CONTRACTS.md "Mitigations")
    sensitive: str | None = None  # the cohort attribute a mitigation targets (None for erm)
    strengths: tuple | None = None  # the strength axis of the grid; None: the mitigation's probe_strengths (core.mitigations)
    adversary: str = "grl"  # adversarial: "grl" (gradient reversal) or "projection" (Zhang et al.)
    track: str | None = None  # experiment tracking (cxrfair.tracking.BACKENDS) of the runs written; None: off. Changes no result
    shots: int | None = None  # few-shot: train on K images per class of the training split, one draw per seed; None: all
    warm_start: bool = True  # L-BFGS: each lane starts from the solution at the neighbouring penalty (WARM_PATHS, WARM_ASCENDING)

    def __post_init__(self):
        row = self.row  # None for an unknown name: validate() names the fix
        if self.solver is None:
            object.__setattr__(self, "solver", row.probe_solver if row else "lbfgs")
        if self.select is None:
            object.__setattr__(self, "select", "worst_group" if row is None or row.needs_sensitive else "loss")
        if self.max_iter is None:
            object.__setattr__(self, "max_iter", MAX_ITER.get(self.method, MAX_ITER["linear"]))
        if self.strengths is None:
            object.__setattr__(self, "strengths", row.probe_strengths if row else ())

    @property
    def row(self) -> mitigations.Mitigation | None:
        """The mitigation's row of the table (None if the name is unknown)."""
        return mitigations.MITIGATIONS.get(self.mitigation)

    @property
    def has_strength(self) -> bool:
        """Whether strength is a grid axis (every mitigation that takes one: not erm, not erase)."""
        return self.row is None or self.row.has_strength

    @property
    def skip(self) -> bool:
        """Whether the probe is the skip MLP (an MLP with ``architecture="skip"``)."""
        return self.method == "mlp" and self.architecture == "skip"

    @property
    def family(self) -> str:
        """The probe's architecture name in run.json: "linear", "mlp" (plain) or "mlp+skip"."""
        return "mlp+skip" if self.skip else self.method

    @property
    def l2_grid(self) -> tuple:
        """The L2 grid in force (``l2s``, or the architecture's default)."""
        grids = L2_GRIDS if self.shots is None else FEWSHOT_L2_GRIDS
        return tuple(self.l2s) if self.l2s is not None else grids.get(self.family, grids["linear"])

    @property
    def l2_skip_grid(self) -> tuple:
        """The skip weight's L2 grid (L-BFGS skip MLP; empty otherwise)."""
        if not (self.skip and self.solver == "lbfgs"):
            return ()
        return tuple(self.l2s_skip) if self.l2s_skip is not None else (L2_SKIP_GRID if self.shots is None
                                                                       else FEWSHOT_L2_SKIP_GRID)

    @property
    def warm_path(self) -> tuple[str, ...]:
        """The configuration keys whose path L-BFGS lanes warm-start along (``warm_start_chains``; empty: no chains)."""
        return WARM_PATHS[self.family] if self.warm_start and self.solver == "lbfgs" else ()

    @property
    def warm_ascending(self) -> bool:
        """Whether the warm-start chains walk the penalty from the smallest value up (WARM_ASCENDING)."""
        return self.family in WARM_ASCENDING

    @property
    def linear_start(self) -> bool:
        """Whether each chain's first lane (the skip MLP: every lane) takes its skip weight and bias
        from the linear probe at its ``l2_skip`` (``linear_starts``): the skip MLP with ``warm_start``."""
        return self.warm_start and self.solver == "lbfgs" and self.family in LINEAR_START

    @property
    def ftol_value(self) -> float:
        """The relative-decrease stopping tolerance in force (``ftol``, or the method's default)."""
        return float(self.ftol) if self.ftol is not None else FTOL.get(self.method, 0.0)

    def validate(self, given: Iterable[str] = ()) -> "SweepConfig":
        """Raise CxrfairError naming the option that is unusable; return self.

        ``given``: the options the user set explicitly (``--lr``; the CLI knows, a config's
        defaults do not count). One that this sweep does not read is refused, not ignored: an
        AdamW option with L-BFGS and the reverse (``SOLVER_OPTIONS``), ``--adversary`` without
        ``--mitigation adversarial``. (``cxrfair run``'s [probe] section feeds ERM probes and
        mitigation sweeps with different solvers, so it passes none.)
        """
        if self.method not in METHODS:
            raise CxrfairError(f"method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.solver not in SOLVERS:
            raise CxrfairError(f"--solver {self.solver!r}: expected one of {', '.join(SOLVERS)}")
        _check(self.architecture in ARCHITECTURES, "--architecture", f"choose one of {', '.join(ARCHITECTURES)}")
        _check(self.l2s_skip is None or self.skip, "--l2-skip", "only for the skip MLP (mlp --architecture skip)")
        _check(self.l2s_skip is None or self.solver == "lbfgs", "--l2-skip", "only with --solver lbfgs (adamw's weight decay covers W0)")
        grid = {"--seeds": self.seeds}
        grid |= {"--l2": self.l2_grid} if self.solver == "lbfgs" else {"--lr": self.lrs, "--weight-decay": self.weight_decays}
        if self.method == "mlp":
            grid["--hidden"] = self.hiddens
        if self.skip and self.solver == "lbfgs":
            grid["--l2-skip"] = self.l2_skip_grid
        for option, values in grid.items():
            if len(values) == 0:
                raise CxrfairError(f"{option}: the grid is empty; give at least one value")
        _check(all(math.isfinite(v) and v > 0 for v in self.lrs), "--lr", "learning rates must be positive numbers")
        _check(all(math.isfinite(v) and v >= 0 for v in self.weight_decays), "--weight-decay", "weight decays must be >= 0")
        _check(all(math.isfinite(v) and v >= 0 for v in self.l2_grid), "--l2", "L2 penalties must be numbers >= 0")
        _check(all(math.isfinite(v) and v >= 0 for v in self.l2_skip_grid), "--l2-skip", "L2 penalties must be numbers >= 0")
        _check(math.isfinite(self.ftol_value) and self.ftol_value >= 0, "--ftol", "must be a number >= 0 (0: off)")
        _check(self.select in SELECTIONS, "--select", f"choose one of {', '.join(SELECTIONS)}")
        self._validate_mitigation()
        _check(self.method != "mlp" or all(_is_int(h) and h >= 1 for h in self.hiddens), "--hidden",
               "hidden widths must be whole numbers >= 1, e.g. 256,512")
        _check(len(set(self.seeds)) == len(self.seeds), "--seeds", "seeds must be distinct")
        _check(self.epochs >= 1, "--epochs", "must be >= 1")
        _check(self.batch_size >= 1, "--batch-size", "must be >= 1")
        _check(self.max_iter >= 1, "--max-iter", "must be >= 1")
        _check(self.memory_budget_mb > 0, "--memory-budget", "must be > 0 MB")
        check_backend(self.track)
        _check(self.shots is None or (isinstance(self.shots, int) and not isinstance(self.shots, bool) and self.shots >= 1),
               "--shots", "must be a whole number >= 1 (training images per class)")
        _check(self.shots is None or self.mitigation == "erm", "--shots",
               f"few-shot probes are plain (erm) probes for now; drop --shots or --mitigation {self.mitigation}")
        # Last: a value that is wrong in itself is the first thing to fix.
        given = set(given)
        for solver, options in SOLVER_OPTIONS.items():
            unused = [o for o in options.values() if o in given and solver != self.solver]
            _check(not unused, ", ".join(unused), f"only with --solver {solver}; this sweep uses "
                   f"{self.solver} (its options: {', '.join(SOLVER_OPTIONS[self.solver].values())}), which would "
                   f"ignore {'them' if len(unused) > 1 else 'it'}; drop {'them' if len(unused) > 1 else 'it'} or pass "
                   f"--solver {solver}")
        _check("--adversary" not in given or self.mitigation == "adversarial", "--adversary",
               f"only with --mitigation adversarial, not {self.mitigation}; drop it")
        return self

    def _validate_mitigation(self) -> None:
        row = mitigations.get(self.mitigation, mitigations.PROBE)
        erm = not row.needs_sensitive
        _check(erm or bool(self.sensitive), "--sensitive", f"--mitigation {self.mitigation} needs the attribute it targets, e.g. sex")
        _check(not erm or self.sensitive is None, "--sensitive", "only with a --mitigation other than erm")
        _check(erm or self.select != "accuracy", "--select", "a mitigation selects by worst_group, loss or gap")
        _check(not erm or self.select in ("loss", "accuracy"), "--select",
               "worst_group and gap need a --mitigation and --sensitive attribute; plain probes use loss or accuracy")
        adversaries = mitigations.adversaries(mitigations.PROBE)
        _check(self.adversary in adversaries, "--adversary", f"choose one of {', '.join(adversaries)}")
        _check(not (row.probe_solver == "adamw" and self.solver == "lbfgs"), "--solver",
               f"{self.mitigation} changes its objective every step, which full-batch L-BFGS cannot follow; use --solver adamw")
        if self.has_strength:
            _check(len(self.strengths) > 0, "--strength", "give at least one value")
            _check(len(set(self.strengths)) == len(self.strengths), "--strength", "strengths must be distinct")
        mitigations.check_strengths(self.mitigation, tuple(self.strengths))

    def configurations(self) -> list[dict]:
        """The grid in a fixed order: strength (mitigations), hidden (MLP), then lr and weight decay
        (AdamW) or l2 (L-BFGS), then l2_skip (L-BFGS skip MLP).

        Every configuration has all four keys; those the solver does not use are NaN. A mitigation
        with a strength adds a ``strength`` key (erm's configurations stay as they were), the
        L-BFGS skip MLP an ``l2_skip`` key.
        """
        hiddens = [int(h) for h in self.hiddens] if self.method == "mlp" else [0]
        nan = float("nan")
        if self.solver == "lbfgs" and self.l2_skip_grid:
            base = [{"lr": nan, "weight_decay": nan, "l2": float(l2), "hidden": h, "l2_skip": float(l2k)}
                    for h, l2, l2k in itertools.product(hiddens, self.l2_grid, self.l2_skip_grid)]
        elif self.solver == "lbfgs":
            base = [{"lr": nan, "weight_decay": nan, "l2": float(l2), "hidden": h}
                    for h, l2 in itertools.product(hiddens, self.l2_grid)]
        else:
            base = [{"lr": float(lr), "weight_decay": float(wd), "l2": nan, "hidden": h}
                    for h, lr, wd in itertools.product(hiddens, self.lrs, self.weight_decays)]
        if not self.has_strength:
            return base
        return [{"strength": float(st), **c} for st in self.strengths for c in base]


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
    erasure: dict | None = None  # erase: what was fitted (run.json ``erasure``)
    by_strength: dict = field(default_factory=dict)  # strength -> index into configs of its best configuration

    @property
    def best_config(self) -> dict:
        return self.configs[self.selected]


# ---------------------------------------------------------------- chunking


# Copies of the parameters an AdamW lane holds: params, best params, Adam mu and nu, gradients,
# updates and XLA's loop double-buffering. (L-BFGS lanes run one per device, unchunked.)
ADAMW_COPIES = 8


def lane_bytes(dim: int, n_classes: int, max_hidden: int, batch_size: int, n_eval: int, epochs: int,
               copies: int = ADAMW_COPIES, skip: bool = False) -> int:
    """Rough working set of one lane (bytes): parameters and their copies, activations, outputs.

    ``batch_size`` is the rows of one step and ``epochs`` the length of the curves; activations
    of a step and of evaluation count ~4 times.
    """
    width = max_hidden if max_hidden else n_classes
    n_params = dim * width + width + (max_hidden * n_classes + n_classes if max_hidden else 0) + (dim * n_classes if skip else 0)
    activations = 4 * (batch_size + n_eval) * (width + n_classes)
    return 4 * (copies * n_params + activations) + output_bytes(n_classes, n_eval, epochs)


def output_bytes(n_classes: int, n_eval: int, epochs: int) -> int:
    """What one lane returns (bytes): its loss curves (2 x ``epochs``) and evaluation outputs."""
    return 4 * (2 * epochs + n_eval * n_classes)


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


def run_sweep(x: dict, y: dict, n_classes: int, cfg: SweepConfig, groups: dict | None = None) -> SweepResult:
    """Train every configuration × seed of ``cfg`` and select one on validation.

    Args:
        x: split -> (N_split, D) float32 features for "train", "val", "test".
        y: split -> (N_split,) int labels for "train", "val"; multi-label: (N_split, C) float
            targets in {1, 0, NaN} (NaN masked).
        n_classes: C.
        cfg: the sweep (validated here).
        groups: for a mitigation, split -> (N_split,) int group codes of the sensitive attribute
            for "train" and "val", and "names": the groups in order (``group_codes``).
    """
    import cxrfair.probe.objectives as objectives  # jax: see the note under the imports
    import cxrfair.probe.train as train

    configs = cfg.validate().configurations()
    multilabel = np.ndim(y["train"]) == 2
    _check(not (multilabel and cfg.select == "accuracy"), "--select accuracy",
           "multi-class only; multi-label probes are selected by validation loss (--select loss)")
    if cfg.mitigation != "erm" and groups is None:
        raise CxrfairError(f"--mitigation {cfg.mitigation}: needs the group codes of --sensitive")
    _check(not (multilabel and cfg.mitigation != "erm"), f"--mitigation {cfg.mitigation}",
           "probe mitigations are multi-class only for now; for a multi-label cohort use `cxrfair postprocess` "
           "(group thresholds) or fine-tuning's --mitigation")
    hyper = {k: np.array([c[k] for c in configs]) for k in ("lr", "weight_decay", "hidden", "l2", "l2_skip") if k in configs[0]}
    if cfg.has_strength:
        hyper["strength"] = np.array([c["strength"] for c in configs])
    erasure = None
    if cfg.mitigation == "erase":
        eraser = objectives.leace_fit(x["train"], groups["train"], len(groups["names"]))
        x = {k: objectives.leace_apply(eraser, v) for k, v in x.items()}
        erasure = {"method": "LEACE (Belrose et al. 2023), closed form", "fitted_on": "train", "attribute": cfg.sensitive,
                   "rank": eraser["rank"], "applied_to": list(SPLITS_ALL), "before": "standardisation"}
    spec = mitigation_spec(cfg, y["train"], groups, n_classes)
    recipe = train.Recipe(n_classes=n_classes, epochs=cfg.epochs, batch_size=cfg.batch_size,
                          max_hidden=int(hyper["hidden"].max()), solver=cfg.solver, max_iter=cfg.max_iter, mitigation=spec,
                          skip=cfg.skip, ftol=cfg.ftol_value, tile=tile_rows(cfg.method, np.shape(x["train"])[1]),
                          val_every=VAL_EVERY[cfg.method])
    stats = feature_stats(x["train"]) if cfg.standardize else None
    x = {k: standardize(v, stats) for k, v in x.items()}
    cells = {} if spec.name == "erm" else {"cell_train": cell_codes(y["train"], groups["train"], n_classes),
                                           "group_train": np.asarray(groups["train"], np.int32)}
    data = train.Data(np.asarray(x["train"], np.float32), _labels(y["train"]),
                      np.asarray(x["val"], np.float32), _labels(y["val"]), np.asarray(x["test"], np.float32),
                      **cells)
    seeds = np.array(cfg.seeds)
    shapes = tuple(None if a is None else (a.shape, a.dtype.name) for a in data)
    if cfg.solver == "lbfgs":
        lanes, timings = _run_lanes(recipe, shapes, data, hyper, seeds, warm_start_chains(configs, cfg.warm_path,
                                                                                        cfg.warm_ascending),
                                    cfg.linear_start)
    else:
        lanes, timings = _run_vmapped(recipe, shapes, data, hyper, seeds, cfg, len(x["val"]) + len(x["test"]))
    result = _result(configs, tuple(int(s) for s in seeds), lanes, y["val"], timings, stats, cfg.solver, cfg.select,
                     None if groups is None else groups["val"])
    result.erasure = erasure
    return result


def tile_rows(method: str, dim: int) -> int:
    """Rows per tile of the streamed full-batch loss (``TILE_BYTES`` of float32 features of ``dim``); 0: unstreamed."""
    return max(1, TILE_BYTES[method] // (4 * dim)) if TILE_BYTES[method] else 0


def _run_vmapped(recipe, shapes: tuple, data, hyper: dict, seeds: np.ndarray, cfg: SweepConfig, n_eval: int) -> tuple[dict, dict]:
    """AdamW: every lane vmapped (``train.train_sweep``: lanes sharing a seed share each minibatch
    matmul), in chunks of lanes that fit ``cfg.memory_budget_mb``. Returns (lanes, timings)."""
    from cxrfair.probe.train import lane_mesh  # jax: see the note under the imports

    per_lane = lane_bytes(shapes[0][0][1], recipe.n_classes, recipe.max_hidden, cfg.batch_size, n_eval, cfg.epochs,
                          copies=ADAMW_COPIES, skip=cfg.skip)
    mesh = lane_mesh()
    # With several devices each holds K / n of a chunk's configurations (the budget is per device).
    s_chunk, k_chunk = plan_chunks(len(seeds), math.ceil(len(hyper["l2"]) / mesh.size), per_lane, cfg.memory_budget_mb * 2**20)
    k_chunk *= mesh.size
    t0 = time.perf_counter()
    program = _program(recipe, shapes, s_chunk, k_chunk, mesh if mesh.size > 1 else None)
    t1 = time.perf_counter()
    lanes = _run_chunks(program, data, hyper, seeds, s_chunk, k_chunk)
    return lanes, {"compile_s": t1 - t0, "train_s": time.perf_counter() - t1, "seeds_per_chunk": s_chunk,
                   "configs_per_chunk": k_chunk, "sequential_lanes": False, "devices": mesh.size,
                   "chunks": math.ceil(len(seeds) / s_chunk) * math.ceil(len(hyper["l2"]) / k_chunk)}


def _run_lanes(recipe, shapes: tuple, data, hyper: dict, seeds: np.ndarray, chains: list[list[int]],
               linear_start: bool = False) -> tuple[dict, dict]:
    """L-BFGS: every (seed, configuration) lane on its own, one per device at a time
    (``train.train_lanes``), every call dispatched before any result is read. Returns (lanes, timings).

    ``chains`` (``warm_start_chains``) partition the configurations; along a chain each lane starts
    from the previous lane's solution (same seed), the first from its seed's initialisation; with
    ``linear_start`` (the skip MLP) the first's skip weight W0 and bias b2 from the linear probe's
    solution at its ``l2_skip`` instead (``linear_starts``, solved first, in the linear probe's program).
    Chains of every seed are dealt to the devices, ``mesh.size`` at a time; a short block is
    padded by repeating its last chain (the copies' results are dropped).

    The MLP's lanes run in one program per hidden width (``lane_widths``), not zero-padded to the
    widest: a 256-wide lane in a 512-wide program would do twice its matmul work. The programs
    (the linear one too, with ``linear_start``) compile in parallel threads, and each one's lanes
    are dispatched as soon as it is ready.
    """
    import jax  # see the note under the imports

    from cxrfair.probe.train import lane_mesh, seed_keys

    mesh = lane_mesh()
    n_dev, n_configs = mesh.size, len(hyper["l2"])
    t0, compile_s = time.perf_counter(), 0.0
    lanes_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("lanes"))
    data = jax.device_put(data, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))  # once, on every device
    keys = np.asarray(seed_keys(seeds))
    outs, where = [], []  # each call's output, and the (seed index, configuration) of each of its lanes
    heads, n_linear = None, 0
    widths = lane_widths(recipe, chains, hyper["hidden"])
    linear = linear_recipe(recipe, shapes[0][0][1]) if linear_start else None
    # Every program compiles at once, each in its own thread (XLA compiles outside the GIL): with
    # the linear start the lanes train in ~1-2 s on the demo caches, and the 2-3 compilations are
    # most of a first run (benchmarks/RESULTS.md, issue 27, third round). Same executables, same results.
    recipes = ([linear] if linear_start else []) + [r for r, _ in widths]
    use_compilation_cache()  # here, not first in several threads at once
    with ThreadPoolExecutor(len(recipes)) as pool:
        programs = iter([pool.submit(_lane_program, r, shapes, mesh) for r in recipes])
        if linear_start:
            t1 = time.perf_counter()
            program = next(programs).result()
            compile_s += time.perf_counter() - t1
            heads = linear_starts(program, linear, shapes, data, hyper, keys[0], [chain[0] for chain in chains], mesh,
                                  lanes_sharding)
            n_linear = len({id(w) for w, _ in heads.values()})
        for width_recipe, width_chains in widths:
            t1 = time.perf_counter()
            program = next(programs).result()
            compile_s += time.perf_counter() - t1
            runs = [(i, chain) for i in range(len(seeds)) for chain in width_chains]  # (seed index, configurations)
            outs_w, where_w = _dispatch_chains(program, width_recipe, shapes, data, hyper, keys, runs, mesh,
                                               lanes_sharding, heads)
            outs += outs_w
            where += where_w
    outs = jax.device_get(outs)
    lanes = {f: np.zeros((len(seeds), n_configs, *getattr(outs[0], f).shape[1:]), getattr(outs[0], f).dtype)
             for f in outs[0]._fields}
    for out, places in zip(outs, where):
        for d, place in enumerate(places):
            if place is not None:
                for f in out._fields:
                    lanes[f][place] = getattr(out, f)[d]
    return lanes, {"compile_s": compile_s, "train_s": time.perf_counter() - t0 - compile_s, "devices": n_dev,
                   "sequential_lanes": True, "chunks": len(outs), "warm_start_chains": len(chains),
                   "lane_programs": len(widths), "linear_start_lanes": n_linear}


def lane_widths(recipe, chains: list[list[int]], hidden: np.ndarray) -> list[tuple]:
    """[(the recipe of one hidden width's lane program, that width's chains)], in the chains' order.

    The MLP gets one recipe per width in the grid, ``max_hidden`` that width and ``draw_hidden``
    the widest (``train.init_params``: the same initial weights as the padded program); the linear
    probe one, ``recipe`` itself. A chain holds one width (``warm_start_chains`` never crosses
    ``hidden``).
    """
    if recipe.max_hidden == 0:
        return [(recipe, chains)]
    by_width: dict = {}
    for chain in chains:
        by_width.setdefault(int(hidden[chain[0]]), []).append(chain)
    return [(dataclasses.replace(recipe, max_hidden=width, draw_hidden=recipe.max_hidden), width_chains)
            for width, width_chains in by_width.items()]


def _dispatch_chains(program, recipe, shapes: tuple, data, hyper: dict, keys: np.ndarray, runs: list, mesh,
                     lanes_sharding, heads: dict | None = None) -> tuple[list, list]:
    """Dispatch ``runs`` ((seed index, chain) pairs) through one lane program, ``mesh.size`` chains at
    a time, without reading any result. ``heads`` (``linear_starts``): the skip weight and bias each
    chain's first lane starts from; None: it starts from its seed's initialisation. Returns (each
    call's output, the (seed index, configuration) of each of its lanes, None for padding)."""
    import jax  # see the note under the imports

    from cxrfair.probe.train import lane_params_shape

    n_dev = mesh.size
    zeros = jax.tree.map(lambda a: np.zeros((n_dev, *a.shape), a.dtype), lane_params_shape(shapes[0][0][1], recipe))
    mask = lambda keys: {k: np.full(n_dev, k in keys) for k in zeros}  # noqa: E731  (train_lanes' warm)
    outs, where = [], []
    for b0 in range(0, len(runs), n_dev):
        block = runs[b0:b0 + n_dev]
        block += block[-1:] * (n_dev - len(block))
        seed_idx = np.array([i for i, _ in block])
        start, warm = jax.device_put(zeros, lanes_sharding), mask(())
        if heads is not None:  # W0 and b2 from the linear probe's solution (same for every seed)
            solved = [heads[chain[0]] for _, chain in block]
            start = dict(start, w0=jax.device_put(jax.numpy.stack([w for w, _ in solved]), lanes_sharding),
                         b2=jax.device_put(jax.numpy.stack([b for _, b in solved]), lanes_sharding))
            warm = mask(("w0", "b2"))
        for pos in range(max(len(chain) for _, chain in block)):
            configs = np.array([chain[min(pos, len(chain) - 1)] for _, chain in block])
            if pos > 0:
                warm = mask(tuple(zeros))
            out, start = program(keys[seed_idx], _hyper(hyper, configs, n_dev), data, start, warm)
            outs.append(out)
            real = [b0 + d < len(runs) and pos < len(block[d][1]) for d in range(n_dev)]
            where.append([(seed_idx[d], configs[d]) if real[d] else None for d in range(n_dev)])
    return outs, where


def linear_recipe(recipe, dim: int):
    """The linear probe's L-BFGS lane recipe beside an MLP's ``recipe`` (its defaults: MAX_ITER,
    FTOL, TILE_BYTES, VAL_EVERY), equal to the one ``probe linear`` compiles for the same data, so
    the persistent compilation cache serves both."""
    return dataclasses.replace(recipe, max_hidden=0, draw_hidden=0, skip=False, max_iter=MAX_ITER["linear"],
                               ftol=FTOL["linear"], tile=tile_rows("linear", dim), val_every=VAL_EVERY["linear"])


def linear_starts(program, recipe, shapes: tuple, data, hyper: dict, key: np.ndarray, heads: list[int], mesh,
                  lanes_sharding) -> dict:
    """The linear probe's solution at each chain head's ``l2_skip`` (and strength), dispatched
    through the linear lane ``program`` (``linear_recipe``), ``mesh.size`` at a time, not read.

    The skip MLP, logits = W0 x + W2 relu(W1 x + b1) + b2, is the linear probe when its ReLU branch
    is off; a chain's first lane starts W0 and b2 here (the branch from its seed's initialisation),
    so its iterations go to the branch, not to re-solving the convex linear part (a skip-MLP
    iteration costs ~17 linear ones at 256 hidden units). One solve per distinct (strength,
    l2_skip), from ``key`` (the sweep's first seed): the linear objective is strictly convex for
    l2_skip > 0, so its optimum does not depend on the start, and every seed's chain shares it.

    Args:
        heads: the configuration index of each chain's first lane.

    Returns:
        configuration index (each of ``heads``) -> (W (C, D), b (C,)) device arrays.
    """
    import jax  # see the note under the imports

    from cxrfair.probe.train import lane_params_shape

    problem = lambda k: (hyper["l2_skip"][k], hyper["strength"][k] if "strength" in hyper else None)  # noqa: E731
    todo = list(dict.fromkeys(problem(k) for k in heads))  # distinct, in chain order
    first = {p: next(k for k in heads if problem(k) == p) for p in todo}
    n_dev = mesh.size
    linear = {k: v for k, v in hyper.items() if k != "l2_skip"} | {"l2": hyper["l2_skip"]}  # W's penalty: W0's
    zeros = jax.tree.map(lambda a: np.zeros((n_dev, *a.shape), a.dtype), lane_params_shape(shapes[0][0][1], recipe))
    cold = {k: np.zeros(n_dev, bool) for k in zeros}
    solved = {}
    for b0 in range(0, len(todo), n_dev):
        block = todo[b0:b0 + n_dev]
        configs = np.array([first[p] for p in block] + [first[block[-1]]] * (n_dev - len(block)))
        _, params = program(np.repeat(key[None], n_dev, 0), _hyper(linear, configs, n_dev), data,
                            jax.device_put(zeros, lanes_sharding), cold)
        solved |= {p: (params["w"][d], params["b"][d]) for d, p in enumerate(block)}
    return {k: solved[problem(k)] for k in heads}


def warm_start_chains(configs: list[dict], path: tuple[str, ...], ascending: bool = False) -> list[list[int]]:
    """Chains of configuration indices that differ only in the ``path`` keys, each from the largest
    penalty to the smallest (``ascending``: from the smallest to the largest, WARM_ASCENDING), so
    every lane starts from a neighbour's solution (a regularisation path).

    One key (``("l2",)``): from its largest value down (``ascending``: up). Two keys (``("l2", "l2_skip")``): the
    first key from its largest value down, and within each of its values the second key down then
    up alternately (a snake), so consecutive lanes differ in one value. ``path`` empty: every
    configuration alone (cold starts). Chains come in the order of their first configuration in the grid.
    """
    if not path:
        return [[k] for k in range(len(configs))]
    groups: dict = {}
    for k, c in enumerate(configs):
        rest = tuple((key, v) for key, v in c.items() if key not in path and not (isinstance(v, float) and math.isnan(v)))
        groups.setdefault(rest, []).append(k)
    chains = []
    for ks in groups.values():
        outer = sorted({configs[k][path[0]] for k in ks}, reverse=not ascending)
        chain = []
        for i, value in enumerate(outer):
            row = sorted((k for k in ks if configs[k][path[0]] == value), key=lambda k: [-configs[k][p] for p in path[1:]])
            chain += row if i % 2 == 0 else row[::-1]
        chains.append(chain)
    return chains

SPLITS_ALL = ("train", "val", "test")


def run_fewshot_sweep(inputs, cfg: SweepConfig) -> tuple[SweepResult, list]:
    """A few-shot sweep: seed s trains on its own draw of ``cfg.shots`` images per class (``draw_shots``).

    The draws are part of the seed variance: each seed's lanes see only its draw's training rows,
    and the configuration is chosen, as in ``run_sweep``, by the mean over seeds (draws) of the
    validation score on the full validation split; val and test are never subsampled.
    Standardisation (``cfg.standardize``) uses the mean and sd of the whole training split's
    features (no labels): a draw of C x K rows cannot estimate a per-feature sd (K = 1, C = 2:
    two points), and dividing by one near 0 would blow that feature up on val and test.

    Args:
        inputs: ``ProbeInputs`` (its ``train_rows`` give the patients).
        cfg: the sweep, ``shots`` set.

    Returns:
        (the SweepResult over all seeds, as ``run_sweep``'s; the ``Shots`` draw of each seed, in seed order).
    """
    cfg = cfg.validate()
    _check(cfg.shots is not None, "--shots", "run_fewshot_sweep needs shots")
    stats = feature_stats(inputs.x["train"]) if cfg.standardize else None
    x = {k: standardize(v, stats) for k, v in inputs.x.items()}
    patients = inputs.train_rows["patient_id"].to_numpy()
    parts, draws = [], []
    for seed in cfg.seeds:
        draw = draw_shots(inputs.y["train"], patients, cfg.shots, seed, inputs.classes)
        xs, ys = dict(x, train=x["train"][draw.index]), dict(inputs.y, train=inputs.y["train"][draw.index])
        parts.append(run_sweep(xs, ys, len(inputs.classes), dataclasses.replace(cfg, seeds=(seed,), standardize=False)))
        draws.append(draw)
    note = short_note(draws)
    if note:
        warnings.warn(note, CxrfairWarning, stacklevel=2)
    return merge_seeds(parts, cfg.select, stats), draws


def merge_seeds(parts: list, select: str, stats: dict | None = None) -> SweepResult:
    """One ``SweepResult`` from single-seed sweeps of one grid (``run_fewshot_sweep``), the
    configuration chosen again on the mean over all their seeds (``select_config``)."""
    cat = lambda f: np.concatenate([getattr(p, f) for p in parts], axis=0)  # noqa: E731  (S, K, ...)
    best_val_loss = cat("best_val_loss")
    mean_loss = best_val_loss.mean(0)
    table = pd.concat([p.table for p in parts], ignore_index=True)
    accuracy = table.groupby("config", sort=True)["val_accuracy"].mean().to_numpy()
    selected = select_config({"loss": np.where(np.isfinite(mean_loss), mean_loss, np.inf), "accuracy": accuracy}, select)
    table = table.sort_values(["config", "seed"], kind="stable").assign(selected=lambda t: t["config"] == selected)
    timings = dict(parts[0].timings)
    for key in ("compile_s", "train_s", "chunks"):
        timings[key] = sum(p.timings[key] for p in parts)
    return SweepResult(parts[0].configs, tuple(s for p in parts for s in p.seeds), table.reset_index(drop=True),
                       selected, best_val_loss, cat("best_epoch"), cat("train_loss"), cat("val_loss"), cat("val_probs"),
                       cat("test_probs"), timings, stats)


def cell_codes(y_train: np.ndarray, group_train: np.ndarray, n_classes: int) -> np.ndarray:
    """(N,) int32 cell of each training row: group * C + class (multi-class)."""
    return (np.asarray(group_train, np.int64) * n_classes + np.asarray(y_train, np.int64)).astype(np.int32)


def mitigation_spec(cfg: SweepConfig, y_train: np.ndarray, groups: dict | None, n_classes: int):
    """The static ``objectives.Spec`` of a sweep's training; a mitigation whose term is plain training
    (erase: it acts on the features) trains with erm's."""
    from cxrfair.probe.objectives import PLAIN, TERMS, Spec  # jax: see the note under the imports

    if TERMS[cfg.mitigation] is PLAIN:
        return Spec()
    n_groups = len(groups["names"])
    counts = np.bincount(cell_codes(y_train, groups["train"], n_classes), minlength=n_groups * n_classes)
    steps = cfg.epochs * math.ceil(len(y_train) / cfg.batch_size)
    return Spec(cfg.mitigation, n_groups, tuple(int(c) for c in counts), cfg.adversary, steps)


def _labels(y) -> np.ndarray:
    """(N,) int32 labels, or (N, C) float32 multi-label targets (NaN kept: the loss masks it)."""
    return np.asarray(y, np.float32) if np.ndim(y) == 2 else np.asarray(y, np.int32)


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


# ---------------------------------------------------------------- compilation cache


CACHE_ENV = "CXRFAIR_CACHE"  # cxrfair's cache folder (default ~/.cache/cxrfair); compiled sweeps go in <it>/jax
NO_JAX_CACHE_ENV = "CXRFAIR_NO_JAX_CACHE"  # set (to anything but "" or "0") to keep compiled sweeps in memory only
JAX_CACHE_MAX_BYTES = 2 * 2**30  # the folder is trimmed to this, least recently used first


def jax_cache_dir() -> Path | None:
    """Where compiled sweeps persist across processes: ``$CXRFAIR_CACHE/jax`` (default
    ``~/.cache/cxrfair/jax``); None when ``$CXRFAIR_NO_JAX_CACHE`` is set."""
    if os.environ.get(NO_JAX_CACHE_ENV, "") not in ("", "0"):
        return None
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cxrfair") / "jax"


def use_compilation_cache() -> None:
    """Point JAX's persistent compilation cache at ``jax_cache_dir()``, unless the user already
    chose a folder (``JAX_COMPILATION_CACHE_DIR``) or turned ours off.

    Why: compiling a sweep takes 5-13 s on 2 CPU cores, as long as training the default linear
    sweep on a demo-sized cache; with the cache, a second process with the same shapes (another
    model of the same embedding size, another run of the command) loads the executable instead.
    JAX keys each entry by the program, the backend and the compiler, so a stale entry is never used.
    """
    import jax  # see the note under the imports

    folder = jax_cache_dir()
    if folder is None or jax.config.jax_compilation_cache_dir:
        return
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    if jax.config.jax_compilation_cache_max_size == -1:  # JAX's default: unbounded
        jax.config.update("jax_compilation_cache_max_size", JAX_CACHE_MAX_BYTES)


@functools.lru_cache(maxsize=8)
def _program(recipe, shapes: tuple, s_chunk: int, k_chunk: int, mesh=None):
    """The compiled sweep for one chunk shape; every chunk (padded) and every later sweep of the
    same shapes reuses it, so compile time is paid once per process (and, with the persistent
    cache, once per machine). ``mesh``: the configurations split over its devices
    (``train.train_sweep_sharded``); None: one device (``train.train_sweep``)."""
    import jax  # see the note under the imports

    import cxrfair.probe.train as train

    use_compilation_cache()
    f32, i32 = jax.numpy.float32, jax.numpy.int32
    spec = jax.ShapeDtypeStruct
    data = train.Data(*(None if s is None else spec(s[0], s[1]) for s in shapes))  # mitigations add cell/group codes
    strength = None if recipe.mitigation.name == "erm" else spec((k_chunk,), f32)
    l2_skip = spec((k_chunk,), f32) if recipe.skip and recipe.solver == "lbfgs" else None  # as configurations() gives it
    hyper = train.Hyper(spec((k_chunk,), f32), spec((k_chunk,), f32), spec((k_chunk,), i32), spec((k_chunk,), f32), strength,
                        l2_skip)
    keys = spec((s_chunk, 2), jax.numpy.uint32)
    if mesh is None:
        return train.train_sweep.lower(keys, hyper, data, recipe).compile()
    named = lambda *axes: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))  # noqa: E731
    place = lambda a, *axes: None if a is None else spec(a.shape, a.dtype, sharding=named(*axes))  # noqa: E731
    hyper = jax.tree.map(lambda a: place(a, train.LANE_AXIS), hyper)
    data = train.Data(*(place(a) for a in data))
    return train.train_sweep_sharded.lower(place(keys), hyper, data, recipe=recipe, mesh=mesh).compile()


@functools.lru_cache(maxsize=8)
def _lane_program(recipe, shapes: tuple, mesh):
    """``train.train_lanes`` compiled for one lane per device of ``mesh``: one executable per data
    shape and recipe, whatever the grid, the seeds or the strengths (see ``_program``)."""
    import jax  # see the note under the imports

    import cxrfair.probe.train as train

    use_compilation_cache()
    f32, i32, spec = jax.numpy.float32, jax.numpy.int32, jax.ShapeDtypeStruct
    n = mesh.size
    lanes = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(train.LANE_AXIS))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    data = train.Data(*(None if s is None else spec(s[0], s[1], sharding=replicated) for s in shapes))
    lane = lambda dtype: spec((n,), dtype, sharding=lanes)  # noqa: E731
    strength = None if recipe.mitigation.name == "erm" else lane(f32)
    l2_skip = lane(f32) if recipe.skip else None
    hyper = train.Hyper(lane(f32), lane(f32), lane(i32), lane(f32), strength, l2_skip)
    keys = spec((n, 2), jax.numpy.uint32, sharding=lanes)
    start = jax.tree.map(lambda a: spec((n, *a.shape), a.dtype, sharding=lanes), train.lane_params_shape(shapes[0][0][1], recipe))
    warm = {k: spec((n,), jax.numpy.bool_, sharding=lanes) for k in start}  # per parameter (train_lanes)
    return train.train_lanes.lower(keys, hyper, data, start, warm, recipe=recipe, mesh=mesh).compile()


def _run_chunks(program, data, hyper: dict, seeds: np.ndarray, s_chunk: int, k_chunk: int) -> dict:
    """Run the compiled program over (seed chunk, config chunk) blocks; (S, K, ...) NumPy arrays."""
    import jax  # see the note under the imports

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
    from cxrfair.probe.train import Hyper  # jax: see the note under the imports

    idx = _pad(idx, size)
    # Keys a solver does not use are NaN in the grid; the program gets 0 for them.
    value = lambda k, dtype: np.nan_to_num(np.asarray(hyper[k][idx], np.float64)).astype(dtype)  # noqa: E731
    strength = value("strength", np.float32) if "strength" in hyper else None
    l2_skip = value("l2_skip", np.float32) if "l2_skip" in hyper else None
    return Hyper(value("lr", np.float32), value("weight_decay", np.float32), value("hidden", np.int32), value("l2", np.float32),
                 strength, l2_skip)


def _result(configs: list, seeds: tuple, lanes: dict, y_val: np.ndarray, timings: dict, stats: dict | None,
            solver: str, select: str = "loss", group_val: np.ndarray | None = None) -> SweepResult:
    multilabel = np.ndim(y_val) == 2
    correct = None if multilabel else lanes["val_probs"].argmax(-1) == np.asarray(y_val)  # (S, K, Nv)
    val_acc = np.full(lanes["best_val_loss"].shape, np.nan) if multilabel else correct.mean(-1)  # (S, K)
    mean_loss = lanes["best_val_loss"].mean(0)  # a lane that diverged from epoch 1 keeps inf
    mean_loss = np.where(np.isfinite(mean_loss), mean_loss, np.inf)
    if not np.isfinite(mean_loss).any():
        fix = "lower --lr" if solver == "adamw" else "check the features, or try --solver adamw"
        raise CxrfairError(f"every configuration diverged (validation loss NaN/inf from the start); {fix}")
    fair = {} if group_val is None or multilabel else group_accuracy_summary(correct, group_val)
    means = {"loss": mean_loss, "accuracy": val_acc.mean(0), **{k: v.mean(0) for k, v in fair.items()}}
    selected = select_config(means, select)
    by_strength = {}
    if "strength" in configs[0]:
        for st in dict.fromkeys(c["strength"] for c in configs):
            idx = np.array([k for k, c in enumerate(configs) if c["strength"] == st])
            by_strength[st] = int(idx[select_config({k: v[idx] for k, v in means.items()}, select)])
    rows = [{"config": k, **({"strength": c["strength"]} if "strength" in c else {}), "lr": c["lr"],
             "weight_decay": c["weight_decay"], "l2": c["l2"], **({"l2_skip": c["l2_skip"]} if "l2_skip" in c else {}),
             "hidden": c["hidden"], "seed": s,
             "best_val_loss": float(lanes["best_val_loss"][i, k]), **_progress(solver, lanes["best_epoch"][i, k]),
             "val_accuracy": float(val_acc[i, k]), **_val_auc(lanes["val_probs"][i, k], y_val),
             **{f"val_{m}": float(v[i, k]) for m, v in fair.items()},
             "selected": k == selected}
            for k, c in enumerate(configs) for i, s in enumerate(seeds)]
    return SweepResult(configs, seeds, pd.DataFrame(rows), selected, lanes["best_val_loss"], lanes["best_epoch"],
                       lanes["train_loss"], lanes["val_loss"], lanes["val_probs"], lanes["test_probs"], timings, stats,
                       by_strength=by_strength)


def _val_auc(probs: np.ndarray, y_val: np.ndarray) -> dict:
    """Multi-label sweep rows also get the masked validation macro AUC; multi-class rows nothing."""
    if np.ndim(y_val) != 2:
        return {}
    return {"val_auc_macro": float(auc_macro(np.asarray(y_val, np.float64), probs))}


def group_accuracy_summary(correct: np.ndarray, groups: np.ndarray) -> dict:
    """``{"worst_group": (S, K) lowest group accuracy, "gap": (S, K) highest - lowest}`` over the
    groups that have rows; correct (S, K, N) bool, groups (N,) int codes."""
    codes = np.asarray(groups)
    acc = np.stack([correct[..., codes == g].mean(-1) for g in np.unique(codes)], -1)  # (S, K, G)
    return {"worst_group": acc.min(-1), "gap": acc.max(-1) - acc.min(-1)}


def select_config(means: dict, select: str) -> int:
    """Index of the chosen configuration from mean validation ``means`` (name -> (K,)).

    ``loss``: lowest loss. ``accuracy`` / ``worst_group``: highest of it, ties to the lower loss.
    ``gap``: smallest gap among configurations within GAP_TOLERANCE of the best accuracy, ties to
    the lower loss. Remaining ties go to the first in grid order.
    """
    loss, first = means["loss"], np.arange(len(means["loss"]))
    if select == "loss":
        return int(np.argmin(loss))  # argmin takes the first of ties
    if select in ("accuracy", "worst_group"):
        return int(np.lexsort((first, loss, -means[select]))[0])
    near = means["accuracy"] >= means["accuracy"].max() - GAP_TOLERANCE
    return int(np.lexsort((first, loss, np.where(near, means["gap"], np.inf)))[0])


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
    cfg.validate()
    t0 = time.perf_counter()
    inputs = load_inputs(cache_path)
    groups = None if cfg.mitigation == "erm" else group_codes(inputs, cfg.sensitive)
    key = lambda tag, s: RunKey(safe_name(inputs.model), cfg.method, tag, int(s), cfg.mitigation, cfg.sensitive,  # noqa: E731
                                cfg.shots).run_id
    tags = ["best"] + [strength_tag(st) for st in (cfg.strengths if cfg.has_strength else ())]
    run_ids = {tag: [key(tag, s) for s in cfg.seeds] for tag in tags}
    check_runs_folder(out, inputs.cohort_hash, [r for ids in run_ids.values() for r in ids], force)
    draws = None
    if cfg.shots is None:
        result = run_sweep(inputs.x, inputs.y, len(inputs.classes), cfg, groups)
    else:
        result, draws = run_fewshot_sweep(inputs, cfg)
    result.timings["total_s"] = time.perf_counter() - t0
    paths = []
    chosen = {tag: result.selected if tag == "best" else result.by_strength[cfg.strengths[tags.index(tag) - 1]]
              for tag in tags}
    for tag, ids in run_ids.items():
        paths += write_runs(out, inputs, cfg, result, ids, chosen[tag], force, draws)
    write_table(out, result, run_ids["best"][0])
    for tag, ids in run_ids.items() if cfg.track is not None else ():
        track_runs(cfg.track, out, result, ids, chosen[tag], cfg.solver, lanes=tag == "best")
    return paths


def track_runs(kind: str, out: Path | str, result: SweepResult, run_ids: list[str], k: int, solver: str,
               lanes: bool) -> None:
    """Log configuration ``k``'s written runs (one per seed, ``result.seeds`` order) to ``<run>/tracking/``.

    Each run: its run.json curves (``_curves``), ``train_loss`` and ``val_loss`` per epoch (AdamW)
    or iteration (L-BFGS) at steps 1, 2, ...; with ``lanes`` (the ``best`` runs) also its seed's
    lanes of the sweep in ``<run>/tracking/sweep/``: x = the configuration index (sweep.csv
    ``config``), one scalar per lane of ``best_val_loss`` and of each other validation column of
    the table, plus ``selected_*`` at the chosen configuration. Logged from the host arrays once
    the runs are written (``cxrfair.tracking``), so the sweep itself runs as without tracking.
    """
    columns = ["best_val_loss"] + [c for c in result.table.columns if c.startswith("val_")]
    chosen = {name: v for name, v in result.configs[k].items() if not (isinstance(v, float) and math.isnan(v))}
    for i, run_id in enumerate(run_ids):
        run_dir = Path(out) / run_id
        curves = _curves(result, i, k, solver)
        with open_tracker(kind, run_dir / TRACKING_DIR, run_id, chosen | {"seed": result.seeds[i]}) as tracker:
            for step, (train, val) in enumerate(zip(curves["train_loss"], curves["val_loss"]), start=1):
                tracker.log(step, {"train_loss": train, **({} if val is None else {"val_loss": val})})
        if not lanes:
            continue
        rows = result.table[result.table["seed"] == result.seeds[i]].sort_values("config")
        with open_tracker(kind, run_dir / TRACKING_DIR / "sweep", f"{run_id}/sweep",
                          {"seed": result.seeds[i], "configurations": len(result.configs)}) as tracker:
            for _, row in rows.iterrows():
                values = {c: row[c] for c in columns if pd.notna(row[c])}
                picked = {f"selected_{c}": v for c, v in values.items()} if row["selected"] else {}
                tracker.log(int(row["config"]), values | picked)


def strength_tag(strength: float) -> str:
    """The run tag of one strength's best configuration: ``st<strength:g>`` (``st0.3``)."""
    return f"st{strength:g}"




def write_table(out, result: SweepResult, run_id: str) -> None:
    """``<family>__sweep.csv``: every configuration × seed."""
    with atomic_path(Path(out) / _sweep_name(run_id)) as tmp:
        result.table.to_csv(tmp, index=False)


def write_runs(out, inputs, cfg: SweepConfig, result: SweepResult, run_ids: list[str], k: int, force: bool,
               draws: list | None = None) -> list[Path]:
    """Write configuration ``k``'s runs, one per seed (few-shot: ``draws``, each seed's ``Shots``, go
    into run.json ``fewshot``)."""
    from cxrfair.probe.train import count_params  # jax: see the note under the imports

    best = result.configs[k]
    dim = inputs.x["train"].shape[1]
    paths = []
    for i, (seed, run_id) in enumerate(zip(result.seeds, run_ids)):
        probs = np.concatenate([result.val_probs[i, k], result.test_probs[i, k]])
        steps = int(result.best_epoch[i, k])
        meta = {
            "run_id": run_id, "model": inputs.model, "method": cfg.method, "seed": int(seed),
            "classes": inputs.classes, "cohort_hash": inputs.cohort_hash,
            "hyperparameters": _hyperparameters(cfg, best, inputs.multilabel) | ({"iterations": steps} if cfg.solver == "lbfgs" else {}),
            # 1-based epoch of the kept AdamW parameters; L-BFGS keeps its final iterate (no epochs).
            "selected_epoch": steps + 1 if cfg.solver == "adamw" else None,
            "trainable_params": count_params(dim, len(inputs.classes), best["hidden"], cfg.skip),
            "timings": {key: v for key, v in result.timings.items() if key.endswith("_s")},
            "curves": _curves(result, i, k, cfg.solver),
            "solver": cfg.solver, "standardize": cfg.standardize,
            **({"standardization": _stats_meta(result.feature_stats, len(inputs.x["train"]))} if cfg.standardize else {}),
            "source": inputs.source, **inputs.run_meta(),
            "notes": _notes(cfg, result, run_id, inputs.multilabel),
            **_mitigation_meta(cfg, result, best),
            **({} if draws is None else {"fewshot": _fewshot_meta(cfg, draws[i], inputs)}),
        }
        paths.append(write_run(out, meta, inputs.predictions(probs), force=force))
    return paths


def _mitigation_meta(cfg: SweepConfig, result: SweepResult, config: dict) -> dict:
    """run.json keys of a mitigation run (none for erm, whose runs stay as they were)."""
    if not cfg.row.needs_sensitive:
        return {}
    import cxrfair.probe.objectives as objectives  # jax: see the note under the imports

    meta = {"mitigation": cfg.mitigation, "sensitive": cfg.sensitive, "strength": config.get("strength"),
            "select": cfg.select, "selection": SELECTION_TEXT[cfg.select]}
    meta |= objectives.run_meta(objectives.Spec(cfg.mitigation, adversary=cfg.adversary))
    if result.erasure is not None:
        meta["erasure"] = result.erasure
    return meta


def _fewshot_meta(cfg: SweepConfig, draw, inputs) -> dict:
    """run.json ``fewshot``: the seed's draw (``Shots.record``) and what the features were standardised with."""
    scaled = ("the whole training split's feature mean and sd (image features only, no labels)" if cfg.standardize
              else "none (raw features)")
    return draw.record(inputs.task, inputs.train_rows["image_id"].to_numpy()) | {"standardization": scaled}


def _curves(result: SweepResult, i: int, k: int, solver: str) -> dict:
    # L-BFGS curves are per iteration; after convergence they repeat, so they are cut there. Their
    # validation loss was evaluated every VAL_EVERY iterations and at the last: None (null) between.
    if solver != "lbfgs":
        return {"train_loss": result.train_loss[i, k].tolist(), "val_loss": result.val_loss[i, k].tolist()}
    n = max(int(result.best_epoch[i, k]), 1)
    val = [None if math.isnan(v) else v for v in result.val_loss[i, k, :n].tolist()]
    return {"train_loss": result.train_loss[i, k, :n].tolist(), "val_loss": val}


def _stats_meta(stats: dict, n_train: int) -> dict:
    """The training-split statistics every split was standardised with (run.json ``standardization``)."""
    return {"fitted_on": "train", "n": n_train, "ddof": 0, "rule": "(x - mean) / std; std 0 -> 1",
            "mean": [float(v) for v in stats["mean"]], "std": [float(v) for v in stats["std"]]}


def _notes(cfg: SweepConfig, result: SweepResult, run_id: str, multilabel: bool = False) -> str:
    how = (f"{cfg.family} probe ({FORWARD_TEXT[cfg.family]}); " +
           (f"full-batch L-BFGS, {stopping_text(cfg)} (final iterate)" if cfg.solver == "lbfgs"
            else "AdamW, cosine annealing, best-validation-loss epoch kept"))
    feats = "features standardised with the training split's mean and sd" if cfg.standardize else "raw features"
    task = f"; multi-label: {LOSS_TEXT['multilabel']}, p = per-condition sigmoid" if multilabel else ""
    if cfg.shots is not None:
        task += (f"; few-shot: trained on {cfg.shots} image(s) per class of the training split, one draw per seed "
                 "(run.json fewshot)")
    return (f"{how}; {feats}{task}; selected by {SELECTION_TEXT[cfg.select]} ({len(result.seeds)} seeds) "
            f"among {len(result.configs)} configurations; see {_sweep_name(run_id)}")


def _sweep_name(run_id: str) -> str:
    return parse_run_id(run_id).sweep_file


LOSS_TEXT = {"multiclass": "cross-entropy",
             "multilabel": "masked sigmoid cross-entropy (per image, the mean over its observed conditions; "
                           "empty labels contribute nothing)"}


def stopping_text(cfg: SweepConfig) -> str:
    """The L-BFGS stopping rule in words (run.json ``hyperparameters.stopping``)."""
    from cxrfair.probe.train import GTOL  # jax: see the note under the imports

    rule = f"stops when the largest gradient entry is <= {GTOL:g}"
    if cfg.ftol_value > 0:
        rule += f", or once an iteration after the first lowers the objective by <= {cfg.ftol_value:g} * max(|f|, 1)"
    return f"{rule}, or after {cfg.max_iter} iterations"


def start_text(cfg: SweepConfig) -> str:
    """Where an L-BFGS lane starts, in words (run.json ``hyperparameters.start``)."""
    linear = ("W0 and b2 from the linear probe's solution at its l2_skip (L-BFGS, gradient test; shared by the seeds), "
              "W1, b1, W2 from its seed's initialisation")
    if not cfg.warm_path:
        return f"every lane: {linear}" if cfg.linear_start else "every lane from its seed's initialisation"
    path = " x ".join(cfg.warm_path)
    first = linear if cfg.linear_start else "from its seed's initialisation"
    side = "smaller" if cfg.warm_ascending else "larger"
    end = "the smallest" if cfg.warm_ascending else "the largest"
    return f"from the same seed's solution at the next {side} {path}; {end}: {first}"


def _hyperparameters(cfg: SweepConfig, best: dict, multilabel: bool = False) -> dict:
    """run.json ``hyperparameters``: the architecture, the chosen values, the solver's settings and the grid."""
    loss = LOSS_TEXT["multilabel" if multilabel else "multiclass"]
    arch = {"architecture": cfg.family, "forward": FORWARD_TEXT[cfg.family]}
    hidden = {"hidden": best["hidden"]} if cfg.method == "mlp" else {}
    hidden_grid = {"hidden": list(cfg.hiddens)} if cfg.method == "mlp" else {}
    if cfg.has_strength:  # the mitigation's strength is one more grid axis
        hidden, hidden_grid = {"strength": best["strength"], **hidden}, {"strength": list(cfg.strengths), **hidden_grid}
    common = {"selection": SELECTION_TEXT[cfg.select], "seeds": list(cfg.seeds)}
    if cfg.solver == "lbfgs":
        from cxrfair.probe.train import GTOL, LBFGS_RECORD  # jax: see the note under the imports

        skip = {"l2_skip": best["l2_skip"]} if "l2_skip" in best else {}
        skip_grid = {"l2_skip": list(cfg.l2_skip_grid)} if skip else {}
        penalty = ("l2/2 * (||W1||^2 + ||W2||^2) + l2_skip/2 * ||W0||^2" if skip else "l2/2 * ||weights||^2")
        return {**arch, "l2": best["l2"], **skip, **hidden, "optimizer": "lbfgs", "batch": "full training split",
                "objective": f"mean {loss} + {penalty} (biases not penalised)", "loss": loss,
                "max_iter": cfg.max_iter, "gtol": GTOL, "ftol": cfg.ftol_value, "stopping": stopping_text(cfg),
                # The validation loss curve's spacing (iterations; null between), and always the last.
                "val_every": VAL_EVERY[cfg.method],
                # The keys whose path lanes warm-start along, largest first ([]: every lane from its seed's init).
                "warm_start": list(cfg.warm_path), "start": start_text(cfg),
                **LBFGS_RECORD, **common,
                "grid": {"l2": list(cfg.l2_grid), **skip_grid, **hidden_grid}}
    from cxrfair.probe.train import ADAM_B1, ADAM_B2, ADAM_EPS  # jax: see the note under the imports

    return {**arch, "lr": best["lr"], "weight_decay": best["weight_decay"], **hidden, "loss": loss, "epochs": cfg.epochs,
            "batch_size": cfg.batch_size, "optimizer": "adamw", "betas": [ADAM_B1, ADAM_B2], "eps": ADAM_EPS,
            "schedule": "cosine annealing to 0 over all steps", "last_batch": "kept, padded and masked (drop_last=False)",
            **common, "grid": {"lr": list(cfg.lrs), "weight_decay": list(cfg.weight_decays), **hidden_grid}}
