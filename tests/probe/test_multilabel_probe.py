"""Multi-label probes: the masked sigmoid cross-entropy inside the same compiled sweep, each lane
against a plain unbatched reference written here (NumPy AdamW, optax MLP, the plain L-BFGS loop of tests/probe/lbfgs_reference.py), the
linear L-BFGS probe against one scikit-learn ``LogisticRegression`` per condition, and the runs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest

from cxrfair.core.runs import read_runs
from cxrfair.errors import CxrfairError
from cxrfair.probe import train
from cxrfair.probe.sweep import SweepConfig, feature_stats, probe_cache, run_sweep
from tests.probe.lbfgs_reference import plain_lbfgs
from tests.probe.synth import ML_ATTRIBUTES, make_cache, make_multilabel_cache, multilabel_features

B1, B2, EPS = 0.9, 0.999, 1e-8


def _data(x, y):
    return train.Data(*(jnp.asarray(a) for a in (x["train"], y["train"], x["val"], y["val"], x["test"])))


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def masked_bce(z, y):
    """Per-example loss (N,) in float64: mean over the row's observed conditions of -log σ(±z)."""
    m = np.isfinite(y)
    t = np.where(m, y, 0.0)
    entry = np.logaddexp(0.0, z) - t * z
    return (entry * m).sum(1) / np.maximum(m.sum(1), 1)


@pytest.fixture(scope="module")
def small():
    # 50 training rows: batches of 16 leave a last batch of 2; ~15% of labels masked; one row fully masked.
    x, y, _ = multilabel_features({"train": 50, "val": 20, "test": 20}, dim=6, n_conditions=3, signal=1.5, seed=4,
                                  masked=0.15)
    y["train"][7] = np.nan
    return x, y


def test_masked_loss_is_the_mean_over_observed_conditions():
    z = np.array([[0.3, -1.0, 2.0], [1.0, 0.5, -0.2]])
    y = np.array([[1.0, np.nan, 0.0], [np.nan, np.nan, np.nan]])
    got = np.asarray(train.task_losses(jnp.asarray(z.T, jnp.float32), jnp.asarray(y, jnp.float32)))
    want0 = (-np.log(_sigmoid(0.3)) - np.log(1 - _sigmoid(2.0))) / 2
    np.testing.assert_allclose(got, [want0, 0.0], rtol=1e-6)
    # optax's own binary cross-entropy on the observed entries agrees.
    ref = optax.sigmoid_binary_cross_entropy(jnp.asarray(z[0, [0, 2]]), jnp.asarray([1.0, 0.0])).mean()
    np.testing.assert_allclose(got[0], float(ref), rtol=1e-6)


def numpy_multilabel_adamw(key, lr, wd, x, y, recipe):
    """Plain NumPy (float64) linear multi-label probe: PyTorch's AdamW, cosine per step, the
    padding dropped, best-validation-loss epoch kept. Only the initial weights and the data order
    come from the library."""
    init_key, order_key = jax.random.split(key)
    p0 = train.init_params(init_key, x["train"].shape[1], recipe, jnp.int32(0))
    w, b = np.asarray(p0["w"], np.float64), np.asarray(p0["b"], np.float64)
    mw, vw, mb, vb = np.zeros_like(w), np.zeros_like(w), np.zeros_like(b), np.zeros_like(b)
    n = len(y["train"])
    total, t = recipe.epochs * math.ceil(n / recipe.batch_size), 0
    best, best_loss, best_epoch, curve = None, np.inf, -1, []
    for epoch in range(recipe.epochs):
        index, weight = (np.asarray(a) for a in train.epoch_batches(order_key, jnp.int32(epoch), n, recipe.batch_size))
        for idx, wt in zip(index, weight):
            idx = idx[wt > 0]
            xb, yb = x["train"][idx].astype(np.float64), y["train"][idx]
            m = np.isfinite(yb)
            g = m * (_sigmoid(xb @ w.T + b) - np.where(m, yb, 0.0)) / np.maximum(m.sum(1, keepdims=True), 1)
            g /= len(idx)
            gw, gb = g.T @ xb, g.sum(0)
            lr_t = lr * 0.5 * (1 + math.cos(math.pi * t / total))
            t += 1
            for p, gp, mo, v in ((w, gw, mw, vw), (b, gb, mb, vb)):
                mo *= B1; mo += (1 - B1) * gp
                v *= B2; v += (1 - B2) * gp**2
                p -= lr_t * ((mo / (1 - B1**t)) / (np.sqrt(v / (1 - B2**t)) + EPS) + wd * p)
        val = masked_bce(x["val"] @ w.T + b, y["val"]).mean()
        curve.append(val)
        if val < best_loss:
            best, best_loss, best_epoch = (w.copy(), b.copy()), val, epoch
    return best_loss, best_epoch, np.array(curve), _sigmoid(x["test"] @ best[0].T + best[1])


def test_each_lane_of_the_fused_multilabel_adamw_sweep_equals_a_plain_numpy_run(small):
    x, y = small
    recipe = train.Recipe(n_classes=3, epochs=5, batch_size=16)
    lrs, wds, seeds = [3e-3, 3e-2, 1e-1], [0.0, 0.1, 0.5], [0, 7]
    hyper = train.Hyper(jnp.array(lrs, jnp.float32), jnp.array(wds, jnp.float32), jnp.zeros(3, jnp.int32), jnp.zeros(3))
    out = jax.device_get(train.train_sweep(train.seed_keys(seeds), hyper, _data(x, y), recipe))
    for i, seed in enumerate(seeds):
        for k in range(3):
            loss, epoch, curve, test_probs = numpy_multilabel_adamw(jax.random.PRNGKey(seed), lrs[k], wds[k], x, y, recipe)
            np.testing.assert_allclose(out.val_loss[i, k], curve, rtol=2e-5, atol=2e-6)
            assert out.best_epoch[i, k] == epoch
            np.testing.assert_allclose(out.test_probs[i, k], test_probs, atol=2e-5)


@pytest.mark.slow  # keeps the default suite under ~10 min; `make test-all` runs it
def test_each_mlp_lane_of_the_multilabel_adamw_sweep_equals_a_plain_optax_run(small):
    x, y = small
    recipe = train.Recipe(n_classes=3, epochs=3, batch_size=16, max_hidden=10)
    lrs, wds, hiddens = [1e-2, 3e-2], [0.0, 0.01], [10, 4]
    hyper = train.Hyper(jnp.array(lrs, jnp.float32), jnp.array(wds, jnp.float32), jnp.array(hiddens, jnp.int32), jnp.zeros(2))
    out = jax.device_get(train.train_sweep(train.seed_keys([2]), hyper, _data(x, y), recipe))
    n = len(y["train"])
    for k in range(2):
        init_key, order_key = jax.random.split(jax.random.PRNGKey(2))
        p = train.init_params(init_key, 6, recipe, jnp.int32(hiddens[k]))
        p = {"w1": p["w1"][:hiddens[k]], "b1": p["b1"][:hiddens[k]], "w2": p["w2"][:, :hiddens[k]], "b2": p["b2"]}
        tx = optax.adamw(optax.cosine_decay_schedule(lrs[k], recipe.epochs * math.ceil(n / 16)), b1=B1, b2=B2, eps=EPS,
                         weight_decay=wds[k])
        state = tx.init(p)

        def loss(p, xb, yb):
            z = jax.nn.relu(xb @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]
            m = jnp.isfinite(yb)
            per = optax.sigmoid_binary_cross_entropy(z, jnp.where(m, yb, 0.0)) * m
            return (per.sum(1) / jnp.maximum(m.sum(1), 1)).mean()

        val = []
        for epoch in range(recipe.epochs):
            index, weight = (np.asarray(a) for a in train.epoch_batches(order_key, jnp.int32(epoch), n, 16))
            for idx, wt in zip(index, weight):
                g = jax.grad(loss)(p, x["train"][idx[wt > 0]], y["train"][idx[wt > 0]])
                u, state = tx.update(g, state, p)
                p = optax.apply_updates(p, u)
            val.append(float(loss(p, x["val"], y["val"])))
        np.testing.assert_allclose(out.val_loss[0, k], val, rtol=2e-5, atol=2e-6)


def _reference_objective(p, x, t, m, l2):
    z = x @ p["w"].T + p["b"]
    per = (optax.sigmoid_binary_cross_entropy(z, t) * m).sum(1) / jnp.maximum(m.sum(1), 1)
    return per.mean() + 0.5 * l2 * jnp.sum(p["w"] ** 2)


def reference_lbfgs(key, l2, x, y, recipe):
    """One linear multi-label probe by the plain L-BFGS loop; returns (test probabilities, iterations)."""
    init = train.init_params(jax.random.split(key)[0], x["train"].shape[1], recipe, jnp.int32(0))
    m = jnp.isfinite(y["train"]).astype(jnp.float32)
    t = jnp.where(m > 0, y["train"], 0.0)
    params, iterations = plain_lbfgs(_reference_objective, init, (jnp.asarray(x["train"]), t, m, jnp.float32(l2)), recipe)
    return np.asarray(jax.nn.sigmoid(x["test"] @ params["w"].T + params["b"])), iterations


def test_each_lane_of_the_multilabel_lbfgs_sweep_equals_the_plain_loop(small):
    x, y = small
    recipe = train.Recipe(n_classes=3, solver="lbfgs", max_iter=30)
    l2s = [1e-3, 1e-1]
    hyper = train.Hyper(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2, jnp.int32), jnp.array(l2s, jnp.float32))
    out = jax.device_get(train.train_sweep(train.seed_keys([0, 3]), hyper, _data(x, y), recipe))
    for i, seed in enumerate([0, 3]):
        for k, l2 in enumerate(l2s):
            probs, iterations = reference_lbfgs(jax.random.PRNGKey(seed), l2, x, y, recipe)
            np.testing.assert_allclose(out.test_probs[i, k], probs, atol=2e-4)
            assert abs(int(out.best_epoch[i, k]) - iterations) <= 1


def test_linear_lbfgs_is_one_sklearn_logistic_regression_per_condition():
    """Mean over images of the per-image mean over observed conditions + l2/2 ||W||^2 separates
    into one binary problem per condition: sklearn at C = 1/(l2 N) on the rows where the
    condition is observed, each weighted 1 / (the row's observed conditions)."""
    from sklearn.linear_model import LogisticRegression

    x, y, _ = multilabel_features({"train": 80, "val": 20, "test": 30}, dim=5, n_conditions=3, signal=1.0, seed=1,
                                  masked=0.2)
    l2s = (1e-3, 1e-1)
    res = run_sweep(x, y, 3, SweepConfig(l2s=l2s, seeds=(0,)))  # standardised with the training statistics
    stats = feature_stats(x["train"])
    z = {k: (v - stats["mean"]) / stats["std"] for k, v in x.items()}
    observed = np.isfinite(y["train"])
    weight = 1 / np.maximum(observed.sum(1), 1)
    for k, l2 in enumerate(l2s):
        for c in range(3):
            keep = observed[:, c]
            ref = LogisticRegression(C=1 / (l2 * 80), tol=1e-10, max_iter=10_000).fit(
                z["train"][keep], y["train"][keep, c], sample_weight=weight[keep])
            np.testing.assert_allclose(res.test_probs[0, k, :, c], ref.predict_proba(z["test"])[:, 1], atol=1e-3)


def test_a_one_condition_binary_task_trains_and_writes_runs(tmp_path):
    """nih-neatx-pneumothorax style: one condition (C = 1)."""
    path, x, y, _ = make_multilabel_cache(tmp_path / "b.h5", conditions=["Pneumothorax"], signal=3.0)
    probe_cache(path, tmp_path / "runs", SweepConfig(l2s=(1e-3, 1e-2), seeds=(0,), max_iter=50))
    run = read_runs(tmp_path / "runs")[0]
    assert run.meta["classes"] == ["Pneumothorax"] and run.task == "multilabel"
    Y, P = run.arrays("test")
    assert P.shape == (len(y["test"]), 1)
    from sklearn.metrics import roc_auc_score

    keep = np.isfinite(Y[:, 0])
    assert roc_auc_score(Y[keep, 0], P[keep, 0]) > 0.85  # a strong planted signal is learned


@pytest.mark.parametrize("solver", ["lbfgs", "adamw"])
def test_multilabel_probe_runs_carry_task_attributes_and_per_condition_probabilities(tmp_path, solver):
    path, x, y, _ = make_multilabel_cache(tmp_path / "ml.h5")
    grid = dict(l2s=(1e-3, 1e-1), max_iter=30) if solver == "lbfgs" else dict(lrs=(1e-2,), weight_decays=(0.0, 0.1), epochs=3,
                                                                                batch_size=16)
    cfg = SweepConfig(method="mlp", solver=solver, hiddens=(4,), seeds=(0, 1), **grid)
    probe_cache(path, tmp_path / "runs", cfg)
    runs = read_runs(tmp_path / "runs")
    assert [r.run_id for r in runs] == ["tiny-clip__mlp__best__s0", "tiny-clip__mlp__best__s1"]
    meta = runs[0].meta
    assert meta["task"] == "multilabel" and meta["attributes"] == ML_ATTRIBUTES
    assert "masked sigmoid" in meta["hyperparameters"]["loss"] and "multi-label" in meta["notes"]
    pred = runs[0].predictions
    assert [c for c in pred.columns if c.startswith("p_")] == ["p_Atelectasis", "p_Pleural Effusion", "p_Pneumothorax"]
    assert not np.allclose(pred.filter(like="p_").sum(axis=1), 1.0)  # independent sigmoids, not a softmax
    table = pd.read_csv(tmp_path / "runs" / "tiny-clip__mlp__sweep.csv")
    assert table["val_accuracy"].isna().all() and table["val_auc_macro"].between(0, 1).all()
    assert table.loc[table["selected"], "best_val_loss"].mean() == table.groupby("config")["best_val_loss"].mean().min()


def test_selection_by_accuracy_is_refused_for_multilabel(tmp_path):
    path, *_ = make_multilabel_cache(tmp_path / "ml.h5")
    with pytest.raises(CxrfairError, match="--select accuracy: multi-class only"):
        probe_cache(path, tmp_path / "runs", SweepConfig(select="accuracy", l2s=(1e-2,), seeds=(0,), max_iter=5))
    assert not (tmp_path / "runs").exists()


def test_multiclass_probe_runs_carry_the_caches_task_and_attributes(tmp_path):
    path, *_ = make_cache(tmp_path / "c.h5")
    probe_cache(path, tmp_path / "runs", SweepConfig(l2s=(1e-2,), seeds=(0,), max_iter=5))
    meta = read_runs(tmp_path / "runs")[0].meta
    assert meta["task"] == "multiclass" and meta["attributes"] == {
        "sex": {"groups": ["M", "F"], "reference": "M"}, "age_group": {"groups": ["young", "old"], "reference": "young"}}
