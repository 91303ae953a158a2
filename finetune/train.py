"""LoRA and full fine-tuning of a foundation model's image encoder, as small functions.

The shape follows the Flax MNIST example: ``create_state`` (model + optimizer + schedule),
``train_step``, ``train_epoch``, ``evaluate``, ``fit`` (epochs, best-epoch selection,
checkpoints), and ``finetune(config)`` gluing data, model and the run writer together.

Recipe (PAPER.md §3): image encoder (+ peft LoRA on every attention and MLP linear, targets from
the model registry, or all weights for full fine-tuning) + a linear head D -> C; AdamW; cosine
annealing over all steps; cross-entropy; validation loss every epoch; the lowest-validation-loss
state is evaluated on val + test and written as a run. bf16 autocast on CUDA, fp32 on CPU.

Resume: after every epoch a checkpoint (trainable weights + buffers, optimizer, scheduler, RNG
states, best-so-far state, curves) is written atomically to ``RUNS/.<run_id>.work/``. Batch order
and augmentation are pure functions of (seed, epoch), so a resumed run on CPU ends bit-identical
to an uninterrupted one.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from cxrfair.errors import CxrfairError
from cxrfair.finetune import data as fdata
from cxrfair.finetune.config import FinetuneConfig
from cxrfair.io import atomic_dir, atomic_path

SPLITS = ("train", "val", "test")
CHECKPOINT = "checkpoint.pt"
ADAPTER_DIR = "adapter"  # peft save_pretrained folder inside the run (LoRA)
FULL_WEIGHTS = "model.safetensors"  # state dict of encoder + head (full fine-tuning)
CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Model


class Classifier(nn.Module):
    """Image encoder + linear head: (B, 3, S, S) normalised float -> (B, C) logits."""

    def __init__(self, encoder: nn.Module, embed_dim: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def lora_targets(spec) -> tuple[str, ...] | str:
    """The registry's peft ``target_modules`` for a model; CxrfairError if it has none."""
    if not spec.lora_targets:
        raise CxrfairError(
            f"--model {spec.name}: the registry has no LoRA target list for this architecture; "
            "use `cxrfair finetune full`, or add lora_targets to its ModelSpec"
        )
    return spec.lora_targets if isinstance(spec.lora_targets, str) else list(spec.lora_targets)


def build_classifier(fm, num_classes: int, config: FinetuneConfig) -> nn.Module:
    """Classifier for ``config.method``: peft-wrapped (LoRA + trainable head) or fully trainable.

    Head and LoRA initialisation draw from a generator seeded with ``config.seed`` (the global
    RNG is left alone), so the same seed always gives the same starting point.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = Classifier(fm.image_encoder, fm.embed_dim, num_classes)
        if config.method == "full":
            model.requires_grad_(True)
            return model
        return wrap_lora(model, lora_targets(fm.spec), config)


def wrap_lora(model: Classifier, targets, config: FinetuneConfig) -> nn.Module:
    """peft LoRA on ``targets`` of the encoder; the head is trained whole (``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=targets, modules_to_save=["head"],
    )
    try:
        peft_model = get_peft_model(model, lcfg)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise CxrfairError(f"--model: LoRA targets {targets!r} do not match the encoder ({e})") from None
    pin_frozen_attention(peft_model)
    return peft_model


def pin_frozen_attention(model: nn.Module) -> None:
    """Keep frozen ``nn.MultiheadAttention`` weights bit-identical under peft's LoRA.

    peft's LoRA for MultiheadAttention merges the update into the base weights for each forward
    and subtracts it again afterwards; ``(W + dW) - dW`` is not ``W`` in floating point, so the
    "frozen" weights random-walk by a few ulps per forward. A forward hook copies the pristine
    weights back after every call (the merged tensors are fresh, so nothing else sees the copy).
    """
    from peft.tuners.lora.layer import MultiheadAttention as LoraMHA

    for module in model.modules():
        if not isinstance(module, LoraMHA):
            continue
        base = module.get_base_layer()
        pristine = (base.in_proj_weight.detach().clone(), base.out_proj.get_base_layer().weight.detach().clone())

        def restore(mod, args, output, pristine=pristine):
            b = mod.get_base_layer()
            with torch.no_grad():
                b.in_proj_weight.copy_(pristine[0])
                b.out_proj.get_base_layer().weight.copy_(pristine[1])

        module.register_forward_hook(restore)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors training changes: trainable parameters and all buffers (e.g. BatchNorm stats), on CPU."""
    params = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach().cpu().clone() for n, b in model.named_buffers()}
    return {**params, **buffers}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from ``trainable_state``) into ``model`` in place (parameters keep identity)."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    unknown = sorted(set(state) - set(tensors))
    if unknown:
        raise CxrfairError(f"checkpoint holds tensors this model lacks ({unknown[:3]}...); pass --force to start over")
    with torch.no_grad():
        for name, t in state.items():
            tensors[name].copy_(t)


# ---------------------------------------------------------------------------------------------
# State and steps


@dataclass
class TrainState:
    """Everything that evolves during training (and is checkpointed)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0  # epochs completed
    best_epoch: int | None = None  # 1-based epoch of the lowest validation loss so far
    best_val: float = float("inf")
    best_state: dict = field(default_factory=dict)
    curves: dict = field(default_factory=lambda: {"train_loss": [], "val_loss": [], "lr": []})
    epoch_seconds: list = field(default_factory=list)
    wait_seconds: list = field(default_factory=list)
    images_seen: int = 0


def create_state(model: nn.Module, config: FinetuneConfig, total_steps: int) -> TrainState:
    """AdamW over the trainable parameters + cosine annealing to 0 over ``total_steps`` steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    return TrainState(model=model, optimizer=opt, scheduler=sched)


@dataclass(frozen=True)
class Runtime:
    """Device-side settings shared by the step functions."""

    device: torch.device
    bf16: bool  # autocast matmuls to bfloat16 (CUDA)
    normalize: Callable[[torch.Tensor], torch.Tensor]  # (B,3,S,S) uint8 -> float, the model's own

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and logits. x: (B,3,S,S) uint8; y: (B,) int64 -> (scalar, (B, C) float32)."""
    with rt.autocast():
        logits = model(rt.normalize(x))
    logits = logits.float()  # loss and softmax in fp32 even under bf16 autocast
    return nn.functional.cross_entropy(logits, y), logits


def train_step(state: TrainState, x: torch.Tensor, y: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """One AdamW step + one scheduler step; returns the batch loss (detached, not synced)."""
    loss, _ = loss_fn(state.model, x, y, rt)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    return loss.detach()


def train_mode(model: nn.Module) -> None:
    """``model.train()``, except BatchNorm layers whose affine weights are frozen stay in eval mode.

    Under LoRA the backbone is frozen, and that includes its normalisation statistics: the saved
    adapter holds only adapters + head, so running stats updated in training would be lost and
    the reloaded model would predict differently.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def train_epoch(state: TrainState, batches: fdata.Prefetcher, rt: Runtime, bar=None) -> dict:
    """One pass over the training batches. Returns ``{"loss", "seconds", "wait", "images"}``."""
    train_mode(state.model)
    t0 = time.perf_counter()
    total, n = torch.zeros((), device=rt.device), 0
    for x, y in batches:
        total += train_step(state, x, y, rt) * len(y)
        n += len(y)
        if bar is not None:
            bar.update(1)
    loss = float(total) / max(n, 1)  # one host sync per epoch
    return {"loss": loss, "seconds": time.perf_counter() - t0, "wait": batches.wait_s, "images": n}


@torch.no_grad()
def evaluate(model: nn.Module, pixels: np.ndarray, labels: np.ndarray, idx: np.ndarray, batch_size: int,
             rt: Runtime) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and softmax probabilities on rows ``idx`` of the cache.

    Returns:
        loss: float; probs: (len(idx), C) float64, rows in ``idx`` order.
    """
    model.eval()
    batches = fdata.Prefetcher(pixels, labels, fdata.index_batches(idx, batch_size), rt.device)
    total, probs = 0.0, []
    for x, y in batches:
        loss, logits = loss_fn(model, x, y, rt)
        total += float(loss) * len(y)
        probs.append(torch.softmax(logits, dim=1).double().cpu().numpy())
    return total / len(idx), np.concatenate(probs)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def rng_states() -> dict:
    """Every global RNG a training step could touch (dropout, anything random in user code)."""
    np_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, state: TrainState, fingerprint: dict) -> None:
    """Write the whole training state atomically (a crash leaves the previous checkpoint)."""
    ckpt = {
        "version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "epoch": state.epoch,
        "model": trainable_state(state.model), "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(), "rng": rng_states(),
        "best_epoch": state.best_epoch, "best_val": state.best_val, "best_state": state.best_state,
        "curves": state.curves, "epoch_seconds": state.epoch_seconds, "wait_seconds": state.wait_seconds,
        "images_seen": state.images_seen,
    }
    with atomic_path(path, option="checkpoint") as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path: Path, fingerprint: dict) -> dict:
    """Read a checkpoint and check it was written by the same configuration (CxrfairError otherwise)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say so instead of a pickle traceback
        raise CxrfairError(f"checkpoint {path}: cannot be read ({type(e).__name__}); pass --force to start over") from None
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        raise CxrfairError(f"checkpoint {path}: not a cxrfair fine-tuning checkpoint; pass --force to start over")
    check_fingerprint(ckpt["fingerprint"], fingerprint, path)
    return ckpt


def check_fingerprint(saved: dict, now: dict, path: Path) -> None:
    """CxrfairError naming every field of ``now`` whose value differs from the checkpoint's."""
    diff = ", ".join(f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v)
    if diff:
        raise CxrfairError(
            f"checkpoint {path} was written by another configuration ({diff}); resume with the "
            "checkpoint's options, or pass --force to discard it and start over"
        )


def restore(state: TrainState, ckpt: dict) -> None:
    """Put a loaded checkpoint back into ``state`` (model, optimizer, scheduler, RNGs, bookkeeping)."""
    load_trainable_state(state.model, ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_states(ckpt["rng"])
    state.epoch, state.best_epoch, state.best_val = ckpt["epoch"], ckpt["best_epoch"], ckpt["best_val"]
    state.best_state, state.curves = ckpt["best_state"], ckpt["curves"]
    state.epoch_seconds, state.wait_seconds = ckpt["epoch_seconds"], ckpt["wait_seconds"]
    state.images_seen = ckpt["images_seen"]


# ---------------------------------------------------------------------------------------------
# Fit


@dataclass(frozen=True)
class Data:
    """The decoded cohort: pixels (N,3,S,S) uint8, labels (N,) int, row indices per split."""

    pixels: np.ndarray
    labels: np.ndarray
    split: dict  # name -> (n_split,) int64 row indices, cohort order


@dataclass(frozen=True)
class EpochLog:
    """What ``on_epoch_end`` sees after an epoch has been checkpointed."""

    epoch: int  # 1-based
    train_loss: float
    val_loss: float
    images_per_s: float
    checkpoint: Path


def augment_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 7]).generate_state(1)[0])


def fit(state: TrainState, data: Data, config: FinetuneConfig, rt: Runtime, ckpt_path: Path, fingerprint: dict,
        on_epoch_end: Callable[[EpochLog], None] | None = None, progress: bool = True) -> TrainState:
    """Train from ``state.epoch`` to ``config.epochs``, keeping the lowest-validation-loss state.

    After each epoch: validation loss, best-state bookkeeping, an atomic checkpoint, then
    ``on_epoch_end`` (which may raise to stop the run; the checkpoint is already on disk).
    """
    from tqdm.auto import tqdm

    train_idx = data.split["train"]
    n_batches = len(fdata.index_batches(train_idx, config.batch_size))
    epochs = tqdm(range(state.epoch, config.epochs), initial=state.epoch, total=config.epochs,
                  desc=f"{config.method} {config.model}", unit="epoch", disable=not progress)
    for epoch in epochs:
        order = train_idx[fdata.epoch_order(len(train_idx), config.seed, epoch)]
        batches = fdata.Prefetcher(data.pixels, data.labels, fdata.index_batches(order, config.batch_size), rt.device,
                                   augment_seed=augment_seed(config.seed, epoch) if config.augment else None)
        with tqdm(total=n_batches, desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=not progress) as bar:
            stats = train_epoch(state, batches, rt, bar)
        val_loss, _ = evaluate(state.model, data.pixels, data.labels, data.split["val"], config.batch_size, rt)
        record_epoch(state, stats, val_loss)
        save_checkpoint(ckpt_path, state, fingerprint)
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CxrfairError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def load_data(cohort, fm, config: FinetuneConfig) -> Data:
    """Decode the cohort once into the uint8 cache (memory or memmap) and index its splits."""
    table = cohort.table
    paths = cohort.image_paths(config.images)
    size = fm.preprocess.size
    to_file = config.cache == "file" or (
        config.cache == "auto" and fdata.cache_bytes(len(paths), size) > config.cache_max_gb * 2**30)
    file = None
    if to_file:
        root = str(config.images or cohort.meta.get("images_root"))
        file = fdata.cache_file_for(config.out, fdata.cache_key(cohort.hash, fm.preprocess, root))
    pixels = fdata.image_cache(paths, fm.preprocess, workers=config.workers, file=file)
    index = {c: i for i, c in enumerate(cohort.classes)}
    labels = table["label"].map(index).to_numpy(np.int64)
    split = {s: np.flatnonzero(table["split"].to_numpy() == s) for s in SPLITS}
    return Data(pixels=pixels, labels=labels, split=split)


def finetune(config: FinetuneConfig, *, on_epoch_end: Callable[[EpochLog], None] | None = None,
             progress: bool = True) -> RunResult:
    """Fine-tune ``config.model`` on ``config.cohort`` and write the run to ``config.out``.

    Args:
        config: the run's configuration.
        on_epoch_end: called after each epoch's checkpoint; raising in it interrupts the run
            (``config.resume`` continues it later).
        progress: show tqdm bars.

    Returns:
        RunResult. Raises CxrfairError for anything the user can fix; nothing is written to
        ``out/<run_id>`` unless the run completes.
    """
    t_start = time.perf_counter()
    setup = prepare(config)
    model = build_classifier(setup.fm, len(setup.cohort.classes), config).to(setup.rt.device)
    steps = config.epochs * len(fdata.index_batches(setup.data.split["train"], config.batch_size))
    state = create_state(model, config, steps)
    seed_globals(config.seed)
    if setup.checkpoint is not None:
        restore(state, setup.checkpoint)
    fit(state, setup.data, config, setup.rt, setup.ckpt_path, setup.fingerprint, on_epoch_end, progress)
    return finish(config, setup, state, t_start)


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


def prepare(config: FinetuneConfig) -> Setup:
    """Check everything cheap first (model spec, outputs, cohort, checkpoint), then load model and images."""
    from cxrfair.extract.cohort import load_cohort
    from cxrfair.extract.registry import get_spec, load_model

    spec = get_spec(config.model)
    if config.method == "lora":
        lora_targets(spec)
    ckpt_path = config.out / f".{config.run_id}.work" / CHECKPOINT
    check_outputs(config.out / config.run_id, ckpt_path, config)
    cohort = load_cohort(config.cohort)
    check_splits(cohort)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    fingerprint = {**config.training_fields(), "precision": precision, "cohort_hash": cohort.hash}
    checkpoint = resume_checkpoint(ckpt_path, fingerprint, config)
    fm = load_model(config.model, config.weights, str(device))
    fingerprint["weights_id"] = fm.weights_id
    checkpoint = resume_checkpoint(ckpt_path, fingerprint, config, checkpoint)
    t0 = time.perf_counter()
    data = load_data(cohort, fm, config)
    rt = Runtime(device=device, bf16=precision == "bf16", normalize=fm.preprocess.normalize)
    return Setup(cohort, fm, data, rt, fingerprint, ckpt_path, checkpoint, time.perf_counter() - t0)


def finish(config: FinetuneConfig, setup: Setup, state: TrainState, t_start: float) -> RunResult:
    """Evaluate the lowest-validation-loss state on val + test, write run + weights, drop the checkpoint."""
    t0 = time.perf_counter()
    load_trainable_state(state.model, state.best_state)
    eval_idx = np.concatenate([setup.data.split["val"], setup.data.split["test"]])
    _, probs = evaluate(state.model, setup.data.pixels, setup.data.labels, eval_idx, config.batch_size, setup.rt)
    timings = summarize_timings(state, setup.cache_s, time.perf_counter() - t0, time.perf_counter() - t_start)
    meta = run_meta(config, setup, state, timings)
    weights = write_outputs(config, setup.cohort, state.model, meta, eval_idx, probs)
    shutil.rmtree(setup.ckpt_path.parent, ignore_errors=True)
    return RunResult(run_dir=config.out / config.run_id, run_id=config.run_id, selected_epoch=state.best_epoch,
                     trainable_params=meta["trainable_params"], curves=state.curves, probs=probs,
                     timings=timings, weights=weights)


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


def seed_globals(seed: int) -> None:
    """Seed the global RNGs (dropout etc.); a resumed run overwrites them from the checkpoint."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def summarize_timings(state: TrainState, cache_s: float, eval_s: float, total_s: float) -> dict:
    """Seconds (and two rates) for run.json; epoch lists cover resumed epochs too."""
    train_s = float(sum(state.epoch_seconds))
    return {
        "image_cache": cache_s, "train": train_s, "eval": eval_s, "total": total_s,
        "per_epoch": [float(s) for s in state.epoch_seconds],
        "images_per_s": state.images_seen / train_s if train_s > 0 else None,
        "data_wait_fraction": float(sum(state.wait_seconds)) / train_s if train_s > 0 else None,
    }


def run_meta(config: FinetuneConfig, setup: Setup, state: TrainState, timings: dict) -> dict:
    """run.json contents (the shared run format + fine-tuning extras)."""
    cohort, fm = setup.cohort, setup.fm
    precision = setup.fingerprint["precision"]
    return {
        "run_id": config.run_id, "model": config.model, "method": config.method, "seed": config.seed,
        "classes": cohort.classes, "cohort_hash": cohort.hash,
        "hyperparameters": {**config.hyperparameters(), "precision": precision},
        "selected_epoch": state.best_epoch, "trainable_params": count_trainable(state.model),
        "timings": timings, "curves": state.curves, "weights_id": fm.weights_id,
        "source": str(config.cohort),
        "notes": "selected_epoch is 1-based; curves hold one value per epoch; "
                 f"weights in {ADAPTER_DIR if config.method == 'lora' else FULL_WEIGHTS}",
    }


def write_outputs(config: FinetuneConfig, cohort, model: nn.Module, meta: dict, eval_idx: np.ndarray,
                  probs: np.ndarray) -> Path:
    """Write the run (predictions + run.json) and then the weights into it.

    The weights are written first into a hidden folder and moved into the finished run folder by
    one rename, so the run folder never holds a half-written adapter.
    """
    from cxrfair.analysis.runs import make_predictions, write_run

    predictions = make_predictions(cohort.table.iloc[eval_idx], probs, cohort.classes)
    staging = config.out / f".{config.run_id}.weights"
    with atomic_dir(staging, force=True, option="--out") as tmp:
        save_weights(model, tmp, config.method)
    run_dir = write_run(config.out, meta, predictions, force=config.force)
    name = ADAPTER_DIR if config.method == "lora" else FULL_WEIGHTS
    (staging / name).replace(run_dir / name)
    shutil.rmtree(staging, ignore_errors=True)
    return run_dir / name


def save_weights(model: nn.Module, folder: Path, method: str) -> None:
    """LoRA: peft ``save_pretrained`` (adapters + head) into ``folder/adapter``; full: safetensors state dict."""
    if method == "lora":
        model.save_pretrained(str(folder / ADAPTER_DIR))
    else:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / FULL_WEIGHTS))


def load_finetuned(run_dir: Path | str, device: str = "cpu", weights: Path | None = None) -> nn.Module:
    """Rebuild a finished run's classifier from its saved weights (eval mode).

    Returns:
        Module mapping (B, 3, S, S) normalised float -> (B, C) logits.
    """
    import json

    from peft import PeftModel

    from cxrfair.extract.registry import load_model

    run_dir = Path(run_dir)
    meta = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    fm = load_model(meta["model"], weights, device)
    model = Classifier(fm.image_encoder, fm.embed_dim, len(meta["classes"]))
    if meta["method"] == "lora":
        model = PeftModel.from_pretrained(model, str(run_dir / ADAPTER_DIR))
        pin_frozen_attention(model)
    else:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(run_dir / FULL_WEIGHTS)))
    return model.to(device).eval()
