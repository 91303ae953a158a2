"""Full-batch L-BFGS probes and standardisation: the engine's pieces (two-loop recursion against the
dense BFGS inverse, the line search's interpolation and its failure), each lane against the plain
loop of ``tests/probe/lbfgs_reference.py``,
the linear probe against scikit-learn at every C, and the default sweeps against a tuned
``LogisticRegression`` on features with a large common offset (the demo cache's pathology)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cxrfair.probe import lbfgs, train
from cxrfair.probe.sweep import SweepConfig, feature_stats, run_sweep, select_config
from tests.probe.lbfgs_reference import plain_lbfgs
from tests.probe.synth import clusters, embedding_like


def _data(x, y):
    return train.Data(*(jnp.asarray(a) for a in (x["train"], y["train"], x["val"], y["val"], x["test"])))


def _forward(p, a):
    """The probe by its parameters: linear ("w"), MLP ("w1", "w2"), plus the skip weight ("w0")."""
    if "w" in p:
        return a @ p["w"].T + p["b"]
    skip = a @ p["w0"].T if "w0" in p else 0.0
    return jax.nn.relu(a @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"] + skip


def _objective(p, x, y, l2, l2_skip):
    ce = optax.softmax_cross_entropy_with_integer_labels(_forward(p, x), y).mean()
    penalty = l2 * sum(jnp.sum(p[k] ** 2) for k in ("w", "w1", "w2") if k in p)
    return ce + 0.5 * (penalty + (l2_skip * jnp.sum(p["w0"] ** 2) if "w0" in p else 0.0))


def reference_lbfgs(key, l2, hidden, x, y, recipe, l2_skip=None):
    """One probe the plain way: the unbatched Python/NumPy L-BFGS loop (``plain_lbfgs``; no vmap, no
    scan), the MLP at its own width (``recipe.skip``: plus the linear skip weight W0, penalised
    by ``l2_skip``). The same stopping rules as the library's (largest gradient entry <= gtol, a
    non-finite step, or with ``recipe.ftol`` > 0 a kept step that lowered the objective by at
    most ftol * max(|f_old|, |f_new|, 1)) and the same initial weights (its only library call).

    Returns:
        (test probabilities (Nt, C), iterations that moved the parameters).
    """
    init = train.init_params(jax.random.split(key)[0], x["train"].shape[1], recipe, jnp.int32(hidden))
    if hidden:
        init = {"w1": init["w1"][:hidden], "b1": init["b1"][:hidden], "w2": init["w2"][:, :hidden], "b2": init["b2"],
                **({"w0": init["w0"]} if recipe.skip else {})}
    data = (jnp.asarray(x["train"]), jnp.asarray(y["train"]), jnp.float32(l2), jnp.float32(l2_skip or 0.0))
    params, iterations = plain_lbfgs(_objective, init, data, recipe)
    return np.asarray(jax.nn.softmax(_forward(params, x["test"]))), iterations


def _dense_bfgs_direction(grad, pairs, first):
    """-H g with H built densely: H0 = gamma I (s.y / y.y of the newest pair; ``first`` if none), then
    H <- V^T H V + rho s s^T, V = I - rho y s^T, for each pair oldest first (Nocedal & Wright 7.19)."""
    if not pairs:
        return -first * grad
    s, y = pairs[-1]
    h = np.eye(len(grad)) * (s @ y) / (y @ y)
    for s, y in pairs:
        rho = 1.0 / (s @ y)
        v = np.eye(len(grad)) - rho * np.outer(y, s)
        h = v.T @ h @ v + rho * np.outer(s, s)
    return -h @ grad


def test_the_two_loop_recursion_is_the_dense_bfgs_inverse():
    """``lbfgs.direction`` over the ring buffer (wrapped around, a negative-curvature pair skipped)
    equals -H g from the dense BFGS update over the last MEMORY kept pairs; with an empty memory it is
    the gradient step scaled to length <= 1."""
    rng = np.random.default_rng(0)
    n = 7
    a = rng.normal(size=(n, n))
    hessian = a @ a.T + n * np.eye(n)  # SPD: every pair (s, A s) has positive curvature
    tree = lambda v: {"a": jnp.asarray(v[:3], jnp.float32), "b": jnp.asarray(v[3:].reshape(2, 2), jnp.float32)}  # noqa: E731
    flat = lambda t: np.concatenate([np.asarray(t["a"], np.float64), np.asarray(t["b"], np.float64).ravel()])  # noqa: E731
    grad = flat(tree(rng.normal(size=n)))
    memory, kept = lbfgs.init(tree(np.zeros(n))), []
    d, _ = lbfgs.direction(tree(grad), memory)
    np.testing.assert_allclose(flat(d), -min(1.0, 1.0 / np.linalg.norm(grad)) * grad, rtol=1e-6)
    for i in range(lbfgs.MEMORY + 4):
        s = flat(tree(rng.normal(size=n)))
        y = -s if i == 5 else flat(tree(hessian @ s))  # pair 5: s.y < 0, skipped
        memory = lbfgs.remember(memory, tree(s), tree(y))
        if i != 5:
            kept.append((s, y))
    assert int(memory.count) == lbfgs.MEMORY + 3
    d, after = lbfgs.direction(tree(grad), memory)
    expected = _dense_bfgs_direction(grad, kept[-lbfgs.MEMORY:], None)
    np.testing.assert_allclose(flat(d), expected, rtol=2e-4, atol=1e-5 * np.abs(expected).max())
    assert int(after.count) == int(memory.count)  # a descent direction: the memory is kept


def test_the_line_search_interpolates_and_gives_up_without_a_decrease():
    """A rejected unit step on phi(t) = (t - 0.3)^2 is replaced by the exact minimiser 0.3 (the cubic
    through a quadratic); the result is kept in [0.1 t, 0.5 t]. A search along a direction that does
    not descend (a gradient of the wrong sign) reports failure after MAX_LINESEARCH evaluations, and
    the lane then stops where it was. The approximate Wolfe conditions accept a step that f cannot
    resolve when its slope rose enough, not one whose slope did not (a null step)."""
    phi = lambda t: (t - 0.3) ** 2  # noqa: E731
    assert float(lbfgs.next_trial(1.0, phi(0.0), -0.6, phi(1.0), 1.4)) == pytest.approx(0.3, rel=1e-5)
    assert float(lbfgs.next_trial(1.0, 0.0, -1.0, 0.0, 1.0)) == pytest.approx(0.5)  # the cubic's minimiser, 0.5 t
    steep = lambda t: 100.0 * (t - 0.01) ** 2  # noqa: E731
    assert float(lbfgs.next_trial(1.0, steep(0.0), -2.0, steep(1.0), 198.0)) == pytest.approx(0.1)  # minimiser 0.01: at least 0.1 t
    assert float(lbfgs.next_trial(1.0, 0.0, -1.0, jnp.inf, jnp.nan)) == pytest.approx(0.1)  # overflow: the quadratic's 0, so 0.1 t

    assert bool(lbfgs.accept(1.0, -1e-9, 1.0, 1.0, -0.5e-9))  # f unchanged in float32, slope halved
    assert not bool(lbfgs.accept(1.0, -1e-9, 1e-3, 1.0, -0.99e-9))  # f unchanged, slope as at 0: a null step
    assert not bool(lbfgs.accept(1.0, -1e-9, 1.0, 1.0 + 1e-5, -0.5e-9))  # f rose beyond EPS_F |f|
    assert bool(lbfgs.accept(1.0, -1.0, 0.5, 0.5, -2.0))  # Armijo alone (the slope still steep)
    wrong = lambda p: (jnp.sum(p["x"] ** 2), {"x": -2.0 * p["x"]})  # noqa: E731
    start = {"x": jnp.array([1.0, -2.0])}
    out = lbfgs.step(wrong, start, *wrong(start), lbfgs.init(start))
    assert not bool(out.accepted) and int(out.evaluations) == lbfgs.MAX_LINESEARCH
    recipe = train.Recipe(n_classes=2, solver="lbfgs", max_iter=5)
    state = train.LbfgsState(start, lbfgs.init(start), *wrong(start), jnp.array(False), jnp.int32(0), jnp.int32(1))
    fun = lambda p: jnp.sum(p["x"] ** 2)  # noqa: E731
    monkey = jax.custom_vjp(fun)
    monkey.defvjp(lambda p: (fun(p), p), lambda p, ct: ({"x": -2.0 * ct * p["x"]},))
    state, _ = train.lbfgs_iteration(state, None, monkey, recipe.gtol)
    assert bool(state.done) and int(state.iterations) == 0
    np.testing.assert_array_equal(state.params["x"], start["x"])


@pytest.fixture(scope="module")
def small():
    return clusters({"train": 50, "val": 20, "test": 20}, dim=8, n_classes=3, spread=1.0, seed=3)


def test_each_lane_of_the_lbfgs_sweep_equals_the_plain_loop(small):
    """Linear lanes (two seeds x two penalties), in one compiled vmapped program."""
    x, y = small
    recipe = train.Recipe(n_classes=3, solver="lbfgs", max_iter=40)
    l2s, seeds = [1e-3, 1e-1], [0, 5]
    hyper = train.Hyper(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2, jnp.int32), jnp.array(l2s, jnp.float32))
    out = jax.device_get(train.train_sweep(train.seed_keys(seeds), hyper, _data(x, y), recipe))
    for i, seed in enumerate(seeds):
        for k, l2 in enumerate(l2s):
            probs, iterations = reference_lbfgs(jax.random.PRNGKey(seed), l2, 0, x, y, recipe)
            np.testing.assert_allclose(out.test_probs[i, k], probs, atol=2e-4)
            assert abs(int(out.best_epoch[i, k]) - iterations) <= 1  # float noise may shift the last test
    assert out.best_epoch[0, 1] < 40  # the strongly penalised lane converges before the cap


@pytest.mark.slow  # keeps the default suite under ~10 min; `make test-all` runs it
def test_each_mlp_lane_of_the_lbfgs_sweep_equals_the_plain_loop(small):
    """Different widths share a program (zero-padded units); each lane is still its own MLP."""
    x, y = small
    recipe = train.Recipe(n_classes=3, max_hidden=8, solver="lbfgs", max_iter=12)
    l2s, hiddens = [1e-2, 1e-1], [8, 5]
    hyper = train.Hyper(jnp.zeros(2), jnp.zeros(2), jnp.array(hiddens, jnp.int32), jnp.array(l2s, jnp.float32))
    out = jax.device_get(train.train_sweep(train.seed_keys([4]), hyper, _data(x, y), recipe))
    for k in range(2):
        probs, iterations = reference_lbfgs(jax.random.PRNGKey(4), l2s[k], hiddens[k], x, y, recipe)
        np.testing.assert_allclose(out.test_probs[0, k], probs, atol=1e-3)
        assert out.best_epoch[0, k] == iterations


def test_each_skip_mlp_lane_equals_the_plain_loop(small):
    """The default MLP, the skip MLP (logits = W0 x + W2 relu(W1 x + b1) + b2, W0 penalised by its
    own l2_skip), with the relative-decrease stop on: lanes of two widths and two (l2, l2_skip)
    pairs in one vmapped program, each against the plain loop at its own width."""
    x, y = small
    recipe = train.Recipe(n_classes=3, max_hidden=6, solver="lbfgs", max_iter=25, skip=True, ftol=1e-3)
    l2s, l2_skips, hiddens = [1e-2, 1.0], [1e-3, 1e-1], [6, 3]
    hyper = train.Hyper(jnp.zeros(2), jnp.zeros(2), jnp.array(hiddens, jnp.int32), jnp.array(l2s, jnp.float32),
                        None, jnp.array(l2_skips, jnp.float32))
    out = jax.device_get(train.train_sweep(train.seed_keys([4]), hyper, _data(x, y), recipe))
    for k in range(2):
        probs, iterations = reference_lbfgs(jax.random.PRNGKey(4), l2s[k], hiddens[k], x, y, recipe, l2_skips[k])
        np.testing.assert_allclose(out.test_probs[0, k], probs, atol=1e-3)
        assert out.best_epoch[0, k] == iterations
    assert out.best_epoch.min() < recipe.max_iter  # a lane stopped early (the rule against ftol 0: the test below)


@pytest.mark.slow  # compiles two sweeps and four plain loops; the skip-MLP lane test above checks the rule too
def test_ftol_stops_each_lane_where_the_plain_loop_stops(small):
    """The relative-decrease rule: a lane stops after the first kept step that lowers the objective
    by at most ftol * max(|f|, 1), as the plain loop does; without it the same lanes run longer."""
    x, y = small
    recipe = train.Recipe(n_classes=3, solver="lbfgs", max_iter=60, ftol=1e-3)
    l2s, seeds = [1e-4, 1e-2], [0, 5]
    hyper = train.Hyper(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2, jnp.int32), jnp.array(l2s, jnp.float32))
    out = jax.device_get(train.train_sweep(train.seed_keys(seeds), hyper, _data(x, y), recipe))
    off = jax.device_get(train.train_sweep(train.seed_keys(seeds), hyper, _data(x, y), dataclasses.replace(recipe, ftol=0.0)))
    for i, seed in enumerate(seeds):
        for k, l2 in enumerate(l2s):
            probs, iterations = reference_lbfgs(jax.random.PRNGKey(seed), l2, 0, x, y, recipe)
            np.testing.assert_allclose(out.test_probs[i, k], probs, atol=2e-4)
            assert int(out.best_epoch[i, k]) == iterations
    assert (out.best_epoch < off.best_epoch).all(), (out.best_epoch, off.best_epoch)


def test_linear_lbfgs_is_sklearns_logistic_regression_at_each_c():
    """Objective mean CE + l2/2 ||W||^2 is sklearn's at C = 1/(l2 N): the same minimiser."""
    from sklearn.linear_model import LogisticRegression

    x, y = clusters({"train": 90, "val": 30, "test": 30}, dim=6, n_classes=3, spread=0.7, seed=1)
    l2s = (1e-3, 1e-2, 1e-1)
    res = run_sweep(x, y, 3, SweepConfig(l2s=l2s, seeds=(0,), standardize=False))
    for k, l2 in enumerate(l2s):
        ref = LogisticRegression(C=1 / (l2 * 90), tol=1e-10, max_iter=10_000).fit(x["train"], y["train"])
        # Both stop at a gradient tolerance (ours 1e-4 on the largest entry): close, not equal.
        np.testing.assert_allclose(res.test_probs[0, k], ref.predict_proba(x["test"]), atol=1e-3)


def test_standardisation_uses_the_training_split_only(small):
    x, y = small
    shifted = {**x, "val": x["val"] + 5.0, "test": x["test"] * 3.0}  # val/test must not move the statistics
    cfg = SweepConfig(l2s=(1e-2,), seeds=(0,), max_iter=50)
    res = run_sweep(shifted, y, 3, cfg)
    np.testing.assert_allclose(res.feature_stats["mean"], x["train"].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.feature_stats["std"], x["train"].std(0), rtol=1e-5)
    # The same as standardising by hand with the training statistics and not standardising again.
    mean, std = x["train"].mean(0), x["train"].std(0)
    by_hand = run_sweep({k: (v - mean) / std for k, v in shifted.items()}, y, 3, SweepConfig(**{**cfg.__dict__, "standardize": False}))
    np.testing.assert_allclose(res.test_probs, by_hand.test_probs, atol=1e-5)
    assert by_hand.feature_stats is None


def test_a_constant_feature_is_centred_not_divided_by_zero():
    x = np.array([[1.0, 2.0], [1.0, 4.0], [1.0, 6.0]], np.float32)
    stats = feature_stats(x)
    assert stats["std"][0] == 1.0 and stats["mean"][0] == 1.0


def test_selection_by_loss_or_by_accuracy():
    loss, acc = np.array([0.9, 0.8, 0.8, 1.0]), np.array([0.5, 0.6, 0.7, 0.7])
    assert select_config({"loss": loss, "accuracy": acc}, "loss") == 1  # lowest loss, first of ties
    assert select_config({"loss": loss, "accuracy": acc}, "accuracy") == 2  # highest accuracy, ties to the lower loss


def offset_features(seed: int, sizes: dict, dim: int = 24):
    """Features with the demo cache's pathology: a large common offset (norm ~8.5) and a small
    per-dimension sd (~0.07) around weakly separated, anisotropic classes."""
    x, y = embedding_like(sizes, dim=dim, n_classes=6, spread=0.35, seed=seed)
    rng = np.random.default_rng(seed + 100)
    offset = rng.normal(size=dim)
    offset *= 8.5 / np.linalg.norm(offset)
    scale = 0.07 / x["train"].std()
    return {k: (offset + v * scale).astype(np.float32) for k, v in x.items()}, y


def tuned_logistic_regression(x, y, criterion: str) -> float:
    """Test accuracy of sklearn's LogisticRegression on standardised features, C chosen on val
    (``criterion`` "loss": lowest log-loss; "accuracy": highest accuracy, then lower log-loss)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x["train"])
    fits = [LogisticRegression(C=c, max_iter=10_000).fit(scaler.transform(x["train"]), y["train"])
            for c in np.logspace(-3, 3, 13)]
    val = [(m.score(scaler.transform(x["val"]), y["val"]), log_loss(y["val"], m.predict_proba(scaler.transform(x["val"]))))
           for m in fits]
    key = (lambda i: val[i][1]) if criterion == "loss" else (lambda i: (-val[i][0], val[i][1]))
    best = fits[min(range(len(fits)), key=key)]
    return best.score(scaler.transform(x["test"]), y["test"])


def _test_accuracy(res, y) -> float:
    return float(np.mean(res.test_probs[:, res.selected].argmax(-1) == y["test"]))


SIZES = {"train": 420, "val": 120, "test": 240}


def test_warm_started_linear_lanes_reach_the_cold_started_optimum_in_fewer_iterations():
    """The default L-BFGS sweep starts each lane from the solution at the next larger l2 (same
    seed). The linear objective is strictly convex: the same optimum as cold starts and as
    scikit-learn at C = 1/(l2 N), reached in fewer iterations."""
    from sklearn.linear_model import LogisticRegression

    x, y = clusters({"train": 90, "val": 30, "test": 30}, dim=6, n_classes=3, spread=0.7, seed=1)
    cfg = SweepConfig(l2s=(1e-4, 1e-3, 1e-2, 1e-1), seeds=(0, 2), standardize=False)
    warm = run_sweep(x, y, 3, cfg)
    cold = run_sweep(x, y, 3, dataclasses.replace(cfg, warm_start=False))
    assert warm.timings["warm_start_chains"] == 1 and cold.timings["warm_start_chains"] == 4
    np.testing.assert_allclose(warm.test_probs, cold.test_probs, atol=2e-3)
    np.testing.assert_array_equal(warm.best_epoch[:, 3], cold.best_epoch[:, 3])  # the largest l2 starts the chain, cold
    assert (warm.best_epoch[:, :3].sum(1) < cold.best_epoch[:, :3].sum(1)).all(), (warm.best_epoch, cold.best_epoch)
    for k, l2 in enumerate(cfg.l2s):
        ref = LogisticRegression(C=1 / (l2 * 90), tol=1e-10, max_iter=10_000).fit(x["train"], y["train"])
        np.testing.assert_allclose(warm.test_probs[:, k], np.broadcast_to(ref.predict_proba(x["test"]), warm.test_probs[:, k].shape),
                                   atol=2e-3)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_default_linear_probe_reaches_a_tuned_logistic_regression(seed):
    x, y = offset_features(seed, SIZES)
    assert 7.5 < np.linalg.norm(x["train"], axis=1).mean() < 9.5 and x["train"].std(0).mean() < 0.1
    for select in ("loss", "accuracy"):
        ref = tuned_logistic_regression(x, y, select)
        acc = _test_accuracy(run_sweep(x, y, 6, SweepConfig(seeds=(0,), select=select)), y)
        assert 0.3 < ref < 0.85, "the data should be neither trivial nor hopeless"
        assert acc >= ref - 0.02, (select, acc, ref)


@pytest.mark.slow  # compiling the sweep dominates (~100 s loaded); measured on the demo cache by benchmarks/probe_vs_logreg.py
def test_default_mlp_grid_reaches_a_tuned_logistic_regression_fast():
    """The MLP's default (skip MLP, l2 x l2_skip grid, L-BFGS with its stopping rule), at one small
    width and one seed (the slow test below runs the full default grid)."""
    x, y = offset_features(0, SIZES)
    ref = tuned_logistic_regression(x, y, "loss")
    acc = _test_accuracy(run_sweep(x, y, 6, SweepConfig(method="mlp", hiddens=(32,), seeds=(0,))), y)
    assert acc >= ref - 0.03, (acc, ref)


@pytest.mark.slow
def test_default_mlp_probe_reaches_a_tuned_logistic_regression():
    x, y = offset_features(0, SIZES)
    ref = tuned_logistic_regression(x, y, "loss")
    res = run_sweep(x, y, 6, SweepConfig(method="mlp"))
    accs = (res.test_probs[:, res.selected].argmax(-1) == y["test"]).mean(-1)
    assert accs.mean() >= ref - 0.03, (accs, ref)


def test_sequential_lanes_equal_the_vmapped_sweep(small):
    """Large L-BFGS sweeps run their lanes one after another (vmapped, each lane would hold copies
    of the training features); each lane is the same probe either way."""
    x, y = small
    recipe = train.Recipe(n_classes=3, solver="lbfgs", max_iter=40)
    hyper = train.Hyper(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2, jnp.int32), jnp.array([1e-3, 1e-1], jnp.float32))
    keys, data = train.seed_keys([0, 5]), _data(x, y)
    fused = jax.device_get(train.train_sweep(keys, hyper, data, recipe))
    one_by_one = jax.device_get(train.train_sweep(keys, hyper, data, dataclasses.replace(recipe, sequential=True)))
    for field in ("test_probs", "val_probs", "val_loss", "train_loss", "best_val_loss"):
        np.testing.assert_allclose(getattr(one_by_one, field), getattr(fused, field), rtol=1e-4, atol=1e-5, err_msg=field)
    assert np.abs(one_by_one.best_epoch - fused.best_epoch).max() <= 1  # float noise may shift the last test


def test_the_sweeps_lbfgs_lanes_equal_the_vmapped_program_and_the_plain_loop(small):
    """run_sweep runs L-BFGS lanes one per device at a time (``train.train_lanes``); each lane is
    the vmapped ``train_sweep``'s lane and the plain loop's probe, in the (seed, config) order."""
    x, y = small
    cfg = SweepConfig(l2s=(1e-3, 1e-1), seeds=(0, 5), max_iter=30, standardize=False, warm_start=False)
    res = run_sweep(x, y, 3, cfg)
    assert res.timings["sequential_lanes"] and res.timings["chunks"] == 4 // res.timings["devices"]
    recipe = train.Recipe(n_classes=3, solver="lbfgs", max_iter=30)
    hyper = train.Hyper(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2, jnp.int32), jnp.array(cfg.l2s, jnp.float32))
    fused = jax.device_get(train.train_sweep(train.seed_keys(cfg.seeds), hyper, _data(x, y), recipe))
    for field in ("test_probs", "val_probs", "val_loss", "train_loss", "best_val_loss"):
        np.testing.assert_allclose(getattr(res, field), getattr(fused, field), rtol=1e-4, atol=1e-5, err_msg=field)
    assert np.abs(res.best_epoch - fused.best_epoch).max() <= 1  # float noise may shift the last test
    for i, seed in enumerate(cfg.seeds):
        for k, l2 in enumerate(cfg.l2s):
            probs, iterations = reference_lbfgs(jax.random.PRNGKey(seed), l2, 0, x, y, recipe)
            np.testing.assert_allclose(res.test_probs[i, k], probs, atol=2e-4)
            assert abs(int(res.best_epoch[i, k]) - iterations) <= 1


def test_the_sweeps_skip_mlp_lanes_equal_the_plain_loop(small):
    """The default MLP through run_sweep: lanes of two widths, each in its own width's program,
    each against the plain loop at its own width (from the initial weights drawn at the wider)."""
    x, y = small
    cfg = SweepConfig(method="mlp", hiddens=(3, 6), l2s=(1e-2,), l2s_skip=(1e-1,), seeds=(4,), max_iter=20,
                      ftol=1e-3, standardize=False, warm_start=False)
    res = run_sweep(x, y, 3, cfg)
    assert res.timings["lane_programs"] == 2  # one program per width, neither padded
    recipe = train.Recipe(n_classes=3, max_hidden=6, solver="lbfgs", max_iter=20, skip=True, ftol=1e-3)
    for k, hidden in enumerate(cfg.hiddens):
        probs, iterations = reference_lbfgs(jax.random.PRNGKey(4), 1e-2, hidden, x, y, recipe, 1e-1)
        np.testing.assert_allclose(res.test_probs[0, k], probs, atol=1e-3)
        assert int(res.best_epoch[0, k]) == iterations


@pytest.mark.parametrize("skip", [True, False], ids=["skip-mlp", "mlp"])
def test_a_lane_in_its_own_widths_program_equals_the_padded_lane(small, skip):
    """run_sweep gives each hidden width its own L-BFGS program (``draw_hidden``: the initial
    weights drawn at the widest, then cut). A lane there starts from exactly the padded program's
    weights and takes the same steps: the padded units are zeros, so only the order of float32
    sums differs (relative ~1e-7 per sum), which a dozen well-conditioned iterations keep far
    below the tolerances here (probabilities 1e-4, objective rtol 1e-5)."""
    x, y = small
    padded = train.Recipe(n_classes=3, max_hidden=7, solver="lbfgs", max_iter=12, skip=skip, ftol=1e-4 if skip else 0.0)
    own = dataclasses.replace(padded, max_hidden=4, draw_hidden=7)
    key, hidden = jax.random.PRNGKey(4), jnp.int32(4)
    p_pad, p_own = train.init_params(key, 8, padded, hidden), train.init_params(key, 8, own, hidden)
    np.testing.assert_array_equal(p_own["w1"], p_pad["w1"][:4])
    np.testing.assert_array_equal(p_own["w2"], p_pad["w2"][:, :4])
    np.testing.assert_array_equal(p_own["b1"], p_pad["b1"][:4])
    assert not np.asarray(p_pad["w1"][4:]).any()  # the padded program's extra units are zero
    hyper = train.Hyper(jnp.float32(0), jnp.float32(0), hidden, jnp.float32(1e-2), None, jnp.float32(1e-1) if skip else None)
    lane = jax.jit(lambda recipe: train.lbfgs_lane(key, hyper, _data(x, y), recipe)[0], static_argnums=0)
    a, b = jax.device_get(lane(own)), jax.device_get(lane(padded))
    assert int(a.best_epoch) == int(b.best_epoch) > 3
    np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-5)
    np.testing.assert_allclose(a.test_probs, b.test_probs, atol=1e-4)
    np.testing.assert_allclose(a.val_probs, b.val_probs, atol=1e-4)


def test_the_validation_loss_every_k_iterations_changes_nothing_else(small):
    """``Recipe.val_every`` (the MLP's default 10): the validation loss is evaluated after every
    k-th iteration and at the lane's last, NaN between; the optimisation never reads it, so the
    iterations, the training curve and the outputs are those of evaluating it every iteration."""
    x, y = small
    every = train.Recipe(n_classes=3, max_hidden=5, solver="lbfgs", max_iter=40, skip=True, ftol=1e-4)
    hyper = train.Hyper(jnp.float32(0), jnp.float32(0), jnp.int32(5), jnp.float32(1e-2), None, jnp.float32(1e-1))
    lane = jax.jit(lambda recipe: train.lbfgs_lane(jax.random.PRNGKey(4), hyper, _data(x, y), recipe)[0], static_argnums=0)
    a, b = jax.device_get(lane(every)), jax.device_get(lane(dataclasses.replace(every, val_every=3)))
    n = int(a.best_epoch)
    assert n == int(b.best_epoch) and 7 < n < every.max_iter and n % 3 != 0  # the last iteration is off the grid
    np.testing.assert_allclose(b.train_loss, a.train_loss, rtol=1e-5)
    for field in ("val_probs", "test_probs", "best_val_loss"):
        np.testing.assert_allclose(getattr(b, field), getattr(a, field), rtol=1e-5, atol=1e-6, err_msg=field)
    evaluated = np.isfinite(b.val_loss[:n])
    expected = (np.arange(1, n + 1) % 3 == 0) | (np.arange(1, n + 1) == n)
    np.testing.assert_array_equal(evaluated, expected)
    np.testing.assert_allclose(b.val_loss[:n][evaluated], a.val_loss[:n][evaluated], rtol=1e-5)
    np.testing.assert_allclose(b.val_loss[n:], a.val_loss[n - 1], rtol=1e-5)  # after the stop: the last, repeated
    assert b.best_val_loss == b.val_loss[-1]


def test_the_skip_mlps_lanes_start_from_the_linear_probe(small):
    """The default skip-MLP sweep (``--warm-start``): every lane alone, starting W0 and b2 from the
    linear probe's solution at its l2_skip and W1, b1, W2 from its seed's initialisation (no chain
    along l2: from a large l2 the branch died and stayed dead). Against the plain loop: the linear
    probe solved from the first seed's initialisation with the linear recipe, then each lane from
    the start described, at its own width."""
    x, y = small
    cfg = SweepConfig(method="mlp", hiddens=(3,), l2s=(1e-2, 1.0), l2s_skip=(1e-1, 1e-3), seeds=(4, 7), max_iter=20,
                      ftol=1e-3, standardize=False)
    res = run_sweep(x, y, 3, cfg)
    assert res.timings["warm_start_chains"] == 4 and res.timings["linear_start_lanes"] == 2
    linear = train.Recipe(n_classes=3, solver="lbfgs", max_iter=1000)  # the linear probe's defaults (ftol 0)
    mlp = train.Recipe(n_classes=3, max_hidden=3, solver="lbfgs", max_iter=20, skip=True, ftol=1e-3)
    data = lambda l2, l2_skip: (jnp.asarray(x["train"]), jnp.asarray(y["train"]), jnp.float32(l2), jnp.float32(l2_skip))  # noqa: E731
    configs = cfg.configurations()
    for l2_skip in cfg.l2s_skip:
        init = train.init_params(jax.random.split(jax.random.PRNGKey(4))[0], 8, linear, jnp.int32(0))
        solved, _ = plain_lbfgs(_objective, init, data(l2_skip, 0.0), linear)  # "w", "b": the linear probe
        for i, seed in enumerate(cfg.seeds):
            start = dict(train.init_params(jax.random.split(jax.random.PRNGKey(seed))[0], 8, mlp, jnp.int32(3)),
                         w0=solved["w"], b2=solved["b"])
            for l2 in cfg.l2s:  # each lane from the same start
                k = next(k for k, c in enumerate(configs) if c["l2"] == l2 and c["l2_skip"] == l2_skip)
                params, iterations = plain_lbfgs(_objective, start, data(l2, l2_skip), mlp)
                probs = np.asarray(jax.nn.softmax(_forward(params, x["test"])))
                np.testing.assert_allclose(res.test_probs[i, k], probs, atol=1e-3, err_msg=f"{seed} {l2} {l2_skip}")
                assert abs(int(res.best_epoch[i, k]) - iterations) <= 1  # float noise may shift the last test
    # The start is not the cold one: started cold, the lanes end elsewhere.
    cold = run_sweep(x, y, 3, dataclasses.replace(cfg, warm_start=False))
    assert np.abs(cold.test_probs - res.test_probs).max() > 1e-2

def test_the_optax_engine_kept_for_benchmarks_reaches_the_same_optimum(small, monkeypatch):
    """``CXRFAIR_LBFGS_ENGINE=optax`` (``train.ENGINE``: the previous engine, benchmarks' baseline):
    a linear lane (strictly convex) reaches the lean engine's optimum, both stopping at gtol."""
    x, y = small
    recipe = train.Recipe(n_classes=3, solver="lbfgs", max_iter=200)
    hyper = train.Hyper(jnp.float32(0), jnp.float32(0), jnp.int32(0), jnp.float32(1e-2))

    def lane():  # a fresh function each time: the engine is read when the lane is traced
        return jax.device_get(jax.jit(lambda: train.lbfgs_lane(jax.random.PRNGKey(0), hyper, _data(x, y), recipe)[0])())

    lean = lane()
    monkeypatch.setattr(train, "ENGINE", "optax")
    old = lane()
    assert 0 < int(old.best_epoch) < recipe.max_iter and 0 < int(lean.best_epoch) < recipe.max_iter
    assert not np.array_equal(old.train_loss, lean.train_loss)  # two engines ran: different paths
    np.testing.assert_allclose(old.test_probs, lean.test_probs, atol=1e-3)
    np.testing.assert_allclose(old.train_loss[-1], lean.train_loss[-1], rtol=1e-5)


def _xor(seed: int, sizes: dict, dim: int = 8):
    """A planted non-linear signal: the label is the XOR of the signs of features 0 and 1, the
    other features noise. No linear probe beats chance; a one-hidden-layer ReLU MLP can."""
    rng = np.random.default_rng(seed)
    x = {s: rng.normal(size=(n, dim)).astype(np.float32) for s, n in sizes.items()}
    return x, {s: ((a[:, 0] > 0) ^ (a[:, 1] > 0)).astype(np.int32) for s, a in x.items()}


@pytest.mark.parametrize("default", [True, False])
def test_the_skip_mlps_relu_branch_is_alive_where_it_pays(monkeypatch, default):
    """On a planted XOR signal the skip MLP at the small l2 must beat the linear probe on
    validation, with its branch clearly on (||W2||_F read from the lanes' final parameters). By
    default every lane starts its branch from its seed's initialisation (``WARM_PATHS``). The
    chains before issue 27's fourth round (``default`` False: along l2 from the largest down, W0,
    b2 of the first lane from the linear probe) fail: l2 = 1 drives W1, W2 to ~0, a stationary
    point, and the small l2 inherits a dead branch, a linear probe in disguise. They are run here
    too and must fail the same checks, so the data is known to tell the two apart."""
    from cxrfair.probe import sweep

    if not default:
        monkeypatch.setitem(sweep.WARM_PATHS, "mlp+skip", ("l2",))
    norms = []  # (l2, ||W2||_F) of each MLP lane, from its program's final parameters
    program_of = sweep._lane_program

    def recording(recipe, shapes, mesh):
        program = program_of(recipe, shapes, mesh)
        if recipe.max_hidden == 0:
            return program

        def run(keys, hyper, data, start, warm):
            out, params = program(keys, hyper, data, start, warm)
            norms.extend(zip(np.asarray(hyper.l2), np.linalg.norm(np.asarray(params["w2"]), axis=(1, 2))))
            return out, params
        return run

    monkeypatch.setattr(sweep, "_lane_program", recording)
    x, y = _xor(0, {"train": 300, "val": 150, "test": 150})
    cfg = SweepConfig(method="mlp", hiddens=(16,), l2s=(1e-2, 1.0), l2s_skip=(1e-3,), seeds=(0,))
    res = run_sweep(x, y, 2, cfg)
    linear = run_sweep(x, y, 2, SweepConfig(seeds=(0,)))
    val_acc = (res.val_probs.argmax(-1) == y["val"]).mean(-1)[0]  # (K,)
    linear_val = (linear.val_probs[0, linear.selected].argmax(-1) == y["val"]).mean()
    small = next(k for k, c in enumerate(res.configs) if c["l2"] == 1e-2)
    w2_small = [w for l2, w in norms if np.isclose(l2, 1e-2)]
    assert len(w2_small) == 1 and len(norms) == 2
    assert linear_val < 0.65, "the planted signal must be invisible to a linear probe"
    alive = val_acc[small] > linear_val + 0.2 and w2_small[0] > 0.5
    assert alive == default, (default, val_acc, linear_val, norms)
    if default:  # selected on validation, and it generalises
        assert res.selected == small and _test_accuracy(res, y) > 0.8


def test_an_unknown_lbfgs_engine_is_refused(tmp_path):
    """``CXRFAIR_LBFGS_ENGINE`` other than lean / optax: one line naming the variable and the fix, exit 1,
    nothing written (read at import, in a fresh process)."""
    import os
    import subprocess
    import sys

    from tests.probe.synth import make_cache

    cache = make_cache(tmp_path / "c.h5")[0]
    env = {**os.environ, "CXRFAIR_LBFGS_ENGINE": "zoom", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "cxrfair", "probe", "linear", "--cache", str(cache), "--out",
                          str(tmp_path / "runs")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "CXRFAIR_LBFGS_ENGINE='zoom'" in out.stderr + out.stdout
    assert not (tmp_path / "runs").exists()
