"""Mitigation pieces against slow references written here: GroupDRO's q, the Sinkhorn divergence
(POT and a dense NumPy log-domain solver), gradient reversal, reweighting, the masked loss."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dataclasses import replace

from cxrfair.core.mitigations import SINKHORN
from cxrfair.errors import CxrfairError
from cxrfair.finetune import objectives as O
from cxrfair.finetune import sinkhorn
from cxrfair.finetune.train import masked_bce

# ---------------------------------------------------------------------------------------------
# GroupDRO


def sagawa_numpy(q: np.ndarray, losses: np.ndarray, cells: np.ndarray, eta: float) -> tuple[np.ndarray, float]:
    """Sagawa et al.'s update written directly: per present cell q_c *= exp(eta * mean loss), renormalise;
    the robust loss is sum_c q_c * mean loss of c."""
    q = q.copy()
    means = {}
    for c in range(len(q)):
        rows = losses[cells == c]
        if len(rows):
            means[c] = rows.mean()
            q[c] *= np.exp(eta * means[c])
    q /= q.sum()
    return q, sum(q[c] * m for c, m in means.items())


def test_groupdro_q_update_and_loss_equal_a_direct_numpy_implementation():
    rng = np.random.default_rng(0)
    n_cells, eta = 6, 0.7
    # Every cell has training rows; the last never appears in these batches: its q only renormalises.
    obj = O.GroupDRO(eta, 3, n_cells, 2, False, None, cell_counts=np.full(n_cells, 4))
    q_ref = np.full(n_cells, 1 / n_cells)
    for _ in range(5):
        cells = rng.integers(0, n_cells - 1, 10)
        losses = rng.gamma(2.0, 1.0, 10).astype(np.float32).astype(np.float64)  # what the step sees
        w = np.ones(10, np.float32)
        w[-1] = 0  # a padding row: no loss, no count
        q_ref, robust = sagawa_numpy(q_ref, losses[:-1], cells[:-1], eta)
        lt = torch.tensor(losses, dtype=torch.float32)
        ct, wt = torch.from_numpy(cells), torch.from_numpy(w)
        obj.step_statistics(lt, ct, wt)
        np.testing.assert_allclose(obj.q.numpy(), q_ref, rtol=1e-12)
        got = obj.chunk_loss(None, lt, None, ct, None, wt, 10.0, None)
        assert got.item() == pytest.approx(robust, rel=1e-6)


def test_groupdro_q_starts_uniform_over_cells_with_training_rows_as_the_probes_does():
    # Cells 0..5 = group x class (3 groups, 2 classes); cells 1 and 4 have no training row.
    cells = np.array([0, 0, 2, 3, 3, 5, 0, 2, 1])  # row 8 (cell 1) is validation
    train = np.arange(8)
    counts = O.train_cell_counts(cells, train, 6)
    assert counts.tolist() == [3, 0, 2, 2, 0, 1]
    obj = O.make_objective("groupdro", 0.5, 3, 6, 2, False, None, 0, 0, counts)
    np.testing.assert_allclose(obj.q.numpy(), [0.25, 0, 0.25, 0.25, 0, 0.25])
    # The probe's init on the same counts (imported here: only this test of the file needs JAX).
    from cxrfair.probe.objectives import Spec, groupdro_init

    probe_q = np.asarray(groupdro_init(Spec("groupdro", 3, tuple(int(c) for c in counts))))
    np.testing.assert_allclose(obj.q.numpy(), probe_q, rtol=1e-6)
    # An empty cell stays at 0 through updates (it is never in a batch); the live cells sum to 1.
    obj.step_statistics(torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0, 3, 5]), torch.ones(3))
    assert obj.q[1] == 0 and obj.q[4] == 0 and obj.q.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="cell_counts"):
        O.GroupDRO(0.5, 3, 6, 2, False, None)


def test_groupdro_update_does_not_overflow_for_large_steps():
    q, m = O.groupdro_update(torch.full((3,), 1 / 3, dtype=torch.float64), torch.tensor([2000.0, 1.0, 0.0]),
                             torch.tensor([2.0, 1.0, 0.0]), eta=10.0)
    assert torch.isfinite(q).all() and q[0] == pytest.approx(1.0) and m[2] == 0


# ---------------------------------------------------------------------------------------------
# Sinkhorn divergence


def dense_ot_numpy(a: np.ndarray, b: np.ndarray, eps: float, iters: int = 30000) -> float:
    """Entropic OT between uniform 1-D samples, dense log-domain Sinkhorn in float64 (no annealing):
    the dual value <alpha, f> + <beta, g> at convergence."""
    la, lb = np.full(len(a), -np.log(len(a))), np.full(len(b), -np.log(len(b)))
    cost = (a[:, None] - b[None, :]) ** 2
    f, g = np.zeros(len(a)), np.zeros(len(b))

    def softmin(z, axis):
        m = z.max(axis=axis, keepdims=True)
        return -eps * (m + np.log(np.exp(z - m).sum(axis=axis, keepdims=True))).squeeze(axis)

    for _ in range(iters):
        f_new = softmin(lb[None, :] + (g[None, :] - cost) / eps, 1)
        g_new = softmin(la[:, None] + (f_new[:, None] - cost) / eps, 0)
        if max(np.abs(f_new - f).max(), np.abs(g_new - g).max()) < 1e-13:
            f, g = f_new, g_new
            break
        f, g = f_new, g_new
    return float(np.exp(la) @ f + np.exp(lb) @ g)


def divergence_numpy(a, b, eps=sinkhorn.EPS) -> float:
    """S_eps(a, b) from three dense reference problems."""
    return dense_ot_numpy(a, b, eps) - 0.5 * dense_ot_numpy(a, a, eps) - 0.5 * dense_ot_numpy(b, b, eps)


def pot_primal(a: np.ndarray, b: np.ndarray, eps: float) -> float:
    """OT_eps from POT's plan: <P, C> + eps * KL(P | alpha x beta) (the primal, independent of our duals)."""
    ot = pytest.importorskip("ot")
    wa, wb = np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b))
    cost = (a[:, None] - b[None, :]) ** 2
    plan = ot.sinkhorn(wa, wb, cost, eps, method="sinkhorn_log", numItermax=100000, stopThr=1e-11)
    kl = np.sum(plan * np.log(np.where(plan > 0, plan, 1) / np.outer(wa, wb)))
    return float(np.sum(plan * cost) + eps * kl)


SAMPLES = [(np.array([0.1, 0.9, 0.5, 0.45, 0.2, 0.8]), np.array([0.3, 0.35, 0.7])),
           (np.random.default_rng(1).uniform(0, 1, 9), np.random.default_rng(2).beta(2, 5, 4))]


@pytest.mark.parametrize("sample,eps", [pytest.param(1, sinkhorn.EPS, marks=pytest.mark.slow), (0, 0.05)])
def test_sinkhorn_divergence_equals_dense_numpy_and_pot(sample, eps):
    # The training schedule against converged references. (eps = 0.01
    # on sample 0's near-tied points takes the references minutes to converge: eps 0.05 there.)
    a, b = SAMPLES[sample]
    got = sinkhorn.sinkhorn_divergence(torch.tensor(a), torch.tensor(b), replace(SINKHORN, eps=eps)).item()
    ref = divergence_numpy(a, b, eps)
    assert got == pytest.approx(ref, abs=1e-6)
    pot = pot_primal(a, b, eps) - 0.5 * pot_primal(a, a, eps) - 0.5 * pot_primal(b, b, eps)
    assert ref == pytest.approx(pot, abs=1e-8)  # the two references agree (dual vs POT's primal)
    assert got == pytest.approx(pot, abs=1e-6)


def test_sinkhorn_batch_of_problems_equals_one_by_one_and_is_zero_for_equal_samples():
    a, b = (torch.tensor(x) for x in SAMPLES[1])
    c = torch.tensor(SAMPLES[0][0])
    schedule = replace(SINKHORN, eps=0.05)
    both = sinkhorn.divergences([(a, b), (c, a), (b, b)], schedule)
    singles = [sinkhorn.sinkhorn_divergence(x, y, schedule) for x, y in ((a, b), (c, a))]
    np.testing.assert_allclose(both[:2].numpy(), torch.stack(singles).numpy(), atol=1e-6)  # one stopping rule for all
    assert abs(both[2].item()) < 1e-10


def test_sinkhorn_gradient_equals_finite_differences_of_the_numpy_reference():
    # The envelope gradient does not depend on eps; a larger eps converges fast, so the
    # reference's finite differences are exact enough to compare tightly.
    a, b = SAMPLES[0]
    eps = 0.1
    x = torch.tensor(a, requires_grad=True)
    y = torch.tensor(b, requires_grad=True)
    sinkhorn.sinkhorn_divergence(x, y, replace(SINKHORN, eps=eps)).backward()
    h = 1e-5
    for vec, grad, other, first in ((a, x.grad, b, True), (b, y.grad, a, False)):
        for i in range(len(vec)):
            up, dn = vec.copy(), vec.copy()
            up[i] += h
            dn[i] -= h
            f = (lambda v: divergence_numpy(v, other, eps)) if first else (lambda v: divergence_numpy(other, v, eps))
            assert grad[i].item() == pytest.approx((f(up) - f(dn)) / (2 * h), abs=1e-7)


@pytest.mark.parametrize("seed", [0, 1])
def test_fairot_term_gradient_equals_a_finite_difference_of_its_own_value(seed):
    # At the training settings (eps = EPS, the stopping rule), float64: the value is the dual at
    # (f(g), g), stationary in g, so the stopping rule's residual moves it by ~tol^2 and the central
    # differences are exact to ~1e-8. A gradient twice the value's would miss by a factor 2.
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.05, 0.95, size=(9, 1))
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 1])
    mask = torch.ones(9, 1, dtype=torch.bool)

    def value(s: np.ndarray) -> float:
        return O.fairot_term(torch.tensor(s), mask, groups, 3).item()

    x = torch.tensor(scores, requires_grad=True)
    O.fairot_term(x, mask, groups, 3).backward()
    h = 1e-5
    fd = np.zeros(9)
    for i in range(9):
        up, dn = scores.copy(), scores.copy()
        up[i, 0] += h
        dn[i, 0] -= h
        fd[i] = (value(up) - value(dn)) / (2 * h)
    np.testing.assert_allclose(x.grad[:, 0].numpy(), fd, rtol=1e-4, atol=1e-7)
    assert np.abs(fd).max() > 1e-3


def test_fairot_term_sums_groups_and_skips_groups_under_two_rows():
    scores = torch.tensor([[0.9], [0.8], [0.2], [0.4], [0.3], [0.7]], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 1, 2])  # group 2 has one row: skipped
    mask = torch.ones_like(scores, dtype=torch.bool)
    got = O.fairot_term(scores, mask, groups, 3)
    s = scores[:, 0]
    want = sinkhorn.sinkhorn_divergence(s, s[:2]) + sinkhorn.sinkhorn_divergence(s, s[2:5])
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
    # Multi-label: per condition, masked rows out of both samples, averaged over conditions.
    two = torch.cat([scores, scores.flip(0)], dim=1)
    m2 = torch.ones_like(two, dtype=torch.bool)
    m2[0, 1] = False
    s1 = two[1:, 1]
    g1 = groups[1:]
    want1 = sinkhorn.sinkhorn_divergence(s1, s1[g1 == 0]) if (g1 == 0).sum() >= 2 else 0.0
    want1 = want1 + sinkhorn.sinkhorn_divergence(s1, s1[g1 == 1])
    got2 = O.fairot_term(two, m2, groups, 3)
    assert got2.item() == pytest.approx((want.item() + float(want1)) / 2, abs=1e-6)


def test_true_scores_are_the_probability_of_the_true_label():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
    s, m = O.true_scores(logits, torch.tensor([0, 2]), multilabel=False)
    np.testing.assert_allclose(s[:, 0].numpy(), torch.softmax(logits, 1)[[0, 1], [0, 2]].numpy())
    assert m.all()
    y = torch.tensor([[1.0, 0.0, float("nan")], [0.0, float("nan"), 1.0]])
    s, m = O.true_scores(logits, y, multilabel=True)
    p = torch.sigmoid(logits)
    np.testing.assert_allclose(s[m].numpy(), torch.stack([p[0, 0], 1 - p[0, 1], 1 - p[1, 0], p[1, 2]]).numpy())
    assert m.tolist() == [[True, True, False], [True, False, True]]


# ---------------------------------------------------------------------------------------------
# Gradient reversal


def test_gradient_reversal_flips_the_gradient_sign_times_lambda():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64)
    (O.grad_reverse(x, 0.3) * w).sum().backward()
    assert torch.equal(x.grad, -0.3 * w)
    assert torch.equal(O.grad_reverse(x, 0.3), x)  # the forward is the identity


def test_trainee_reverses_only_the_adversary_gradient_into_the_encoder():
    torch.manual_seed(0)
    from cxrfair.finetune.model import Classifier

    clf = Classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)), 5, 3).double()
    adv = O.make_adversary(5, 2, seed=0).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)

    def encoder_grad(scale: float, part: slice, reverse: bool) -> torch.Tensor:
        clf.zero_grad()
        t = O.Trainee(clf, adv)
        t.scale = scale
        out = t(x) if reverse else torch.cat([clf(x), adv(clf.encoder(x))], dim=1)
        out[:, part].pow(2).sum().backward()
        return clf.encoder[1].weight.grad.clone()

    lam = 0.4
    task = encoder_grad(lam, slice(0, 3), True)
    torch.testing.assert_close(task, encoder_grad(lam, slice(0, 3), False))  # the task's gradient is untouched
    adv_reversed = encoder_grad(lam, slice(3, 5), True)
    torch.testing.assert_close(adv_reversed, -lam * encoder_grad(lam, slice(3, 5), False))


def test_grl_schedule_ramps_from_zero_to_almost_one():
    assert O.grl_schedule(0.0) == 0.0
    assert O.grl_schedule(0.5) == pytest.approx(2 / (1 + np.exp(-5)) - 1)
    assert 0.999 < O.grl_schedule(1.0) < 1.0


# ---------------------------------------------------------------------------------------------
# Reweighting, groups and cells


def test_reweight_weights_equal_a_hand_count():
    # Training rows 0..6: cells 0,0,0,1,1,2,0 -> counts {0: 4, 1: 2, 2: 1}; row 7 is validation.
    cells = np.array([0, 0, 0, 1, 1, 2, 0, 1])
    train = np.arange(7)
    for s in (0.0, 0.5, 1.0):
        raw = np.array([4, 4, 4, 2, 2, 1, 4], dtype=float) ** -s
        want = raw / raw.mean()
        got = O.reweight_weights(cells, train, s, 3)
        np.testing.assert_allclose(got[:7], want, rtol=1e-6)
        assert got[7] == 1.0
    w1 = O.reweight_weights(cells, train, 1.0, 3)[:7]
    assert w1[:3].sum() + w1[6] == pytest.approx(w1[3] + w1[4]) == pytest.approx(w1[5])  # every cell counts equally


def test_cells_are_group_by_class_for_multiclass_and_group_for_multilabel():
    groups, labels = np.array([0, 1, 1, -1]), np.array([2, 0, 2, 1])
    cells, n = O.cell_ids(groups, labels, 2, 3, multilabel=False)
    assert cells.tolist() == [2, 3, 5, -1] and n == 6
    cells, n = O.cell_ids(groups, labels, 2, 3, multilabel=True)
    assert cells.tolist() == [0, 1, 1, -1] and n == 2


def test_group_ids_refuse_empty_training_values_and_groups_without_training_rows():
    table = pd.DataFrame({"race": ["White", "Black", "", "Asian"]})
    with pytest.raises(CxrfairError, match=r"column 'race' is empty or undeclared.*1 training row"):
        O.group_ids(table, "race", ["White", "Black", "Asian"], np.arange(3), "c")
    assert O.group_ids(table, "race", ["White", "Black", "Asian"], np.array([0, 1, 3]), "c").tolist() == [0, 1, -1, 2]
    with pytest.raises(CxrfairError, match=r"\['Asian'\] of --sensitive race have no training rows"):
        O.group_ids(table, "race", ["White", "Black", "Asian"], np.array([0, 1]), "c")


# ---------------------------------------------------------------------------------------------
# Multi-label loss


def test_masked_bce_equals_a_loop_over_observed_conditions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3))
    y = rng.integers(0, 2, (5, 3)).astype(float)
    y[0, 1] = y[2, :] = y[4, 0] = np.nan
    want = []
    for i in range(5):
        terms = [-(y[i, c] * np.log(1 / (1 + np.exp(-logits[i, c])))
                   + (1 - y[i, c]) * np.log(1 - 1 / (1 + np.exp(-logits[i, c]))))
                 for c in range(3) if not np.isnan(y[i, c])]
        want.append(np.mean(terms) if terms else 0.0)
    got = masked_bce(torch.tensor(logits), torch.tensor(y))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    lt = torch.tensor(logits, requires_grad=True)
    masked_bce(lt, torch.tensor(y)).sum().backward()
    assert torch.isfinite(lt.grad).all() and (lt.grad[2] == 0).all() and lt.grad[0, 1] == 0  # masked: no gradient
