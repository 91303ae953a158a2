"""A lean full-batch L-BFGS step for the probe lanes: two-loop recursion and a backtracking line search.

Why not ``optax.lbfgs`` with its zoom line search: the probes' lanes accept the unit step in
92–99% of iterations (benchmarks/RESULTS.md, issue 27), yet the zoom search compiles into a large
program (``lax.cond`` branches, nested while loops, the objective traced several times), and the
compilation dominated the linear sweep below ~200k rows and the MLP's per-width programs. Here the
objective and its gradient appear once, inside one small ``while_loop``, and every choice is a
``jnp.where``: no per-lane ``lax.cond``, so a vmapped lane runs no second branch.

The algorithm (Nocedal & Wright, Numerical Optimization, algorithms 7.4 / 7.5 and 3.1):

- direction d = -H g by the two-loop recursion over the last ``MEMORY`` curvature pairs
  (s, y) = (step, change of gradient), H0 = gamma I with gamma = s.y / y.y of the newest pair;
  with an empty memory gamma = min(1, 1 / ||g||) (optax's choice: a first step of length <= 1);
- a pair is stored only if s.y > eps * y.y (positive curvature, well above float32 rounding),
  otherwise skipped (the memory keeps the older pairs);
- if d is not a descent direction (g.d >= 0 or non-finite), the memory is cleared and d is the
  scaled gradient step;
- line search: the unit step first; while the Armijo condition f(x + t d) <= f(x) + C1 t g.d
  fails, t becomes the minimiser of the cubic through (0, f, g.d) and (t, f_t, g_t.d) (the
  gradient at t comes with f_t), or of the quadratic through f, g.d and f_t where the cubic has
  none, safeguarded to [0.1 t, 0.5 t]. Where float32 no longer resolves the decrease, a step is
  also accepted by Hager & Zhang's approximate Wolfe conditions on the slope (``accept``). At most
  ``MAX_LINESEARCH`` evaluations; a search that finds no step reports failure, and the caller
  stops the lane at its current point.

The plain reference the tests compare lanes with is ``tests/probe/lbfgs_reference.py`` (the same
algorithm as an unbatched NumPy loop).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

MEMORY = 10  # curvature pairs kept (optax's and scipy's default)
C1 = 1e-4  # Armijo's sufficient-decrease constant (Nocedal & Wright's, scipy's)
MAX_LINESEARCH = 20  # evaluations per line search at most (t then <= 0.5^19 ~ 2e-6)
SIGMA, DELTA, EPS_F = 0.9, 0.1, 1e-6  # Hager & Zhang's approximate Wolfe conditions (their defaults)
# run.json's description of the line search (``train.LBFGS_RECORD``).
LINESEARCH = ("backtracking from the unit step, cubic interpolation (Armijo, strict decrease; "
              "approximate Wolfe where float32 cannot resolve it)")
SHRINK = (0.1, 0.5)  # a rejected step t is replaced by one in [0.1 t, 0.5 t]
CURVATURE_EPS = float(jnp.finfo(jnp.float32).eps)  # a pair is kept if s.y > this * y.y


class Memory(NamedTuple):
    """The curvature pairs of one lane; each leaf of ``s`` and ``y`` is the parameter's shape with a
    leading axis (MEMORY,), a ring buffer whose newest pair sits at slot (count - 1) % MEMORY."""

    s: dict  # (MEMORY, ...) parameter steps
    y: dict  # (MEMORY, ...) gradient changes
    rho: jax.Array  # (MEMORY,) 1 / s.y; 0 for an empty slot (which then changes nothing)
    gamma: jax.Array  # () the initial inverse Hessian's scale, s.y / y.y of the newest pair
    count: jax.Array  # () int: pairs stored since the last reset (0: the scaled gradient step)


def vdot(a, b) -> jax.Array:
    """Inner product of two pytrees of the same structure."""
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def init(params) -> Memory:
    """An empty memory for parameters shaped like ``params``."""
    zeros = jax.tree.map(lambda a: jnp.zeros((MEMORY,) + a.shape, a.dtype), params)
    return Memory(zeros, zeros, jnp.zeros((MEMORY,), jnp.float32), jnp.float32(1.0), jnp.int32(0))


def direction(grad, memory: Memory) -> tuple[dict, Memory]:
    """-H g by the two-loop recursion; a non-descent result is replaced by the scaled gradient step
    and the memory cleared. Returns (d, the memory, cleared where that happened)."""
    # Newest to oldest: slots (count - 1 - i) % MEMORY; empty slots have rho = 0 and change nothing.
    order = (memory.count - 1 - jnp.arange(MEMORY)) % MEMORY
    take = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731

    def newest_first(q, i):
        alpha = memory.rho[i] * vdot(take(memory.s, i), q)
        return jax.tree.map(lambda a, b: a - alpha * b, q, take(memory.y, i)), alpha

    q, alphas = jax.lax.scan(newest_first, grad, order)
    scale = jnp.where(memory.count > 0, memory.gamma, first_scale(grad))
    r = jax.tree.map(lambda a: scale * a, q)

    def oldest_first(r, i_alpha):
        i, alpha = i_alpha
        beta = memory.rho[i] * vdot(take(memory.y, i), r)
        return jax.tree.map(lambda a, b: a + (alpha - beta) * b, r, take(memory.s, i)), None

    r, _ = jax.lax.scan(oldest_first, r, (order[::-1], alphas[::-1]))
    descent = vdot(grad, r) > 0  # d = -r; False for NaN too
    fallback = first_scale(grad)
    d = jax.tree.map(lambda a, g: -jnp.where(descent, a, fallback * g), r, grad)
    return d, memory._replace(rho=jnp.where(descent, memory.rho, 0.0), count=jnp.where(descent, memory.count, 0))


def first_scale(grad) -> jax.Array:
    """min(1, 1 / ||g||): a scaled gradient step no longer than 1 (optax's first step)."""
    return jnp.minimum(1.0, 1.0 / jnp.sqrt(vdot(grad, grad)))


def remember(memory: Memory, s, y) -> Memory:
    """The memory with the pair (s, y) as its newest, if s.y > CURVATURE_EPS * y.y (else unchanged)."""
    sy, yy = vdot(s, y), vdot(y, y)
    keep = (sy > CURVATURE_EPS * yy) & jnp.isfinite(sy) & jnp.isfinite(yy)
    slot = memory.count % MEMORY
    put = lambda buf, new: jax.tree.map(lambda b, n: b.at[slot].set(jnp.where(keep, n, b[slot])), buf, new)  # noqa: E731
    return Memory(put(memory.s, s), put(memory.y, y), memory.rho.at[slot].set(jnp.where(keep, 1.0 / sy, memory.rho[slot])),
                  jnp.where(keep, sy / yy, memory.gamma), memory.count + keep.astype(jnp.int32))


def next_trial(t, f0, g0, ft, gt) -> jax.Array:
    """The step to try after t was rejected: the minimiser of the cubic through phi(0) = f0,
    phi'(0) = g0, phi(t) = ft, phi'(t) = gt (else of the quadratic through f0, g0, ft), kept in
    [0.1 t, 0.5 t]; 0.5 t where neither is finite (e.g. f_t overflowed)."""
    d1 = g0 + gt - 3.0 * (f0 - ft) / (0.0 - t)
    disc = d1 * d1 - g0 * gt
    d2 = jnp.sqrt(jnp.maximum(disc, 0.0))
    cubic = t - t * (gt + d2 - d1) / (gt - g0 + 2.0 * d2)
    quadratic = -g0 * t * t / (2.0 * (ft - f0 - g0 * t))
    trial = jnp.where((disc >= 0) & jnp.isfinite(cubic), cubic, quadratic)
    trial = jnp.where(jnp.isfinite(trial), trial, SHRINK[1] * t)
    return jnp.clip(trial, SHRINK[0] * t, SHRINK[1] * t)


def accept(f0, g0, t, ft, gt) -> jax.Array:
    """Whether the step t is accepted: phi(0) = f0, phi'(0) = g0 < 0, phi(t) = ft, phi'(t) = gt.

    Armijo's sufficient decrease, ft <= f0 + C1 t g0, with a strict decrease (ft < f0: where C1 t g0
    is below float32's resolution of f, Armijo alone accepts a null step, and the lane would repeat
    it to max_iter); or Hager & Zhang's approximate Wolfe conditions, SIGMA g0 <= gt <= (2 DELTA - 1) g0
    with ft <= f0 + EPS_F |f0|, which judge the step by the slope where f no longer resolves the
    decrease (near the optimum of an ill-conditioned lane, its gradient still above gtol). A NaN
    anywhere rejects the step.
    """
    armijo = (ft <= f0 + C1 * t * g0) & (ft < f0)
    wolfe = (gt >= SIGMA * g0) & (gt <= (2.0 * DELTA - 1.0) * g0) & (ft <= f0 + EPS_F * jnp.abs(f0))
    return armijo | wolfe


class Step(NamedTuple):
    """One iteration's outcome."""

    params: dict  # the accepted point (the last one tried if the search failed)
    value: jax.Array  # () the objective there
    grad: dict  # its gradient
    memory: Memory  # with the new pair (if its curvature was positive)
    accepted: jax.Array  # () bool: the line search found a sufficient decrease
    evaluations: jax.Array  # () int: objective-and-gradient evaluations it made


def step(value_and_grad: Callable, params, value, grad, memory: Memory) -> Step:
    """One L-BFGS iteration from ``params`` (objective ``value``, gradient ``grad``).

    ``value_and_grad(params) -> (value, grad)`` is called in one ``while_loop`` (traced once)."""
    d, memory = direction(grad, memory)
    slope = vdot(grad, d)  # < 0

    def searching(c):
        return ~c[4] & (c[5] < MAX_LINESEARCH)

    def trial(c):
        t, _, _, _, _, n = c
        p = jax.tree.map(lambda a, b: a + t * b, params, d)
        f, g = value_and_grad(p)
        ft = vdot(g, d)
        ok = accept(value, slope, t, f, ft)
        return jnp.where(ok, t, next_trial(t, value, slope, f, ft)), p, f, g, ok, n + 1

    start = (jnp.float32(1.0), params, value, grad, jnp.array(False), jnp.int32(0))
    t, p, f, g, ok, n = jax.lax.while_loop(searching, trial, start)
    s = jax.tree.map(lambda a, b: a - b, p, params)
    y = jax.tree.map(lambda a, b: a - b, g, grad)
    return Step(p, f, g, remember(memory, s, y), ok, n)
