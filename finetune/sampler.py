"""The (distributed) sampler: one seeded global batch order; each process takes its slice of every batch.

An epoch's order is ``epoch_order(n, seed, epoch)`` and is cut into global batches of
``batch_size`` exactly as a single process cuts it, whatever the number of processes. Process
``r`` of ``W`` takes the contiguous slice ``shard_rows(B, r, W)`` of each global batch (shares
differ by at most one row when ``W`` does not divide ``B``). Every process divides its summed,
weighted per-example loss by the same global denominator (the batch's total weight) and DDP
sums the gradients, so each step's gradient is the single-process mean over the global batch,
the last partial batch included, for any ``W`` and any micro-batching.

A process whose share is empty (a last batch smaller than ``W``) still runs a forward/backward so
the all-reduce happens: on one zero-weight padding row, or on an empty batch when BatchNorm
statistics are synchronised (a padding row would enter them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cxrfair.extract.distributed import shard_rows


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """(n,) permutation for one epoch, a pure function of (seed, epoch) so a resumed run replays it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def index_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split an index order into batches of ``batch_size`` (the last one may be smaller)."""
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass(frozen=True)
class Step:
    """One optimizer step as one process sees it.

    Attributes:
        rows: (b,) cohort rows of this process's share, in global-batch order; a single padding
            row when the share is empty and ``pad``; empty (b = 0) when kept empty.
        positions: (b,) each row's place in the global batch (its augmentation is drawn there).
        weights: (b,) float32 loss weight per row (1, or the given row weight; 0 for padding).
        denominator: the global batch's total weight: every process divides by this number.
        chunks: ((start, stop), ...) micro-batches over ``rows``: one forward/backward each.
        pad: ``rows`` is a zero-weight stand-in, not data.
        global_size: images in the global batch (all processes together).
    """

    rows: np.ndarray
    positions: np.ndarray
    weights: np.ndarray
    denominator: float
    chunks: tuple
    pad: bool
    global_size: int

    @property
    def images(self) -> int:
        """Images of the data this process trains on in this step (padding excluded)."""
        return 0 if self.pad else len(self.rows)


def plan_epoch(order: np.ndarray, batch_size: int, rank: int = 0, world: int = 1, micro_batch: int | None = None,
               keep_empty: bool = False, row_weights: np.ndarray | None = None) -> list[Step]:
    """This process's steps for one epoch.

    Args:
        order: (n,) cohort rows in the epoch's (global) order.
        batch_size: global batch size (all processes together).
        rank, world: this process and the number of processes.
        micro_batch: most rows per forward pass (gradient accumulation); None = a whole share.
        keep_empty: give every process the same number of (possibly empty) micro-batches, for
            synchronised BatchNorm, whose forward is itself a collective.
        row_weights: (N,) per-row loss weights indexed by cohort row; None = all 1 (plain mean).
    """
    return [plan_step(batch, rank, world, micro_batch, keep_empty, row_weights)
            for batch in index_batches(order, batch_size)]


def plan_step(batch: np.ndarray, rank: int, world: int, micro_batch: int | None, keep_empty: bool,
              row_weights: np.ndarray | None) -> Step:
    """Process ``rank``'s share of one global ``batch`` (cohort rows) as a Step."""
    weights = np.ones(len(batch), np.float32) if row_weights is None else np.asarray(row_weights, np.float32)[batch]
    start, stop = shard_rows(len(batch), rank, world)
    rows, positions, w = batch[start:stop], np.arange(start, stop), weights[start:stop]
    pad = stop == start and not keep_empty
    if pad:
        rows, positions, w = batch[:1], np.zeros(1, np.int64), np.zeros(1, np.float32)
    n_chunks = 1 if micro_batch is None else math.ceil(math.ceil(len(batch) / world) / micro_batch)
    return Step(rows, positions, w, float(weights.sum(dtype=np.float64)), chunk_bounds(len(rows), n_chunks, keep_empty),
                pad, len(batch))


def chunk_bounds(n: int, n_chunks: int, keep_empty: bool) -> tuple:
    """``n_chunks`` near-equal (start, stop) ranges over ``n`` rows; empty ones dropped unless ``keep_empty``."""
    edges = [i * n // n_chunks for i in range(n_chunks + 1)]
    bounds = tuple((a, b) for a, b in zip(edges, edges[1:]) if b > a or keep_empty)
    return bounds or ((0, n),)


def plain_steps(idx: np.ndarray, batch_size: int) -> list[Step]:
    """Unweighted, unsharded batches of ``idx`` in order (evaluation)."""
    return [Step(b, np.arange(len(b)), np.ones(len(b), np.float32), float(len(b)), ((0, len(b)),), False, len(b))
            for b in index_batches(np.asarray(idx), batch_size)]
