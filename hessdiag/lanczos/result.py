"""The result of one Lanczos run: Ritz pairs of both ends, their proven bounds and probable limits.

What is proven and what is probable is stated in :mod:`hessdiag.lanczos.certificates`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LanczosResult:
    """Ritz pairs of both ends of the spectrum from one Lanczos run.

    Eigenvalue tensors are float64 on the CPU; vectors have the basis dtype on the operator's device.

    Attributes:
        top: the k largest Ritz values, descending.
        bottom: the k smallest Ritz values, ascending (most negative first).
        top_residuals, bottom_residuals: the Lanczos residuals beta_m |s_m| (exact products, no
            rounding): ||A y - theta y|| for exact arithmetic.
        top_error_bounds, bottom_error_bounds: proven bounds (:mod:`hessdiag.lanczos.certificates`):
            an eigenvalue of A lies within each of its Ritz value, product errors and rounding
            included. They alone decide `converged`.
        top_vectors, bottom_vectors: unit Ritz vectors, shape (k, dim); ``None`` in recurrence mode.
        num_iterations: Lanczos steps = operator applications.
        converged: every requested error bound is within the tolerance.
        top_converged, bottom_converged: the same, per end (``False`` for an end not requested).
        ritz_values: all Ritz values, ascending, shape (m,).
        ritz_weights: squared first components of the Ritz vectors of T (the quadrature weights
            of stochastic Lanczos quadrature), aligned with `ritz_values`; they sum to 1.
        alphas, betas: the tridiagonal matrix T (diagonal, off-diagonal), float64.
        basis: where the basis lived: "device", "host", "device+host" (rows beyond the device's
            budget spilled to host memory) or "recurrence".
        interlacing_slack: how far a Ritz value may lie outside [lambda_min, lambda_max] because of
            product errors and rounding (sqrt(m) e + rounding).
        top_limit, bottom_limit: probable limits of the whole spectrum: with probability at least
            1 - `MISS_PROBABILITY` over the random part of the start, no eigenvalue lies above
            `top_limit` or below `bottom_limit` (a Christoffel-function bound, not an estimate: see
            :mod:`hessdiag.lanczos.certificates`). Infinite when the start had no random part; equal to the extreme Ritz
            values when the run exhausted the start's Krylov space. Both widened by `interlacing_slack`.
    """

    top: torch.Tensor
    bottom: torch.Tensor
    top_residuals: torch.Tensor
    bottom_residuals: torch.Tensor
    top_error_bounds: torch.Tensor
    bottom_error_bounds: torch.Tensor
    top_vectors: torch.Tensor | None
    bottom_vectors: torch.Tensor | None
    num_iterations: int
    converged: bool
    top_converged: bool
    bottom_converged: bool
    ritz_values: torch.Tensor
    ritz_weights: torch.Tensor
    alphas: torch.Tensor
    betas: torch.Tensor
    basis: str
    interlacing_slack: float
    top_limit: float
    bottom_limit: float

    @property
    def negative_curvature_certified(self) -> bool:
        """True when theta_min < -slack: then lambda_min <= theta_min + slack < 0 is proven
        (interlacing, product errors and rounding included)."""
        return bool(self.ritz_values[0] + self.interlacing_slack < 0)