"""The plain L-BFGS loop the probe lanes are checked against: an unbatched Python loop over
``optax.lbfgs`` steps (no vmap, no scan, no while_loop) with the library's stopping rules written
out here, shared by the multi-class and multi-label lane tests."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

SOLVER = optax.lbfgs(memory_size=10, linesearch=optax.scale_by_zoom_linesearch(
    max_linesearch_steps=30, initial_guess_strategy="one"))


@partial(jax.jit, static_argnums=0)
def _step(objective, p, state, value, grad, *data):
    # Data and penalties are arguments, not closure constants: lanes of one shape share one executable.
    updates, state = SOLVER.update(grad, state, p, value=value, grad=grad, value_fn=lambda q: objective(q, *data))
    return optax.apply_updates(p, updates), state


def _finite(value, params) -> bool:
    return bool(np.isfinite(float(value)) and all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(params)))


def plain_lbfgs(objective, init: dict, data: tuple, recipe) -> tuple[dict, int]:
    """Minimise ``objective(params, *data)`` from ``init``. Stops when the largest gradient entry is
    <= ``recipe.gtol``, before a non-finite step, or (``recipe.ftol`` > 0) after a kept step, not
    the first, that lowered the objective by at most ftol * max(|f_old|, |f_new|, 1); at most
    ``recipe.max_iter``.

    Returns:
        (the parameters, iterations that moved them).
    """
    params, state = init, SOLVER.init(init)
    value, grad = jax.value_and_grad(objective)(params, *data)
    iterations = 0
    for _ in range(recipe.max_iter):
        if max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad)) <= recipe.gtol:
            break
        new, new_state = _step(objective, params, state, value, grad, *data)
        new_value, new_grad = optax.tree.get(new_state, "value"), optax.tree.get(new_state, "grad")
        if not _finite(new_value, new):
            break
        stalled = float(value) - float(new_value) <= recipe.ftol * max(abs(float(value)), abs(float(new_value)), 1.0)
        params, state, value, grad = new, new_state, new_value, new_grad
        iterations += 1
        if recipe.ftol > 0 and stalled and iterations > 1:  # not on the first step
            break
    return params, iterations
