"""The compiled sweep against plain single-configuration training written here, and its accuracy."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cxrfair.probe import train
from cxrfair.probe.sweep import SweepConfig, lane_bytes, run_sweep
from tests.probe.synth import clusters, embedding_like

B1, B2, EPS = 0.9, 0.999, 1e-8
ADAMW = {"solver": "adamw", "standardize": False}  # the paper's recipe, as these tests check it


def _data(x, y):
    return train.Data(jnp.asarray(x["train"]), jnp.asarray(y["train"]), jnp.asarray(x["val"]),
                      jnp.asarray(y["val"]), jnp.asarray(x["test"]))


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _ce(z, y):
    """Per-example cross-entropy of logits z (N, C) in float64."""
    z = z - z.max(-1, keepdims=True)
    return np.log(np.exp(z).sum(-1)) - z[np.arange(len(y)), y]


def numpy_linear_fit(key, lr, wd, x, y, recipe):
    """A plain NumPy (float64) linear probe: PyTorch's AdamW update, cosine annealing per step,
    masked last batch, best-validation-loss epoch kept. Uses the library only for the seed's
    initial weights and data order, so the two trainings start and shuffle identically."""
    init_key, order_key = jax.random.split(key)
    p0 = train.init_params(init_key, x["train"].shape[1], recipe, jnp.int32(0))
    w, b = np.asarray(p0["w"], np.float64), np.asarray(p0["b"], np.float64)
    mw, vw, mb, vb = np.zeros_like(w), np.zeros_like(w), np.zeros_like(b), np.zeros_like(b)
    n = len(y["train"])
    steps = math.ceil(n / recipe.batch_size)
    total, t = recipe.epochs * steps, 0
    best, best_loss, best_epoch, curve = None, np.inf, -1, []
    for epoch in range(recipe.epochs):
        index, weight = (np.asarray(a) for a in train.epoch_batches(order_key, jnp.int32(epoch), n, recipe.batch_size))
        for idx, wt in zip(index, weight):
            idx = idx[wt > 0]  # the reference simply drops the padding
            xb, yb = x["train"][idx].astype(np.float64), y["train"][idx]
            g = _softmax(xb @ w.T + b)
            g[np.arange(len(yb)), yb] -= 1
            g /= len(yb)
            gw, gb = g.T @ xb, g.sum(0)
            lr_t = lr * 0.5 * (1 + math.cos(math.pi * t / total))
            t += 1
            for p, gp, m, v in ((w, gw, mw, vw), (b, gb, mb, vb)):
                m *= B1; m += (1 - B1) * gp
                v *= B2; v += (1 - B2) * gp**2
                step = (m / (1 - B1**t)) / (np.sqrt(v / (1 - B2**t)) + EPS)
                p -= lr_t * (step + wd * p)
        val = _ce(x["val"] @ w.T + b, y["val"]).mean()
        curve.append(val)
        if val < best_loss:
            best, best_loss, best_epoch = (w.copy(), b.copy()), val, epoch
    return best_loss, best_epoch, np.array(curve), _softmax(x["test"] @ best[0].T + best[1])


def optax_mlp_fit(key, lr, wd, hidden, x, y, recipe):
    """A plain unbatched JAX MLP loop with optax.adamw and a Python epoch loop (no vmap/scan)."""
    init_key, order_key = jax.random.split(key)
    params = train.init_params(init_key, x["train"].shape[1], recipe, jnp.int32(hidden))
    # Train only the live hidden units, as a width-`hidden` MLP would have.
    params = {"w1": params["w1"][:hidden], "b1": params["b1"][:hidden], "w2": params["w2"][:, :hidden], "b2": params["b2"]}
    n = len(y["train"])
    total = recipe.epochs * math.ceil(n / recipe.batch_size)
    tx = optax.adamw(optax.cosine_decay_schedule(lr, total), b1=B1, b2=B2, eps=EPS, weight_decay=wd)
    state = tx.init(params)

    def loss(p, xb, yb):
        h = jax.nn.relu(xb @ p["w1"].T + p["b1"])
        return optax.softmax_cross_entropy_with_integer_labels(h @ p["w2"].T + p["b2"], yb).mean()

    @jax.jit
    def step(p, s, xb, yb):
        g = jax.grad(loss)(p, xb, yb)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    best_loss, best_epoch, val_loss = np.inf, -1, jax.jit(loss)
    for epoch in range(recipe.epochs):
        index, weight = (np.asarray(a) for a in train.epoch_batches(order_key, jnp.int32(epoch), n, recipe.batch_size))
        for idx, wt in zip(index, weight):
            idx = idx[wt > 0]
            params, state = step(params, state, x["train"][idx], y["train"][idx])
        val = float(val_loss(params, x["val"], y["val"]))
        if val < best_loss:
            best_loss, best_epoch = val, epoch
    return best_loss, best_epoch


@pytest.fixture(scope="module")
def small():
    # 50 training rows: batches of 16 leave a last batch of 2, which the masking must handle.
    return clusters({"train": 50, "val": 20, "test": 20}, dim=8, n_classes=3, spread=1.5, seed=3)


def test_each_lane_of_the_fused_linear_sweep_equals_a_plain_numpy_run(small):
    x, y = small
    recipe = train.Recipe(n_classes=3, epochs=6, batch_size=16)
    lrs, wds, seeds = [3e-3, 3e-2, 1e-1], [0.0, 0.1, 0.5], [0, 7]
    hyper = train.Hyper(jnp.array(lrs, jnp.float32), jnp.array(wds, jnp.float32), jnp.zeros(3, jnp.int32), jnp.zeros(3))
    out = jax.device_get(train.train_sweep(train.seed_keys(seeds), hyper, _data(x, y), recipe))
    for i, seed in enumerate(seeds):
        for k in range(3):
            loss, epoch, curve, test_probs = numpy_linear_fit(jax.random.PRNGKey(seed), lrs[k], wds[k], x, y, recipe)
            np.testing.assert_allclose(out.val_loss[i, k], curve, rtol=2e-5, atol=2e-6)
            assert out.best_epoch[i, k] == epoch
            np.testing.assert_allclose(out.best_val_loss[i, k], loss, rtol=2e-5)
            np.testing.assert_allclose(out.test_probs[i, k], test_probs, atol=2e-5)


def test_each_lane_of_the_fused_mlp_sweep_equals_a_plain_optax_run(small):
    """Different widths share a program (zero-padded units); each lane is still its own MLP."""
    x, y = small
    recipe = train.Recipe(n_classes=3, epochs=4, batch_size=16, max_hidden=12)
    lrs, wds, hiddens = [1e-2, 3e-2, 1e-2], [0.0, 0.01, 0.1], [12, 5, 8]
    hyper = train.Hyper(jnp.array(lrs, jnp.float32), jnp.array(wds, jnp.float32), jnp.array(hiddens, jnp.int32), jnp.zeros(3))
    out = jax.device_get(train.train_sweep(train.seed_keys([4]), hyper, _data(x, y), recipe))
    for k in range(3):
        loss, epoch = optax_mlp_fit(jax.random.PRNGKey(4), lrs[k], wds[k], hiddens[k], x, y, recipe)
        assert out.best_epoch[0, k] == epoch
        np.testing.assert_allclose(out.best_val_loss[0, k], loss, rtol=2e-5)


def test_chunked_sweep_equals_the_whole_sweep(small):
    x, y = small
    cfg = SweepConfig(**ADAMW, lrs=(1e-2, 3e-2, 1e-1), weight_decays=(0.0,), seeds=(0, 1), epochs=3, batch_size=16)
    whole = run_sweep(x, y, 3, cfg)
    # A budget of 2.5 lanes: chunks of 2 configurations x 1 seed, the last of each seed padded.
    budget = 2.5 * lane_bytes(8, 3, 0, 16, 40, 3) / 2**20
    tiny = run_sweep(x, y, 3, SweepConfig(**{**cfg.__dict__, "memory_budget_mb": budget}))
    assert whole.timings["chunks"] == 1 and tiny.timings["chunks"] == 4
    for field in ("best_val_loss", "val_loss", "train_loss", "test_probs"):
        np.testing.assert_allclose(getattr(tiny, field), getattr(whole, field), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(tiny.best_epoch, whole.best_epoch)
    assert tiny.selected == whole.selected


def test_a_fixed_seed_gives_identical_results(small):
    x, y = small
    cfg = SweepConfig(**ADAMW, lrs=(3e-2,), weight_decays=(0.0,), seeds=(5,), epochs=3, batch_size=16)
    a, b = run_sweep(x, y, 3, cfg), run_sweep(x, y, 3, cfg)
    np.testing.assert_array_equal(a.test_probs, b.test_probs)
    np.testing.assert_array_equal(a.val_loss, b.val_loss)
    other = run_sweep(x, y, 3, SweepConfig(**{**cfg.__dict__, "seeds": (6,)}))
    assert not np.array_equal(a.test_probs, other.test_probs)


def test_linearly_separable_features_are_learned_perfectly():
    x, y = clusters({"train": 120, "val": 30, "test": 60}, dim=16, n_classes=4, spread=12.0, seed=1)
    res = run_sweep(x, y, 4, SweepConfig(**ADAMW, lrs=(1e-2,), weight_decays=(0.0,), seeds=(0,), epochs=20, batch_size=32))
    assert (res.test_probs[0, 0].argmax(-1) == y["test"]).mean() == 1.0


def test_selection_picks_the_lowest_mean_validation_loss(small):
    x, y = small
    res = run_sweep(x, y, 3, SweepConfig(**ADAMW, lrs=(1e-4, 3e-2), weight_decays=(0.0,), seeds=(0, 1), epochs=3, batch_size=16))
    means = res.best_val_loss.mean(0)
    assert res.selected == int(np.argmin(means)) and res.best_config["lr"] == 3e-2
    assert len(res.table) == 4 and res.table["selected"].sum() == 2
    assert set(res.table.columns) >= {"lr", "weight_decay", "l2", "hidden", "seed", "best_val_loss", "best_epoch", "val_accuracy"}


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_realistic_features_match_tuned_sklearn_logistic_regression(seed):
    """Paper-sized splits (840/120/240), 64 dims, ~50% accuracy; the paper's 150-epoch recipe."""
    from sklearn.linear_model import LogisticRegression

    x, y = embedding_like({"train": 840, "val": 120, "test": 240}, dim=64, n_classes=6, spread=0.1, seed=seed)
    fits = [LogisticRegression(C=c, max_iter=5000).fit(x["train"], y["train"]) for c in (1e-3, 1e-2, 3e-2, 1e-1, 1, 10)]
    tuned = max(fits, key=lambda m: np.mean(m.predict(x["val"]) == y["val"]))  # first of ties
    sk_acc = np.mean(tuned.predict(x["test"]) == y["test"])
    res = run_sweep(x, y, 6, SweepConfig(**ADAMW, lrs=(3e-4, 1e-3, 3e-3), weight_decays=(0.0, 0.1), seeds=(0,), epochs=150))
    acc = np.mean(res.test_probs[0, res.selected].argmax(-1) == y["test"])
    assert 0.35 < sk_acc < 0.8, "the data should be neither trivial nor hopeless"
    assert abs(acc - sk_acc) <= 0.02, (acc, sk_acc)
