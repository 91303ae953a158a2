"""Each mitigation's pure function against a slow reference written here (NumPy, POT, scikit-learn)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrfair.probe import objectives as ob


def _ctx(w, cell, group, strength=0.0, step=0):
    return ob.Context(jnp.asarray(w, jnp.float32), jnp.asarray(cell, jnp.int32), jnp.asarray(group, jnp.int32),
                      jnp.asarray(strength, jnp.float32), jnp.asarray(step, jnp.int32))


# ---------------------------------------------------------------- reweight


def test_reweight_weights_match_a_hand_count():
    cells = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 3])  # cell sizes 6, 2, 3, 1
    counts = np.bincount(cells)
    for s in (0.0, 0.5, 1.0):
        w = np.asarray(ob.cell_weights(jnp.asarray(counts), s))[cells]
        by_hand = np.array([(cells == c).sum() ** -s for c in cells])
        np.testing.assert_allclose(w, by_hand / by_hand.mean(), rtol=1e-6)  # mean 1 over the training rows
        assert w.mean() == pytest.approx(1.0, abs=1e-6)
    equal = np.asarray(ob.cell_weights(jnp.asarray(counts), 1.0))[cells]
    assert np.allclose([equal[cells == c].sum() for c in range(4)], len(cells) / 4)  # every cell counts equally
    assert np.asarray(ob.cell_weights(jnp.asarray([3, 0, 2]), 1.0))[1] == 0  # an empty cell has no weight


def test_reweight_loss_is_the_weighted_mean_over_real_rows():
    losses = jnp.array([1.0, 2.0, 3.0, 4.0])
    spec = ob.Spec("reweight", 2, (3, 1))
    loss, _ = ob.reweight(losses, _ctx([1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 1, 1], strength=1.0), (), spec)
    w = np.array([1 / 3, 1 / 3, 1.0]) * 4 / 2  # n^-1, normalised to mean 1 over the 4 training rows
    assert float(loss) == pytest.approx(np.sum(w * [1.0, 2.0, 3.0]) / 3, rel=1e-6)


# ---------------------------------------------------------------- groupdro


def groupdro_numpy(batches, counts, eta):
    """Sagawa et al.'s loop, directly: per batch, each cell's mean loss, q *= exp(eta L), normalise."""
    q = (counts > 0) / (counts > 0).sum()
    out = []
    for losses, cells in batches:
        cell_loss = np.zeros(len(counts))
        for c in range(len(counts)):
            if (cells == c).any():
                cell_loss[c] = losses[cells == c].mean()
        q = q * np.exp(eta * cell_loss)
        q = q / q.sum()
        out.append((q.copy(), float(q @ cell_loss)))
    return out


def test_groupdro_q_update_matches_a_numpy_loop():
    rng = np.random.default_rng(0)
    counts = np.array([5, 0, 3, 9])  # cell 1 has no training rows: q stays 0 there
    spec = ob.Spec("groupdro", 2, tuple(int(c) for c in counts))
    batches = [(rng.uniform(0, 3, size=8), rng.choice([0, 2, 3], size=8)) for _ in range(6)]
    ref = groupdro_numpy(batches, counts, eta=0.7)
    q = ob.groupdro_init(spec)
    for (losses, cells), (q_ref, loss_ref) in zip(batches, ref):
        loss, q = ob.groupdro(jnp.asarray(losses, jnp.float32), _ctx(np.ones(8), cells, cells // 2, 0.7), q, spec)
        np.testing.assert_allclose(np.asarray(q), q_ref, rtol=1e-5, atol=1e-7)
        assert float(loss) == pytest.approx(loss_ref, rel=1e-5)
    assert np.asarray(q)[1] == 0.0


def test_groupdro_ignores_padding_and_does_not_differentiate_q():
    spec = ob.Spec("groupdro", 2, (2, 2))
    losses = jnp.array([1.0, 3.0, 100.0])
    ctx = _ctx([1, 1, 0], [0, 1, 1], [0, 1, 1], 1.0)
    grad = jax.grad(lambda l: ob.groupdro(l, ctx, ob.groupdro_init(spec), spec)[0])(losses)
    q = np.exp([1.0, 3.0]) / np.exp([1.0, 3.0]).sum()
    np.testing.assert_allclose(np.asarray(grad), [q[0], q[1], 0.0], rtol=1e-5)  # d/dl of q·L with q held


# ---------------------------------------------------------------- fairot: Sinkhorn divergence


def _entropic_ot_pot(x, y, eps):
    """min_P <P, C> + eps KL(P | a⊗b) from POT's converged log-domain plan (uniform weights)."""
    ot = pytest.importorskip("ot")
    a, b = np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y))
    cost = (x[:, None] - y[None, :]) ** 2
    # A sample against itself converges slowly (marginal error ~5e-8 after 2,000 iterations, still
    # there after 20,000); 4,000 moves the value by < 1e-7, far inside the tolerances below.
    plan = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=4_000, stopThr=1e-10)
    kl = np.sum(np.where(plan > 0, plan * np.log(np.where(plan > 0, plan, 1) / np.outer(a, b)), 0))
    return np.sum(plan * cost) + eps * kl


_ot, _div = jax.jit(ob.sinkhorn_ot), jax.jit(ob.sinkhorn_divergence)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("n, m, seed", [(7, 9, 0), pytest.param(20, 5, 1, marks=pytest.mark.slow),
                                        pytest.param(16, 16, 2, marks=pytest.mark.slow)])
def test_sinkhorn_divergence_matches_pot(n, m, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(size=n), rng.uniform(size=m) ** 2
    a, b = jnp.full(n, 1 / n), jnp.full(m, 1 / m)
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    eps = ob.SINKHORN_EPS
    assert float(_ot(xj, a, yj, b)) == pytest.approx(_entropic_ot_pot(x, y, eps), rel=1e-3, abs=1e-6)
    ref = _entropic_ot_pot(x, y, eps) - 0.5 * _entropic_ot_pot(x, x, eps) - 0.5 * _entropic_ot_pot(y, y, eps)
    assert float(_div(xj, a, yj, b)) == pytest.approx(ref, rel=2e-3, abs=2e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fairot_penalty_in_float32_matches_pot_on_the_slowest_samples_and_groups_far_apart():
    # The cases the fixed iteration counts were chosen on (benchmarks/RESULTS.md, "fairot probe"):
    # scores piled at both ends (arcsine), a tight cluster near 1, and two groups at opposite ends
    # (the cross problem moves mass a whole unit: exponents near the float32 limits).
    rng = np.random.default_rng(7)
    samples = [rng.beta(0.5, 0.5, 40), 1 - rng.exponential(0.02, 40).clip(0, 1),
               np.r_[rng.uniform(0, 0.05, 20), rng.uniform(0.95, 1, 20)]]
    group = np.r_[np.zeros(20, int), np.ones(20, int)]
    penalty = jax.jit(jax.value_and_grad(ob.fairot_penalty), static_argnums=2)
    for scores in samples:
        ctx = _ctx(np.ones(40), np.zeros(40), group)
        got, grad = penalty(jnp.asarray(scores, jnp.float32), ctx, 2)
        eps = ob.SINKHORN_EPS
        want = sum(_entropic_ot_pot(scores, scores[group == g], eps) - 0.5 * _entropic_ot_pot(scores, scores, eps)
                   - 0.5 * _entropic_ot_pot(scores[group == g], scores[group == g], eps) for g in (0, 1))
        assert float(got) == pytest.approx(want, rel=2e-3, abs=2e-6)
        assert np.isfinite(np.asarray(grad)).all()


def test_sinkhorn_weights_select_rows_and_identical_samples_have_zero_divergence():
    x = jnp.array([0.1, 0.5, 0.9, 0.3])
    full = jnp.full(4, 0.25)
    assert abs(float(_div(x, full, x, full))) < 1e-6
    # Weight 0 removes a point: the same as the divergence between the remaining points.
    half = jnp.array([0.5, 0.5, 0.0, 0.0])
    direct = _div(x, full, x[:2], jnp.array([0.5, 0.5]))
    assert float(_div(x, full, x, half)) == pytest.approx(float(direct), rel=1e-4)


def test_fairot_penalty_is_zero_when_groups_score_alike_and_its_gradient_is_finite():
    groups = _ctx(np.ones(6), np.zeros(6), [0, 0, 1, 1, 2, 2])
    lone = _ctx([1, 1, 1, 1, 1, 0], np.zeros(6), [0, 0, 0, 0, 0, 1])  # group 1's only row is padding: skipped
    penalty = jax.jit(ob.fairot_penalty, static_argnums=2)
    alike = jnp.array([0.2, 0.8, 0.2, 0.8, 0.2, 0.8])  # every group scores as the batch does
    apart = jnp.array([0.2, 0.2, 0.8, 0.8, 0.5, 0.5])
    assert float(penalty(alike, groups, 3)) == pytest.approx(0.0, abs=1e-6)
    assert float(penalty(apart, groups, 3)) > 1e-3
    assert float(penalty(jnp.array([0.2, 0.2, 0.2, 0.2, 0.2, 0.9]), lone, 2)) == pytest.approx(0.0, abs=1e-6)
    grad = jax.grad(lambda s: ob.fairot_penalty(s, groups, 3))(apart)
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0
    # A batch of padding only (every problem without points): 0, and a zero gradient, not NaN.
    empty = _ctx(np.zeros(6), np.zeros(6), [0, 0, 0, 1, 1, 1])
    value, grad = jax.value_and_grad(lambda s: ob.fairot_penalty(s, empty, 2))(apart)
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)


def _central_difference(fn, x: np.ndarray, h: float) -> np.ndarray:
    """(n,) central finite differences of the scalar fn at x (n,), one coordinate at a time."""
    out = np.zeros(len(x))
    for i in range(len(x)):
        up, dn = x.copy(), x.copy()
        up[i] += h
        dn[i] -= h
        out[i] = (float(fn(jnp.asarray(up, jnp.float32))) - float(fn(jnp.asarray(dn, jnp.float32)))) / (2 * h)
    return out


# A gradient twice the finite difference (both extrapolated potentials differentiated) fails these
# by a factor 2; float32 Sinkhorn values move by ~1e-8 between nearby inputs, so h = 1e-3 keeps the
# differences' noise near 1e-5 against gradients of 1e-3..1e-1 (the tolerances below).
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sinkhorn_gradient_equals_a_finite_difference_of_its_value(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(size=7), rng.uniform(size=5) ** 2
    a, b = jnp.full(7, 1 / 7), jnp.full(5, 1 / 5)
    yj = jnp.asarray(y, jnp.float32)
    for value in (lambda v: ob.sinkhorn_ot(v, a, yj, b), lambda v: ob.sinkhorn_divergence(v, a, yj, b)):
        fn = jax.jit(value)
        grad = np.asarray(jax.jit(jax.grad(value))(jnp.asarray(x, jnp.float32)))
        fd = _central_difference(fn, x, 1e-3)
        np.testing.assert_allclose(grad, fd, rtol=2e-2, atol=5e-5)
        assert np.abs(fd).max() > 1e-3  # the comparison is not between zeros


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_fairot_term_gradient_equals_a_finite_difference_of_the_loss_it_reports(seed):
    # The whole term the loop differentiates: mean loss + strength * Σ_g S_eps on exp(-loss), with
    # a padding row and a group of one (skipped); its gradient in the per-example losses.
    rng = np.random.default_rng(10 + seed)
    losses = rng.uniform(0.05, 2.0, size=8)
    ctx = _ctx([1, 1, 1, 1, 1, 1, 1, 0], np.zeros(8), [0, 0, 0, 1, 1, 1, 2, 2], strength=3.0)
    spec = ob.Spec("fairot", n_groups=3)
    value = lambda v: ob.fairot(v, ctx, (), spec)[0]  # noqa: E731
    grad = np.asarray(jax.jit(jax.grad(value))(jnp.asarray(losses, jnp.float32)))
    fd = _central_difference(jax.jit(value), losses, 1e-3)
    np.testing.assert_allclose(grad, fd, rtol=2e-2, atol=5e-5)
    assert grad[-1] == 0.0  # padding: no gradient
    # The penalty's own part is far from zero here, so a doubled penalty gradient could not pass.
    pen = lambda v: ob.fairot_penalty(jnp.exp(-v), ctx, 3)  # noqa: E731
    g_pen = np.asarray(jax.grad(pen)(jnp.asarray(losses, jnp.float32)))
    assert np.abs(3.0 * g_pen).max() > 0.1 * np.abs(grad).max()
    np.testing.assert_allclose(g_pen, _central_difference(jax.jit(pen), losses, 1e-3), rtol=2e-2, atol=5e-5)


def test_fairot_penalty_batches_every_group_into_one_solve_and_matches_pot_per_group():
    # The batched path (2G + 1 problems on one shared cost) against POT, one group at a time:
    # S(batch, group g) from three converged POT problems, groups with < 2 rows skipped.
    rng = np.random.default_rng(3)
    scores = rng.beta(2, 2, size=24)
    group = np.array([0] * 10 + [1] * 13 + [2])  # group 2 has one row: skipped
    w = np.ones(24)
    w[-3:-1] = 0  # two padding rows of group 1
    ctx = _ctx(w, np.zeros(24), group)
    got = float(jax.jit(ob.fairot_penalty, static_argnums=2)(jnp.asarray(scores, jnp.float32), ctx, 3))
    batch = scores[w > 0]
    want = 0.0
    for g in (0, 1):
        mine = scores[(group == g) & (w > 0)]
        want += (_entropic_ot_pot(batch, mine, ob.SINKHORN_EPS) - 0.5 * _entropic_ot_pot(batch, batch, ob.SINKHORN_EPS)
                 - 0.5 * _entropic_ot_pot(mine, mine, ob.SINKHORN_EPS))
    assert want > 1e-4  # the groups do differ
    assert got == pytest.approx(want, rel=2e-3, abs=2e-6)


def test_packed_problems_equal_each_problem_solved_alone_values_and_gradients():
    # The fast path fairot_penalty takes: K problems with shared rows and cost packed into one
    # kernel, each column in one problem. Against each problem solved alone on its own columns
    # (sinkhorn_value, one problem): values, and the gradient in the cost of a weighted sum of
    # them. Problem 2 has no columns (a group absent from the batch) and column 5 is padding:
    # both must leave the others untouched and everything finite.
    rng = np.random.default_rng(4)
    x = rng.uniform(size=9)
    a = np.r_[np.full(8, 1 / 8), 0.0]  # the last row is padding
    label = np.array([0, 1, 0, 0, 1, 1, 3, 0, 3])  # problems 0, 1, 3 (2 has no column)
    b = np.zeros(9)
    for k in (0, 1, 3):
        b[label == k] = 1.0
    b[5] = 0.0  # padding column
    for k in (0, 1, 3):
        b[label == k] /= b[label == k].sum()
    cost = jnp.asarray((x[:, None] - x[None, :]) ** 2, jnp.float32)
    onehot = jax.nn.one_hot(label, 4, dtype=jnp.float32)
    ct = jnp.array([1.0, -2.0, 0.0, 0.5])  # a problem without columns gets cotangent 0 (the penalty masks it)
    packed = lambda c: ob.packed_sinkhorn_value(c, jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), onehot)  # noqa: E731
    values = np.asarray(jax.jit(packed)(cost))
    grad = np.asarray(jax.jit(jax.grad(lambda c: jnp.dot(ct, packed(c))))(cost))
    assert np.isfinite(values).all() and np.isfinite(grad).all()
    want_grad = np.zeros((9, 9))
    for k in (0, 1, 3):
        cols = np.flatnonzero((label == k) & (b > 0))
        alone = lambda c: ob.sinkhorn_value(c[:, cols], jnp.asarray(a, jnp.float32), jnp.asarray(b[cols], jnp.float32))  # noqa: E731, B023
        assert values[k] == pytest.approx(float(alone(cost)), rel=1e-5, abs=1e-7)
        want_grad += float(ct[k]) * np.asarray(jax.grad(alone)(cost))
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6 * np.abs(want_grad).max())
    assert np.abs(want_grad).max() > 1e-2  # the comparison is not between zeros


@pytest.mark.parametrize("seed", [0, 1])
def test_fairot_penalty_gradient_equals_a_float64_central_difference(seed):
    # The batched solve's custom gradient (the plan of the last half-step, summed over the 2G + 1
    # problems sharing the cost) against central differences of its own value, in float64 so the
    # difference is exact to ~1e-9 (a doubled or missing term is off by far more).
    rng = np.random.default_rng(20 + seed)
    with jax.enable_x64(True):
        scores = rng.uniform(0.05, 0.95, size=12)
        ctx = ob.Context(jnp.asarray(np.r_[np.ones(11), 0.0]), jnp.zeros(12, jnp.int32),
                         jnp.asarray([0] * 7 + [1] * 4 + [1]), jnp.float64(1.0), jnp.int32(0))
        value = jax.jit(lambda s: ob.fairot_penalty(s, ctx, 2))
        grad = np.asarray(jax.jit(jax.grad(lambda s: ob.fairot_penalty(s, ctx, 2)))(jnp.asarray(scores)))
        h, fd = 1e-6, np.zeros(12)
        for i in range(12):
            up, dn = scores.copy(), scores.copy()
            up[i] += h
            dn[i] -= h
            fd[i] = (float(value(jnp.asarray(up))) - float(value(jnp.asarray(dn)))) / (2 * h)
    assert grad.dtype == np.float64 and grad[-1] == 0.0  # padding: no gradient
    assert np.abs(fd).max() > 1e-3
    # The solve stops after a fixed count (no tolerance loop), so the last half-step's plan is
    # converged to ~1e-4 of the largest entry, not to float64's last bits.
    np.testing.assert_allclose(grad, fd, rtol=2e-3, atol=1e-3 * np.abs(fd).max())


def test_sinkhorn_value_is_the_converged_value_whatever_the_iteration_count_beyond_the_default():
    # No warm start: the value depends only on the inputs (not on earlier steps), and the default
    # iteration count is already converged to the tolerance the POT tests use.
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.uniform(size=20), jnp.float32)
    a = jnp.full(20, 1 / 20)
    cost = (x[:, None] - x[None, :]) ** 2
    default = float(jax.jit(ob.sinkhorn_value)(cost, a, a))
    longer = float(jax.jit(ob.sinkhorn_value, static_argnums=(3, 4))(cost, a, a, ob.SINKHORN_EPS, 4 * ob.SINKHORN.iterations))
    assert default == pytest.approx(longer, rel=1e-3)


# ---------------------------------------------------------------- adversarial


def test_gradient_reversal_is_identity_forward_and_minus_scale_backward():
    x = jnp.array([1.0, -2.0])
    assert np.array_equal(np.asarray(ob.reverse_gradient(x, 0.3)), np.asarray(x))
    grad = jax.grad(lambda v: jnp.sum(ob.reverse_gradient(v, 0.3) * jnp.array([2.0, 5.0])))(x)
    np.testing.assert_allclose(np.asarray(grad), [-0.6, -1.5], rtol=1e-6)
    assert float(ob.grl_ramp(0.0)) == 0.0 and float(ob.grl_ramp(1.0)) == pytest.approx(2 / (1 + np.exp(-10)) - 1)


def _linear_forward(p, x):
    z = p["w"] @ x.T + p["b"][:, None]
    return z, z


def _ce(p, x, y):
    z = _linear_forward(p, x)[0]
    return jax.nn.logsumexp(z, axis=0) - z[y, jnp.arange(len(y))]


def test_projection_removes_the_adversarys_direction_from_the_probe_gradient():
    """Zhang et al.: g = ∇L_P − proj_{∇L_A} ∇L_P − λ∇L_A, so <g + λ∇L_A, ∇L_A> = 0 over all parameters."""
    rng = np.random.default_rng(0)
    x, y, g = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32), jnp.asarray(rng.integers(0, 3, 12)), rng.integers(0, 2, 12)
    probe = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32), "b": jnp.zeros(3)}
    spec = ob.Spec("adversarial", 2, (3, 3, 3, 3, 0, 0), "projection", 10)
    params = {**probe, **ob.init_extra_params(jax.random.PRNGKey(0), spec, 3, 3)}
    ctx = _ctx(np.ones(12), np.zeros(12), g, strength=0.5)
    (_, _), grads = ob.value_and_grad(spec, _ce, _linear_forward, params, x, y, ctx, ())

    def adv(p):
        z = _linear_forward(p, x)[0]
        return ob.adversary_loss(params["adv"], jnp.concatenate([jax.nn.softmax(z, axis=0), jax.nn.one_hot(y, 3, axis=0)]), ctx)

    g_a = jax.grad(adv)(probe)
    resid = sum(float(jnp.vdot(grads[k] + 0.5 * g_a[k], g_a[k])) for k in probe)
    scale = sum(float(jnp.vdot(g_a[k], g_a[k])) for k in probe)
    assert abs(resid) < 1e-4 * max(scale, 1e-6)
    assert set(grads) == {"w", "b", "adv"}


def test_grl_sends_the_adversarys_gradient_back_reversed():
    rng = np.random.default_rng(1)
    x, y, g = jnp.asarray(rng.normal(size=(10, 4)), jnp.float32), jnp.asarray(rng.integers(0, 2, 10)), rng.integers(0, 2, 10)
    probe = {"w": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32), "b": jnp.zeros(2)}
    spec = ob.Spec("adversarial", 2, (2, 3, 2, 3), "grl", total_steps=10)
    params = {**probe, **ob.init_extra_params(jax.random.PRNGKey(3), spec, 2, 2)}
    ctx = _ctx(np.ones(10), np.zeros(10), g, strength=2.0, step=5)
    _, grads = ob.value_and_grad(spec, _ce, _linear_forward, params, x, y, ctx, ())
    lam = 2.0 * float(ob.grl_ramp(0.5))
    g_task = jax.grad(lambda p: jnp.mean(_ce(p, x, y)))(probe)
    g_adv = jax.grad(lambda p: ob.adversary_loss(params["adv"], _linear_forward(p, x)[1], ctx))(probe)
    for k in probe:
        np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(g_task[k] - lam * g_adv[k]), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- erase (LEACE)


def test_leace_leaves_no_linearly_decodable_attribute_on_train():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    n, d = 1500, 6
    groups = rng.integers(0, 3, n)
    x = rng.normal(size=(n, d)) + np.eye(3, d)[groups] * 2.5 + 4.0  # the group shifts three directions
    raw = LogisticRegression(max_iter=2000).fit(x, groups)
    assert raw.score(x, groups) > 0.85
    eraser = ob.leace_fit(x, groups, 3)
    erased = ob.leace_apply(eraser, x)
    clf = LogisticRegression(max_iter=2000).fit(erased, groups)
    chance = np.bincount(groups).max() / n
    assert clf.score(erased, groups) <= chance + 0.02  # no better than always guessing the largest group
    for k in range(3):
        assert abs(roc_auc_score(groups == k, clf.predict_proba(erased)[:, k]) - 0.5) < 0.05
    # No direction of the erased features correlates with the group (LEACE's guarantee).
    cross = (erased - erased.mean(0)).T @ (np.eye(3)[groups] - np.eye(3)[groups].mean(0)) / n
    assert np.abs(cross).max() < 1e-4 and eraser["rank"] == 2
    # What is left (the part orthogonal to the group) is kept: the eraser changes x least.
    assert np.abs(erased - x).mean() < np.abs(x - x.mean(0)).mean()
