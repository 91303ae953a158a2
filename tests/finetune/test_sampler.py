"""The distributed sampler: each process's slice of every global batch, micro-batches, padding, weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrfair.finetune import sampler
from cxrfair.finetune.train import reduce_loss


def plans(n: int, batch: int, world: int, **kw) -> list[list[sampler.Step]]:
    order = sampler.epoch_order(n, seed=1, epoch=2)
    return [sampler.plan_epoch(order, batch, rank, world, **kw) for rank in range(world)]


@pytest.mark.parametrize("n,batch,world", [(36, 7, 2), (36, 12, 2), (37, 8, 3), (10, 4, 4), (5, 2, 8), (9, 9, 1)])
def test_ranks_split_each_single_process_batch_in_order(n, batch, world):
    order = sampler.epoch_order(n, seed=1, epoch=2)
    single = sampler.index_batches(order, batch)
    per_rank = plans(n, batch, world)
    assert all(len(p) == len(single) for p in per_rank)  # every process takes every step
    for k, global_batch in enumerate(single):
        steps = [p[k] for p in per_rank]
        real = [s for s in steps if not s.pad]
        np.testing.assert_array_equal(np.concatenate([s.rows for s in real]), global_batch)
        np.testing.assert_array_equal(np.concatenate([s.positions for s in real]), np.arange(len(global_batch)))
        sizes = [s.images for s in steps]
        assert sum(sizes) == len(global_batch) and max(sizes) - min(sizes) <= 1
        assert all(s.denominator == len(global_batch) == s.global_size for s in steps)


def test_one_process_plan_is_the_single_process_order():
    order = sampler.epoch_order(20, seed=0, epoch=0)
    steps = sampler.plan_epoch(order, 6, 0, 1)
    for s, b in zip(steps, sampler.index_batches(order, 6), strict=True):
        np.testing.assert_array_equal(s.rows, b)
        assert s.chunks == ((0, len(b)),) and not s.pad and (s.weights == 1).all()


def test_an_empty_share_is_one_zero_weight_padding_row():
    [p0], [p1], [p2] = plans(2, 2, 3)  # one global batch of 2 rows over 3 processes
    assert p2.pad and p2.images == 0 and p2.weights.tolist() == [0.0] and p2.chunks == ((0, 1),)
    assert p2.rows[0] == p0.rows[0]  # a real row of the batch (valid input), weighted out
    assert not p0.pad and not p1.pad


def test_kept_empty_shares_give_every_process_the_same_number_of_micro_batches():
    # Synchronised BatchNorm is a collective in every forward: equal counts, empty ones allowed.
    per_rank = plans(13, 5, 3, micro_batch=1, keep_empty=True)
    for k in range(len(per_rank[0])):
        counts = {len(p[k].chunks) for p in per_rank}
        assert len(counts) == 1
        assert not any(p[k].pad for p in per_rank)
    last = [p[-1] for p in per_rank]  # the last global batch holds 3 rows: 1 per process
    assert [s.images for s in last] == [1, 1, 1]


@pytest.mark.parametrize("micro", [1, 2, 3, 100])
def test_micro_batches_tile_each_share_within_the_limit(micro):
    for steps in plans(37, 9, 2, micro_batch=micro):
        for s in steps:
            covered = [i for a, b in s.chunks for i in range(a, b)]
            assert covered == list(range(len(s.rows)))
            assert all(0 < b - a <= micro for a, b in s.chunks)


def test_row_weights_give_per_row_weights_and_a_global_denominator():
    w = np.arange(1, 11, dtype=np.float32)  # row r weighs r + 1
    order = np.arange(10)
    s0, s1 = (sampler.plan_epoch(order, 10, r, 2, row_weights=w)[0] for r in range(2))
    assert s0.denominator == s1.denominator == w.sum()
    np.testing.assert_array_equal(np.concatenate([s0.weights, s1.weights]), w)


@pytest.mark.parametrize("batch,world,micro", [(7, 2, None), (7, 2, 2), (8, 3, 1), (1, 3, None), (2, 4, 1)])
def test_gradients_summed_over_processes_equal_the_single_process_mean(batch, world, micro):
    """The loss-scaling rule: each share's micro-batches, back-propagated and summed over ranks,
    give the gradient of one process's mean cross-entropy over the global batch (padding included)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(batch, 5), torch.randint(0, 3, (batch,))

    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    reference = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()  # gradients accumulate over ranks and chunks: what DDP's sum hook computes
    for rank in range(world):
        step = sampler.plan_step(np.arange(batch), rank, world, micro, False, None)
        w = torch.from_numpy(step.weights)
        for a, b in step.chunks:
            rows = step.rows[a:b]
            losses = torch.nn.functional.cross_entropy(model(x[rows]), y[rows], reduction="none")
            reduce_loss(losses, w[a:b], step.denominator).backward()
    for p, ref in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-7)
