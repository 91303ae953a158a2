"""Linear and MLP probes as small pure functions, and the compiled program that trains a sweep.

One probe (one hyperparameter configuration, one seed) is ``fit_lane``, with one of two solvers.

L-BFGS (``fit_lane_lbfgs``, the default): full-batch L-BFGS (``cxrfair.probe.lbfgs``: two-loop
recursion on one flat parameter vector, a backtracking line search from the unit step) on
mean cross-entropy + l2/2 * ||W||^2, a ``lax.while_loop`` of at most ``max_iter`` iterations; a
lane whose largest gradient entry falls to ``gtol`` stops moving (its state is frozen with
``jnp.where`` while other vmapped lanes still run; the loop ends when every lane is done), and
its final iterate is evaluated. With ``Recipe.ftol`` > 0 a lane also stops after an iteration that
lowers the objective by at most ftol * max(|f|, 1) (the MLP's default: its lanes rarely reach
``gtol``). For the linear probe this is scikit-learn's ``LogisticRegression`` at C = 1/(l2 N). With
``Recipe.tile`` the full-batch loss of a split larger than a tile is streamed (``streamed_loss``):
one pass over the features per objective and gradient (the sweep sets it for the linear probe).

The MLP is the paper's one hidden ReLU layer, or with ``Recipe.skip`` that layer plus a linear
skip connection, logits = W0 x + W2 relu(W1 x + b1) + b2, whose W0 L-BFGS penalises by its own
``Hyper.l2_skip`` (the skip MLP contains the linear probe).

AdamW (``fit_lane_adamw``, the paper's recipe): ``lax.scan`` over epochs, an inner ``lax.scan`` over minibatch steps, AdamW (``optax.inject_hyperparams`` so the
learning rate and weight decay are values in the optimizer state, not Python constants) with
cosine annealing over all steps, and the validation loss evaluated after every epoch; the
parameters of the epoch with the lowest validation loss are kept with ``jnp.where``.

A sweep is ``vmap(vmap(fit_lane))``: the inner ``vmap`` runs over configurations that share a
seed, hence one data order and one initialisation, so the minibatch ``x`` is *not* batched and
JAX's batching rule turns each lane's ``x @ W`` into one matrix multiply ``[B, D] x [D, K*C]``
(for the MLP, ``[B, D] x [D, K*H]`` then a batched second layer); the outer ``vmap`` runs over
seeds. ``train_sweep`` is that program; ``cxrfair.probe.sweep`` compiles it once per chunk shape,
splits an AdamW grid into equal (padded) chunks that fit a memory budget and runs each through it
(``train_sweep_sharded``: the configurations split over several devices). L-BFGS lanes do not
vmap well (see ``train_lanes``): the sweep runs them one per device at a time with ``train_lanes``,
each lane warm-started from a neighbour's solution (``lbfgs_lane``'s ``start``).

Weights are stored (out, in), as in PyTorch, so K stacked lanes form one contiguous (K*C, D)
matrix and neither the forward nor the backward matmul needs a transpose of the weights.

Minibatches: every epoch is ``ceil(N / B)`` steps over a fresh permutation; the last batch is
padded with weight-0 rows (drop_last=False, as PyTorch's DataLoader), and each step's loss is
the mean over its real rows only.

Tasks: the labels' shape says which loss applies (a static fact, so one traced program per task).
Multi-class labels are (N,) int32 and the per-example loss is softmax cross-entropy. Multi-label
targets are (N, C) float32 in {1, 0, NaN} (NaN = masked, e.g. an uncertain label under
``--uncertain ignore``) and the per-example loss is the sigmoid cross-entropy averaged over that
example's observed conditions (an example with none contributes 0); probabilities are then the
per-condition sigmoids. Both are functions of (logits, targets, mask) returning one loss per
example, so per-example weights (mitigations) wrap them unchanged.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

import cxrfair.probe.lbfgs as lbfgs
import cxrfair.probe.objectives as objectives
from cxrfair.errors import CxrfairError

# AdamW moments as in PyTorch's defaults, so the paper's recipe means the same thing here.
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8


# L-BFGS convergence: the largest gradient entry at most this (scikit-learn's default tol).
GTOL = 1e-4


@dataclass(frozen=True)
class Recipe:
    """The static part of training: shapes and schedule, shared by every lane of a sweep."""

    n_classes: int  # C, the width of the output layer
    epochs: int = 150  # AdamW: passes over the training split
    batch_size: int = 64  # AdamW: minibatch size; the last batch of an epoch is padded and masked
    max_hidden: int = 0  # 0: linear probe; >0: MLP whose hidden layer is padded to this width
    draw_hidden: int = 0  # MLP: the width initial weights are drawn at, >= max_hidden (0: max_hidden); see init_params
    solver: str = "adamw"  # "adamw" (the paper's minibatch recipe) or "lbfgs" (full batch)
    max_iter: int = 500  # L-BFGS: iterations at most (a converged lane stops moving)
    gtol: float = GTOL  # L-BFGS: converged when every gradient entry is at most this in magnitude
    ftol: float = 0.0  # L-BFGS: also done once an iteration lowers the objective by at most ftol * max(|f|, 1)
    tile: int = 0  # L-BFGS: stream the splits through the loss this many rows at a time (``streamed_loss``); 0: whole
    val_every: int = 1  # L-BFGS: validation loss at every this many iterations and the lane's last (NaN between)
    sequential: bool = False  # train_sweep: lanes one after another (lax.map), not vmapped (run_sweep uses train_lanes for L-BFGS)
    skip: bool = False  # MLP: add a linear skip connection, logits = W0 x + W2 relu(W1 x + b1) + b2
    mitigation: objectives.Spec = objectives.Spec()  # the loss's fairness mitigation (default: erm)

    def steps_per_epoch(self, n_train: int) -> int:
        return math.ceil(n_train / self.batch_size)


class Data(NamedTuple):
    """Features and labels of the three splits: float32 features; int32 labels (N,) (multi-class)
    or float32 targets (N, C) in {1, 0, NaN} (multi-label, NaN = masked)."""

    x_train: jax.Array  # (N, D)
    y_train: jax.Array  # (N,) or (N, C)
    x_val: jax.Array  # (Nv, D)
    y_val: jax.Array  # (Nv,) or (Nv, C)
    x_test: jax.Array  # (Nt, D)
    cell_train: jax.Array | None = None  # (N,) int cell of each training row (mitigations only)
    group_train: jax.Array | None = None  # (N,) int group of each training row (mitigations only)


class Hyper(NamedTuple):
    """Per-lane hyperparameters (scalars for one lane; arrays of shape (K,) for a sweep)."""

    lr: jax.Array  # AdamW: peak learning rate
    wd: jax.Array  # AdamW: decoupled weight decay (PyTorch AdamW convention: multiplied by lr)
    hidden: jax.Array  # hidden width, <= Recipe.max_hidden (ignored by the linear probe)
    l2: jax.Array  # L-BFGS: penalty l2/2 * ||weights||^2 added to the mean loss (biases free)
    strength: jax.Array | None = None  # the mitigation's strength (None for erm)
    l2_skip: jax.Array | None = None  # L-BFGS, skip MLP: penalty on the skip weight W0 (None: l2)


class LaneResult(NamedTuple):
    """What one lane returns (leading axes (S, K) in a sweep)."""

    best_val_loss: jax.Array  # ()
    best_epoch: jax.Array  # () int, 0-based; L-BFGS: iterations run (the final iterate is kept)
    train_loss: jax.Array  # (E,) mean minibatch loss of each epoch; L-BFGS: objective per iteration
    val_loss: jax.Array  # (E,) validation loss after each epoch (L-BFGS: iteration; NaN where Recipe.val_every skips it)
    val_probs: jax.Array  # (Nv, C) from the kept parameters (multi-label: per-condition sigmoids)
    test_probs: jax.Array  # (Nt, C) from the kept parameters


# ---------------------------------------------------------------- model


def init_params(key: jax.Array, dim: int, recipe: Recipe, hidden: jax.Array) -> dict:
    """PyTorch ``nn.Linear`` initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    For the MLP the hidden layer is allocated ``recipe.max_hidden`` wide and the units beyond
    ``hidden`` are zero: their gradients are then exactly zero, so they stay zero and the lane
    trains exactly like an MLP of width ``hidden`` (this lets different widths share a program).
    The weights are drawn ``recipe.draw_hidden`` wide (when set) and cut to ``max_hidden``: a
    program of one width (``max_hidden`` = ``hidden``) then starts a lane from exactly the weights
    of the program padded to the grid's widest (``draw_hidden``), since a draw depends on its shape.

    Weights are stored (out, in) like PyTorch's: stacked over K lanes, a weight (K, C, D) is
    one contiguous (K*C, D) matrix, so the fused forward and backward matmuls need no transpose.

    The skip MLP (``recipe.skip``) adds ``"w0": (C, D)``, the linear skip weight, initialised like
    the linear probe's weight from a key folded from ``key`` (so its other weights equal the plain
    MLP's at the same seed).

    Returns:
        linear: ``{"w": (C, D), "b": (C,)}``; MLP: ``{"w1": (H, D), "b1": (H,), "w2": (C, H),
        "b2": (C,)}`` with H = ``recipe.max_hidden`` (skip MLP: and ``"w0"``).
    """
    n_classes = recipe.n_classes
    if recipe.max_hidden == 0:
        kw, kb = jax.random.split(key)
        bound = 1.0 / math.sqrt(dim)
        return {"w": _uniform(kw, (n_classes, dim), bound), "b": _uniform(kb, (n_classes,), bound)}
    k1, k2, k3, k4 = jax.random.split(key, 4)
    h, drawn = recipe.max_hidden, max(recipe.draw_hidden, recipe.max_hidden)
    live = (jnp.arange(h) < hidden).astype(jnp.float32)  # (H,)
    b1, b2 = 1.0 / math.sqrt(dim), 1.0 / jnp.sqrt(hidden.astype(jnp.float32))
    params = {
        "w1": _uniform(k1, (drawn, dim), b1)[:h] * live[:, None],
        "b1": _uniform(k2, (drawn,), b1)[:h] * live,
        "w2": _uniform(k3, (n_classes, drawn), 1.0)[:, :h] * b2 * live,
        "b2": _uniform(k4, (n_classes,), 1.0) * b2,
    }
    if recipe.skip:
        params["w0"] = _uniform(jax.random.fold_in(key, 2), (n_classes, dim), b1)
    return params


def _uniform(key: jax.Array, shape: tuple, bound) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0) * bound


def count_params(dim: int, n_classes: int, hidden: int, skip: bool = False) -> int:
    """Trainable parameters of one probe (hidden 0: linear; skip: the MLP's skip weight W0 too)."""
    if hidden == 0:
        return dim * n_classes + n_classes
    return dim * hidden + hidden + hidden * n_classes + n_classes + (dim * n_classes if skip else 0)


def logits_t(params: dict, x: jax.Array) -> jax.Array:
    """Logits, transposed: (C, B) for features x (B, D).

    Classes-first is the layout the fused matmul produces (stacked lanes give (K*C, B)), so the
    loss is taken along axis 0 with no transpose inside the step (~9% faster on CPU).
    """
    return forward_t(params, x)[0]


def forward_t(params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logits (C, B), the features the head reads: the MLP's hidden layer (H, B), else the logits)."""
    xt = x.T
    if "w" in params:
        z = params["w"] @ xt + params["b"][:, None]
        return z, z
    h = jax.nn.relu(params["w1"] @ xt + params["b1"][:, None])  # (H, B)
    z = params["w2"] @ h + params["b2"][:, None]
    return (z + params["w0"] @ xt if "w0" in params else z), h


def apply(params: dict, x: jax.Array) -> jax.Array:
    """Logits (B, C) of features x (B, D)."""
    return logits_t(params, x).T


def is_multilabel(y: jax.Array) -> bool:
    """Multi-label targets are (N, C); multi-class labels (N,). Static under tracing."""
    return y.ndim == 2


def softmax_ce(z: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy (B,) of logits z (C, B) (classes first) and int labels y (B,)."""
    # The label mask depends only on y, which lanes sharing a seed share: computed once per step.
    is_label = jnp.arange(z.shape[0])[:, None] == y[None, :]
    return jax.nn.logsumexp(z, axis=0) - jnp.sum(jnp.where(is_label, z, 0.0), axis=0)


def masked_sigmoid_ce(z: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-example sigmoid cross-entropy (B,), the mean over each example's observed conditions.

    Args:
        z: (C, B) logits, conditions first (the fused matmul's layout).
        targets: (C, B) in {0, 1} (any value where masked).
        mask: (C, B) float, 1 where the label is observed, 0 where masked.

    Returns:
        (B,); an example with no observed condition gets 0.
    """
    entry = jnp.logaddexp(0.0, z) - jnp.where(mask > 0, targets, 0.0) * z  # -log σ(±z), stable
    return jnp.sum(entry * mask, axis=0) / jnp.maximum(jnp.sum(mask, axis=0), 1.0)


def task_losses(z: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example loss (B,) of logits z (C, B) for labels y: (B,) int or (B, C) float with NaN masked."""
    if is_multilabel(y):
        yt = y.T
        mask = jnp.isfinite(yt).astype(z.dtype)
        return masked_sigmoid_ce(z, jnp.where(mask > 0, yt, 0.0), mask)
    return softmax_ce(z, y)


def example_losses(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example loss (B,) of features x (B, D) and labels y (``task_losses``); callers weight and reduce."""
    return task_losses(logits_t(params, x), y)


def probabilities(params: dict, x: jax.Array, multilabel: bool) -> jax.Array:
    """(B, C): softmax over classes, or (multi-label) each condition's sigmoid."""
    z = apply(params, x)
    return jax.nn.sigmoid(z) if multilabel else jax.nn.softmax(z)


def batch_loss(params: dict, x: jax.Array, y: jax.Array, w: jax.Array) -> jax.Array:
    """Mean loss over the real rows of a padded batch (w: (B,) 1 for real rows, 0 for padding)."""
    return jnp.sum(example_losses(params, x, y) * w) / jnp.maximum(jnp.sum(w), 1.0)


# ---------------------------------------------------------------- optimizer


def _adamw_cosine(learning_rate, weight_decay, total_steps: int) -> optax.GradientTransformation:
    # optax.adamw is chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate); the
    # cosine factor sits between so that decay, like PyTorch's AdamW + CosineAnnealingLR, is
    # scaled by the annealed learning rate.
    return optax.chain(
        optax.scale_by_adam(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_schedule(optax.cosine_decay_schedule(1.0, total_steps)),
        optax.scale_by_learning_rate(learning_rate),
    )


def optimizer(lr, wd, total_steps: int) -> optax.GradientTransformation:
    """AdamW with cosine annealing to 0 over ``total_steps``; lr / wd live in the state."""
    return optax.inject_hyperparams(_adamw_cosine, static_args=("total_steps",))(
        learning_rate=lr, weight_decay=wd, total_steps=total_steps)


# ---------------------------------------------------------------- one lane


def epoch_batches(key: jax.Array, epoch: jax.Array, n: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """The data order of one epoch.

    Returns:
        index: (steps, B) int rows of the training split (padding rows point at row 0).
        weight: (steps, B) float, 1 for real rows and 0 for padding.
    """
    steps = math.ceil(n / batch_size)
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    pad = steps * batch_size - n
    index = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)]).reshape(steps, batch_size)
    weight = (jnp.arange(steps * batch_size) < n).astype(jnp.float32).reshape(steps, batch_size)
    return index, weight


def train_step(carry: tuple, batch: tuple, total_steps: int, spec: objectives.Spec = objectives.Spec(),
               strength=None) -> tuple[tuple, jax.Array]:
    """One AdamW step on one padded minibatch; returns the new (params, opt_state, aux) and the loss.

    ``aux`` is () for erm; with a mitigation, (its carried state, the step count), and the
    gradients come from ``objectives.value_and_grad`` on the per-example losses.
    """
    params, opt_state, aux = carry
    x, y, w = batch[:3]
    if spec.name == "erm":
        loss, grads = jax.value_and_grad(batch_loss)(params, x, y, w)
    else:
        state, step = aux
        ctx = objectives.Context(w, batch[3], batch[4], strength, step)
        (loss, state), grads = objectives.value_and_grad(spec, example_losses, forward_t, params, x, y, ctx, state)
        aux = (state, step + 1)
    # The hyperparameters come from opt_state, so the transform built here needs no values.
    updates, opt_state = optimizer(0.0, 0.0, total_steps).update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, aux), loss


class EpochState(NamedTuple):
    """The carry of the epoch loop: current parameters, optimizer state and the best so far."""

    params: dict
    opt_state: optax.OptState
    best: dict  # parameters after the best epoch (the initial ones until an epoch improves)
    best_loss: jax.Array  # () its validation loss (inf at first)
    best_epoch: jax.Array  # () int, 0-based (-1 at first)
    aux: tuple = ()  # the mitigation's (carried state, step count); () for erm


def train_epoch(state: EpochState, epoch: jax.Array, order_key: jax.Array, data: Data,
                recipe: Recipe, strength=None) -> tuple[EpochState, tuple[jax.Array, jax.Array]]:
    """One pass over the training split, then the validation loss; returns (state, (train, val) loss)."""
    n = data.x_train.shape[0]
    index, weight = epoch_batches(order_key, epoch, n, recipe.batch_size)
    total_steps = recipe.epochs * recipe.steps_per_epoch(n)
    erm = recipe.mitigation.name == "erm"

    def step(carry, batch):
        # Rows are gathered per step: gathering the whole epoch up front would hold a permuted
        # copy of the training split per seed (S x N x D floats: 2.2 GB at 240k x 768 x 3 seeds).
        rows, w = batch
        rows_batch = (data.x_train[rows], data.y_train[rows], w)
        if not erm:
            rows_batch += (data.cell_train[rows], data.group_train[rows])
        return train_step(carry, rows_batch, total_steps, spec=recipe.mitigation, strength=strength)

    (params, opt_state, aux), losses = jax.lax.scan(step, (state.params, state.opt_state, state.aux), (index, weight))
    # The epoch's training loss weights each step by its real rows (the last may be short).
    train_loss = jnp.sum(losses * weight.sum(1)) / n
    val_loss = jnp.mean(example_losses(params, data.x_val, data.y_val))
    return keep_best(state, params, opt_state, val_loss, epoch)._replace(aux=aux), (train_loss, val_loss)


def keep_best(state: EpochState, params: dict, opt_state, val_loss: jax.Array, epoch: jax.Array) -> EpochState:
    """New state; ``best`` moves to ``params`` only if ``val_loss`` is strictly lower (first minimum wins)."""
    better = val_loss < state.best_loss
    best = jax.tree.map(lambda new, old: jnp.where(better, new, old), params, state.best)
    return EpochState(params, opt_state, best, jnp.where(better, val_loss, state.best_loss),
                      jnp.where(better, epoch, state.best_epoch), state.aux)


def fit_lane(key: jax.Array, hyper: Hyper, data: Data, recipe: Recipe) -> LaneResult:
    """Train one probe (one configuration, one seed) with ``recipe.solver`` and evaluate it."""
    if recipe.solver == "lbfgs":
        return fit_lane_lbfgs(key, hyper, data, recipe)
    return fit_lane_adamw(key, hyper, data, recipe)


def fit_lane_adamw(key: jax.Array, hyper: Hyper, data: Data, recipe: Recipe) -> LaneResult:
    """The paper's recipe for one probe: AdamW epochs; the best-validation epoch is evaluated.

    ``key`` fixes both the initialisation and the data order, so lanes that share it differ
    only in their hyperparameters.
    """
    n, dim = data.x_train.shape
    init_key, order_key = jax.random.split(key)
    params = init_params(init_key, dim, recipe, hyper.hidden)
    spec, aux = recipe.mitigation, ()
    if spec.name != "erm":
        # The adversary's key is folded from the seed's, so the probe's own init matches erm's.
        params |= objectives.init_extra_params(jax.random.fold_in(init_key, 1), spec,
                                               recipe.max_hidden or recipe.n_classes, recipe.n_classes)
        aux = (objectives.init_state(spec), jnp.array(0, jnp.int32))
    opt_state = optimizer(hyper.lr, hyper.wd, recipe.epochs * recipe.steps_per_epoch(n)).init(params)
    state = EpochState(params, opt_state, params, jnp.array(jnp.inf, jnp.float32), jnp.array(-1, jnp.int32), aux)
    epoch = partial(train_epoch, order_key=order_key, data=data, recipe=recipe, strength=hyper.strength)
    state, (train_curve, val_curve) = jax.lax.scan(epoch, state, jnp.arange(recipe.epochs, dtype=jnp.int32))
    ml = is_multilabel(data.y_val)
    return LaneResult(state.best_loss, state.best_epoch, train_curve, val_curve,
                      probabilities(state.best, data.x_val, ml), probabilities(state.best, data.x_test, ml))


# ---------------------------------------------------------------- L-BFGS (full batch)


def weight_norm_sq(params: dict) -> jax.Array:
    """Sum of squared weights (not biases, not the skip weight), the L2 penalty's ||W||^2 (padded MLP units are 0)."""
    return sum(jnp.sum(params[k] ** 2) for k in ("w", "w1", "w2") if k in params)


def penalty(params: dict, l2: jax.Array, l2_skip: jax.Array | None = None) -> jax.Array:
    """l2/2 * ||W||^2, plus l2_skip/2 * ||W0||^2 for the skip MLP's skip weight (l2_skip None: l2)."""
    skip = 0.0 if "w0" not in params else jnp.sum(params["w0"] ** 2) * (l2 if l2_skip is None else l2_skip)
    return 0.5 * (l2 * weight_norm_sq(params) + skip)


def objective(params: dict, x: jax.Array, y: jax.Array, l2: jax.Array, weights: jax.Array | None = None,
              l2_skip: jax.Array | None = None, tile: int = 0) -> jax.Array:
    """Mean per-example loss over the training split + l2/2 * ||W||^2 (+ l2_skip/2 * ||W0||^2).

    For the linear probe this is scikit-learn's multinomial ``LogisticRegression`` objective
    divided by C*N, i.e. the same minimiser at ``C = 1 / (l2 * N)``. Multi-label: the conditions'
    weights are separate, so it is one binary ``LogisticRegression`` per condition at that C, over
    the rows where the condition is observed, each with sample weight 1 / (the row's observed
    conditions). ``weights`` (N,) (the ``reweight`` mitigation; mean 1) weight each example's loss.
    ``tile`` > 0 streams the mean loss over N > ``tile`` rows (``mean_loss``): the same value, and its
    gradient from the same pass over x.
    """
    return mean_loss(params, x, y, weights, tile) + penalty(params, l2, l2_skip)


def mean_loss(params: dict, x: jax.Array, y: jax.Array, weights: jax.Array | None = None, tile: int = 0) -> jax.Array:
    """Mean per-example loss (times ``weights`` (N,) if given) of features x (N, D); streamed
    (``streamed_loss``) when ``tile`` > 0 and N > ``tile``, so a split of one tile keeps the plain
    formula's float path (the demo's and the paper's 840-row probes are unchanged bit for bit)."""
    if tile and x.shape[0] > tile:
        return streamed_loss(params, x, y, weights, tile)
    losses = example_losses(params, x, y)
    return jnp.mean(losses if weights is None else losses * weights)


# ---------------------------------------------------------------- full-batch loss, streamed in tiles


def _tile_loss_sum(params: dict, i: jax.Array, x: jax.Array, y: jax.Array, weights: jax.Array | None, rows: int) -> jax.Array:
    """Sum of the per-example losses (times ``weights``) of tile ``i``: rows [i*rows, (i+1)*rows) of x (N, D).

    The last tile is the split's last ``rows`` rows, so every tile has one shape; the rows it
    shares with the tile before get weight 0, so each row counts once.
    """
    n = x.shape[0]
    start = jnp.minimum(i * rows, n - rows)
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, rows)  # noqa: E731
    w = (start + jnp.arange(rows) >= i * rows).astype(jnp.float32)
    if weights is not None:
        w = w * take(weights)
    return jnp.sum(example_losses(params, take(x), take(y)) * w)


def streamed_loss_sum(params: dict, x: jax.Array, y: jax.Array, weights: jax.Array | None, tile: int,
                      with_grad: bool = False):
    """Sum over the rows of x (N, D) of the per-example loss (times ``weights`` (N,)), at most ``tile``
    rows at a time (equal tiles); with ``with_grad``, (that sum, its gradient with respect to
    ``params``) from the same pass.

    Why tiles: evaluated whole, the full-batch loss of a large split runs as several XLA passes
    over (C, N) arrays whose reductions over the short class axis are slow on CPU, and the
    backward matmul reads x from memory again. In tiles, each tile's forward and backward run
    while it is in cache (measured at N = 100k, D = 64: benchmarks/RESULTS.md, issue 27).
    """
    n = x.shape[0]
    n_tiles = -(-n // tile)
    rows = -(-n // n_tiles)  # at most ``tile``, and the last tile overlaps the one before by fewer than n_tiles rows
    tile_sum = partial(_tile_loss_sum, x=x, y=y, weights=weights, rows=rows)
    if not with_grad:
        return jax.lax.fori_loop(0, n_tiles, lambda i, acc: acc + tile_sum(params, i), jnp.float32(0.0))

    def body(i, acc):
        value, grad = jax.value_and_grad(tile_sum)(params, i)
        return acc[0] + value, jax.tree.map(jnp.add, acc[1], grad)

    return jax.lax.fori_loop(0, n_tiles, body, (jnp.float32(0.0), jax.tree.map(jnp.zeros_like, params)))


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def streamed_loss(params: dict, x: jax.Array, y: jax.Array, weights: jax.Array | None, tile: int) -> jax.Array:
    """``mean_loss`` of x (N, D) streamed ``tile`` rows at a time (``streamed_loss_sum``).

    Its custom VJP computes the gradient in the forward pass, so ``jax.value_and_grad`` (as the L-BFGS
    line search calls it) costs one pass over x, not a forward pass and then a backward one.
    Only ``params`` is differentiated: x, y and weights are data (zero cotangents).
    """
    return streamed_loss_sum(params, x, y, weights, tile) / x.shape[0]


def _streamed_loss_fwd(params, x, y, weights, tile):
    value, grad = streamed_loss_sum(params, x, y, weights, tile, with_grad=True)
    n = x.shape[0]
    return value / n, jax.tree.map(lambda g: g / n, grad)


def _streamed_loss_bwd(tile, grad, cotangent):
    return jax.tree.map(lambda g: cotangent * g, grad), None, None, None


streamed_loss.defvjp(_streamed_loss_fwd, _streamed_loss_bwd)


def lbfgs_solver() -> optax.GradientTransformationExtraArgs:
    """optax's L-BFGS (memory 10) with its zoom line search (strong Wolfe conditions): the engine
    before ``cxrfair.probe.lbfgs`` (``ENGINE`` "optax"), kept as the benchmarks' baseline."""
    return optax.lbfgs(memory_size=10, linesearch=optax.scale_by_zoom_linesearch(
        max_linesearch_steps=30, initial_guess_strategy="one"))


# The L-BFGS engine: "lean" (``cxrfair.probe.lbfgs``, the default) or "optax" (``lbfgs_solver``, the
# previous one, for benchmarks/probe_lbfgs_engine.py to time side by side). Read once at import: a
# process trains with one engine (its compiled programs are cached by recipe, not by engine).
ENGINE = os.environ.get("CXRFAIR_LBFGS_ENGINE", "lean")
if ENGINE not in ("lean", "optax"):
    raise CxrfairError(f"CXRFAIR_LBFGS_ENGINE={ENGINE!r}: expected lean (the default) or optax (the benchmarks' baseline); unset it")

# What run.json records of the engine (``cxrfair.probe.sweep``'s hyperparameters).
LBFGS_RECORD = ({"memory_size": lbfgs.MEMORY, "linesearch": lbfgs.LINESEARCH} if ENGINE == "lean" else
                {"memory_size": 10, "linesearch": "zoom (strong Wolfe), optax"})


class LbfgsState(NamedTuple):
    """The carry of the L-BFGS loop."""

    params: jax.Array | dict  # lean engine: one flat vector (P,) (``ravel_pytree``); optax: the parameters
    opt_state: lbfgs.Memory | optax.OptState  # the curvature memory (lean) or optax's state
    value: jax.Array  # () the objective at params
    grad: jax.Array | dict  # its gradient, shaped like params
    done: jax.Array  # () bool: converged (or stopped by a non-finite step or a failed line search); params frozen since
    iterations: jax.Array  # () int: iterations that moved the parameters
    evaluations: jax.Array  # () int: objective-and-gradient evaluations, the lane's start included


def lbfgs_init(params: dict) -> lbfgs.Memory | optax.OptState:
    """The engine's initial state for ``params``."""
    return lbfgs.init(params) if ENGINE == "lean" else lbfgs_solver().init(params)


def lbfgs_iteration(state: LbfgsState, _, fun, gtol: float, ftol: float = 0.0) -> tuple[LbfgsState, tuple]:
    """One L-BFGS step on ``fun`` (the full-batch objective of ``state.params``); a lane that is
    done keeps its parameters.

    The objective and gradient at the new point are the line search's, so an iteration costs only
    the line search's evaluations. The lane is done (and keeps its parameters) once its largest
    gradient entry is at most ``gtol``, or when the step would leave the finite numbers or (lean
    engine) its line search finds no sufficient decrease. With ``ftol`` > 0, a step after the
    lane's first that lowers the objective by at most ftol * max(|f_old|, |f_new|, 1) is kept and
    the lane is then done (scipy's L-BFGS-B ``ftol`` rule, not tested on the first step).

    Returns the new state and the objective at the parameters it leaves.
    """
    converged = max_abs(state.grad) <= gtol
    if ENGINE == "lean":
        out = lbfgs.step(jax.value_and_grad(fun), state.params, state.value, state.grad, state.opt_state)
        params, opt_state, value, grad, accepted, evaluations = (out.params, out.memory, out.value, out.grad,
                                                                 out.accepted, out.evaluations)
    else:
        updates, opt_state = lbfgs_solver().update(state.grad, state.opt_state, state.params,
                                                   value=state.value, grad=state.grad, value_fn=fun)
        params = optax.apply_updates(state.params, updates)
        value, grad = optax.tree.get(opt_state, "value"), optax.tree.get(opt_state, "grad")
        accepted, evaluations = jnp.array(True), optax.tree.get(opt_state, "num_linesearch_steps")
    finite = jnp.isfinite(value) & jnp.isfinite(max_abs(params)) & jnp.isfinite(max_abs(grad))
    stay = state.done | converged | ~finite | ~accepted
    stalled = state.value - value <= ftol * jnp.maximum(jnp.maximum(jnp.abs(state.value), jnp.abs(value)), 1.0)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(stay, b, a), new, old)  # noqa: E731
    # Not on a lane's first step: with an empty memory L-BFGS steps along the scaled gradient, whose
    # small decrease says little about convergence (warm-started lanes would stop there).
    stalled = stalled & (state.iterations >= 1)
    evaluations = state.evaluations + jnp.where(state.done | converged, 0, evaluations).astype(jnp.int32)
    state = LbfgsState(*keep((params, opt_state, value, grad), state[:4]), stay | ((ftol > 0) & stalled),
                       state.iterations + (~stay).astype(jnp.int32), evaluations)
    return state, state.value


def lbfgs_loop(step, state: LbfgsState, val_fn, max_iter: int, gtol: float, val_every: int = 1) -> tuple:
    """Iterate ``step`` until the lane is done (converged or non-finite) or ``max_iter`` steps.

    A ``while_loop``, not a ``scan`` of ``max_iter`` steps: vmapped lanes stop together once every
    lane is done, instead of running frozen line searches to the cap (most lanes converge in a
    fraction of it). The curves come out as the scan's would: (max_iter,) each, the steps after
    the stop repeating the last one written (a done lane's state no longer changes), or the
    initial objective and validation loss if the lane was done before its first step.

    ``val_fn(params)`` is the validation loss, evaluated after every ``val_every``-th iteration and
    at the lane's last (its final parameters, what selection reads); the curve is NaN at the other
    iterations. Why not every iteration: the curve is only a record, and for the MLP the
    validation pass cost ~9% of an iteration (benchmarks/RESULTS.md, issue 27).

    Returns (state, train_curve (max_iter,), val_curve (max_iter,)).
    """
    curves = (jnp.full((max_iter,), state.value), jnp.full((max_iter,), jnp.nan, state.value.dtype))

    def running(carry) -> jax.Array:
        i, s, _ = carry
        return (i < max_iter) & ~(s.done | (max_abs(s.grad) <= gtol))

    def body(carry):
        i, s, (tc, vc) = carry
        s, t = step(s, None)
        if val_every == 1:
            v = val_fn(s.params)
        else:
            v = jax.lax.cond((i + 1) % val_every == 0, val_fn, lambda p: jnp.full((), jnp.nan, t.dtype), s.params)
        return i + 1, s, (tc.at[i].set(t), vc.at[i].set(v))

    n, state, (tc, vc) = jax.lax.while_loop(running, body, (jnp.array(0, jnp.int32), state, curves))
    # The final parameters' loss, at the loop's last step and the lane's own last (a vmapped lane
    # that stopped earlier has kept these parameters since): with n = 0, the initial loss.
    final = val_fn(state.params)
    vc = vc.at[jnp.maximum(n - 1, 0)].set(final).at[jnp.maximum(state.iterations - 1, 0)].set(final)
    idx = jnp.minimum(jnp.arange(max_iter), jnp.maximum(n - 1, 0))
    return state, tc[idx], vc[idx]


def lbfgs_weights(spec: objectives.Spec, data: Data, strength) -> jax.Array | None:
    """(N,) example weights of the full-batch objective: ``reweight``'s cell weights, else None (plain mean)."""
    if spec.name == "erm" or spec.name == "erase":
        return None
    if spec.name != "reweight":
        raise ValueError(f"mitigation {spec.name!r} needs the adamw solver (its objective changes every step)")
    return objectives.cell_weights(jnp.array(spec.cell_counts), strength)[data.cell_train]


def max_abs(tree) -> jax.Array:
    """Largest absolute entry of a pytree of arrays."""
    return jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)) for leaf in jax.tree.leaves(tree)]))


def fit_lane_lbfgs(key: jax.Array, hyper: Hyper, data: Data, recipe: Recipe) -> LaneResult:
    """One probe by full-batch L-BFGS on the L2-penalised loss; the final iterate is evaluated.

    At most ``recipe.max_iter`` iterations; a lane stops moving once its gradient's largest entry
    is at most ``recipe.gtol`` (or a step would leave the finite numbers). ``key`` fixes only the
    initialisation (the same as AdamW's), which matters for the MLP, not the convex linear probe.
    """
    return lbfgs_lane(key, hyper, data, recipe)[0]


def lbfgs_lane(key: jax.Array, hyper: Hyper, data: Data, recipe: Recipe, start: dict | None = None) -> tuple[LaneResult, dict]:
    """``fit_lane_lbfgs`` from ``start`` (a warm start: e.g. the solution at a larger penalty)
    instead of the seed's initialisation when given; returns (its result, its final parameters).

    The linear probe's objective is strictly convex, so its optimum does not depend on the start
    (only the iterations to reach it do); the MLP's does.
    """
    dim = data.x_train.shape[1]
    params = init_params(jax.random.split(key)[0], dim, recipe, hyper.hidden) if start is None else start
    weights = lbfgs_weights(recipe.mitigation, data, hyper.strength)
    # The lean engine works on one flat parameter vector (P,): its two-loop recursion and memory
    # are then one array each, not one per weight (per weight, the skip MLP's recursion and memory
    # update alone took ~2 s to compile; benchmarks/RESULTS.md, issue 27, third round).
    flat, unravel = jax.flatten_util.ravel_pytree(params) if ENGINE == "lean" else (params, lambda p: p)
    fun = partial(objective, x=data.x_train, y=data.y_train, l2=hyper.l2, weights=weights, l2_skip=hyper.l2_skip,
                  tile=recipe.tile)
    value, grad = jax.value_and_grad(lambda p: fun(unravel(p)))(flat)
    state = LbfgsState(flat, lbfgs_init(flat), value, grad, jnp.array(False), jnp.array(0, jnp.int32),
                       jnp.array(1, jnp.int32))
    step = partial(lbfgs_iteration, fun=lambda p: fun(unravel(p)), gtol=recipe.gtol, ftol=recipe.ftol)
    val_fn = lambda p: mean_loss(unravel(p), x=data.x_val, y=data.y_val, tile=recipe.tile)  # noqa: E731
    state, train_curve, val_curve = lbfgs_loop(step, state, val_fn, recipe.max_iter, recipe.gtol, recipe.val_every)
    ml, params = is_multilabel(data.y_val), unravel(state.params)
    return LaneResult(val_curve[-1], state.iterations, train_curve, val_curve,
                      probabilities(params, data.x_val, ml), probabilities(params, data.x_test, ml)), params


# ---------------------------------------------------------------- a sweep


@partial(jax.jit, static_argnames="recipe")
def train_sweep(keys: jax.Array, hyper: Hyper, data: Data, recipe: Recipe) -> LaneResult:
    """Train every (seed, configuration) lane in one compiled program.

    Args:
        keys: (S, 2) uint32 PRNG keys, one per seed (``seed_keys``).
        hyper: Hyper of (K,) arrays, the configurations; every seed trains all of them.
        data: the splits, shared by all lanes.
        recipe: static shapes and schedule.

    Returns:
        LaneResult whose fields have leading axes (S, K).
    """
    if recipe.sequential:
        return _sequential_sweep(keys, hyper, data, recipe)
    # Inner vmap: configurations share the key, hence the data order, so each step's minibatch
    # is one unbatched array and the K lanes' matmuls fuse into one [B, D] x [D, K*C].
    per_seed = jax.vmap(fit_lane, in_axes=(None, 0, None, None))
    return jax.vmap(per_seed, in_axes=(0, None, None, None))(keys, hyper, data, recipe)


def _sequential_sweep(keys: jax.Array, hyper: Hyper, data: Data, recipe: Recipe) -> LaneResult:
    """``train_sweep`` with the lanes run one after another (``lax.map``), each exactly ``fit_lane``.

    Why: vmapped, L-BFGS's line search branches per lane (``lax.cond`` on a batched predicate),
    and JAX then broadcasts every operand of the branch, the training features included, to all
    lanes: ~1.6 copies of the (N, D) features per lane (12 GB for 8 lanes of 240k x 768).
    One lane at a time needs the features once, at the cost of unfused matmuls.
    """
    lane = lambda key, h: fit_lane(key, h, data, recipe)  # noqa: E731
    per_seed = lambda key: jax.lax.map(lambda h: lane(key, h), hyper)  # noqa: E731
    return jax.lax.map(per_seed, keys)


def seed_keys(seeds) -> jax.Array:
    """(S, 2) PRNG keys for integer seeds."""
    return jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])


# ---------------------------------------------------------------- L-BFGS lanes, one per device


LANE_AXIS = "lanes"


def lane_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh over ``devices`` (default: every visible device) whose axis is the lane axis."""
    return jax.sharding.Mesh(np.array(devices if devices is not None else jax.devices()), (LANE_AXIS,))


def lane_params_shape(dim: int, recipe: Recipe) -> dict:
    """The shapes of one lane's parameters (``init_params``), as ``jax.ShapeDtypeStruct``s."""
    return jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), dim, recipe, jnp.int32(max(recipe.max_hidden, 1))))


@partial(jax.jit, static_argnames=("recipe", "mesh"))
def train_lanes(keys: jax.Array, hyper: Hyper, data: Data, start: dict, warm: dict, recipe: Recipe,
                mesh: jax.sharding.Mesh) -> tuple[LaneResult, dict]:
    """One L-BFGS lane per device of ``mesh``, each exactly ``lbfgs_lane``, in one compiled program.

    Why not ``train_sweep``'s ``vmap``: the vmapped loop runs every lane until the slowest is done
    (and, with optax's zoom line search, the engine before ``cxrfair.probe.lbfgs``, JAX evaluated
    both branches of its per-lane ``lax.cond`` on features broadcast into every lane).
    One lane at a time each lane stops at its own iteration count (measured on the demo cache:
    the default linear sweep's training 7.1 s vmapped, 1.9 s one lane at a time). The program
    depends only on the data's shapes, the recipe and the device count, so one compilation serves
    every seed, configuration, strength and grid size (``cxrfair.probe.sweep`` calls it once per
    ``mesh.size`` lanes, asynchronously).

    Args:
        keys: (L, 2) uint32 PRNG keys, one per lane, L = ``mesh.size`` (sharded over the lane axis).
        hyper: Hyper of (L,) arrays, one configuration per lane.
        data: the splits, replicated on every device.
        start: parameters of (L, ...) (``lane_params_shape``) a lane starts from where ``warm``.
        warm: per parameter (the keys of ``start``), (L,) bool: True, that lane's parameter starts
            from ``start``; False, from its seed's initialisation (``start``'s entry unread). All
            True: a warm start (the previous lane's solution); all False: a cold start; the skip
            MLP's ``w0`` and ``b2`` alone: the skip weight and bias from the linear probe, the
            ReLU branch from the initialisation (``cxrfair.probe.sweep``, ``linear_starts``).
        recipe: static shapes and schedule (``solver="lbfgs"``).
        mesh: a 1-D mesh over the lane axis (``lane_mesh``).

    Returns:
        (LaneResult, final parameters), each with a leading axis (L,).
    """
    spec = jax.sharding.PartitionSpec(LANE_AXIS)

    def local(k, h, d, p, w):  # this device's lane: k (1, 2), h / p / w with a leading axis of 1
        first = lambda tree: jax.tree.map(lambda a: a[0], tree)  # noqa: E731
        k, h, p = k[0], first(h), first(p)
        cold = init_params(jax.random.split(k)[0], d.x_train.shape[1], recipe, h.hidden)
        out = lbfgs_lane(k, h, d, recipe, jax.tree.map(lambda a, b, m: jnp.where(m[0], a, b), p, cold, w))
        return jax.tree.map(lambda a: a[None], out)

    # check_vma off: the lanes never communicate, and optax's line search (ENGINE "optax") mixes
    # per-lane and replicated values in its lax.cond branches, which the varying-axis check rejects.
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, jax.sharding.PartitionSpec(), spec, spec),
                         out_specs=spec, check_vma=False)(keys, hyper, data, start, warm)


@partial(jax.jit, static_argnames=("recipe", "mesh"))
def train_sweep_sharded(keys: jax.Array, hyper: Hyper, data: Data, recipe: Recipe, mesh: jax.sharding.Mesh) -> LaneResult:
    """``train_sweep`` with the configurations split evenly over the devices of ``mesh``: each
    device runs the vmapped sweep of its K / ``mesh.size`` configurations for every seed.

    Args:
        keys: (S, 2) PRNG keys (replicated).
        hyper: Hyper of (K,) arrays, K a multiple of ``mesh.size`` (sharded over the lane axis).
        data: the splits (replicated).

    Returns:
        LaneResult with leading axes (S, K).
    """
    spec = jax.sharding.PartitionSpec
    return jax.shard_map(lambda k, h, d: train_sweep(k, h, d, recipe), mesh=mesh,
                         in_specs=(spec(), spec(LANE_AXIS), spec()), out_specs=spec(None, LANE_AXIS),
                         check_vma=False)(keys, hyper, data)
