"""Whole-spectrum summaries: the Hessian trace (Hutch++) and the spectral density (SLQ).

* Hutch++ (Meyer, Musco, Musco, Woodruff 2021): with m products, a third sketch the dominant
  subspace Q = orth(A S), whose trace tr(Q^T A Q) is exact, and the rest feed Hutchinson's
  estimator on the deflated operator (I - QQ^T) A (I - QQ^T). Error O(1/m) instead of O(1/sqrt m);
  exact for an operator of rank <= m/3.
* Stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017; Ghorbani, Krishnan, Xiao 2019): m Lanczos
  steps from a random unit probe v give the Gauss quadrature sum_i tau_i f(theta_i) of
  v^T f(A) v, with nodes the Ritz values theta_i and weights tau_i the squared first components of
  the eigenvectors of T; it is exact for polynomials f of degree < 2m. Averaged over probes it
  estimates the spectral density (1/n) sum_j delta(t - lambda_j).
Both run on any symmetric ``matvec``; the ``hessian_*`` wrappers feed them Hessian-vector products.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hessdiag.lanczos import lanczos
from hessdiag.lanczos.basis import MemoryBudget
from hessdiag.operator import HessianOperator, LossFn
from hessdiag.vectors import VectorShard, random_generator, random_signs


@dataclass
class TraceEstimate:
    """A Hutch++ trace estimate: `trace`, and `num_matvecs` products spent."""

    trace: float
    num_matvecs: int


@dataclass
class SpectralDensity:
    """Gauss quadrature nodes and weights of stochastic Lanczos quadrature.

    Attributes:
        nodes: Ritz values, shape (num_probes, m), float64.
        weights: quadrature weights, shape (num_probes, m); each row sums to 1.
        num_matvecs: products spent.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    num_matvecs: int

    def density(self, grid: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        """The Gaussian-smoothed density on `grid`, averaged over probes; integrates to ~1.

        Args:
            grid: points t at which to evaluate, shape (g,).
            sigma: kernel width (default: 1% of the spread of the nodes, at least 1e-12).
        """
        if sigma is None:
            spread = float(self.nodes.max() - self.nodes.min())
            sigma = max(0.01 * spread, 1e-12)
        t = grid.to(torch.float64).reshape(-1, 1, 1)
        kernel = torch.exp(-0.5 * ((t - self.nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return (kernel * self.weights).sum(dim=2).mean(dim=1)

    def moment(self, power: int) -> float:
        """Estimate of tr(A^power) / n (exact per probe for power < 2m)."""
        return float((self.weights * self.nodes**power).sum(dim=1).mean())


def hutchpp_trace(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    *,
    num_matvecs: int = 30,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TraceEstimate:
    """tr(A) by Hutch++ with `num_matvecs` products (rounded down to a multiple of 3, at least 3)."""
    if not isinstance(num_matvecs, int) or num_matvecs < 3:
        raise ValueError(f"`num_matvecs` must be an int >= 3, got {num_matvecs!r}.")
    device = torch.device(device)
    generator = random_generator(seed, None, device)
    third = num_matvecs // 3
    sketch = torch.stack([matvec(random_signs(dim, generator, device, dtype)) for _ in range(third)], dim=1)
    q, _ = torch.linalg.qr(sketch)
    low_rank = sum(float(torch.dot(qi, matvec(qi))) for qi in q.T)
    probes = torch.stack([random_signs(dim, generator, device, dtype) for _ in range(third)])
    probes -= (probes @ q) @ q.T
    residual = sum(float(torch.dot(g, matvec(g))) for g in probes) / third
    return TraceEstimate(trace=low_rank + residual, num_matvecs=3 * third)


def slq_density(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    *,
    num_probes: int = 4,
    num_iter: int = 30,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    shard: VectorShard | None = None,
    memory_budget: MemoryBudget = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature with `num_probes` Rademacher probes of `num_iter` steps each
    (each probe's basis placed by `memory_budget`, as in :func:`~hessdiag.lanczos.lanczos`).

    With a `shard` (vectors split across processes, see :class:`~hessdiag.vectors.VectorShard`),
    each process draws its own coordinates of the probes and every process gets the same density.
    """
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"`num_probes` must be a positive int, got {num_probes!r}.")
    if not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"`num_iter` must be a positive int, got {num_iter!r}.")
    generator = random_generator(seed, shard, device)
    size = dim if shard is None else shard.size
    nodes, weights = [], []
    for _ in range(num_probes):  # one probe at a time: the probes of a large model need not all fit
        probe = random_signs(size, generator, torch.device(device), dtype, shard)
        run = lanczos(
            matvec, dim, k=1, tol=0.0, max_iter=num_iter, v0=probe, warm_random=0.0, device=device, dtype=dtype,
            shard=shard, memory_budget=memory_budget,
        )  # fmt: skip
        nodes.append(run.ritz_values)
        weights.append(run.ritz_weights)
    # Rows differ in length only when a probe hit an invariant subspace early: pad with zero weight.
    return SpectralDensity(
        nodes=_pad(nodes),
        weights=_pad(weights),
        num_matvecs=sum(n.numel() for n in nodes),
    )


def _pad(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack rows, padding shorter ones with zeros."""
    width = max(r.numel() for r in rows)
    return torch.stack([torch.cat([r, r.new_zeros(width - r.numel())]) for r in rows])


def hessian_trace(
    model: nn.Module, loss_fn: LossFn, batch: Any, *, num_hvps: int = 30, seed: int = 0, **operator_options: Any
) -> TraceEstimate:
    """Hutch++ estimate of the Hessian trace of ``loss_fn(model, batch)``.

    `operator_options` are passed to :class:`~hessdiag.operator.HessianOperator` (params, mode, ...).
    """
    with HessianOperator(model, loss_fn, batch, seed=seed, **operator_options) as operator:
        return hutchpp_trace(
            operator.matvec, operator.dim, num_matvecs=num_hvps, seed=seed, device=operator.device, dtype=operator.dtype
        )


def hessian_spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    num_probes: int = 4,
    num_iter: int = 30,
    seed: int = 0,
    **operator_options: Any,
) -> SpectralDensity:
    """Spectral density of the Hessian of ``loss_fn(model, batch)`` by stochastic Lanczos quadrature."""
    with HessianOperator(model, loss_fn, batch, seed=seed, **operator_options) as operator:
        return slq_density(
            operator.matvec,
            operator.dim,
            num_probes=num_probes,
            num_iter=min(num_iter, operator.dim),
            seed=seed,
            device=operator.device,
            dtype=operator.dtype,
            shard=operator.shard,
        )
