"""LoRA and full fine-tuning of a foundation model's image encoder, as small functions.

The shape follows the Flax MNIST example: ``create_state`` (model + optimizer + schedule),
``train_step``, ``train_epoch``, ``evaluate``, ``fit`` (epochs, best-epoch selection,
checkpoints), and ``finetune(config)`` gluing data, model and the run writer together.

Recipe (Sun et al., ISBI 2025): image encoder (+ peft LoRA on every attention and MLP linear, targets from
the model registry, or all weights for full fine-tuning) + a linear head D -> C; AdamW; cosine
annealing over all steps; cross-entropy; validation loss every epoch; the lowest-validation-loss
state is evaluated on val + test and written as a run. bf16 autocast on CUDA, fp32 on CPU.

The loss is computed per example first (``example_losses``: (B,) values) and reduced after, as a
weighted sum divided by the global batch's total weight (``sampler.Step.denominator``); this is
what keeps one process and several (``finetune.distributed``: DDP under torchrun) on the same
gradient, and where per-example weights or other loss terms plug in.

Resume: after every epoch a checkpoint (``finetune.checkpoint``) is written atomically to
``RUNS/.<run_id>.work/``. Batch order and augmentation are pure functions of (seed, epoch), so a
resumed run on CPU ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from cxrfair.core.metrics import accuracy, auc_macro
from cxrfair.core.multilabel import auc_macro as multilabel_auc_macro
from cxrfair.core.runs import TRACKING_DIR, check_runs_folder, make_predictions, write_run
from cxrfair.errors import CxrfairError
from cxrfair.extract.cohort import load_cohort
from cxrfair.extract.distributed import shard_rows
from cxrfair.extract.registry import get_spec, load_model
from cxrfair.finetune import data as fdata
from cxrfair.finetune import objectives
from cxrfair.finetune.checkpoint import (  # noqa: F401  (re-exported: the names tests and tools use)
    CHECKPOINT, CHECKPOINT_VERSION, check_fingerprint, load_checkpoint, rank_seed, read_checkpoint, restore,
    rng_states, save_checkpoint, seed_globals, set_rng_states,
)
from cxrfair.finetune.config import FinetuneConfig
from cxrfair.finetune.distributed import Dist, check_batchnorm, session, shared_image_cache, sync_batchnorm, wrap_ddp
from cxrfair.finetune.model import (  # noqa: F401  (re-exported)
    ADAPTER_DIR, FULL_WEIGHTS, Classifier, build_classifier, count_trainable, load_finetuned, load_trainable_state,
    lora_targets, pin_frozen_attention, save_weights, train_mode, trainable_state, wrap_lora,
)
from cxrfair.finetune.sampler import Step, epoch_order, plain_steps, plan_epoch
from cxrfair.io import atomic_dir
from cxrfair.tracking import Tracker, open_tracker

SPLITS = ("train", "val", "test")
# Test hooks: SIGKILL the process of rank KILL_RANK (default 0) right after optimizer step N.
KILL_AFTER_ENV = "CXRFAIR_FINETUNE_KILL_AFTER_STEPS"
KILL_RANK_ENV = "CXRFAIR_FINETUNE_KILL_RANK"


# ---------------------------------------------------------------------------------------------
# State and steps


@dataclass
class TrainState:
    """Everything that evolves during training (and is checkpointed)."""

    model: nn.Module  # the classifier itself: evaluated, checkpointed and saved
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0  # epochs completed
    best_epoch: int | None = None  # 1-based epoch of the lowest validation loss so far
    best_val: float = float("inf")
    best_state: dict = field(default_factory=dict)
    curves: dict = field(default_factory=lambda: {"train_loss": [], "val_loss": [], "lr": []})
    epoch_seconds: list = field(default_factory=list)
    wait_seconds: list = field(default_factory=list)
    images_seen: int = 0  # over all processes
    ddp: nn.Module | None = None  # DistributedDataParallel(model) under torchrun; training steps run through it
    objective: object | None = None  # finetune.objectives.Objective of the mitigation (None: erm, reweight)
    trainee: nn.Module | None = None  # what a step calls when the objective adds modules (model + adversary)
    total_steps: int = 1  # optimizer steps of the whole run (training progress for the adversary's schedule)

    @property
    def net(self) -> nn.Module:
        """The module a training step calls: the DDP wrapper when there is one."""
        if self.ddp is not None:
            return self.ddp
        return self.trainee if self.trainee is not None else self.model


def create_state(model: nn.Module, config: FinetuneConfig, total_steps: int, objective=None) -> TrainState:
    """AdamW over the trainable parameters (and the objective's, e.g. an adversary) + cosine
    annealing to 0 over ``total_steps`` steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    extra = objective.parameters() if objective is not None else []
    opt = torch.optim.AdamW(params + extra, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    state = TrainState(model=model, optimizer=opt, scheduler=sched, objective=objective, total_steps=max(total_steps, 1))
    if objective is not None:
        wrapped = objective.wrap(model)
        state.trainee = wrapped if wrapped is not model else None
    return state


@dataclass(frozen=True)
class Runtime:
    """Device-side settings shared by the step functions."""

    device: torch.device
    bf16: bool  # autocast matmuls to bfloat16 (CUDA)
    normalize: Callable[[torch.Tensor], torch.Tensor]  # (B,3,S,S) uint8 -> float, the model's own

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def example_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rt: Runtime,
                   n_logits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example task loss and the model's outputs.

    Args:
        x: (B, 3, S, S) uint8; y: (B,) int64 class indices (multi-class) or (B, C) float32 in
            {0, 1, NaN} (multi-label, NaN = masked).
        n_logits: the task's logits are the first ``n_logits`` output columns (a model with
            more outputs, e.g. classifier + adversary); None: all of them.

    Returns:
        losses (B,) float32 (``task_losses``), outputs (B, C) or (B, n_logits + ...) float32
        (fp32 even under bf16 autocast).
    """
    with rt.autocast():
        logits = model(rt.normalize(x))
    logits = logits.float()
    return task_losses(logits if n_logits is None else logits[:, :n_logits], y), logits


def task_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) cross-entropy for (B,) class indices; masked binary cross-entropy for (B, C) float targets."""
    if y.is_floating_point():
        return masked_bce(logits, y)
    return nn.functional.cross_entropy(logits, y, reduction="none")


def masked_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Multi-label loss: (B, C) logits and (B, C) targets in {0, 1, NaN} -> (B,) mean binary
    cross-entropy over each row's observed conditions (NaN contributes nothing; 0 when none is)."""
    observed = ~torch.isnan(y)
    per = nn.functional.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y), reduction="none")
    per = torch.where(observed, per, 0.0)
    return per.sum(dim=1) / observed.sum(dim=1).clamp(min=1)


def output_probs(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Softmax over classes (multi-class) or a sigmoid per condition (multi-label)."""
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)


def reduce_loss(losses: torch.Tensor, weights: torch.Tensor, denominator: float) -> torch.Tensor:
    """A micro-batch's share of a global batch's loss: ``sum_i w_i * losses_i / denominator``.

    Args:
        losses: (b,) per-example losses; weights: (b,) per-example weights (0 for padding rows);
        denominator: the global batch's total weight, the same on every process.

    Summed over a step's micro-batches and over processes (DDP sums gradients), this is the
    weighted mean loss of the global batch, so the gradient does not depend on how the batch
    was split.
    """
    return (losses * weights).sum() / denominator


def no_sync(state: TrainState, skip: bool):
    """DDP's ``no_sync`` for all but a step's last micro-batch (gradients accumulate locally), else nothing."""
    return state.ddp.no_sync() if skip and state.ddp is not None else contextlib.nullcontext()


def train_step(state: TrainState, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, step: Step, rt: Runtime,
               cells: torch.Tensor | None = None, groups: torch.Tensor | None = None) -> torch.Tensor:
    """One AdamW + scheduler step over this process's share of a global batch.

    Each micro-batch's ``reduce_loss`` is back-propagated (DDP syncs after the last one); with
    a mitigation's objective, ``mitigated_step`` instead.

    Args:
        x: (b, 3, S, S) uint8, y: (b,) int64 or (b, C) float32, w: (b,) float32: the share
            (see ``sampler.Step``); cells, groups: (b,) int64 for an objective.

    Returns:
        The share's summed per-example task loss, float64, detached and not synced (0 for padding).
    """
    if state.objective is not None:
        return mitigated_step(state, x, y, w, step, rt, cells, groups)
    state.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    last = len(step.chunks) - 1
    for i, (a, b) in enumerate(step.chunks):
        with no_sync(state, i < last):
            losses, _ = example_losses(state.net, x[a:b], y[a:b], rt)
            reduce_loss(losses, w[a:b], step.denominator).backward()
        total += losses.detach().double().sum()
    state.optimizer.step()
    state.scheduler.step()
    return torch.zeros_like(total) if step.pad else total


def mitigated_step(state: TrainState, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, step: Step, rt: Runtime,
                   cells: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``train_step`` with a mitigation's objective: its hooks see the step's losses (``batch_statistics``:
    a gradient-free first pass over the micro-batches, with the RNG state replayed for the real one),
    and each micro-batch back-propagates ``objective.chunk_loss``."""
    obj = state.objective
    n_logits = obj.n_classes if state.trainee is not None else None  # the adversary's logits follow the task's
    state.optimizer.zero_grad(set_to_none=True)
    obj.begin_step(state.scheduler.last_epoch / state.total_steps)
    if obj.batch_statistics and len(step.chunks) > 1:
        with torch.no_grad(), torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
            first = torch.cat([example_losses(state.net, x[a:b], y[a:b], rt, n_logits)[0] for a, b in step.chunks])
        obj.step_statistics(first, cells, w)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    last = len(step.chunks) - 1
    for i, (a, b) in enumerate(step.chunks):
        with no_sync(state, i < last):
            losses, out = example_losses(state.net, x[a:b], y[a:b], rt, n_logits)
            if obj.batch_statistics and len(step.chunks) == 1:
                obj.step_statistics(losses.detach(), cells, w)
            obj.chunk_loss(out, losses, y[a:b], cells[a:b], groups[a:b], w[a:b], step.denominator, step).backward()
        total += losses.detach().double().sum()
    state.optimizer.step()
    state.scheduler.step()
    return torch.zeros_like(total) if step.pad else total


def train_epoch(state: TrainState, batches: fdata.Prefetcher, rt: Runtime, bar=None, d: Dist = Dist(),
                cells: np.ndarray | None = None, groups: np.ndarray | None = None, step_log: list | None = None) -> dict:
    """One pass over the training steps. Returns ``{"loss", "seconds", "wait", "images"}`` (loss and images over all processes).

    ``cells``, ``groups``: (N,) int64 per cohort row, for a mitigation's objective. ``step_log``
    (tracking): gets ``(step, summed loss tensor, images, lr)`` per optimizer step, this process's
    share; the tensor stays on the device (read with the epoch's one sync, ``log_epoch``).
    """
    train_mode(state.model)
    t0 = time.perf_counter()
    total, n = torch.zeros((), dtype=torch.float64, device=rt.device), 0
    for x, y, w, step in batches:
        lr = state.optimizer.param_groups[0]["lr"]  # this step's (the scheduler moves it on after the step)
        if state.objective is not None:
            c, g = (torch.from_numpy(a[step.rows]).to(rt.device) for a in (cells, groups))
            loss = train_step(state, x, y, w, step, rt, c, g)
        else:
            loss = train_step(state, x, y, w, step, rt)
        total += loss
        if step_log is not None:
            step_log.append((state.scheduler.last_epoch, loss, step.images, lr))
        n += step.images
        kill_hook(state, d)
        if bar is not None:
            bar.update(1)
    seconds = time.perf_counter() - t0
    sums = d.gather((float(total), n))  # one host sync per epoch
    loss_sum, images = math.fsum(s[0] for s in sums), sum(s[1] for s in sums)
    return {"loss": loss_sum / max(images, 1), "seconds": seconds, "wait": batches.wait_s, "images": images}


def kill_hook(state: TrainState, d: Dist) -> None:
    """Test hook: SIGKILL this process after optimizer step ``$CXRFAIR_FINETUNE_KILL_AFTER_STEPS`` (counted from the start)."""
    after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    if after and state.scheduler.last_epoch == after and d.rank == int(os.environ.get(KILL_RANK_ENV, "0") or 0):
        os.kill(os.getpid(), signal.SIGKILL)


@torch.no_grad()
def evaluate(model: nn.Module, pixels: np.ndarray, labels: np.ndarray, idx: np.ndarray, batch_size: int,
             rt: Runtime, d: Dist = Dist()) -> tuple[float, np.ndarray]:
    """Mean task loss and probabilities (softmax, or a sigmoid per condition) on rows ``idx`` of the cache.

    Each process evaluates a contiguous shard of ``idx``; the shards are gathered in rank order.

    Returns:
        loss: float (mean over ``idx``); probs: (len(idx), C) float64, rows in ``idx`` order.
        (Multi-label rows without an observed condition add 0 to the mean: a constant factor
        across epochs, which leaves the selected epoch alone.)
    """
    model.eval()
    start, stop = shard_rows(len(idx), d.rank, d.world)
    losses, probs = [], []
    for x, y, _, _ in fdata.Prefetcher(pixels, labels, plain_steps(idx[start:stop], batch_size), rt.device):
        loss, logits = example_losses(model, x, y, rt)
        losses.append(loss.double().cpu().numpy())
        probs.append(output_probs(logits, labels.ndim == 2).double().cpu().numpy())
    shards = [s for s in d.gather((losses, probs)) if s[0]]
    all_losses = np.concatenate([a for s in shards for a in s[0]])
    return float(all_losses.sum() / len(idx)), np.concatenate([p for s in shards for p in s[1]])


# ---------------------------------------------------------------------------------------------
# Fit


@dataclass(frozen=True)
class Data:
    """The decoded cohort: pixels (N,3,S,S) uint8, labels, row indices per split, mitigation inputs."""

    pixels: np.ndarray
    labels: np.ndarray  # (N,) int64 class index (multi-class) or (N, C) float32 in {0, 1, NaN} (multi-label)
    split: dict  # name -> (n_split,) int64 row indices, cohort order
    row_weights: np.ndarray | None = None  # (N,) float32 loss weight per row; None: all 1
    groups: np.ndarray | None = None  # (N,) int64 group of the sensitive attribute (a mitigation's)
    cells: np.ndarray | None = None  # (N,) int64 (group, class) or group cell


@dataclass(frozen=True)
class EpochLog:
    """What ``on_epoch_end`` sees after an epoch has been checkpointed (on every process)."""

    epoch: int  # 1-based
    train_loss: float
    val_loss: float
    images_per_s: float
    checkpoint: Path


def augment_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 7]).generate_state(1)[0])


def fit(state: TrainState, data: Data, config: FinetuneConfig, rt: Runtime, ckpt_path: Path, fingerprint: dict,
        on_epoch_end: Callable[[EpochLog], None] | None = None, progress: bool = True, d: Dist = Dist(),
        tracker: Tracker = Tracker()) -> TrainState:
    """Train from ``state.epoch`` to ``config.epochs``, keeping the lowest-validation-loss state.

    After each epoch: validation loss, best-state bookkeeping, the epoch's curves to ``tracker``
    (``log_epoch``), an atomic checkpoint (rank 0), then ``on_epoch_end`` (which may raise to stop
    the run; the checkpoint is already on disk).
    """
    from tqdm.auto import tqdm

    train_idx = data.split["train"]
    synced_bn = any(isinstance(m, nn.SyncBatchNorm) for m in state.model.modules())
    epochs = tqdm(range(state.epoch, config.epochs), initial=state.epoch, total=config.epochs,
                  desc=f"{config.method} {config.model}", unit="epoch", disable=not progress)
    for epoch in epochs:
        order = train_idx[epoch_order(len(train_idx), config.seed, epoch)]
        steps = plan_epoch(order, config.batch_size, d.rank, d.world, config.micro_batch, keep_empty=synced_bn,
                           row_weights=data.row_weights)
        batches = fdata.Prefetcher(data.pixels, data.labels, steps, rt.device,
                                   augment_seed=augment_seed(config.seed, epoch) if config.augment else None)
        step_log = [] if tracker.active else None
        with tqdm(total=len(steps), desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=not progress) as bar:
            stats = train_epoch(state, batches, rt, bar, d, data.cells, data.groups, step_log)
        val_loss, val_probs = evaluate(state.model, data.pixels, data.labels, data.split["val"], config.batch_size, rt, d)
        record_epoch(state, stats, val_loss)
        if tracker.active:
            log_epoch(tracker, state, step_log, val_probs, data.labels[data.split["val"]])
        rngs = d.gather(rng_states())
        d.on_main(lambda: save_checkpoint(ckpt_path, state, fingerprint, rngs))
        ips = stats["images"] / max(stats["seconds"], 1e-9)
        epochs.set_postfix(loss=f"{stats['loss']:.4f}", val_loss=f"{val_loss:.4f}", img_s=f"{ips:.0f}")
        if on_epoch_end is not None:
            on_epoch_end(EpochLog(state.epoch, stats["loss"], val_loss, ips, ckpt_path))
    return state


def record_epoch(state: TrainState, stats: dict, val_loss: float) -> None:
    """Append curves and timings; keep a copy of the weights when validation loss improved (strictly)."""
    state.epoch += 1
    state.curves["train_loss"].append(stats["loss"])
    state.curves["val_loss"].append(val_loss)
    state.curves["lr"].append(state.optimizer.param_groups[0]["lr"])
    state.epoch_seconds.append(stats["seconds"])
    state.wait_seconds.append(stats["wait"])
    state.images_seen += stats["images"]
    if val_loss < state.best_val:  # ties keep the earlier epoch
        state.best_val, state.best_epoch = val_loss, state.epoch
        state.best_state = trainable_state(state.model)


def log_epoch(tracker: Tracker, state: TrainState, step_log: list, val_probs: np.ndarray, val_labels: np.ndarray) -> None:
    """The epoch just recorded, to ``tracker`` (main process; x axis: the global optimizer step).

    Per step: ``train/loss`` (the mean task loss of this process's share of the batch: the whole
    batch on one process) and ``train/lr``. At the epoch's last step: the run.json curves
    (``epoch/train_loss``, ``epoch/val_loss``, ``epoch/lr``), ``epoch/epoch``, validation
    ``val/auc_macro`` (+ ``val/accuracy``, multi-class) and the selection rule's state:
    ``val/best_loss`` (lowest validation loss so far) and ``val/selected_epoch`` (its epoch).
    """
    losses = torch.stack([loss for _, loss, _, _ in step_log]).cpu().tolist() if step_log else []  # one sync
    for (step, _, images, lr), loss in zip(step_log, losses):
        tracker.log(step, {"train/lr": lr, **({"train/loss": loss / images} if images else {})})
    multi = val_labels.ndim == 2
    auc = multilabel_auc_macro(val_labels, val_probs) if multi else auc_macro(val_labels, val_probs)
    curves = {f"epoch/{name}": values[-1] for name, values in state.curves.items()}
    selected = {} if state.best_epoch is None else {"val/selected_epoch": state.best_epoch}  # None: no finite loss yet
    tracker.log(state.scheduler.last_epoch, {**curves, "epoch/epoch": state.epoch, "val/auc_macro": auc,
                                             **({} if multi else {"val/accuracy": accuracy(val_labels, val_probs)}),
                                             "val/best_loss": state.best_val, **selected})


# ---------------------------------------------------------------------------------------------
# The whole run


@dataclass(frozen=True)
class RunResult:
    """What ``finetune`` returns (everything is also on disk under ``run_dir``)."""

    run_dir: Path
    run_id: str
    selected_epoch: int  # 1-based epoch whose weights were evaluated
    trainable_params: int
    curves: dict  # train_loss, val_loss, lr: one value per epoch
    probs: np.ndarray  # (N_val + N_test, C), rows in predictions.csv order
    timings: dict
    weights: Path  # adapter folder (lora) or model.safetensors (full)
    world_size: int = 1  # processes that trained it (torchrun)


def resolve_device(name: str, d: Dist = Dist()) -> torch.device:
    """``--device`` as a torch device; under torchrun each CUDA process takes GPU ``LOCAL_RANK``."""
    if name == "cuda" and not torch.cuda.is_available():
        raise CxrfairError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", d.local_rank) if d.active else torch.device("cuda")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def load_data(cohort, fm, config: FinetuneConfig, d: Dist = Dist()) -> Data:
    """Decode the cohort once into the uint8 cache (memory or memmap) and index its splits.

    Under torchrun the cache is always the shared file, decoded by all processes together and
    memory-mapped by each (``--image-cache memory`` then copies it into each process's memory).
    """
    table = cohort.table
    paths = cohort.image_paths(config.images)
    to_file = d.active or config.cache == "file" or (
        config.cache == "auto" and fdata.cache_bytes(len(paths), fm.preprocess.size) > config.cache_max_gb * 2**30)
    file = None
    if to_file:
        root = str(config.images or cohort.meta.get("images_root"))
        file = fdata.cache_file_for(config.out, fdata.cache_key(cohort.hash, fm.preprocess, root))
    if d.active:
        pixels = shared_image_cache(paths, fm.preprocess, file, config.workers, d)
        pixels = np.array(pixels) if config.cache == "memory" else pixels
    else:
        pixels = fdata.image_cache(paths, fm.preprocess, workers=config.workers, file=file)
    split = {s: np.flatnonzero(table["split"].to_numpy() == s) for s in SPLITS}
    return Data(pixels=pixels, labels=cohort.targets(), split=split)


def mitigation_inputs(config: FinetuneConfig, cohort) -> dict:
    """Row weights, groups and cells for ``config.mitigation`` (checked against the cohort before any work).

    Multi-label rows without any observed condition get weight 0 (they carry no loss). Returns
    ``Data`` fields: ``row_weights``, ``groups``, ``cells`` (absent when not needed).
    """
    train = np.flatnonzero(cohort.table["split"].to_numpy() == "train")
    multilabel = cohort.task == "multilabel"
    out: dict = {}
    if multilabel:
        out["row_weights"] = (~np.isnan(cohort.targets())).any(axis=1).astype(np.float32)
    if config.sensitive is None:  # erm: no groups
        return out
    attrs = cohort.attributes
    if config.sensitive not in attrs:
        raise CxrfairError(f"--sensitive {config.sensitive}: cohort {cohort.folder} has no such sensitive attribute; "
                           f"expected one of {', '.join(attrs)}")
    groups = objectives.group_ids(cohort.table, config.sensitive, list(attrs[config.sensitive]["groups"]), train,
                                  str(cohort.folder))
    labels = np.zeros(len(groups), np.int64) if multilabel else cohort.targets()
    cells, n_cells = objectives.cell_ids(groups, labels, len(attrs[config.sensitive]["groups"]), len(cohort.classes),
                                         multilabel)
    row_weights = objectives.TERMS[config.mitigation].row_weights
    if row_weights is not None:
        w = row_weights(cells, train, float(config.strength), n_cells)
        out["row_weights"] = w * out.get("row_weights", 1.0)
    return {**out, "groups": groups, "cells": cells}


def finetune(config: FinetuneConfig, *, on_epoch_end: Callable[[EpochLog], None] | None = None,
             progress: bool = True) -> RunResult:
    """Fine-tune ``config.model`` on ``config.cohort`` and write the run to ``config.out``.

    Launched by torchrun with several processes, every process calls this and they train one
    run together with DDP (see ``finetune.distributed``); rank 0 writes it.

    Args:
        config: the run's configuration (``batch_size`` is the global batch, all processes together).
        on_epoch_end: called after each epoch's checkpoint, on every process; raising in it
            interrupts the run (``config.resume`` continues it later).
        progress: show tqdm bars (rank 0 only).

    Returns:
        RunResult (the same on every process). Raises CxrfairError for anything the user can
        fix; nothing is written to ``out/<run_id>`` unless the run completes.
    """
    t_start = time.perf_counter()
    with session(config.device) as d:
        setup = prepare(config, d)
        state = build_state(config, setup, d)
        with run_tracker(config, setup, d) as tracker:
            fit(state, setup.data, config, setup.rt, setup.ckpt_path, setup.fingerprint, on_epoch_end,
                progress and d.main, d, tracker)
        return finish(config, setup, state, t_start, d)


def run_tracker(config: FinetuneConfig, setup: "Setup", d: Dist = Dist()) -> Tracker:
    """``config.track``'s tracker (rank 0; a no-op one when off) writing beside the checkpoint, in
    ``RUNS/.<run_id>.work/tracking/``; ``finish`` moves it into the run folder. A resumed run adds to
    it; a fresh start first drops what an earlier attempt left there."""
    log_dir = setup.ckpt_path.parent / TRACKING_DIR
    if config.track is not None and setup.checkpoint is None and d.main:
        shutil.rmtree(log_dir, ignore_errors=True)
    return open_tracker(config.track, log_dir, config.run_id, {**config.hyperparameters(), "run_id": config.run_id})


@dataclass(frozen=True)
class Setup:
    """Everything loaded and checked before training starts."""

    cohort: object  # cxrfair.extract.cohort.Cohort
    fm: object  # cxrfair.extract.registry.FoundationModel
    data: Data
    rt: Runtime
    fingerprint: dict  # what a checkpoint of this run must agree on
    ckpt_path: Path
    checkpoint: dict | None  # loaded when resuming
    cache_s: float  # seconds spent building the image cache


def prepare(config: FinetuneConfig, d: Dist = Dist()) -> Setup:
    """Check everything cheap first (model spec, outputs, cohort, checkpoint), then load model and images.

    Checks that touch files run on rank 0; their errors reach every process.
    """

    spec = get_spec(config.model)
    if config.method == "lora":
        lora_targets(spec)
    ckpt_path = config.out / f".{config.run_id}.work" / CHECKPOINT
    d.on_main(lambda: check_outputs(config.out / config.run_id, ckpt_path, config))
    cohort = load_cohort(config.cohort)
    check_splits(cohort)
    inputs = mitigation_inputs(config, cohort)
    one_forward = objectives.TERMS[config.mitigation].one_forward
    if one_forward and config.micro_batch and config.micro_batch < math.ceil(config.batch_size / d.world):
        raise CxrfairError(f"--mitigation {config.mitigation} with --micro-batch {config.micro_batch}: the term compares "
                           "the whole batch's scores, so each process needs its share in one forward pass; drop --micro-batch")
    d.on_main(lambda: check_runs_folder(config.out, cohort.hash, [config.run_id], config.force))
    device = resolve_device(config.device, d)
    precision = resolve_precision(config.precision, device)
    fingerprint = {**config.training_fields(), "precision": precision, "cohort_hash": cohort.hash}
    resumer = Resumer(ckpt_path, fingerprint, config)
    d.on_main(resumer.check)
    fm = load_model(config.model, config.weights, str(device))
    check_batchnorm(fm.image_encoder, config.method, d, device)
    fingerprint["weights_id"] = fm.weights_id
    resuming = d.on_main(resumer.check)
    checkpoint = d.everywhere(lambda: resumer.loaded if d.main else read_checkpoint(ckpt_path) if resuming else None)
    t0 = time.perf_counter()
    data = replace(load_data(cohort, fm, config, d), **inputs)
    rt = Runtime(device=device, bf16=precision == "bf16", normalize=fm.preprocess.normalize)
    return Setup(cohort, fm, data, rt, fingerprint, ckpt_path, checkpoint, time.perf_counter() - t0)


class Resumer:
    """Rank 0's view of ``--resume``: the checkpoint to continue from (checked twice: before and after
    loading the model, whose weights id joins the fingerprint), and one line on stderr saying what happens."""

    def __init__(self, path: Path, fingerprint: dict, config: FinetuneConfig):
        self.path, self.fingerprint, self.config = path, fingerprint, config
        self.loaded: dict | None = None
        self.calls = 0

    def check(self) -> bool:
        self.calls += 1
        if self.config.resume and self.calls == 1 and not self.path.is_file():
            print(f"note: --resume: no checkpoint of {self.config.run_id} at {self.path}; starting from epoch 1",
                  file=sys.stderr)
        self.loaded = resume_checkpoint(self.path, self.fingerprint, self.config, self.loaded)
        if self.config.resume and self.calls == 2 and self.loaded is not None:
            print(f"resuming {self.config.run_id} after epoch {self.loaded['epoch']} of {self.config.epochs} "
                  f"({self.path})", file=sys.stderr)
        return self.loaded is not None


def build_state(config: FinetuneConfig, setup: Setup, d: Dist = Dist()) -> TrainState:
    """Model (SyncBatchNorm and DDP under torchrun), optimizer and schedule; seeded; restored when resuming."""
    device = setup.rt.device
    model = build_classifier(setup.fm, len(setup.cohort.classes), config).to(device)
    model = sync_batchnorm(model, d, device)
    steps = config.epochs * math.ceil(len(setup.data.split["train"]) / config.batch_size)
    state = create_state(model, config, steps, build_objective(config, setup, d))
    if d.active:
        state.ddp = wrap_ddp(state.trainee or model, d, device, setup.fm.preprocess.size)
    seed_globals(rank_seed(config.seed, d.rank))
    if setup.checkpoint is not None:
        restore(state, setup.checkpoint, d.rank, d.world)
    return state


def build_objective(config: FinetuneConfig, setup: Setup, d: Dist = Dist()):
    """The mitigation's step-time objective (``finetune.objectives``), or None (erm, reweight)."""
    if objectives.TERMS[config.mitigation].objective is None:
        return None
    cohort = setup.cohort
    n_groups = len(cohort.attributes[config.sensitive]["groups"])
    n_cells = n_groups if cohort.task == "multilabel" else n_groups * len(cohort.classes)
    counts = objectives.train_cell_counts(setup.data.cells, setup.data.split["train"], n_cells)
    return objectives.make_objective(config.mitigation, config.strength, n_groups, n_cells, len(cohort.classes),
                                     cohort.task == "multilabel", d, setup.fm.embed_dim, config.seed, counts)


def finish(config: FinetuneConfig, setup: Setup, state: TrainState, t_start: float, d: Dist = Dist()) -> RunResult:
    """Evaluate the lowest-validation-loss state on val + test, write run + weights (rank 0), drop the checkpoint."""
    t0 = time.perf_counter()
    load_trainable_state(state.model, state.best_state)
    eval_idx = np.concatenate([setup.data.split["val"], setup.data.split["test"]])
    _, probs = evaluate(state.model, setup.data.pixels, setup.data.labels, eval_idx, config.batch_size, setup.rt, d)
    timings = summarize_timings(state, setup.cache_s, time.perf_counter() - t0, time.perf_counter() - t_start)
    meta = run_meta(config, setup, state, timings, d.world)

    def write() -> Path:
        weights = write_outputs(config, setup.cohort, state.model, meta, eval_idx, probs)
        tracked = setup.ckpt_path.parent / TRACKING_DIR
        if config.track is not None and tracked.is_dir():
            tracked.replace(config.out / config.run_id / TRACKING_DIR)
        shutil.rmtree(setup.ckpt_path.parent, ignore_errors=True)
        return weights

    weights = d.on_main(write)
    return RunResult(run_dir=config.out / config.run_id, run_id=config.run_id, selected_epoch=state.best_epoch,
                     trainable_params=meta["trainable_params"], curves=state.curves, probs=probs,
                     timings=timings, weights=weights, world_size=d.world)


def resume_checkpoint(path: Path, fingerprint: dict, config: FinetuneConfig, loaded: dict | None = None) -> dict | None:
    """The checkpoint to resume from, or None to start fresh.

    Without ``--resume`` there is none (``check_outputs`` already refused or removed a stale
    one). A checkpoint from another configuration is an error, or, with ``--force``, deleted.
    """
    if not config.resume or not path.is_file():
        return None
    try:
        if loaded is None:
            return load_checkpoint(path, fingerprint)
        check_fingerprint(loaded["fingerprint"], fingerprint, path)
        return loaded
    except CxrfairError:
        if not config.force:
            raise
        path.unlink()
        print(f"note: --force: discarded checkpoint {path} (another configuration's, or unreadable); "
              "starting from epoch 1", file=sys.stderr)
        return None


def check_splits(cohort) -> None:
    """Every split must hold images: train to learn, val to select the epoch, test to report."""
    for s in SPLITS:
        if not (cohort.table["split"] == s).any():
            raise CxrfairError(
                f"cohort {cohort.folder}: split '{s}' is empty; fine-tuning needs train, val and test "
                "images; rebuild the cohort with more images per group"
            )


def check_outputs(run_dir: Path, ckpt_path: Path, config: FinetuneConfig) -> None:
    """Refuse early (before any work) to overwrite a finished run or ignore an interrupted one."""
    if run_dir.is_dir() and any(run_dir.iterdir()) and not config.force:
        raise CxrfairError(f"run folder {run_dir}: already exists; pass --force to replace it")
    if ckpt_path.is_file() and not config.resume:
        if not config.force:
            raise CxrfairError(
                f"checkpoint {ckpt_path}: an interrupted run of {config.run_id} is there; pass --resume "
                "to continue it or --force to start over"
            )
        ckpt_path.unlink()


def summarize_timings(state: TrainState, cache_s: float, eval_s: float, total_s: float) -> dict:
    """Seconds (and two rates) for run.json; epoch lists cover resumed epochs too."""
    train_s = float(sum(state.epoch_seconds))
    return {
        "image_cache": cache_s, "train": train_s, "eval": eval_s, "total": total_s,
        "per_epoch": [float(s) for s in state.epoch_seconds],
        "images_per_s": state.images_seen / train_s if train_s > 0 else None,
        "data_wait_fraction": float(sum(state.wait_seconds)) / train_s if train_s > 0 else None,
    }


def run_meta(config: FinetuneConfig, setup: Setup, state: TrainState, timings: dict, world_size: int = 1) -> dict:
    """run.json contents (the shared run format + fine-tuning extras)."""
    cohort, fm = setup.cohort, setup.fm
    precision = setup.fingerprint["precision"]
    return {
        "run_id": config.run_id, "model": config.model, "method": config.method, "seed": config.seed,
        "classes": cohort.classes, "cohort_hash": cohort.hash, "task": cohort.task, "attributes": cohort.attributes,
        "mitigation": config.mitigation, "sensitive": config.sensitive, "strength": config.strength,
        "hyperparameters": {**config.hyperparameters(), "precision": precision},
        "selected_epoch": state.best_epoch, "trainable_params": count_trainable(state.model),
        "timings": timings, "curves": state.curves, "weights_id": fm.weights_id,
        "world_size": world_size, "source": str(config.cohort),
        "notes": "selected_epoch is 1-based; curves hold one value per epoch; batch_size is the global batch; "
                 f"weights in {ADAPTER_DIR if config.method == 'lora' else FULL_WEIGHTS}",
    }


def write_outputs(config: FinetuneConfig, cohort, model: nn.Module, meta: dict, eval_idx: np.ndarray,
                  probs: np.ndarray) -> Path:
    """Write the run (predictions + run.json) and then the weights into it.

    The weights are written first into a hidden folder and moved into the finished run folder by
    one rename, so the run folder never holds a half-written adapter.
    """

    predictions = make_predictions(cohort.table.iloc[eval_idx], probs, cohort.classes, task=cohort.task,
                                   attributes=cohort.attributes)
    staging = config.out / f".{config.run_id}.weights"
    with atomic_dir(staging, force=True, option="--out", inputs=(config.cohort,), writes=(ADAPTER_DIR, FULL_WEIGHTS)) as tmp:
        save_weights(model, tmp, config.method)
    run_dir = write_run(config.out, meta, predictions, force=config.force)
    name = ADAPTER_DIR if config.method == "lora" else FULL_WEIGHTS
    (staging / name).replace(run_dir / name)
    shutil.rmtree(staging, ignore_errors=True)
    return run_dir / name
