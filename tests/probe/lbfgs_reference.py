"""The plain L-BFGS loop the probe lanes are checked against: the algorithm of
``cxrfair.probe.lbfgs`` written out as an unbatched Python/NumPy loop (Nocedal & Wright's two-loop
recursion over a list of pairs, a backtracking search (Armijo with a strict decrease, or approximate Wolfe) with cubic/quadratic
interpolation;
no vmap, no scan, no while_loop, no ring buffer) with the library's stopping rules, shared by the
multi-class and multi-label lane tests. Only the objective and its gradient come from JAX (the
tests' own textbook objectives); the constants are the library's."""

from __future__ import annotations

import jax
import jax.flatten_util
import numpy as np

from cxrfair.probe.lbfgs import C1, CURVATURE_EPS, DELTA, EPS_F, MAX_LINESEARCH, MEMORY, SHRINK, SIGMA


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float32).ravel() for a in jax.tree.leaves(tree)])


def _trial(t: float, f0: float, g0: float, ft: float, gt: float) -> float:
    """The next step after t was rejected: the cubic's minimiser, else the quadratic's, in [0.1 t, 0.5 t]."""
    with np.errstate(all="ignore"):
        d1 = g0 + gt - 3.0 * (f0 - ft) / (0.0 - t)
        disc = d1 * d1 - g0 * gt
        trial = np.nan
        if disc >= 0:
            d2 = np.sqrt(disc)
            trial = t - t * (gt + d2 - d1) / (gt - g0 + 2.0 * d2)
        if not np.isfinite(trial):
            trial = -g0 * t * t / (2.0 * (ft - f0 - g0 * t))
    if not np.isfinite(trial):
        trial = SHRINK[1] * t
    return float(np.clip(trial, SHRINK[0] * t, SHRINK[1] * t))


def plain_lbfgs(objective, init: dict, data: tuple, recipe) -> tuple[dict, int]:
    """Minimise ``objective(params, *data)`` from ``init``. Stops when the largest gradient entry is
    <= ``recipe.gtol``, before a step whose line search finds no sufficient decrease or whose point
    is not finite, or (``recipe.ftol`` > 0) after a kept step, not the first, that lowered the
    objective by at most ftol * max(|f_old|, |f_new|, 1); at most ``recipe.max_iter``.

    Returns:
        (the parameters, iterations that moved them).
    """
    _, unravel = jax.flatten_util.ravel_pytree(init)
    vg = jax.jit(jax.value_and_grad(lambda v, *d: objective(unravel(v), *d)))

    def fg(v):
        f, g = vg(v, *data)
        return float(f), np.asarray(g, np.float64)

    x = _flat(init).astype(np.float64)
    f, g = fg(x.astype(np.float32))
    pairs: list[tuple[np.ndarray, np.ndarray]] = []  # oldest first, at most MEMORY
    iterations = 0
    for _ in range(recipe.max_iter):
        if np.max(np.abs(g)) <= recipe.gtol:
            break
        # Two-loop recursion (Nocedal & Wright, algorithm 7.4).
        q, alphas = g.copy(), []
        for s, y in reversed(pairs):
            alpha = (s @ q) / (s @ y)
            q -= alpha * y
            alphas.append(alpha)
        first = min(1.0, 1.0 / np.sqrt(g @ g))
        r = q * ((pairs[-1][0] @ pairs[-1][1]) / (pairs[-1][1] @ pairs[-1][1]) if pairs else first)
        for (s, y), alpha in zip(pairs, reversed(alphas)):
            r += (alpha - (y @ r) / (s @ y)) * s
        d = -r
        if not g @ d < 0:  # not a descent direction: clear the memory, scaled gradient step
            pairs, d = [], -first * g
        slope = g @ d
        # Backtracking from the unit step (Armijo), at most MAX_LINESEARCH evaluations.
        t, accepted = 1.0, False
        for _ in range(MAX_LINESEARCH):
            x_new = (x + t * d).astype(np.float32).astype(np.float64)
            f_new, g_new = fg(x_new.astype(np.float32))
            g_t = g_new @ d
            armijo = f_new <= f + C1 * t * slope and f_new < f
            wolfe = SIGMA * slope <= g_t <= (2 * DELTA - 1) * slope and f_new <= f + EPS_F * abs(f)
            if armijo or wolfe:
                accepted = True
                break
            t = _trial(t, f, slope, f_new, g_t)
        if not (accepted and np.isfinite(f_new) and np.isfinite(x_new).all() and np.isfinite(g_new).all()):
            break
        s, y = x_new - x, g_new - g
        if s @ y > CURVATURE_EPS * (y @ y):
            pairs = (pairs + [(s, y)])[-MEMORY:]
        stalled = f - f_new <= recipe.ftol * max(abs(f), abs(f_new), 1.0)
        x, f, g = x_new, f_new, g_new
        iterations += 1
        if recipe.ftol > 0 and stalled and iterations > 1:  # not on the first step
            break
    return unravel(x.astype(np.float32)), iterations
