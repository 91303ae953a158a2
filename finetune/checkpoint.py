"""Resume checkpoints: the whole training state after an epoch, written atomically by one process.

A checkpoint holds the trainable weights and buffers, the optimizer and scheduler, every
process's RNG states, the best-so-far state and the curves, plus a fingerprint of the options
that change what a run computes (a checkpoint from other options is refused, or discarded with
``--force``). It does not depend on the number of processes: the global batch order is the same
for any world size, so a run may resume on more or fewer GPUs (only the per-process RNG streams,
used by dropout, then restart from seeds).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import torch

from cxrfair.errors import CxrfairError
from cxrfair.finetune.model import load_trainable_state, trainable_state
from cxrfair.io import atomic_path, library_write_errors

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1


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


def rank_seed(seed: int, rank: int) -> int:
    """Seed of process ``rank``'s global RNGs: ``seed`` itself on rank 0 (a one-process run is unchanged)."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def seed_globals(seed: int) -> None:
    """Seed the global RNGs (dropout etc.); a resumed run overwrites them from the checkpoint."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def save_checkpoint(path: Path, state, fingerprint: dict, rng_ranks: list[dict]) -> None:
    """Write the whole training state atomically (a crash leaves the previous checkpoint).

    ``rng_ranks``: ``rng_states()`` of every process, in rank order.
    """
    ckpt = {
        "version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "epoch": state.epoch,
        "model": trainable_state(state.model), "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(), "rng": rng_ranks[0], "rng_ranks": rng_ranks,
        "world_size": len(rng_ranks),
        "best_epoch": state.best_epoch, "best_val": state.best_val, "best_state": state.best_state,
        "curves": state.curves, "epoch_seconds": state.epoch_seconds, "wait_seconds": state.wait_seconds,
        "images_seen": state.images_seen,
        # A mitigation's training state (GroupDRO's q, the adversary's weights); its optimizer
        # moments are in "optimizer" (the adversary's parameters follow the model's there).
        "objective": state.objective.state_dict() if state.objective is not None else None,
    }
    with atomic_path(path, option="checkpoint") as tmp, library_write_errors(path):
        torch.save(ckpt, tmp)


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents; CxrfairError for a truncated or foreign file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say so instead of a pickle traceback
        raise CxrfairError(f"checkpoint {path}: cannot be read ({type(e).__name__}); pass --force to start over") from None
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        raise CxrfairError(f"checkpoint {path}: not a cxrfair fine-tuning checkpoint; pass --force to start over")
    return ckpt


def load_checkpoint(path: Path, fingerprint: dict) -> dict:
    """Read a checkpoint and check it was written by the same configuration (CxrfairError otherwise)."""
    ckpt = read_checkpoint(path)
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


def restore(state, ckpt: dict, rank: int = 0, world: int = 1) -> None:
    """Put a loaded checkpoint back into ``state`` (model, optimizer, scheduler, RNGs, bookkeeping).

    RNG states come back per process when the world size is the one that wrote the checkpoint;
    otherwise process 0 takes the old process 0's and the others keep their fresh seeds.
    """
    load_trainable_state(state.model, ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    saved = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if len(saved) == world:
        set_rng_states(saved[rank])
    else:
        if rank == 0:
            print(f"note: checkpoint written by {len(saved)} process(es), resuming with {world}: same batches "
                  "and steps; dropout masks (if any) follow new random streams", file=sys.stderr)
            set_rng_states(saved[0])
    state.epoch, state.best_epoch, state.best_val = ckpt["epoch"], ckpt["best_epoch"], ckpt["best_val"]
    state.best_state, state.curves = ckpt["best_state"], ckpt["curves"]
    state.epoch_seconds, state.wait_seconds = ckpt["epoch_seconds"], ckpt["wait_seconds"]
    state.images_seen = ckpt["images_seen"]
    if state.objective is not None:
        state.objective.load_state_dict(ckpt["objective"])
