"""Debiased Sinkhorn divergence between 1-D samples (the ``fairot`` mitigation), in PyTorch.

``OT_eps(a, b) = min_P <P, C> + eps * KL(P | alpha x beta)`` with squared cost
``C_ij = (a_i - b_j)^2`` and uniform weights, and the debiased divergence (Feydy et al. 2019)
``S_eps(a, b) = OT_eps(a, b) - OT_eps(a, a) / 2 - OT_eps(b, b) / 2``: 0 for equal samples,
symmetric, >= 0. The dual potentials come from log-domain Sinkhorn iterations (eps annealed
from the samples' squared diameter down to ``eps``, then iterated at ``eps`` until the
potentials move less than ``tol`` or ``max_iter`` passes), computed without autograd; the value
is then one differentiable half-step ``<alpha, f(g*)> + <beta, g*>``, whose gradient is the
envelope-theorem gradient ``sum_j P_ij dC_ij`` of the converged problem (no back-propagation
through the loop).

Many problems run at once: samples padded to a common length, padding given weight 0.
"""

from __future__ import annotations

import math

import torch

EPS = 0.01  # FairCLIP's blur for scores in [0, 1]: the contract's epsilon
TOL = 1e-7  # largest change of a potential (cost units) at which iterations stop
MAX_ITER = 500  # bounds a training step's cost; eps = 0.01 on near-tied scores converges slowly (geomloss stops early too)
ANNEAL = 0.5  # eps multiplier per annealing pass (geomloss uses 0.25; gentler converges in fewer passes here)


def _softmin(eps: float, cost: torch.Tensor, log_w: torch.Tensor, pot: torch.Tensor, dim: int) -> torch.Tensor:
    """``-eps * logsumexp(log_w + (pot - cost) / eps)`` over ``dim`` of (K, n, m) ``cost``."""
    if dim == 2:
        z = log_w[:, None, :] + (pot[:, None, :] - cost) / eps
    else:
        z = log_w[:, :, None] + (pot[:, :, None] - cost) / eps
    return -eps * torch.logsumexp(z, dim=dim)


def potentials(x: torch.Tensor, wx: torch.Tensor, y: torch.Tensor, wy: torch.Tensor, eps: float = EPS,
               tol: float = TOL, max_iter: int = MAX_ITER) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Converged dual potentials of K entropic OT problems between weighted 1-D samples (no autograd).

    Args:
        x: (K, n) points, wx: (K, n) weights (each row sums to 1; 0 marks padding); y, wy: (K, m).

    Returns:
        f (K, n), g (K, m), and the number of passes made at the final ``eps``.
    """
    with torch.no_grad():
        x, y = x.detach(), y.detach()
        cost = (x[:, :, None] - y[:, None, :]) ** 2
        la, lb = torch.log(wx), torch.log(wy)  # -inf on padding: those points drop out of every sum
        real = (wx > 0, wy > 0)
        f, g = torch.zeros_like(x), torch.zeros_like(y)
        diameter = float(torch.where(real[0][:, :, None] & real[1][:, None, :], cost, 0).max())
        e = max(diameter, eps)
        while e > eps:  # anneal: a coarse problem's potentials start the next, finer one
            f, g = _softmin(e, cost, lb, g, 2), _softmin(e, cost, la, f, 1)
            e = max(e * ANNEAL, eps)
        for it in range(1, max_iter + 1):
            f_new = _softmin(eps, cost, lb, g, 2)
            g_new = _softmin(eps, cost, la, f_new, 1)
            moved = max(_max_change(f_new, f, real[0]), _max_change(g_new, g, real[1]))
            f, g = f_new, g_new
            if moved < tol:
                break
        return f, g, it


def _max_change(new: torch.Tensor, old: torch.Tensor, real: torch.Tensor) -> float:
    return float(torch.where(real, (new - old).abs(), 0).max()) if new.numel() else 0.0


def ot_values(x: torch.Tensor, wx: torch.Tensor, y: torch.Tensor, wy: torch.Tensor, eps: float = EPS,
              tol: float = TOL, max_iter: int = MAX_ITER) -> torch.Tensor:
    """``OT_eps`` of K problems (shapes as in ``potentials``) -> (K,), differentiable in ``x`` and ``y``."""
    _, g, _ = potentials(x, wx, y, wy, eps, tol, max_iter)
    cost = (x[:, :, None] - y[:, None, :]) ** 2
    f = _softmin(eps, cost, torch.log(wy), g, 2)  # one half-step with autograd: the envelope gradient
    return (wx * torch.where(wx > 0, f, 0)).sum(1) + (wy * g).sum(1)


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


def divergences(pairs: list[tuple[torch.Tensor, torch.Tensor]], eps: float = EPS, tol: float = TOL,
                max_iter: int = MAX_ITER) -> torch.Tensor:
    """``S_eps(a, b)`` of every ``(a, b)`` pair of 1-D samples -> (len(pairs),), all problems solved at once."""
    if not pairs:
        return torch.zeros(0)
    k = len(pairs)
    firsts = [a for a, _ in pairs] + [a for a, _ in pairs] + [b for _, b in pairs]
    seconds = [b for _, b in pairs] + [a for a, _ in pairs] + [b for _, b in pairs]
    x, wx = pad(firsts)
    y, wy = pad(seconds)
    ot = ot_values(x, wx, y, wy, eps, tol, max_iter)
    return ot[:k] - 0.5 * ot[k:2 * k] - 0.5 * ot[2 * k:]


def sinkhorn_divergence(a: torch.Tensor, b: torch.Tensor, eps: float = EPS, tol: float = TOL,
                        max_iter: int = MAX_ITER) -> torch.Tensor:
    """``S_eps(a, b)`` between two 1-D samples (n,) and (m,) with uniform weights: a scalar tensor."""
    return divergences([(a, b)], eps, tol, max_iter)[0]

