"""Debiased Sinkhorn divergence between 1-D samples (the ``fairot`` mitigation), in PyTorch.

``OT_eps(a, b) = min_P <P, C> + eps * KL(P | alpha x beta)`` with squared cost
``C_ij = (a_i - b_j)^2`` and uniform weights, and the debiased divergence (Feydy et al. 2019)
``S_eps(a, b) = OT_eps(a, b) - OT_eps(a, a) / 2 - OT_eps(b, b) / 2``: 0 for equal samples,
symmetric, >= 0. The schedule is the probe's (``cxrfair.core.mitigations.SINKHORN``; the probe's
JAX solver, ``cxrfair.probe.objectives``, is the other implementation): the cross problem
OT(a, b) gets one log-domain pass per annealing blur, then over-relaxed iterations at ``eps``
(Thibault et al. 2017); each symmetric problem OT(a, a) gets averaged updates
``p <- (p + T(p)) / 2`` from 0. The potentials are computed without autograd; the value is then
one differentiable half-step, ``<alpha, f(g*)> + <beta, g*>`` (``<alpha, T(p*)> + <alpha, p*>``
for a symmetric problem), whose gradient is the envelope-theorem gradient ``sum_j P_ij dC_ij`` of
the converged problem (no back-propagation through the loop).

Here every pass is a log-sum-exp (the probe's solver trades most of them for matrix products:
its step is the sweep's cost; here the encoder's step is). Many problems run at once: samples
padded to a common length, padding given weight 0.
"""

from __future__ import annotations

import torch

from cxrfair.core.mitigations import SINKHORN, SinkhornSchedule

EPS = SINKHORN.eps  # FairCLIP's blur for scores in [0, 1]: the contract's epsilon


def _softmin(eps: float, cost: torch.Tensor, log_w: torch.Tensor, pot: torch.Tensor, dim: int) -> torch.Tensor:
    """``-eps * logsumexp(log_w + (pot - cost) / eps)`` over ``dim`` of (K, n, m) ``cost``."""
    if dim == 2:
        z = log_w[:, None, :] + (pot[:, None, :] - cost) / eps
    else:
        z = log_w[:, :, None] + (pot[:, :, None] - cost) / eps
    return -eps * torch.logsumexp(z, dim=dim)


def potentials(x: torch.Tensor, wx: torch.Tensor, y: torch.Tensor, wy: torch.Tensor,
               schedule: SinkhornSchedule = SINKHORN) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual potentials of K entropic OT problems between weighted 1-D samples (no autograd).

    Args:
        x: (K, n) points, wx: (K, n) weights (each row sums to 1; 0 marks padding); y, wy: (K, m).
        schedule: blur, annealing blurs (those above the blur are used), iteration counts, tolerance.

    Returns:
        f (K, n), g (K, m): at least ``schedule.iterations`` over-relaxed iterations at
        ``schedule.eps``, then on until no potential moves more than ``schedule.tolerance``.
    """
    with torch.no_grad():
        cost = (x.detach()[:, :, None] - y.detach()[:, None, :]) ** 2
        la, lb = torch.log(wx), torch.log(wy)  # -inf on padding: those points drop out of every sum
        f, g = torch.zeros_like(x), torch.zeros_like(y)
        for e in (e for e in schedule.anneal if e > schedule.eps):  # a coarse problem's potentials start the next
            f = _softmin(e, cost, lb, g, 2)
            g = _softmin(e, cost, la, f, 1)
        omega, eps = schedule.over_relaxation, schedule.eps
        for it in range(1, schedule.max_iterations + 1):
            f_new = (1 - omega) * f + omega * _softmin(eps, cost, lb, g, 2)
            g_new = (1 - omega) * g + omega * _softmin(eps, cost, la, f_new, 1)
            # Checked only past the count (the probe's): a device sync per check.
            done = it >= schedule.iterations and max(_moved(f_new, f, wx), _moved(g_new, g, wy)) < _tolerance(schedule, x)
            f, g = f_new, g_new
            if done:
                break
        return f, g


def symmetric_potential(x: torch.Tensor, w: torch.Tensor, schedule: SinkhornSchedule = SINKHORN) -> torch.Tensor:
    """The potential p (K, n) of OT_eps(w, w) for K weighted samples x (K, n) (no autograd).

    Averaged updates p <- (p + T(p)) / 2 from p = 0, T(p) = softmin_w(p - C), which converge
    without annealing (Feydy et al. 2019): ``schedule.symmetric_iterations``, then on until p
    moves less than ``schedule.tolerance``.
    """
    with torch.no_grad():
        cost = (x.detach()[:, :, None] - x.detach()[:, None, :]) ** 2
        lw = torch.log(w)
        p = torch.zeros_like(x)
        for it in range(1, schedule.max_iterations + 1):
            new = 0.5 * (p + _softmin(schedule.eps, cost, lw, p, 2))
            done = it >= schedule.symmetric_iterations and _moved(new, p, w) < _tolerance(schedule, x)
            p = new
            if done:
                break
        return p


def _tolerance(schedule: SinkhornSchedule, x: torch.Tensor) -> float:
    """``schedule.tolerance``, or what the dtype can resolve if coarser: float32 potentials (~0.1)
    jitter by a few ulps from pass to pass (16 eps = 2e-6) and would never move less than 1e-10."""
    return max(schedule.tolerance, 16 * torch.finfo(x.dtype).eps)


def _moved(new: torch.Tensor, old: torch.Tensor, w: torch.Tensor) -> float:
    """The largest change of a real point's potential (padding ignored)."""
    return float(torch.where(w > 0, (new - old).abs(), 0).max()) if new.numel() else 0.0


def ot_values(x: torch.Tensor, wx: torch.Tensor, y: torch.Tensor, wy: torch.Tensor,
              schedule: SinkhornSchedule = SINKHORN) -> torch.Tensor:
    """``OT_eps`` of K problems (shapes as in ``potentials``) -> (K,), differentiable in ``x`` and ``y``."""
    _, g = potentials(x, wx, y, wy, schedule)
    cost = (x[:, :, None] - y[:, None, :]) ** 2
    f = _softmin(schedule.eps, cost, torch.log(wy), g, 2)  # one half-step with autograd: the envelope gradient
    return (wx * torch.where(wx > 0, f, 0)).sum(1) + (wy * g).sum(1)


def self_values(x: torch.Tensor, w: torch.Tensor, schedule: SinkhornSchedule = SINKHORN) -> torch.Tensor:
    """``OT_eps(w, w)`` of K weighted samples x (K, n) -> (K,), differentiable in ``x``."""
    p = symmetric_potential(x, w, schedule)
    cost = (x[:, :, None] - x[:, None, :]) ** 2
    f = _softmin(schedule.eps, cost, torch.log(w), p, 2)  # T(p), with autograd: the envelope gradient
    return (w * torch.where(w > 0, f + p, 0)).sum(1)


def pad(samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D samples of different lengths as (K, L) points and uniform weights (0 on padding)."""
    length = max(len(s) for s in samples)
    ref = samples[0]
    x = torch.zeros(len(samples), length, dtype=ref.dtype, device=ref.device)
    w = torch.zeros_like(x)
    for k, s in enumerate(samples):
        x[k, :len(s)] = s
        w[k, :len(s)] = 1.0 / len(s)
    return x, w


def divergences(pairs: list[tuple[torch.Tensor, torch.Tensor]], schedule: SinkhornSchedule = SINKHORN) -> torch.Tensor:
    """``S_eps(a, b)`` of every ``(a, b)`` pair of 1-D samples -> (len(pairs),), all problems solved at once."""
    if not pairs:
        return torch.zeros(0)
    x, wx = pad([a for a, _ in pairs])
    y, wy = pad([b for _, b in pairs])
    return ot_values(x, wx, y, wy, schedule) - 0.5 * self_values(x, wx, schedule) - 0.5 * self_values(y, wy, schedule)


def sinkhorn_divergence(a: torch.Tensor, b: torch.Tensor, schedule: SinkhornSchedule = SINKHORN) -> torch.Tensor:
    """``S_eps(a, b)`` between two 1-D samples (n,) and (m,) with uniform weights: a scalar tensor."""
    return divergences([(a, b)], schedule)[0]
