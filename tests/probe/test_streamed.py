"""The full-batch loss streamed in tiles (``train.streamed_loss``, the default linear L-BFGS path):
its value and gradient against the whole-split formula written here, and the sweep it drives
against scikit-learn's optimum and against the unstreamed sweep."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cxrfair.probe import sweep, train
from cxrfair.probe.sweep import SweepConfig, run_sweep
from tests.probe.synth import clusters

N, D, C = 103, 5, 4  # 103 rows: tiles of 16 leave a last tile that overlaps the one before


def _reference(params, x, y, weights, l2):
    """Mean (weighted) loss + l2/2 ||W||^2 over the whole split, the textbook way (optax's losses)."""
    z = x @ params["w"].T + params["b"]
    if y.ndim == 2:  # multi-label: mean over each row's observed conditions, NaN masked
        m = jnp.isfinite(y).astype(jnp.float32)
        per = (optax.sigmoid_binary_cross_entropy(z, jnp.where(m > 0, y, 0.0)) * m).sum(1) / jnp.maximum(m.sum(1), 1)
    else:
        per = optax.softmax_cross_entropy_with_integer_labels(z, y)
    return jnp.mean(per if weights is None else per * weights) + 0.5 * l2 * jnp.sum(params["w"] ** 2)


def _problem(task: str, weighted: bool):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(N, D)).astype(np.float32))
    if task == "multilabel":
        y = rng.integers(0, 2, (N, C)).astype(np.float32)
        y[rng.random((N, C)) < 0.2] = np.nan
    else:
        y = rng.integers(0, C, N).astype(np.int32)
    params = {"w": jnp.asarray(rng.normal(size=(C, D)).astype(np.float32)), "b": jnp.asarray(rng.normal(size=C).astype(np.float32))}
    weights = jnp.asarray(rng.uniform(0.2, 2.0, N).astype(np.float32)) if weighted else None
    return params, x, jnp.asarray(y), weights


@pytest.mark.parametrize("task,weighted", [("multiclass", False), ("multiclass", True), ("multilabel", False)])
@pytest.mark.parametrize("tile", [1, 16, 50, 1000])  # one row, uneven tiles, two tiles; tile > N: the plain formula
def test_streamed_objective_and_gradient_equal_the_whole_split(task, weighted, tile):
    params, x, y, weights = _problem(task, weighted)
    want, want_grad = jax.value_and_grad(_reference)(params, x, y, weights, 0.3)
    fused = jax.jit(jax.value_and_grad(train.objective), static_argnames="tile")
    got, got_grad = fused(params, x, y, jnp.float32(0.3), weights, None, tile)
    value_only = jax.jit(train.objective, static_argnames="tile")(params, x, y, jnp.float32(0.3), weights, None, tile)
    streamed = train.streamed_loss(params, x, y, weights, tile) + 0.15 * jnp.sum(params["w"] ** 2)  # one tile if tile > N
    # float32 sums of N = 103 terms in another order: relative error <= ~N * eps = 1.2e-5.
    np.testing.assert_allclose(got, want, rtol=2e-5)
    np.testing.assert_allclose(value_only, want, rtol=2e-5)
    np.testing.assert_allclose(streamed, want, rtol=2e-5)
    for k in ("w", "b"):
        scale = float(jnp.max(jnp.abs(want_grad[k])))
        np.testing.assert_allclose(got_grad[k], want_grad[k], rtol=0, atol=2e-5 * max(scale, 1.0), err_msg=k)


def test_the_gradient_flows_through_the_streamed_loss_like_the_whole_one():
    """The custom VJP scales by the incoming cotangent (here 3 and the chain rule through a square)."""
    params, x, y, _ = _problem("multiclass", False)
    outer = lambda f: jax.grad(lambda p: 3.0 * f(p) ** 2)(params)  # noqa: E731
    got = outer(lambda p: train.mean_loss(p, x, y, tile=16))
    want = outer(lambda p: train.mean_loss(p, x, y))
    for k in ("w", "b"):
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_each_row_counts_once_when_the_last_tile_overlaps():
    """Per-row weights that single out rows in the overlap: each row's loss enters exactly once."""
    params, x, y, _ = _problem("multiclass", False)
    per = np.asarray(train.example_losses(params, x, y))
    for row in (0, 88, 89, 90, 102):  # 103 rows in 7 tiles of 15: the last covers rows 88-102, 88-89 counted before
        onehot = jnp.zeros(N).at[row].set(1.0)
        np.testing.assert_allclose(train.mean_loss(params, x, y, onehot, tile=16) * N, per[row], rtol=1e-6)


@pytest.fixture(scope="module")
def clustered():
    return clusters({"train": 90, "val": 30, "test": 30}, dim=6, n_classes=3, spread=0.7, seed=1)


def test_the_streamed_sweep_reaches_sklearns_optimum_and_the_unstreamed_sweep(clustered, monkeypatch):
    """run_sweep with tiles of 16 rows (90 = 6 x 15): every lane at scikit-learn's optimum, as the
    unstreamed sweep's lanes are; both stop at the same gradient tolerance, so they agree to the
    optimum, not bit for bit."""
    from sklearn.linear_model import LogisticRegression

    x, y = clustered
    cfg = SweepConfig(l2s=(1e-3, 1e-2, 1e-1), seeds=(0, 2), standardize=False)
    monkeypatch.setitem(sweep.TILE_BYTES, "linear", 16 * 4 * 6)  # 16 rows of 6 float32 features
    assert sweep.tile_rows("linear", 6) == 16
    streamed = run_sweep(x, y, 3, cfg)
    monkeypatch.setitem(sweep.TILE_BYTES, "linear", 0)
    whole = run_sweep(x, y, 3, cfg)
    np.testing.assert_allclose(streamed.test_probs, whole.test_probs, atol=2e-3)
    assert streamed.selected == whole.selected
    for k, l2 in enumerate(cfg.l2s):
        ref = LogisticRegression(C=1 / (l2 * 90), tol=1e-10, max_iter=10_000).fit(x["train"], y["train"])
        want = np.broadcast_to(ref.predict_proba(x["test"]), streamed.test_probs[:, k].shape)
        np.testing.assert_allclose(streamed.test_probs[:, k], want, atol=2e-3)


def test_tile_rows_fill_the_tile_bytes_at_any_feature_width(monkeypatch):
    monkeypatch.setitem(sweep.TILE_BYTES, "linear", 2**20)
    for dim in (8, 64, 100, 768):
        rows = sweep.tile_rows("linear", dim)
        assert rows * 4 * dim <= 2**20 < (rows + 1) * 4 * dim, dim  # the most float32 rows that fit
    assert sweep.tile_rows("linear", 10**9) == 1  # never 0 rows: 0 means "not streamed"
    monkeypatch.setitem(sweep.TILE_BYTES, "mlp", 0)
    assert sweep.tile_rows("mlp", 64) == 0
