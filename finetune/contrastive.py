"""Contrastive (CLIP-style) fine-tuning of a dual-encoder model on the cohort's image-text pairs (issue 28).

``finetune_contrastive(config)`` adapts a registered image-text model's image encoder (peft LoRA
on the registry's targets, or every weight) and optionally its text encoder (``--text frozen``
default, ``lora``, ``full``), with the symmetric InfoNCE of ``contrastive_objectives`` at the
model's own, fixed logit scale, on pairs (image, text) of the training split: the cohort's
``text`` column, else a sentence from the labels (``finetune.texts``). A mitigation of the one
table (``--mitigation``, stage ``contrastive``) adds its term from ``contrastive_objectives.TERMS``.

Reused from classifier fine-tuning: the uint8 image cache and its prefetcher, the seeded global
batch order and its per-process slices (``sampler``), ``TrainState`` + checkpoints (resume after
every epoch), AdamW + cosine schedule, the torchrun session. Under DDP every process gathers the
global batch's embeddings (its own with gradient) and computes the same global loss, so a
2-process run trains what one process trains (``GatherRows``).

Selection (never test): after every epoch the validation split is embedded and scored by the
rule ``--select``: ``auc`` (default) the validation zero-shot macro AUC with the ``clip`` prompt
set (multi-class: softmax over the classes; multi-label: each condition's (no X, X) pair), the
highest wins; ``loss`` the validation contrastive loss (batches of ``--batch-size`` in cohort
order), the lowest wins; ties keep the earlier epoch. Test images are never embedded.

Output: ``OUT/<name>/`` (``ContrastiveConfig.run_id``: ``<model>.ctr-<adapter>[...].s<seed>``)
holding ``contrastive.json`` and ``adapted.safetensors`` (``extract.adapted``), which
``cxrfair extract --model contrastive:OUT/<name>`` embeds like any model.
"""

from __future__ import annotations

import inspect
import math
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from cxrfair.core import metrics as mc
from cxrfair.core import mitigations
from cxrfair.core import multilabel as ml
from cxrfair.core.runs import TRACKING_DIR
from cxrfair.errors import CxrfairError
from cxrfair.extract.adapted import FORMAT, RECORD, VERSION, WEIGHTS
from cxrfair.extract.cohort import load_cohort
from cxrfair.extract.distributed import shard_rows
from cxrfair.extract.extractor import class_text_embeddings, pair_text_embeddings
from cxrfair.extract.prompts import build_binary_prompts, build_prompts
from cxrfair.extract.registry import get_spec, load_model
from cxrfair.finetune import contrastive_objectives as co
from cxrfair.finetune import data as fdata
from cxrfair.finetune import objectives, texts
from cxrfair.finetune import train as T
from cxrfair.finetune.checkpoint import rank_seed, read_checkpoint, restore, rng_states, save_checkpoint, seed_globals
from cxrfair.finetune.contrastive_config import ContrastiveConfig
from cxrfair.finetune.distributed import Dist, check_batchnorm, session, sync_batchnorm
from cxrfair.finetune.model import (count_trainable, load_trainable_state, lora_targets, pin_frozen_attention,
                                    train_mode, trainable_state)
from cxrfair.finetune.sampler import epoch_order, plain_steps, plan_epoch
from cxrfair.io import atomic_dir, library_write_errors, write_json_atomic
from cxrfair.tracking import Tracker

ZERO_SHOT_SET = "clip"  # the prompt set of the validation zero-shot AUC (deterministic: one draw)


# ---------------------------------------------------------------------------------------------
# The model


class DualEncoder(nn.Module):
    """The foundation model (adapted in place) as one module: images (+ tokens) -> normalised embeddings.

    ``forward(x, tokens)``: x (B, 3, S, S) normalised float; tokens the tokenizer's output for T
    texts or None. Returns img (B, D), txt (T, D) or None, and the adversary's (B, G) logits on
    the gradient-reversed image embedding (``scale`` = λ × ramp, set each step) or None.
    """

    def __init__(self, fm, model: nn.Module, adversary: nn.Module | None = None):
        super().__init__()
        self.model = model  # fm.model, or the peft wrapper around it (its parameters are registered here)
        self.adversary = adversary
        self.encode_image, self.encode_text = fm.encode_image, fm.encode_text
        self.scale = 0.0

    def forward(self, x: torch.Tensor, tokens=None):
        img = nn.functional.normalize(self.encode_image(x).float(), dim=-1)
        txt = None if tokens is None else nn.functional.normalize(self.encode_text(tokens).float(), dim=-1)
        adv = None if self.adversary is None else self.adversary(objectives.grad_reverse(img, self.scale))
        return img, txt, adv


def image_side(model: nn.Module, encoder: nn.Module) -> tuple[set[str], set[str]]:
    """Names in ``model`` of the image encoder's modules and of its tensors (parameters and buffers),
    found by identity: the encoder may be a wrapper of ``model``'s submodules (CXR-CLIP's tower +
    projection) rather than one of them. CxrfairError when its parameters are not ``model``'s."""
    mods = {id(m) for m in encoder.modules()}
    tensors = {id(t) for t in (*encoder.parameters(), *encoder.buffers())}
    modules = {n for n, m in model.named_modules() if id(m) in mods and n}
    names = {n for n, t in (*model.named_parameters(), *model.named_buffers()) if id(t) in tensors}
    if len({id(p) for p in encoder.parameters()}) > len({id(p) for n, p in model.named_parameters() if n in names}):
        raise CxrfairError("the model's image encoder holds weights outside its model; contrastive fine-tuning "
                           "needs both encoders in one module")
    return modules, names


def inside(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def matching_modules(model: nn.Module, targets, keep: Callable[[str], bool]) -> list[str]:
    """Full names of ``model``'s modules that peft would target with ``targets`` (names matched as
    a suffix, or one regex matched in full), among those ``keep`` accepts."""
    names = [n for n, _ in model.named_modules() if n and keep(n)]
    if isinstance(targets, str):
        return [n for n in names if re.fullmatch(targets, n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


@dataclass
class Adapted:
    """The trainable model and what export must save."""

    dual: DualEncoder
    peft: nn.Module | None  # the peft wrapper when any LoRA was injected (merged at export)
    saved: list[str]  # base-model names (modules or parameters) whose tensors the export writes


def adapt(fm, config: ContrastiveConfig, adversary: nn.Module | None) -> Adapted:
    """LoRA / full on the image encoder, frozen / LoRA / full on the text side; the logit scale stays fixed.

    LoRA initialisation draws from a generator seeded with ``config.seed`` (global RNG untouched).
    """
    model = fm.model
    image_modules, image_tensors = image_side(model, fm.image_encoder)
    lora: list[str] = []
    if config.method == "lora":
        lora += matching_modules(model, lora_targets(fm.spec), lambda n: n in image_modules)
    if config.text == "lora":
        targets = lora_targets(fm.spec)
        found = [] if isinstance(targets, str) else matching_modules(model, targets, lambda n: n not in image_modules)
        if not found:
            raise CxrfairError(f"--text lora: model {fm.name} has no text-encoder modules named like its LoRA targets "
                               f"{targets!r}; use --text frozen or --text full")
        lora += found
    model.requires_grad_(False)
    saved = list(lora)
    wrapped = None
    if lora:
        from peft import LoraConfig, get_peft_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            wrapped = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                                       lora_dropout=config.lora_dropout, target_modules=lora))
        pin_frozen_attention(wrapped)
    if config.method == "full":
        fm.image_encoder.requires_grad_(True)
        saved += sorted(image_tensors)
    if config.text == "full":
        text_params = [n for n, _ in model.named_parameters() if n not in image_tensors and "logit_" not in n]
        for n, p in model.named_parameters():
            if n in text_params:
                p.requires_grad_(True)
        saved += text_params
    return Adapted(DualEncoder(fm, wrapped if wrapped is not None else model, adversary), wrapped, saved)


def adapted_tensors(fm, adapted: Adapted) -> dict[str, torch.Tensor]:
    """The base model's tensors the run changed, under base names, LoRA merged in (peft ``merge_and_unload``;
    destructive: call once, at the end). Returns {name: contiguous CPU tensor}."""
    if adapted.peft is not None:
        adapted.peft.merge_and_unload()
    state = fm.model.state_dict()
    keep = [k for k in state if any(inside(k, p) for p in adapted.saved)]
    return {k: state[k].detach().cpu().contiguous() for k in keep}


# ---------------------------------------------------------------------------------------------
# Batches across processes


class GatherRows(torch.autograd.Function):
    """All processes' (m, ...) tensors concatenated in rank order; the gradient of this process's rows
    flows back to them (every process computes the same global loss, so its own slice is exact)."""

    @staticmethod
    def forward(ctx, x, rank: int, world: int):
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None, None


def gather_batch(parts: dict, width: int, d: Dist) -> dict:
    """Each (b, ...) tensor of ``parts`` padded to ``width`` rows (zeros; padding has weight 0) and
    gathered over processes: (W * width, ...). One process: unchanged."""
    if not d.active:
        return parts
    out = {}
    for k, v in parts.items():
        if v is None:
            out[k] = None
            continue
        v = nn.functional.pad(v, (0, 0) * (v.dim() - 1) + (0, width - len(v)))
        out[k] = GatherRows.apply(v, d.rank, d.world)
    return out


def take_tokens(tokens, idx: np.ndarray, device: torch.device):
    """Rows ``idx`` of a tokenizer's output (a (T, L) tensor or a mapping of them), on ``device``."""
    if isinstance(tokens, Mapping):
        return {k: v[idx].to(device) for k, v in tokens.items()}
    return tokens[idx].to(device)


# ---------------------------------------------------------------------------------------------
# Setup


@dataclass(frozen=True)
class Setup:
    """Everything loaded and checked before training starts."""

    cohort: object
    fm: object
    data: T.Data  # pixels, labels, split, row_weights, groups, cells
    rt: T.Runtime
    texts: list  # N row texts
    text_source: dict
    unique: list  # distinct texts of train + val rows (U,)
    tid: np.ndarray  # (N,) index into ``unique`` (-1 for test rows: never used)
    fingerprint: dict
    ckpt_path: Path
    checkpoint: dict | None
    cache_s: float


def mitigation_inputs(config: ContrastiveConfig, cohort, train: np.ndarray) -> dict:
    """Row weights (the term's, x 0 for multi-label rows without an observed condition, which have no
    label sentence to pair), groups and cells of ``config.sensitive`` (-1 everywhere for erm), as ``T.Data`` fields."""
    targets = cohort.targets()
    multilabel = cohort.task == "multilabel"
    weights = (~np.isnan(targets)).any(axis=1).astype(np.float32) if multilabel else np.ones(len(targets), np.float32)
    out: dict = {"row_weights": weights}
    if config.sensitive is None:  # erm: no attribute; every row has group and cell -1
        return {**out, "groups": np.full(len(targets), -1, np.int64), "cells": np.full(len(targets), -1, np.int64)}
    attrs = cohort.attributes
    if config.sensitive not in attrs:
        raise CxrfairError(f"--sensitive {config.sensitive}: cohort {cohort.folder} has no such sensitive attribute; "
                           f"expected one of {', '.join(attrs)}")
    names = list(attrs[config.sensitive]["groups"])
    groups = objectives.group_ids(cohort.table, config.sensitive, names, train, str(cohort.folder))
    labels = np.zeros(len(groups), np.int64) if multilabel else targets
    cells, n_cells = objectives.cell_ids(groups, labels, len(names), len(cohort.classes), multilabel)
    row_weights = co.TERMS[config.mitigation].row_weights
    if row_weights is not None:
        out["row_weights"] = weights * row_weights(cells, train, float(config.strength), n_cells)
    return {**out, "groups": groups, "cells": cells}


def check_model(fm) -> None:
    """CLIP's softmax contrastive loss: SigLIP-style models (a logit bias; known only once loaded) are refused."""
    if "logit_bias" in fm.extras:
        raise CxrfairError(f"--model {fm.name}: a SigLIP-style model (sigmoid loss with a logit bias); "
                           "contrastive fine-tuning implements CLIP's softmax InfoNCE only")


def prepare(config: ContrastiveConfig, d: Dist = Dist()) -> Setup:
    """Check the cheap things first (spec, outputs, cohort, mitigation, checkpoint), then load model and images."""
    spec = get_spec(config.model)
    if not spec.zero_shot:
        raise CxrfairError(f"--model {spec.name}: an image-only model; contrastive fine-tuning needs a text encoder")
    if config.method == "lora" or config.text == "lora":
        lora_targets(spec)
    ckpt_path = config.out / f".{config.run_id}.work" / T.CHECKPOINT
    d.on_main(lambda: T.check_outputs(config.out / config.run_id, ckpt_path, config))
    cohort = load_cohort(config.cohort)
    T.check_splits(cohort)
    split = {s: np.flatnonzero(cohort.table["split"].to_numpy() == s) for s in T.SPLITS}
    inputs = mitigation_inputs(config, cohort, split["train"])
    row_texts, source = texts.row_texts(cohort.table, cohort.classes, cohort.targets())
    used = np.concatenate([split["train"], split["val"]])
    unique, ids = texts.text_ids([row_texts[i] for i in used])
    tid = np.full(len(row_texts), -1, np.int64)
    tid[used] = ids
    device = T.resolve_device(config.device, d)
    precision = T.resolve_precision(config.precision, device)
    fingerprint = {**config.training_fields(), "precision": precision, "cohort_hash": cohort.hash}
    resumer = T.Resumer(ckpt_path, fingerprint, config)
    d.on_main(resumer.check)
    fm = load_model(config.model, config.weights, str(device))
    check_model(fm)
    check_batchnorm(fm.image_encoder, config.method, d, device)  # BatchNorm trained in several CPU processes
    fingerprint["weights_id"] = fm.weights_id
    resuming = d.on_main(resumer.check)
    checkpoint = d.everywhere(lambda: resumer.loaded if d.main else read_checkpoint(ckpt_path) if resuming else None)
    t0 = time.perf_counter()
    data = replace(T.load_data(cohort, fm, config, d), **inputs)
    rt = T.Runtime(device=device, bf16=precision == "bf16", normalize=fm.preprocess.normalize)
    return Setup(cohort, fm, data, rt, row_texts, source, unique, tid, fingerprint, ckpt_path, checkpoint,
                 time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class Context:
    """What a step needs besides the state."""

    setup: Setup
    adapted: Adapted
    tokens: object | None  # tokenizer output of ``setup.unique`` (trainable text), else None
    table: torch.Tensor | None  # (U, D) frozen text embeddings of ``setup.unique``, else None
    scale: float  # the logit scale
    d: Dist


def text_table(fm, unique: list[str], rt: T.Runtime) -> torch.Tensor:
    """(U, D) normalised embeddings of ``unique`` by the (current) text encoder, no gradient."""
    precision = "bf16" if rt.bf16 else "fp32"
    emb = class_text_embeddings(fm, [[[t] for t in unique]], rt.device, precision)[0]
    return nn.functional.normalize(torch.from_numpy(emb).to(rt.device), dim=-1)


def build_state(config: ContrastiveConfig, setup: Setup, d: Dist = Dist()) -> tuple[T.TrainState, Context]:
    """Adapted model (DDP under torchrun), its AdamW + cosine schedule, the objective; restored when resuming."""
    cohort, fm = setup.cohort, setup.fm
    term = co.TERMS[config.mitigation]
    n_groups = len(cohort.attributes[config.sensitive]["groups"]) if config.sensitive else 0
    multilabel = cohort.task == "multilabel"
    n_cells = n_groups if multilabel else n_groups * len(cohort.classes)
    counts = objectives.train_cell_counts(setup.data.cells, setup.data.split["train"], n_cells) if n_cells else None
    objective = term.objective(config.strength, n_groups, n_cells, len(cohort.classes), multilabel, config.seed, counts)
    adversary = objectives.make_adversary(fm.embed_dim, n_groups, config.seed) if objective.adversary else None
    adapted = adapt(fm, config, adversary)
    dual = sync_batchnorm(adapted.dual.to(setup.rt.device), d, setup.rt.device)  # trained BatchNorm under DDP on CUDA
    params = [p for n, p in dual.named_parameters() if p.requires_grad and not n.startswith("adversary.")]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = max(config.epochs * math.ceil(len(setup.data.split["train"]) / config.batch_size), 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    state = T.TrainState(model=dual, optimizer=opt, scheduler=sched, objective=objective, total_steps=steps,
                         curves={"train_loss": [], "val_loss": [], "val_auc": [], "lr": []})
    objective.attach(dual)
    if d.active:
        state.ddp = wrap(dual, d, setup.rt.device)
    seed_globals(rank_seed(config.seed, d.rank))
    if setup.checkpoint is not None:
        restore(state, setup.checkpoint, d.rank, d.world)
    trainable_text = config.text != "frozen"
    tokens = fm.tokenize(setup.unique) if trainable_text else None
    table = None if trainable_text else text_table(fm, setup.unique, setup.rt)
    return state, Context(setup, adapted, tokens, table, fm.logit_scale, d)


def wrap(dual: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """DistributedDataParallel with DDP's own gradient averaging: every process back-propagates the
    global loss × world size through its own rows (``GatherRows``), so the average is the gradient."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    # torch >= 2.14 renames broadcast_buffers; buffers are frozen and equal on every process.
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})
    return DDP(dual, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def global_losses(ctx: Context, img: torch.Tensor, txt: torch.Tensor | None, tid: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example contrastive losses and matched similarities of n real rows (img (n, D), tid (n,))."""
    uniq, pos = torch.unique(tid, return_inverse=True)
    if txt is None:
        cand = ctx.table[uniq]
    else:  # the first row of each distinct text stands for it
        first = torch.full((len(uniq),), len(tid), device=tid.device).scatter_reduce(
            0, pos, torch.arange(len(tid), device=tid.device), "amin")
        cand = txt[first]
    return co.contrastive_losses(img, cand, pos, ctx.scale), co.matched_similarity(img, cand, pos)


def train_step(state: T.TrainState, ctx: Context, x: torch.Tensor, w: torch.Tensor, step) -> tuple[float, int]:
    """One AdamW + schedule step on the global batch. Returns (summed per-example loss, real rows), global."""
    setup, d, rt = ctx.setup, ctx.d, ctx.setup.rt
    obj = state.objective
    state.optimizer.zero_grad(set_to_none=True)
    obj.begin_step(state.scheduler.last_epoch / state.total_steps, state.model)
    rows = step.rows
    tid = torch.from_numpy(setup.tid[rows]).to(rt.device)
    tokens = None if ctx.tokens is None else take_tokens(ctx.tokens, setup.tid[rows], rt.device)
    with rt.autocast():
        img, txt, adv = state.net(rt.normalize(x), tokens)
    groups, cells = setup.data.groups, setup.data.cells
    local = {"img": img.float(), "txt": None if txt is None else txt.float(),
             "adv": None if adv is None else adv.float(), "w": w[:, None], "tid": tid[:, None],
             "groups": torch.from_numpy(groups[rows]).to(rt.device)[:, None],
             "cells": torch.from_numpy(cells[rows]).to(rt.device)[:, None]}
    g = gather_batch(local, math.ceil(step.global_size / d.world), d)
    real = g["w"][:, 0] > 0
    losses, sims = global_losses(ctx, g["img"][real], None if g["txt"] is None else g["txt"][real], g["tid"][real, 0])
    batch = co.Batch(losses, g["w"][real, 0], g["cells"][real, 0], g["groups"][real, 0], sims,
                     None if g["adv"] is None else g["adv"][real], step.denominator)
    (obj.loss(batch) * d.world).backward()
    state.optimizer.step()
    obj.after_backward()
    state.scheduler.step()
    return float(losses.detach().double().sum()), int(real.sum())


def train_epoch(state: T.TrainState, ctx: Context, batches, bar=None) -> dict:
    train_mode(state.model)
    t0 = time.perf_counter()
    total, n = 0.0, 0
    for x, _, w, step in batches:
        loss, rows = train_step(state, ctx, x, w, step)
        total, n = total + loss, n + rows
        if bar is not None:
            bar.update(1)
    return {"loss": total / max(n, 1), "seconds": time.perf_counter() - t0, "wait": batches.wait_s, "images": n}


@torch.no_grad()
def embed_images(dual: DualEncoder, pixels: np.ndarray, labels: np.ndarray, idx: np.ndarray, batch_size: int,
                 rt: T.Runtime, d: Dist = Dist()) -> torch.Tensor:
    """(len(idx), D) normalised image embeddings of rows ``idx`` (each process a shard, gathered in order)."""
    dual.eval()
    start, stop = shard_rows(len(idx), d.rank, d.world)
    out = []
    for x, _, _, _ in fdata.Prefetcher(pixels, labels, plain_steps(idx[start:stop], batch_size), rt.device):
        with rt.autocast():
            out.append(dual(rt.normalize(x))[0].float().cpu())
    shards = [torch.cat(s) for s in d.gather(out) if s]
    return torch.cat(shards).to(rt.device)


def zero_shot_probs(fm, img: torch.Tensor, classes: list[str], multilabel: bool, rt: T.Runtime) -> np.ndarray:
    """Zero-shot probabilities of normalised image embeddings (n, D) with the ``clip`` prompt set:
    (n, C) softmax over classes, or per condition p(X) of the (no X, X) pair."""
    precision = "bf16" if rt.bf16 else "fp32"
    if multilabel:
        pair = torch.from_numpy(pair_text_embeddings(fm, build_binary_prompts(ZERO_SHOT_SET, classes, draws=1),
                                                     rt.device, precision)[0]).to(img.device)  # (C, 2, D)
        pair = nn.functional.normalize(pair, dim=-1)
        logits = fm.logit_scale * torch.einsum("nd,ckd->nck", img, pair)
        return torch.softmax(logits, dim=-1)[..., 1].double().cpu().numpy()
    emb = torch.from_numpy(class_text_embeddings(fm, build_prompts(ZERO_SHOT_SET, classes, draws=1),
                                                 rt.device, precision)[0]).to(img.device)
    logits = fm.logit_scale * img @ nn.functional.normalize(emb, dim=-1).T
    return torch.softmax(logits, dim=-1).double().cpu().numpy()


def validate(state: T.TrainState, ctx: Context, config: ContrastiveConfig) -> tuple[float, float]:
    """(validation contrastive loss, validation zero-shot macro AUC) of the current weights."""
    setup = ctx.setup
    idx = setup.data.split["val"]
    img = embed_images(state.model, setup.data.pixels, setup.data.labels, idx, config.batch_size, setup.rt, ctx.d)
    table = ctx.table if ctx.table is not None else text_table(setup.fm, setup.unique, setup.rt)
    weights = setup.data.row_weights[idx] > 0
    total, n = 0.0, 0
    for start in range(0, len(idx), config.batch_size):
        keep = np.flatnonzero(weights[start:start + config.batch_size]) + start
        if len(keep) == 0:
            continue
        tid = torch.from_numpy(setup.tid[idx[keep]]).to(img.device)
        losses, _ = global_losses(replace(ctx, table=table), img[keep], None, tid)
        total, n = total + float(losses.double().sum()), n + len(keep)
    multilabel = setup.cohort.task == "multilabel"
    probs = zero_shot_probs(setup.fm, img, setup.cohort.classes, multilabel, setup.rt)
    y = setup.data.labels[idx]
    auc = float(ml.auc_macro(y, probs) if multilabel else mc.auc_macro(y, probs))
    return total / max(n, 1), auc


def criterion(config: ContrastiveConfig, val_loss: float, val_auc: float) -> float:
    """The selection rule as a number to minimise (``--select``)."""
    return val_loss if config.select == "loss" else -val_auc


def fit(state: T.TrainState, ctx: Context, config: ContrastiveConfig, progress: bool = True,
        on_epoch_end: Callable | None = None, tracker: Tracker = Tracker()) -> T.TrainState:
    """Epochs from ``state.epoch``: train, validate, keep the best state by ``--select``, checkpoint;
    each epoch's curves to ``tracker`` (x axis: the epoch; ``--track``, off by default)."""
    from tqdm.auto import tqdm

    setup, d = ctx.setup, ctx.d
    train_idx = setup.data.split["train"]
    if "before" not in state.curves:  # the base model's validation scores: what the epochs are compared with
        val_loss, val_auc = validate(state, ctx, config)
        state.curves["before"] = {"val_loss": val_loss, "val_auc": val_auc}
    epochs = tqdm(range(state.epoch, config.epochs), initial=state.epoch, total=config.epochs,
                  desc=f"contrastive {config.model}", unit="epoch", disable=not progress)
    for epoch in epochs:
        order = train_idx[epoch_order(len(train_idx), config.seed, epoch)]
        steps = plan_epoch(order, config.batch_size, d.rank, d.world, None, row_weights=setup.data.row_weights)
        batches = fdata.Prefetcher(setup.data.pixels, setup.data.labels, steps, setup.rt.device,
                                   augment_seed=T.augment_seed(config.seed, epoch) if config.augment else None)
        with tqdm(total=len(steps), desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=not progress) as bar:
            stats = train_epoch(state, ctx, batches, bar)
        val_loss, val_auc = validate(state, ctx, config)
        record_epoch(state, stats, val_loss, val_auc, criterion(config, val_loss, val_auc))
        tracker.log(state.epoch, {k: state.curves[k][-1] for k in ("train_loss", "val_loss", "val_auc", "lr")})
        rngs = d.gather(rng_states())
        d.on_main(lambda: save_checkpoint(setup.ckpt_path, state, setup.fingerprint, rngs))
        epochs.set_postfix(loss=f"{stats['loss']:.4f}", val_loss=f"{val_loss:.4f}", val_auc=f"{val_auc:.3f}")
        if on_epoch_end is not None:
            on_epoch_end(state)
    return state


def record_epoch(state: T.TrainState, stats: dict, val_loss: float, val_auc: float, value: float) -> None:
    """Curves and timings; a copy of the weights when the criterion improved (strictly: ties keep the earlier epoch)."""
    state.epoch += 1
    for k, v in (("train_loss", stats["loss"]), ("val_loss", val_loss), ("val_auc", val_auc),
                 ("lr", state.optimizer.param_groups[0]["lr"])):
        state.curves[k].append(v)
    state.epoch_seconds.append(stats["seconds"])
    state.wait_seconds.append(stats["wait"])
    state.images_seen += stats["images"]
    if value < state.best_val:
        state.best_val, state.best_epoch = value, state.epoch
        state.best_state = trainable_state(state.model)


# ---------------------------------------------------------------------------------------------
# The whole run


@dataclass(frozen=True)
class ContrastiveResult:
    """What ``finetune_contrastive`` returns (everything is also on disk under ``folder``)."""

    folder: Path  # OUT/<name>: contrastive.json + adapted.safetensors
    name: str  # the adapted model's name
    selected_epoch: int
    curves: dict
    trainable_params: int
    record: dict


def finetune_contrastive(config: ContrastiveConfig, *, progress: bool = True,
                         on_epoch_end: Callable | None = None) -> ContrastiveResult:
    """Contrastively fine-tune ``config.model`` on ``config.cohort``; write ``config.out/<name>`` (rank 0).

    Under torchrun every process calls this and they train one run together. Raises CxrfairError
    for anything the user can fix; nothing is written to ``out/<name>`` unless the run completes.
    """
    t_start = time.perf_counter()
    with session(config.device) as d:
        setup = prepare(config, d)
        state, ctx = build_state(config, setup, d)
        with T.run_tracker(config, setup, d) as tracker:
            fit(state, ctx, config, progress and d.main, on_epoch_end, tracker)
        load_trainable_state(state.model, state.best_state)
        trainable = count_trainable(state.model)
        record = make_record(config, setup, state, trainable, d.world, time.perf_counter() - t_start)
        d.on_main(lambda: export(config, setup, ctx.adapted, record))
        d.barrier()
    return ContrastiveResult(config.out / config.run_id, config.run_id, state.best_epoch, state.curves, trainable, record)


def make_record(config: ContrastiveConfig, setup: Setup, state: T.TrainState, trainable: int, world: int,
                seconds: float) -> dict:
    """``contrastive.json`` (CONTRACTS "Contrastive fine-tuning")."""
    row = mitigations.get(config.mitigation)
    return {
        "format": FORMAT, "version": VERSION, "name": config.run_id, "run_dir": str((config.out / config.run_id).resolve()),
        "base_model": config.model, "base_weights_id": setup.fm.weights_id,
        "base_weights": None if config.weights is None else str(Path(config.weights).resolve()),
        "adapter": config.method, "text": config.text, "mitigation": config.mitigation,
        "sensitive": config.sensitive, "strength": config.strength if row.has_strength else None,
        "seed": config.seed, "cohort_hash": setup.cohort.hash, "task": setup.cohort.task,
        "classes": setup.cohort.classes, "source": str(config.cohort),
        "texts": {**setup.text_source, "distinct_train_val": len(setup.unique)},
        "loss": {"name": "symmetric InfoNCE (CLIP), per example; rows sharing a text share one candidate",
                 "logit_scale": setup.fm.logit_scale, "logit_scale_trained": False},
        "selection": {"rule": config.select, "split": "val",
                      "metric": ("zero-shot macro AUC, prompt set clip, highest" if config.select == "auc"
                                 else "contrastive loss, lowest"),
                      "ties": "earlier epoch"},
        "selected_epoch": state.best_epoch, "curves": state.curves,
        "hyperparameters": {**config.hyperparameters(), "precision": setup.fingerprint["precision"]},
        "trainable_params": trainable, "world_size": world,
        "timings": {"image_cache": setup.cache_s, "train": float(sum(state.epoch_seconds)), "total": seconds,
                    "per_epoch": [float(s) for s in state.epoch_seconds]},
        "notes": "selected_epoch is 1-based; curves hold one value per epoch; batch_size is the global batch; "
                 f"{WEIGHTS} holds base-model tensors (LoRA merged); load with --model contrastive:FOLDER",
    }


def export(config: ContrastiveConfig, setup: Setup, adapted: Adapted, record: dict) -> Path:
    """Write ``OUT/<name>/`` whole (one folder rename) and drop the checkpoint."""
    from safetensors.torch import save_file

    tensors = adapted_tensors(setup.fm, adapted)
    folder = config.out / config.run_id
    with atomic_dir(folder, force=config.force, option="--out", inputs=(config.cohort,), writes=(RECORD, WEIGHTS, TRACKING_DIR)) as tmp:
        with library_write_errors(tmp / WEIGHTS):
            save_file(tensors, str(tmp / WEIGHTS))
        write_json_atomic(tmp / RECORD, {**record, "tensors": len(tensors)})
        tracked = setup.ckpt_path.parent / TRACKING_DIR
        if config.track is not None and tracked.is_dir():
            tracked.replace(tmp / TRACKING_DIR)
    shutil.rmtree(setup.ckpt_path.parent, ignore_errors=True)
    return folder
