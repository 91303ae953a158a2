"""Fine-tuning under ``torchrun``: the process group, DDP, collective checks and the shared image cache.

Launched by torchrun with more than one process (``extract.distributed.torchrun_env``),
``finetune`` trains with DistributedDataParallel: NCCL between GPUs (one per process, by
``LOCAL_RANK``), Gloo on CPU. The sampler (``finetune.sampler``) gives each process its slice of
every global batch; gradients are summed across processes (each process's loss is already
divided by the global batch's weight); validation and test are evaluated in shards and gathered
in order; only rank 0 writes checkpoints and runs. BatchNorm layers that training updates (full
fine-tuning of a ResNet) become SyncBatchNorm, so batch statistics cover the global batch as in
one process; PyTorch implements that on GPUs only, so such runs need CUDA processes.

Errors stay collective: a check that fails on one process is raised on all of them (a lone
failure would leave the others waiting in the next collective), and the checks that touch files
run on rank 0 only.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np

from cxrfair.errors import CxrfairError
from cxrfair.extract.distributed import shard_rows, torchrun_env
from cxrfair.finetune import data as fdata
from cxrfair.finetune.model import trainable_batchnorm
from cxrfair.io import ensure_writable_dir

T = TypeVar("T")
# The longest wait between two collectives is the image-cache build and rank 0's final writes.
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Dist:
    """This process's place in the run; ``Dist()`` is a plain single-process run (no collectives)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj) -> list:
        """``obj`` of every process, in rank order (pickled; for small things: arrays of predictions, RNG states)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only; its result (small, picklable) or its error reaches every process."""
        if not self.active:
            return fn()
        import torch.distributed as dist

        box: list = [None]
        error = None
        if self.main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:
                error, box[0] = e, ("error", _describe(e, self.rank))
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0][0] == "error":
            raise CxrfairError(box[0][1])
        return box[0][1]

    def everywhere(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every process; if it fails on any, every process raises (the first failing rank's error)."""
        if not self.active:
            return fn()
        error, result = None, None
        try:
            result = fn()
        except Exception as e:
            error = e
        messages = self.gather(None if error is None else _describe(error, self.rank))
        if error is not None:
            raise error
        failed = [m for m in messages if m is not None]
        if failed:
            raise CxrfairError(failed[0])
        return result


def _describe(e: Exception, rank: int) -> str:
    """One line for the other processes: a CxrfairError's own message, else where and what failed."""
    if isinstance(e, CxrfairError):
        return str(e)
    return f"process {rank} on {socket.gethostname()} failed: {type(e).__name__}: {e}"


@contextlib.contextmanager
def session(device_name: str) -> Iterator[Dist]:
    """The run's ``Dist``: a process group when launched by torchrun with several processes, else ``Dist()``.

    ``device_name`` is the ``--device`` option: CUDA processes use NCCL, CPU ones Gloo. A group
    that is already initialised (by a caller) is used as it is and left open.
    """
    env = torchrun_env()
    if env is None:
        yield Dist()
        return
    import torch
    import torch.distributed as dist

    rank, world, local_rank = env
    cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    owned = not dist.is_initialized()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise CxrfairError(f"torchrun: local rank {local_rank} but {torch.cuda.device_count()} GPU(s) on this node; "
                               "pass --nproc-per-node at most the number of GPUs")
        torch.cuda.set_device(local_rank)
    if owned:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        yield Dist(rank=rank, world=world, local_rank=local_rank)
    finally:
        if owned:
            dist.destroy_process_group()


def check_batchnorm(encoder, method: str, d: Dist, device) -> None:
    """CxrfairError when BatchNorm statistics would be per process: BatchNorm trained in several CPU processes."""
    from torch import nn

    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules())
    if d.active and device.type != "cuda" and method == "full" and has_bn:
        raise CxrfairError(
            "full fine-tuning of a model with BatchNorm in several CPU processes: its batch statistics would "
            "cover each process's share instead of the global batch (PyTorch's SyncBatchNorm runs on GPUs only); "
            "run it on CUDA processes, or in one process"
        )


def unused_parameters(model, size: int, device) -> list[str]:
    """Trainable parameters that get no gradient from the classification loss (e.g. GLoRIA's local branch).

    One eval-mode forward/backward on a blank image (no BatchNorm statistics move, no global RNG
    is consumed); gradients are cleared afterwards.
    """
    import torch

    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model(torch.zeros(1, 3, size, size, device=device)).float().sum().backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return names


def _sum_hook(process_group, bucket):
    """DDP comm hook: sum the gradients (each process's loss is already divided by the global denominator)."""
    import torch.distributed as dist

    fut = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def sync_batchnorm(model, d: Dist, device):
    """Trained BatchNorm layers as SyncBatchNorm under DDP on CUDA (same module otherwise)."""
    import torch


    if d.active and device.type == "cuda" and trainable_batchnorm(model):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap_ddp(model, d: Dist, device, size: int):
    """``model`` under DistributedDataParallel with summed gradients (``model`` itself in one process).

    Buffers are not re-broadcast each forward: they are identical on every process (frozen, or
    synchronised BatchNorm), and a broadcast per forward would be a collective that processes
    with different numbers of micro-batches would not match.
    """
    if not d.active:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    unused = unused_parameters(model, size, device)
    # torch >= 2.14 renames broadcast_buffers (and warns on the old name).
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
              find_unused_parameters=bool(unused), **no_buffer_sync)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def shared_image_cache(paths: list, preprocess, file: Path, workers: int, d: Dist) -> np.ndarray:
    """The uint8 image cache at ``file``, decoded once by all processes together, memory-mapped by each.

    Rank 0 creates a blank file, each process decodes its contiguous slice of rows and writes them
    into it, rank 0 publishes it (rename + sidecar), and every process checks it can see the
    result: ``--out`` must be on a filesystem all processes share (CxrfairError otherwise).

    Returns:
        (N, 3, S, S) uint8 read-only memmap.
    """

    shape = fdata.cache_shape(len(paths), preprocess)
    if not d.on_main(lambda: _complete_or_checked(file, shape, paths)):
        tmp = Path(d.on_main(lambda: _blank(file, shape)))
        try:
            start, stop = shard_rows(len(paths), d.rank, d.world)
            d.everywhere(lambda: _fill_slice(tmp, shape, paths[start:stop], start, preprocess, workers, d))
            d.on_main(lambda: (os.replace(tmp, file), fdata.publish_sidecar(file, shape)))
        finally:
            if d.main and tmp.exists():
                tmp.unlink()
    return d.everywhere(lambda: _open_shared(file, shape, d))


def _complete_or_checked(file: Path, shape: tuple, paths: list) -> bool:

    if fdata.cache_is_complete(file, shape):
        return True
    fdata.check_images(paths)
    return False


def _blank(file: Path, shape: tuple) -> str:
    """A zero-filled (sparse) temp file of the cache's size beside ``file``; its path."""

    ensure_writable_dir(file.parent, "image cache")
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.truncate(int(np.prod(shape)))
    return str(tmp)


class _RowWriter:
    """``out[i] = row`` as a positioned write of row ``first + i`` into an open file.

    Not a memmap: processes on different nodes writing neighbouring rows through mmap would each
    write back whole pages, the other's bytes included (rows are not page-aligned).
    """

    def __init__(self, fd: int, first: int, row_bytes: int):
        self.fd, self.first, self.row_bytes = fd, first, row_bytes

    def __setitem__(self, i: int, row: np.ndarray) -> None:
        os.pwrite(self.fd, np.ascontiguousarray(row, dtype=np.uint8).tobytes(), (self.first + i) * self.row_bytes)


def _fill_slice(tmp: Path, shape: tuple, paths: list, start: int, preprocess, workers: int, d: Dist) -> None:

    if not tmp.is_file():
        raise CxrfairError(_not_shared(tmp, d))
    fd = os.open(tmp, os.O_WRONLY)
    try:
        fdata.fill_cache(_RowWriter(fd, start, int(np.prod(shape[1:]))), paths, preprocess, workers,
                         desc=f"decode (1/{d.world} per process)", progress=d.main)
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_shared(file: Path, shape: tuple, d: Dist) -> np.ndarray:

    if not fdata.cache_is_complete(file, shape):
        raise CxrfairError(_not_shared(file, d))
    return fdata.open_cache(file, shape)


def _not_shared(path: Path, d: Dist) -> str:
    return (f"image cache {path}: not visible from process {d.rank} on {socket.gethostname()}; under torchrun "
            "--out must be a folder every process (every node) shares")
