"""Fairness mitigations for the probes: small pure functions plugged into the per-example loss.

The training loop (``cxrfair.probe.train``) computes a per-example loss vector ``(B,)`` (whatever
the task: softmax cross-entropy for multi-class, masked sigmoid for multi-label) and hands it to
``value_and_grad`` here, with a ``Context`` (the batch's real-row mask, each row's group and
cell, the lane's strength and training progress) and the mitigation's carried state. As in
optax, each mitigation is one ``Term`` (an init/loss pair) in ``TERMS``, under its name in the
mitigation table (``cxrfair.core.mitigations``, which holds its solver, strengths and defaults):
most are a reducer ``(losses, ctx, state, spec) -> (loss, state)`` made a term by
``reducer_term``; the adversary, which needs the model's outputs and its own parameters, is
``adversarial_grads``. Nothing here copies the loop, so each lane of a vmapped sweep runs its
own strength, and no caller asks which mitigation it holds.

Names and semantics: docs/CONTRACTS.md, "Mitigations". ``erase`` is not a loss: ``leace_fit``
/ ``leace_apply`` transform the features before the probe.

Cells are (group, class) for multi-class (cell = group * C + class) and groups for multi-label.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cxrfair.core import mitigations

ADVERSARY_HIDDEN = 64  # the adversary: an MLP with one hidden ReLU layer of this width
SINKHORN = mitigations.SINKHORN  # fairot's solve: blur, annealing, iteration counts (shared with fine-tuning)
SINKHORN_EPS = SINKHORN.eps


@dataclass(frozen=True)
class Spec:
    """The static part of a mitigation, shared by every lane of a sweep (hashable: a jit static)."""

    name: str = "erm"  # a key of TERMS (core.mitigations.names(PROBE))
    n_groups: int = 0  # groups of the sensitive attribute
    cell_counts: tuple = ()  # training rows per cell (n_cells,), cell = group * C + class (multi-label: group)
    adversary: str = "grl"  # adversarial: "grl" (gradient reversal on features) or "projection" (Zhang et al.)
    total_steps: int = 1  # optimizer steps of one lane (the GRL ramp's training progress)

    @property
    def n_cells(self) -> int:
        return len(self.cell_counts)


class Context(NamedTuple):
    """What the loss sees of one training step (one lane)."""

    w: jax.Array  # (B,) 1 for real rows, 0 for padding
    cell: jax.Array  # (B,) int cell of each row
    group: jax.Array  # (B,) int group of each row
    strength: jax.Array  # () the lane's strength
    step: jax.Array  # () int optimizer step, 0-based


# ---------------------------------------------------------------- reducers


def masked_mean(values: jax.Array, w: jax.Array) -> jax.Array:
    """Mean of values (B,) over the real rows (w 1) of a padded batch."""
    return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


def erm(losses, ctx: Context, state, spec: Spec):
    """Plain training: the mean per-example loss."""
    return masked_mean(losses, ctx.w), state


def cell_weights(cell_counts: jax.Array, strength: jax.Array) -> jax.Array:
    """Per-cell example weights (n_cells,): w ∝ n_cell^(-s), mean 1 over the training rows.

    s = 0 gives 1 everywhere (ERM); s = 1 makes every non-empty cell's total weight equal.
    Empty cells get weight 0 (no row uses it).
    """
    n = jnp.asarray(cell_counts, jnp.float32)
    raw = jnp.where(n > 0, jnp.maximum(n, 1.0) ** -strength, 0.0)
    return raw * jnp.sum(n) / jnp.sum(n * raw)


def reweight(losses, ctx: Context, state, spec: Spec):
    """Mean of per-example losses weighted by their cell's ``cell_weights``."""
    weights = cell_weights(jnp.array(spec.cell_counts), ctx.strength)[ctx.cell]
    return masked_mean(losses * weights, ctx.w), state


def cell_means(losses: jax.Array, ctx: Context, n_cells: int) -> tuple[jax.Array, jax.Array]:
    """(mean loss of each cell in the batch (n_cells,), 0 where absent; rows per cell (n_cells,))."""
    onehot = jax.nn.one_hot(ctx.cell, n_cells, dtype=losses.dtype) * ctx.w[:, None]  # (B, n_cells)
    count = onehot.sum(0)
    return (losses @ onehot) / jnp.maximum(count, 1.0), count


def groupdro_init(spec: Spec) -> jax.Array:
    """q (n_cells,): uniform over the cells that have training rows."""
    live = (np.asarray(spec.cell_counts) > 0).astype(np.float32)
    return jnp.asarray(live / live.sum())


def groupdro_update(q: jax.Array, cell_loss: jax.Array, eta: jax.Array) -> jax.Array:
    """Sagawa et al.'s step: q_c <- q_c exp(eta L_c), renormalised (absent cells have L_c = 0)."""
    logits = jnp.where(q > 0, jnp.log(jnp.where(q > 0, q, 1.0)) + eta * cell_loss, -jnp.inf)
    return jax.nn.softmax(logits)


def groupdro(losses, ctx: Context, q, spec: Spec):
    """Online group DRO: q moves towards the worst cells, then loss = sum_c q_c L_c (q not differentiated)."""
    cell_loss, _ = cell_means(losses, ctx, spec.n_cells)
    q = groupdro_update(q, jax.lax.stop_gradient(cell_loss), ctx.strength)
    return jnp.dot(q, cell_loss), q


# ---------------------------------------------------------------- fairot: debiased Sinkhorn in 1-D


def anneal_schedule(eps: float = SINKHORN_EPS) -> np.ndarray:
    """The ε-scaling blurs of a cross problem's annealing passes before ``eps`` (those above it)."""
    return np.asarray([e for e in SINKHORN.anneal if e > eps], np.float64)


def _by_column(rows: jax.Array, onehot: jax.Array) -> jax.Array:
    """rows (..., K, n) of K problems spread over columns: (..., n, m), entry (i, j) = rows[problem of j, i]."""
    return jnp.einsum("...ki,...jk->...ij", rows, onehot)


def _solve(cost: jax.Array, a: jax.Array, b: jax.Array, onehot: jax.Array, eps: float, iters: int):
    """Entropic OT values (..., K) and packed plans (..., n, m) of K problems sharing rows and cost.

    cost (..., n, m), a (..., n) the rows' weights (shared by every problem), b (..., m) each
    column's weight in its own problem, onehot (..., m, K) the problem each column belongs to
    (problem k: OT_eps(a, b on the columns of k), b summing to 1 over them). The K problems
    share one kernel of n x m entries, each column carrying its own problem's potentials, so
    a half-step is one (n x m) x (m x K) product: the kernel is read once for all K problems
    (the iterations are bound by reading it, not by arithmetic).

    One pass per ``anneal_schedule`` blur (scaling form on exp(-C / blur)); then the problem at
    ``eps`` absorbed into scaling form, K_ij = exp((f0_{k(j), i} + g0_j - C_ij) / ε) computed
    once, and ``iters`` over-relaxed Sinkhorn iterations (ω = SINKHORN.over_relaxation, Thibault
    et al. 2017) on log u (K, n), log v (m): a matrix product each instead of a log-sum-exp. The
    last f-update is the half-step f(g) = softmin_b(g - C) whose row-normalised kernel is the
    plan; the packed plan's column j is column j of its own problem's plan (each problem's rows
    summing to a), so the K plans sum to it.
    """
    tiny = jnp.finfo(cost.dtype).tiny
    wa, wb = jnp.where(a > 0, a, 0.0), jnp.where(b > 0, b, 0.0)
    onehot = onehot.astype(cost.dtype)
    n_problems = onehot.shape[-1]
    # A problem without columns (a group absent from the batch) keeps 0 potentials and finite
    # sums: its row sums are 0, and -log 0 would reach every column through the products.
    has_cols = (jnp.einsum("...j,...jk->...k", (b > 0).astype(cost.dtype), onehot) > 0)[..., :, None]  # (..., K, 1)

    onehot_t = jnp.swapaxes(onehot, -1, -2)  # (..., K, m)

    # Both sums contract the kernel's first axis (vectors times a matrix, "ki,ij->kj"): XLA's CPU
    # products run that form 1.5-10x faster than a matrix times K columns; so the row sums read a
    # transposed copy of the kernel, made once.
    def row_sums(kern_t, col):  # (..., K, n): sum_j kern_ij col_j over each problem's columns
        return jnp.einsum("...kj,...ji->...ki", col[..., None, :] * onehot_t, kern_t)

    def col_sums(kern, rows):  # (..., m): sum_i kern_ij rows_{k(j), i} of each column's own problem
        return jnp.sum(jnp.einsum("...ki,...ij->...kj", rows, kern) * onehot_t, -2)

    g = jnp.zeros(jnp.broadcast_shapes(b.shape, cost.shape[:-2] + cost.shape[-1:]), cost.dtype)
    f = jnp.zeros(jnp.broadcast_shapes(a.shape[:-1], cost.shape[:-2]) + (n_problems, cost.shape[-2]), cost.dtype)
    for e in anneal_schedule(eps):
        # One pass f = softmin_b(g - C), g = softmin_a(f - C) at blur e, in scaling form on exp(-C / e).
        # Safe in float32 for e >= 0.03: costs and potentials are within [-1.5, 1.5], so every
        # exponent stays within +-50.
        k = jnp.exp(-cost / e)
        f = jnp.where(has_cols, -e * jnp.log(jnp.maximum(row_sums(jnp.swapaxes(k, -1, -2), wb * jnp.exp(g / e)), tiny)), 0.0)
        g = -e * jnp.log(jnp.maximum(col_sums(k, wa[..., None, :] * jnp.exp(f / e)), tiny))
    # One exp for the packed kernel; pairs with an absent point are 0 (their exponent is unbounded).
    live = (a > 0)[..., :, None] & (b > 0)[..., None, :]
    kernel = jnp.exp(jnp.where(live, (_by_column(f, onehot) + g[..., None, :] - cost) / eps, -jnp.inf))
    kernel_t = jnp.swapaxes(kernel, -1, -2)
    omega = SINKHORN.over_relaxation

    def relax(old, sums, present):
        # An absent point's scaling stays 1: its kernel row is 0, and log(0) would blow up exp(lv).
        return jnp.where(present, (1 - omega) * old - omega * jnp.log(jnp.maximum(sums, tiny)), 0.0)

    def iterate(luv, _):
        # f_ki = f0_ki - eps log sum_{j in k} K_ij b_j v_j, g_j = g0_j - eps log sum_i K_ij a_i u_{k(j), i}
        lu, lv = luv
        lu = relax(lu, row_sums(kernel_t, wb * jnp.exp(lv)), (a > 0)[..., None, :] & has_cols)
        return (lu, relax(lv, col_sums(kernel, wa[..., None, :] * jnp.exp(lu)), b > 0)), None

    (_, lv), _ = jax.lax.scan(iterate, (jnp.zeros_like(f), jnp.zeros_like(g)), None, length=iters)
    bv = wb * jnp.exp(lv)
    sums = jnp.where(has_cols, jnp.maximum(row_sums(kernel_t, bv), tiny), 1.0)  # the last half-step, plain (ω = 1): rows sum to a
    f1 = f - eps * jnp.log(sums)
    g = g + eps * lv
    value = (jnp.sum(jnp.where(a > 0, a, 0.0)[..., None, :] * f1, -1)
             + jnp.einsum("...j,...jk->...k", jnp.where(b > 0, b * g, 0.0), onehot))
    plan = kernel * bv[..., None, :] * _by_column(wa[..., None, :] / sums, onehot)
    return value, plan


def _cost_cotangent(plan: jax.Array, cost: jax.Array) -> jax.Array:
    """d/dC of a sum of problems on ``cost`` from their (cotangent-weighted) plans (..., n, m):
    a cost shared (broadcast) by a batch of problems gets their sum."""
    grad = plan.sum(tuple(range(plan.ndim - cost.ndim)))
    grad = grad.sum(tuple(i for i, n in enumerate(cost.shape) if n == 1), keepdims=True)
    return grad.astype(cost.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def packed_sinkhorn_value(cost: jax.Array, a: jax.Array, b: jax.Array, onehot: jax.Array,
                          eps: float = SINKHORN_EPS, iters: int = SINKHORN.iterations) -> jax.Array:
    """Entropic OT costs OT_eps(a, b_k) = min_P <P, C> + eps KL(P | a ⊗ b_k) of K problems -> (..., K).

    cost (..., n, m), a (..., n) summing to 1 (0 = absent), b (..., m) each column's weight in
    its own problem (summing to 1 over the problem's columns), onehot (..., m, K) the problem of
    each column (a column with weight 0 is absent everywhere). The value is the dual one,
    <a, f(g)> + <b, g>, with f(g) = softmin_b(g - C) the last half-step; its gradient in
    ``cost`` is the envelope-theorem one, the plan P of that half-step (dOT/dC_ij = P_ij, no
    backpropagation through the iterations; an earlier version differentiated both potentials:
    an effective 2λ, docs/fairness.md). The weights are not differentiated (their cotangents
    are 0): the loop's weights are masks.
    """
    return _solve(cost, a, b, onehot, eps, iters)[0]


def _packed_fwd(cost, a, b, onehot, eps, iters):
    value, plan = _solve(cost, a, b, onehot, eps, iters)
    return value, (plan, cost, a, b, onehot)


def _packed_bwd(eps, iters, res, ct):
    plan, cost, a, b, onehot = res
    # Each column's plan entries belong to its own problem: scaled by that problem's cotangent.
    per_column = jnp.einsum("...k,...jk->...j", ct, onehot.astype(plan.dtype))
    return (_cost_cotangent(plan * per_column[..., None, :], cost), jnp.zeros_like(a), jnp.zeros_like(b),
            jnp.zeros_like(onehot))


packed_sinkhorn_value.defvjp(_packed_fwd, _packed_bwd)


def sinkhorn_value(cost: jax.Array, a: jax.Array, b: jax.Array, eps: float = SINKHORN_EPS,
                   iters: int = SINKHORN.iterations) -> jax.Array:
    """OT_eps(a, b) of batched problems -> (...,): cost (..., n, m), a (..., n), b (..., m), each
    summing to 1 (0 = absent); ``packed_sinkhorn_value`` with one problem."""
    ones = jnp.ones(jnp.broadcast_shapes(b.shape, cost.shape[:-2] + cost.shape[-1:]) + (1,), cost.dtype)
    return packed_sinkhorn_value(cost, a, b, ones, eps, iters)[..., 0]


def _solve_symmetric(cost: jax.Array, a: jax.Array, eps: float, iters: int):
    """OT_eps(a, a) (...,) of batched symmetric problems and what their plans are made of.

    Averaged updates p <- (p + T(p)) / 2, T(p) = softmin_a(p - C), from p = 0 (Feydy et al.
    2019), in scaling form u = exp(p / eps) on one kernel exp(-C / eps) shared by every problem
    on these points: a matrix product per update for all of them. Safe in float32: a symmetric
    problem's potential stays in [0, (eps / 2) log(1 / min a)] (an isolated point's), so u is
    in [1, sqrt(n)], and kernel entries past e^-80 (cost > 0.8 at eps = 0.01) are e^-80 instead
    of smaller: their share of the plan is below e^-80 of a row's diagonal entry.

    Returns value (...,) = <a, T(p)> + <a, p> and (kernel (..., n, n), row (..., n) = a / s,
    col (..., n) = a u): the half-step plan is row_i kernel_ij col_j, rows summing to a.
    """
    kernel = jnp.exp(-jnp.minimum(cost / eps, 80.0))
    w = jnp.where(a > 0, a, 0.0)

    def sums(u):
        # K (a u) per problem as (a u)^T K (the kernel is symmetric): the fast form of the product (see _solve)
        return jnp.einsum("...kj,...ji->...ki", w * u, kernel)

    def update(u, _):
        return jnp.where(a > 0, jnp.sqrt(u / sums(u)), 1.0), None

    u0 = jnp.ones(jnp.broadcast_shapes(a.shape, cost.shape[:-2] + cost.shape[-1:]), cost.dtype)
    u, _ = jax.lax.scan(update, u0, None, length=iters)
    s = sums(u)
    value = eps * jnp.sum(jnp.where(a > 0, w * (jnp.log(u) - jnp.log(s)), 0.0), -1)
    # An absent point's s is 0 (a problem with no points: a batch of padding): its row is 0, not 0 / 0.
    return value, (kernel, jnp.where(a > 0, w / jnp.where(a > 0, s, 1.0), 0.0), w * u)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def symmetric_value(cost: jax.Array, a: jax.Array, eps: float = SINKHORN_EPS,
                    iters: int = SINKHORN.symmetric_iterations) -> jax.Array:
    """OT_eps(a, a) of K problems on the same points -> (..., K): cost (..., n, n) symmetric, a (..., K, n).

    The gradient in ``cost`` is the envelope one, each problem's half-step plan, summed over
    the K problems sharing the cost; the weights are not differentiated.
    """
    return _solve_symmetric(cost, a, eps, iters)[0]


def _symmetric_fwd(cost, a, eps, iters):
    value, parts = _solve_symmetric(cost, a, eps, iters)
    return value, (parts, a)


def _symmetric_bwd(eps, iters, res, ct):
    (kernel, row, col), a = res
    # sum_k ct_k row_k,i K_ij col_k,j: one (n, K) x (K, n) product, no (K, n, n) plans stored
    return kernel * jnp.einsum("...ki,...kj->...ij", ct[..., None] * row, col), jnp.zeros_like(a)


symmetric_value.defvjp(_symmetric_fwd, _symmetric_bwd)


def sinkhorn_ot(x: jax.Array, a: jax.Array, y: jax.Array, b: jax.Array, eps: float = SINKHORN_EPS,
                iters: int = SINKHORN.iterations) -> jax.Array:
    """OT_eps(a, b) between 1-D samples x (n,) with weights a (n,) and y (m,) with b (m,); C = (x_i - y_j)^2."""
    return sinkhorn_value((x[:, None] - y[None, :]) ** 2, a, b, eps, iters)


def self_ot(x: jax.Array, a: jax.Array, eps: float = SINKHORN_EPS) -> jax.Array:
    """OT_eps(a, a) of the 1-D sample x (n,) with weights a (n,), by the symmetric solve."""
    return symmetric_value((x[:, None] - x[None, :]) ** 2, a[None, :], eps)[0]


def sinkhorn_divergence(x, a, y, b, eps: float = SINKHORN_EPS) -> jax.Array:
    """Debiased S_eps(a, b) = OT(a, b) - OT(a, a)/2 - OT(b, b)/2 (>= 0, 0 iff a = b)."""
    return sinkhorn_ot(x, a, y, b, eps) - 0.5 * self_ot(x, a, eps) - 0.5 * self_ot(y, b, eps)


def fairot_penalty(scores: jax.Array, ctx: Context, n_groups: int) -> jax.Array:
    """Σ_g S_eps(scores of the batch, scores of the batch's rows in group g); groups with < 2 rows skipped.

    scores (B,): each row's probability of its true class (multi-class: exp(-cross-entropy)).
    Every problem lives on the batch's own points, so they share one (B, B) cost: the G cross
    problems (batch vs group g) packed into one (B, B) kernel, each column in its own group's
    problem (``packed_sinkhorn_value``), the G + 1 symmetric ones (group g vs itself, the batch
    vs itself once) as one batched solve on another.
    """
    a = ctx.w / jnp.maximum(ctx.w.sum(), 1.0)
    in_g = ctx.w[None, :] * (ctx.group[None, :] == jnp.arange(n_groups)[:, None])  # (G, B)
    live = in_g.sum(1) >= 2
    count = in_g.sum(1)
    cost = (scores[:, None] - scores[None, :]) ** 2
    # The G cross problems packed into one kernel: column j is in group(j)'s problem, weight 1 / its
    # group's rows (a skipped group's problem, of 0 or 1 column, is finite; value and gradient masked).
    onehot = jax.nn.one_hot(ctx.group, n_groups, dtype=cost.dtype)  # (B, G)
    cross = packed_sinkhorn_value(cost, a, ctx.w / jnp.maximum(count, 1.0)[ctx.group], onehot)  # (G,)
    # A skipped group's symmetric problem runs on the batch's weights (finite) and is masked.
    b = jnp.where(live[:, None], in_g / jnp.maximum(count[:, None], 1.0), a[None, :])
    own = symmetric_value(cost, jnp.concatenate([b, a[None, :]]))  # (G + 1,)
    div = cross - 0.5 * own[:n_groups] - 0.5 * own[-1]
    return jnp.sum(jnp.where(live, div, 0.0))


def fairot(losses, ctx: Context, state, spec: Spec):
    """FairCLIP's idea done right: mean loss + strength × Σ_g S_eps(batch, group g) of true-class scores."""
    return masked_mean(losses, ctx.w) + ctx.strength * fairot_penalty(jnp.exp(-losses), ctx, spec.n_groups), state


# ---------------------------------------------------------------- adversarial


@jax.custom_vjp
def reverse_gradient(x: jax.Array, scale: jax.Array) -> jax.Array:
    """Identity forward; the gradient is multiplied by -scale on the way back (Ganin & Lempitsky)."""
    return x


def _reverse_fwd(x, scale):
    return x, scale


def _reverse_bwd(scale, g):
    return -scale * g, jnp.zeros_like(scale)


reverse_gradient.defvjp(_reverse_fwd, _reverse_bwd)


def grl_ramp(progress: jax.Array) -> jax.Array:
    """Ganin & Lempitsky's schedule 2 / (1 + e^(-10 p)) - 1, p in [0, 1]."""
    return 2.0 / (1.0 + jnp.exp(-10.0 * progress)) - 1.0


def adversary_init(key: jax.Array, n_in: int, n_groups: int) -> dict:
    """The adversary MLP (n_in -> 64 -> n_groups), PyTorch-style uniform init; weights (out, in)."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    u = lambda k, shape, fan: jax.random.uniform(k, shape, jnp.float32, -1.0, 1.0) / np.sqrt(fan)  # noqa: E731
    return {"w1": u(k1, (ADVERSARY_HIDDEN, n_in), n_in), "b1": u(k2, (ADVERSARY_HIDDEN,), n_in),
            "w2": u(k3, (n_groups, ADVERSARY_HIDDEN), ADVERSARY_HIDDEN), "b2": u(k4, (n_groups,), ADVERSARY_HIDDEN)}


def adversary_loss(adv: dict, feat_t: jax.Array, ctx: Context) -> jax.Array:
    """Mean cross-entropy of the adversary predicting each row's group from feat_t (F, B)."""
    h = jax.nn.relu(adv["w1"] @ feat_t + adv["b1"][:, None])
    z = adv["w2"] @ h + adv["b2"][:, None]  # (G, B)
    ce = jax.nn.logsumexp(z, axis=0) - jnp.take_along_axis(z, ctx.group[None, :], axis=0)[0]
    return masked_mean(ce, ctx.w)


def _tree_vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def adversarial_grads(params: dict, loss_fn, forward_fn, x, y, ctx: Context, state, spec: Spec):
    """Loss and gradients of the probe (``params`` minus ``"adv"``) and its adversary (``params["adv"]``).

    grl: the adversary reads the features the head reads (``forward_fn``'s second output: the
    MLP's hidden layer, the linear probe's logits) through a gradient reversal of
    strength × ramp(progress). projection (Zhang et al. 2018): the adversary reads the softmax
    outputs and the one-hot label (equalised odds); the probe's gradient is
    ∇L_P − proj_{∇L_A} ∇L_P − strength ∇L_A, with one inner product over all its parameters.
    """
    probe = {k: v for k, v in params.items() if k != "adv"}
    if spec.adversary == "grl":
        scale = ctx.strength * grl_ramp(ctx.step / spec.total_steps)

        def total(p):
            task = masked_mean(loss_fn(p, x, y), ctx.w)
            return task + adversary_loss(p["adv"], reverse_gradient(forward_fn(p, x)[1], scale), ctx)

        loss, grads = jax.value_and_grad(total)(params)
        return (loss, state), grads

    def task(p):
        return masked_mean(loss_fn(p, x, y), ctx.w)

    def adv(p, a):
        z = forward_fn(p, x)[0]  # (C, B)
        label = jax.nn.one_hot(y, z.shape[0], axis=0, dtype=z.dtype)
        return adversary_loss(a, jnp.concatenate([jax.nn.softmax(z, axis=0), label]), ctx)

    loss, g_p = jax.value_and_grad(task)(probe)
    _, (g_a, g_adv) = jax.value_and_grad(adv, argnums=(0, 1))(probe, params["adv"])
    coef = _tree_vdot(g_p, g_a) / jnp.maximum(_tree_vdot(g_a, g_a), 1e-30)
    grads = jax.tree.map(lambda gp, ga: gp - coef * ga - ctx.strength * ga, g_p, g_a)
    return (loss, state), {**grads, "adv": g_adv}


def adversary_params(key: jax.Array, spec: Spec, n_features: int, n_classes: int) -> dict:
    """``{"adv": ...}``: the adversary reads the features (grl) or the outputs and one-hot label (projection)."""
    n_in = n_features if spec.adversary == "grl" else 2 * n_classes
    return {"adv": adversary_init(key, n_in, spec.n_groups)}


def adversarial_meta(spec: Spec) -> dict:
    return {"adversary": {"kind": spec.adversary, "hidden": ADVERSARY_HIDDEN}}


def fairot_meta(spec: Spec) -> dict:
    return {"sinkhorn": {"eps": SINKHORN.eps, "anneal": [float(e) for e in anneal_schedule()],
                         "iterations": SINKHORN.iterations, "over_relaxation": SINKHORN.over_relaxation,
                         "symmetric_iterations": SINKHORN.symmetric_iterations, "cost": "squared",
                         "score": "probability of the true class", "debiased": True}}


# ---------------------------------------------------------------- the terms (the seam the loop calls)


class Term(NamedTuple):
    """One probe mitigation, optax-style: how it starts and what one step differentiates.

    init(spec) -> carried state (a pytree; () when none). init_params(key, spec, n_features,
    n_classes) -> parameters trained beside the probe ({} when none). value_and_grad(spec,
    loss_fn, forward_fn, params, x, y, ctx, state) -> ((loss, new state), gradients). meta(spec)
    -> the keys it adds to run.json.
    """

    init: Callable
    init_params: Callable
    value_and_grad: Callable
    meta: Callable


def no_state(spec: Spec):
    return ()


def no_params(key: jax.Array, spec: Spec, n_features: int, n_classes: int) -> dict:
    return {}


def no_meta(spec: Spec) -> dict:
    return {}


def reducer_term(reducer: Callable, init: Callable = no_state, meta: Callable = no_meta) -> Term:
    """The term of a reducer ``(losses, ctx, state, spec) -> (loss, state)``: its gradient is the
    reduced per-example loss's."""

    def value_and_grad(spec, loss_fn, forward_fn, params, x, y, ctx, state):
        return jax.value_and_grad(lambda p: reducer(loss_fn(p, x, y), ctx, state, spec), has_aux=True)(params)

    return Term(init, no_params, value_and_grad, meta)


def adversarial_value_and_grad(spec: Spec, loss_fn, forward_fn, params: dict, x, y, ctx: Context, state):
    return adversarial_grads(params, loss_fn, forward_fn, x, y, ctx, state, spec)


# Plain training. ``erase`` trains it too, on features with the attribute erased (``leace_fit``,
# ``leace_apply``); a sweep trains any mitigation whose term is PLAIN with erm's Spec (erm's program).
PLAIN = reducer_term(erm)
TERMS: dict[str, Term] = {
    "erm": PLAIN,
    "reweight": reducer_term(reweight),
    "groupdro": reducer_term(groupdro, init=groupdro_init),
    "adversarial": Term(no_state, adversary_params, adversarial_value_and_grad, adversarial_meta),
    "fairot": reducer_term(fairot, meta=fairot_meta),
    "erase": PLAIN,
}


def init_state(spec: Spec):
    """The mitigation's carried training state (GroupDRO's q; () for most)."""
    return TERMS[spec.name].init(spec)


def init_extra_params(key: jax.Array, spec: Spec, n_features: int, n_classes: int) -> dict:
    """Parameters the mitigation trains beside the probe (``{"adv": ...}`` for adversarial, else {})."""
    return TERMS[spec.name].init_params(key, spec, n_features, n_classes)


def value_and_grad(spec: Spec, loss_fn, forward_fn, params: dict, x, y, ctx: Context, state):
    """((loss, new state), gradients) of one step of mitigation ``spec.name``.

    loss_fn(params, x, y) -> (B,) per-example losses; forward_fn(params, x) -> (logits (C, B),
    features (F, B)). Both are the loop's own, so a new task (multi-label) plugs in unchanged.
    """
    return TERMS[spec.name].value_and_grad(spec, loss_fn, forward_fn, params, x, y, ctx, state)


def run_meta(spec: Spec) -> dict:
    """The run.json keys mitigation ``spec.name`` adds (the adversary's kind, fairot's Sinkhorn settings)."""
    return TERMS[spec.name].meta(spec)


# ---------------------------------------------------------------- erase: LEACE (NumPy, closed form)


def leace_fit(x: np.ndarray, groups: np.ndarray, n_groups: int, tol: float = 1e-8) -> dict:
    """LEACE (Belrose et al. 2023): the least-squares eraser of the group from x, fitted on these rows.

    x (N, D), groups (N,) int in [0, n_groups). With whitening W = Σ_xx^{-1/2} (pseudo-inverse on
    the numerical null space) and P the orthogonal projection onto the column space of W Σ_xz
    (z the one-hot group), r(x) = x − W⁺ P W (x − μ): after it no linear function of x is
    correlated with the group, so a linear classifier does no better than a constant one.

    Returns ``{"mean": (D,), "proj": (D, D) W⁺PW, "rank": rank of P}`` (float64).
    """
    x = np.asarray(x, np.float64)
    z = np.eye(n_groups)[np.asarray(groups)]
    mean = x.mean(0)
    xc, zc = x - mean, z - z.mean(0)
    vals, vecs = np.linalg.eigh(xc.T @ xc / len(x))
    keep = vals > tol * max(vals.max(), 1e-300)
    root = np.where(keep, np.sqrt(np.where(keep, vals, 1.0)), 0.0)
    whiten = (vecs * np.where(keep, 1.0 / np.where(keep, root, 1.0), 0.0)) @ vecs.T
    unwhiten = (vecs * root) @ vecs.T
    u, s, _ = np.linalg.svd(whiten @ (xc.T @ zc / len(x)), full_matrices=False)
    basis = u[:, s > tol * max(s.max(initial=0.0), 1e-300)]
    return {"mean": mean, "proj": unwhiten @ basis @ basis.T @ whiten, "rank": int(basis.shape[1])}


def leace_apply(eraser: dict, x: np.ndarray) -> np.ndarray:
    """x (N, D) with the fitted group erased (float32)."""
    x64 = np.asarray(x, np.float64)
    return (x64 - (x64 - eraser["mean"]) @ eraser["proj"].T).astype(np.float32)
