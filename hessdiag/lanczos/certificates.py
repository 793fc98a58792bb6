"""What a Lanczos run proves, and what it makes probable: the stopping rule and the limits.

* What is proven, per Ritz value (theta, y = Q s) after m steps. Lanczos computes
  A Q = Q T + beta q e_m^T - F, where column j of F is the error of step j: the product's own error
  (``matvec_error`` e, a bound for a unit vector, e.g. finite differences) plus floating-point
  rounding. Then ||A y - theta y|| <= beta |s_m| + e sum_j |s_j| + rounding, so some eigenvalue of A
  lies within that bound of theta (``error_bounds``). `converged` means every requested bound is
  within `tol`: relative to |theta_max| at the top, to the spectral norm at the bottom (relative to
  itself is impractical at the edge of a dense bulk). No other estimate decides it: r^2/gap with the
  gap to the neighbouring *Ritz* value is not a bound (the true gap can be far smaller; measured: 1
  cold run in 5 on low-rank spectra stopped 16x `tol` off with it), so it is not used.
* Rounding is modelled as ``(10 + log2 dim) * m * eps * ||A||`` (eps of the basis dtype, ||A||
  taken as max |theta|): each step's product rounds to about log2(dim) eps ||A|| (blocked and
  pairwise sums, as in torch's reductions and BLAS), the recurrence and the two Gram-Schmidt passes
  add a few eps ||A||, and full reorthogonalisation keeps ||Q^T Q - I|| to a few m eps. It holds for
  the products we have measured; it cannot be proven for an operator we cannot see inside.
* What is only probable: that theta_max is near lambda_max, not near a lower eigenvalue whose
  Ritz pair converged first. Interlacing proves theta_max <= lambda_max + slack and
  theta_min >= lambda_min - slack (slack = sqrt(m) e + rounding, the size of Q^T F); that no larger
  eigenvalue hides outside the Krylov space depends on the random part of the start vector. From
  a uniformly random start on a positive semi-definite A, Kuczynski and Wozniakowski (1992) bound
  P[lambda_max - theta_max > eps lambda_max] <= 1.648 sqrt(dim) exp(-sqrt(eps) (2m - 1)) for every
  A, which is void at the tens of steps used here. Measured instead (README): cold runs at
  tol=1e-3 on six adversarial spectral families, 240 runs: 4 stopped on a near-degenerate
  neighbour of the extreme eigenvalue (within 3 tol of it; its bound held), none further off.
* What this run shows about the rest, with a stated probability (`top_limit`, `bottom_limit`): the
  tridiagonal T defines the orthonormal polynomials p_j of the start vector's spectral measure
  mu = sum_i c_i^2 delta(lambda_i) (c_i its component along eigenvector i), and the Christoffel
  function K(x) = 1 / sum_{j<m} p_j(x)^2 = min {int q^2 dmu : deg q < m, q(x) = 1} bounds the weight
  of every eigenvalue: c_i^2 <= K(lambda_i). Beyond the extreme Ritz values K decreases (every p_j
  has its zeros inside them), so an eigenvalue above the first x > theta_max with K(x) <= eta must
  have c^2 <= eta. The start's random part r (weight rho, uniform on the sphere) makes that
  improbable whatever the warm part: the density of <r, x> is symmetric, unimodal and at most
  sqrt(dim / (2 pi)), so by Anderson's inequality P[c^2 <= eta] <= (kappa / rho) sqrt(2 dim eta / pi),
  kappa = sqrt(1 - rho^2) + rho (the start's norm before normalising). With
  eta = pi p^2 rho^2 / (2 dim kappa^2) that is p = `MISS_PROBABILITY`, for every A and whenever the
  run stops (the bad event depends on the start alone). Exact arithmetic; full reorthogonalisation
  keeps floating point close to it. This is the a-posteriori, spectrum-adapted form of the bound
  above: the limit is close to theta_max when the run has explored beyond it, and far when it has not.
* Warm starts keep a random part for these limits to rest on (:mod:`hessdiag.lanczos.start`).
* lambda_min honestly: a theta_min below ``-slack`` certifies lambda_min <= theta_min + slack < 0 (its
  Ritz vector is a direction of negative curvature); anything above certifies nothing (a float32
  positive semi-definite matrix gives theta_min of -1e-7 ||A|| by rounding alone).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hessdiag.lanczos.basis import Basis
from hessdiag.lanczos.result import LanczosResult

#: The probability, over the random part of the start vector, that an eigenvalue lies beyond the
#: reported `top_limit` / `bottom_limit` (module docstring).
MISS_PROBABILITY = 0.01
# Distances from the extreme Ritz value at which the limits are tried, in units of the spectral norm:
# 10 per decade from 1e-12 to 1e6; the first distance that passes is reported (rounded outwards).
_LIMIT_DISTANCES = torch.logspace(-12, 6, 181, dtype=torch.float64).numpy()


class Convergence:
    """The stopping rule on proven bounds (module docstring) and the assembly of the result."""

    def __init__(self, k: int, which: str, tol: float, dim: int, eps: float) -> None:
        self.k, self.which, self.tol, self.dim = k, which, tol, dim
        # Rounding per unit of m * ||A||; the constant is justified in the module docstring.
        self.rounding_per_step = (10 + math.log2(dim)) * eps
        self.converged = False
        self.top_converged = self.bottom_converged = False
        self.interlacing_slack = 0.0
        empty = np.zeros(0)
        self.top_residuals = self.bottom_residuals = self.top_error_bounds = self.bottom_error_bounds = empty

    def update(self, theta: np.ndarray, s: np.ndarray, beta: float, product_error: float, may_stop: bool) -> None:
        """The bounds of the Ritz pairs (theta, s) of the current T (float64 arrays: a few microseconds
        per step where torch's small-tensor calls cost tens) and whether they stop the run."""
        m = theta.size
        kk = min(self.k, m)
        spectral_norm = float(np.abs(theta).max())
        rounding = self.rounding_per_step * m * spectral_norm
        residuals = beta * np.abs(s[-1])
        # ||F s|| <= e sum_j |s_j| + rounding, column by column of s (one column per Ritz vector).
        bounds = residuals + product_error * np.abs(s).sum(axis=0) + rounding
        self.interlacing_slack = math.sqrt(m) * product_error + rounding
        top, bottom = slice(m - 1, m - 1 - kk if m > kk else None, -1), slice(0, kk)
        self.top_residuals, self.bottom_residuals = residuals[top], residuals[bottom]
        self.top_error_bounds, self.bottom_error_bounds = bounds[top], bounds[bottom]
        self.top_converged = may_stop and kk == self.k and bool(
            (self.top_error_bounds <= self.tol * abs(float(theta[-1]))).all()
        )
        self.bottom_converged = may_stop and kk == self.k and bool(
            (self.bottom_error_bounds <= self.tol * spectral_norm).all()
        )
        wanted = {"top": self.top_converged, "bottom": self.bottom_converged}
        self.converged = all(wanted[end] for end in (("top", "bottom") if self.which == "both" else (self.which,)))

    def result(
        self,
        theta: np.ndarray,
        s: np.ndarray,
        vectors: Basis,
        alphas: list[float],
        betas: list[float],
        random_weight: float,
    ) -> LanczosResult:
        theta, s = torch.from_numpy(theta), torch.from_numpy(s)
        m = theta.numel()
        kk = min(self.k, m)
        bottom_limit, top_limit = probable_limits(alphas, betas[: m - 1], theta, self.dim, random_weight)
        # Floating point: the run is exact for an operator within the slack of A.
        bottom_limit, top_limit = bottom_limit - self.interlacing_slack, top_limit + self.interlacing_slack
        top, bottom = torch.arange(m - 1, m - 1 - kk, -1), torch.arange(kk)
        return LanczosResult(
            top=theta[top],
            bottom=theta[bottom],
            top_residuals=torch.from_numpy(self.top_residuals.copy()),
            bottom_residuals=torch.from_numpy(self.bottom_residuals.copy()),
            top_error_bounds=torch.from_numpy(self.top_error_bounds.copy()),
            bottom_error_bounds=torch.from_numpy(self.bottom_error_bounds.copy()),
            top_vectors=vectors.combine(s[:, top]),
            bottom_vectors=vectors.combine(s[:, bottom]),
            num_iterations=m,
            converged=self.converged,
            top_converged=self.top_converged,
            bottom_converged=self.bottom_converged,
            ritz_values=theta,
            ritz_weights=s[0] ** 2,
            alphas=torch.tensor(alphas, dtype=torch.float64),
            betas=torch.tensor(betas[: m - 1], dtype=torch.float64),
            basis=vectors.where,
            interlacing_slack=self.interlacing_slack,
            top_limit=top_limit,
            bottom_limit=bottom_limit,
        )


def probable_limits(
    alphas: list[float], betas: list[float], theta: torch.Tensor, dim: int, random_weight: float
) -> tuple[float, float]:
    """(bottom, top): with probability >= 1 - `MISS_PROBABILITY` over the random part of the start
    (weight `random_weight`), every eigenvalue lies within them (module docstring).

    `alphas` (m) and `betas` (m - 1) are the tridiagonal T of the run, `theta` its Ritz values.
    """
    low, high = float(theta[0]), float(theta[-1])
    if 0.0 in betas or len(alphas) >= dim:  # the Krylov space was exhausted: every eigenvalue the start sees was found
        return low, high
    if random_weight <= 0.0 or len(alphas) < 2:
        return -math.inf, math.inf
    kappa = math.sqrt(1.0 - random_weight**2) + random_weight
    eta = math.pi * MISS_PROBABILITY**2 * random_weight**2 / (2.0 * dim * kappa**2)
    scale = max(float(theta.abs().max()), torch.finfo(torch.float64).tiny)
    distances = scale * _LIMIT_DISTANCES
    passes = _christoffel_sums(alphas, betas, np.concatenate([high + distances, low - distances])) >= 1.0 / eta
    above, below = passes[: len(distances)], passes[len(distances) :]
    # K decreases monotonically beyond the extreme Ritz values: the first distance that passes is the limit.
    top = high + float(distances[above.argmax()]) if above.any() else math.inf
    bottom = low - float(distances[below.argmax()]) if below.any() else -math.inf
    return bottom, top


def christoffel_sums(alphas: list[float], betas: list[float], x: torch.Tensor) -> torch.Tensor:
    """sum_{j<m} p_j(x)^2 at every point of `x` (float64), the p_j orthonormal for the start's spectral
    measure: beta_j p_{j+1} = (x - alpha_j) p_j - beta_{j-1} p_{j-1}, p_0 = 1. Outside the Ritz
    values this forward recurrence follows its growing solution, so it is stable; an overflow is a
    sum beyond any threshold (infinity)."""
    return torch.from_numpy(_christoffel_sums(alphas, betas, x.detach().to("cpu", torch.float64).numpy()))


def _christoffel_sums(alphas: list[float], betas: list[float], x: np.ndarray) -> np.ndarray:
    """:func:`christoffel_sums` in numpy: a few hundred points over the tens of steps of a run, where
    each of torch's small-tensor calls costs several times numpy's (the same IEEE operations)."""
    previous, current = np.zeros_like(x), np.ones_like(x)
    total = np.ones_like(x)
    with np.errstate(all="ignore"):  # overflow to infinity (and inf - inf) is the answer here
        for j, beta in enumerate(betas):
            below = betas[j - 1] if j > 0 else 0.0
            previous, current = current, ((x - alphas[j]) * current - below * previous) / beta
            total += current * current
    return np.nan_to_num(total, nan=math.inf)
