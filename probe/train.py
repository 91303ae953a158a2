"""Linear and MLP probes as small pure functions, and the compiled program that trains a sweep.

One probe (one hyperparameter configuration, one seed) is ``fit_lane``: ``lax.scan`` over
epochs, an inner ``lax.scan`` over minibatch steps, AdamW (``optax.inject_hyperparams`` so the
learning rate and weight decay are values in the optimizer state, not Python constants) with
cosine annealing over all steps, and the validation loss evaluated after every epoch; the
parameters of the epoch with the lowest validation loss are kept with ``jnp.where``.

A sweep is ``vmap(vmap(fit_lane))``: the inner ``vmap`` runs over configurations that share a
seed, hence one data order and one initialisation, so the minibatch ``x`` is *not* batched and
JAX's batching rule turns each lane's ``x @ W`` into one matrix multiply ``[B, D] x [D, K*C]``
(for the MLP, ``[B, D] x [D, K*H]`` then a batched second layer); the outer ``vmap`` runs over
seeds. ``train_sweep`` is that program; ``cxrfair.probe.sweep`` compiles it once per chunk shape,
splits a grid into equal (padded) chunks that fit a memory budget and runs each through it.

Weights are stored (out, in), as in PyTorch, so K stacked lanes form one contiguous (K*C, D)
matrix and neither the forward nor the backward matmul needs a transpose of the weights.

Minibatches: every epoch is ``ceil(N / B)`` steps over a fresh permutation; the last batch is
padded with weight-0 rows (drop_last=False, as PyTorch's DataLoader), and each step's loss is
the mean over its real rows only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

# AdamW moments as in PyTorch's defaults, so the paper's recipe means the same thing here.
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8


@dataclass(frozen=True)
class Recipe:
    """The static part of training: shapes and schedule, shared by every lane of a sweep."""

    n_classes: int  # C, the width of the output layer
    epochs: int = 150  # passes over the training split
    batch_size: int = 64  # minibatch size; the last batch of an epoch is padded and masked
    max_hidden: int = 0  # 0: linear probe; >0: MLP whose hidden layer is padded to this width

    def steps_per_epoch(self, n_train: int) -> int:
        return math.ceil(n_train / self.batch_size)


class Data(NamedTuple):
    """Features and labels of the three splits (float32 features, int32 labels)."""

    x_train: jax.Array  # (N, D)
    y_train: jax.Array  # (N,)
    x_val: jax.Array  # (Nv, D)
    y_val: jax.Array  # (Nv,)
    x_test: jax.Array  # (Nt, D)


class Hyper(NamedTuple):
    """Per-lane hyperparameters (scalars for one lane; arrays of shape (K,) for a sweep)."""

    lr: jax.Array  # peak learning rate
    wd: jax.Array  # decoupled weight decay (PyTorch AdamW convention: multiplied by lr)
    hidden: jax.Array  # hidden width, <= Recipe.max_hidden (ignored by the linear probe)


class LaneResult(NamedTuple):
    """What one lane returns (leading axes (S, K) in a sweep)."""

    best_val_loss: jax.Array  # ()
    best_epoch: jax.Array  # () int, 0-based
    train_loss: jax.Array  # (E,) mean minibatch loss of each epoch
    val_loss: jax.Array  # (E,) validation loss after each epoch
    val_probs: jax.Array  # (Nv, C) from the kept parameters
    test_probs: jax.Array  # (Nt, C) from the kept parameters


# ---------------------------------------------------------------- model


def init_params(key: jax.Array, dim: int, recipe: Recipe, hidden: jax.Array) -> dict:
    """PyTorch ``nn.Linear`` initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    For the MLP the hidden layer is allocated ``recipe.max_hidden`` wide and the units beyond
    ``hidden`` are zero: their gradients are then exactly zero, so they stay zero and the lane
    trains exactly like an MLP of width ``hidden`` (this lets different widths share a program).

    Weights are stored (out, in) like PyTorch's: stacked over K lanes, a weight (K, C, D) is
    one contiguous (K*C, D) matrix, so the fused forward and backward matmuls need no transpose.

    Returns:
        linear: ``{"w": (C, D), "b": (C,)}``; MLP: ``{"w1": (H, D), "b1": (H,), "w2": (C, H),
        "b2": (C,)}`` with H = ``recipe.max_hidden``.
    """
    n_classes = recipe.n_classes
    if recipe.max_hidden == 0:
        kw, kb = jax.random.split(key)
        bound = 1.0 / math.sqrt(dim)
        return {"w": _uniform(kw, (n_classes, dim), bound), "b": _uniform(kb, (n_classes,), bound)}
    k1, k2, k3, k4 = jax.random.split(key, 4)
    live = (jnp.arange(recipe.max_hidden) < hidden).astype(jnp.float32)  # (H,)
    b1, b2 = 1.0 / math.sqrt(dim), 1.0 / jnp.sqrt(hidden.astype(jnp.float32))
    return {
        "w1": _uniform(k1, (recipe.max_hidden, dim), b1) * live[:, None],
        "b1": _uniform(k2, (recipe.max_hidden,), b1) * live,
        "w2": _uniform(k3, (n_classes, recipe.max_hidden), 1.0) * b2 * live,
        "b2": _uniform(k4, (n_classes,), 1.0) * b2,
    }


def _uniform(key: jax.Array, shape: tuple, bound) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0) * bound


def count_params(dim: int, n_classes: int, hidden: int) -> int:
    """Trainable parameters of one probe (hidden 0: linear)."""
    if hidden == 0:
        return dim * n_classes + n_classes
    return dim * hidden + hidden + hidden * n_classes + n_classes


def logits_t(params: dict, x: jax.Array) -> jax.Array:
    """Logits, transposed: (C, B) for features x (B, D).

    Classes-first is the layout the fused matmul produces (stacked lanes give (K*C, B)), so the
    loss is taken along axis 0 with no transpose inside the step (~9% faster on CPU).
    """
    xt = x.T
    if "w" in params:
        return params["w"] @ xt + params["b"][:, None]
    h = jax.nn.relu(params["w1"] @ xt + params["b1"][:, None])  # (H, B)
    return params["w2"] @ h + params["b2"][:, None]


def apply(params: dict, x: jax.Array) -> jax.Array:
    """Logits (B, C) of features x (B, D)."""
    return logits_t(params, x).T


def example_losses(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy (B,) of int labels y (B,); callers weight and reduce."""
    z = logits_t(params, x)  # (C, B)
    # The label mask depends only on y, which lanes sharing a seed share: computed once per step.
    is_label = jnp.arange(z.shape[0])[:, None] == y[None, :]
    return jax.nn.logsumexp(z, axis=0) - jnp.sum(jnp.where(is_label, z, 0.0), axis=0)


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


def train_step(carry: tuple, batch: tuple, total_steps: int) -> tuple[tuple, jax.Array]:
    """One AdamW step on one padded minibatch; returns the new (params, opt_state) and the loss."""
    params, opt_state = carry
    x, y, w = batch
    loss, grads = jax.value_and_grad(batch_loss)(params, x, y, w)
    # The hyperparameters come from opt_state, so the transform built here needs no values.
    updates, opt_state = optimizer(0.0, 0.0, total_steps).update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss


class EpochState(NamedTuple):
    """The carry of the epoch loop: current parameters, optimizer state and the best so far."""

    params: dict
    opt_state: optax.OptState
    best: dict  # parameters after the best epoch (the initial ones until an epoch improves)
    best_loss: jax.Array  # () its validation loss (inf at first)
    best_epoch: jax.Array  # () int, 0-based (-1 at first)


def train_epoch(state: EpochState, epoch: jax.Array, order_key: jax.Array, data: Data,
                recipe: Recipe) -> tuple[EpochState, tuple[jax.Array, jax.Array]]:
    """One pass over the training split, then the validation loss; returns (state, (train, val) loss)."""
    n = data.x_train.shape[0]
    index, weight = epoch_batches(order_key, epoch, n, recipe.batch_size)
    step = partial(train_step, total_steps=recipe.epochs * recipe.steps_per_epoch(n))
    batches = (data.x_train[index], data.y_train[index], weight)
    (params, opt_state), losses = jax.lax.scan(step, (state.params, state.opt_state), batches)
    # The epoch's training loss weights each step by its real rows (the last may be short).
    train_loss = jnp.sum(losses * weight.sum(1)) / n
    val_loss = jnp.mean(example_losses(params, data.x_val, data.y_val))
    return keep_best(state, params, opt_state, val_loss, epoch), (train_loss, val_loss)


def keep_best(state: EpochState, params: dict, opt_state, val_loss: jax.Array, epoch: jax.Array) -> EpochState:
    """New state; ``best`` moves to ``params`` only if ``val_loss`` is strictly lower (first minimum wins)."""
    better = val_loss < state.best_loss
    best = jax.tree.map(lambda new, old: jnp.where(better, new, old), params, state.best)
    return EpochState(params, opt_state, best, jnp.where(better, val_loss, state.best_loss),
                      jnp.where(better, epoch, state.best_epoch))


def fit_lane(key: jax.Array, hyper: Hyper, data: Data, recipe: Recipe) -> LaneResult:
    """Train one probe (one configuration, one seed) and evaluate its best-validation epoch.

    ``key`` fixes both the initialisation and the data order, so lanes that share it differ
    only in their hyperparameters.
    """
    n, dim = data.x_train.shape
    init_key, order_key = jax.random.split(key)
    params = init_params(init_key, dim, recipe, hyper.hidden)
    opt_state = optimizer(hyper.lr, hyper.wd, recipe.epochs * recipe.steps_per_epoch(n)).init(params)
    state = EpochState(params, opt_state, params, jnp.array(jnp.inf, jnp.float32), jnp.array(-1, jnp.int32))
    epoch = partial(train_epoch, order_key=order_key, data=data, recipe=recipe)
    state, (train_curve, val_curve) = jax.lax.scan(epoch, state, jnp.arange(recipe.epochs, dtype=jnp.int32))
    return LaneResult(state.best_loss, state.best_epoch, train_curve, val_curve,
                      jax.nn.softmax(apply(state.best, data.x_val)), jax.nn.softmax(apply(state.best, data.x_test)))


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
    # Inner vmap: configurations share the key, hence the data order, so each step's minibatch
    # is one unbatched array and the K lanes' matmuls fuse into one [B, D] x [D, K*C].
    per_seed = jax.vmap(fit_lane, in_axes=(None, 0, None, None))
    return jax.vmap(per_seed, in_axes=(0, None, None, None))(keys, hyper, data, recipe)


def seed_keys(seeds) -> jax.Array:
    """(S, 2) PRNG keys for integer seeds."""
    return jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
