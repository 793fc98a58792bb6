"""Lanczos for both ends of a symmetric spectrum, from one Krylov run.

Works on any symmetric operator given as ``matvec(v) -> A v`` on flat vectors, so it is tested on
explicit matrices and used on Hessians alike.

* Full Gram-Schmidt reorthogonalisation against the stored basis (tens of vectors) after the
  three-term recurrence, with a second pass when the first cancels much (Kahan-Parlett): no ghost
  eigenvalues, Ritz vectors that are orthonormal to rounding.
* The tridiagonal matrix is kept and solved in float64.
* A single start vector sees each distinct eigenvalue once: with ``k > 1`` the k largest *distinct*
  eigenvalues come back (a repeated eigenvalue is reported once).
* Stopping: for a Ritz pair (theta, y) after m steps, r = beta_m |s_m| bounds ||A y - theta y||,
  so some eigenvalue lies within r of theta (free: no extra product). Once theta has stagnated,
  the gap estimate r^2 / gap (gap to the nearest other Ritz value; Kato-Temple) is used too: it
  stops far sooner at the same accuracy, but it is not a certificate (the Ritz gap over-estimates
  the true gap), hence the guards: a minimum iteration count and the stagnation check. A warm start
  near an eigenvector that is no longer the top one has a tiny residual and a large Ritz gap while
  the new top eigenvalue is still hidden (measured: a start vector 90 degrees off the new top
  stopped after 4 products 5% low), so warm starts mix in a random component and use the gap
  estimate only from twice the minimum iteration count on (before, the residual bound alone); the
  `Monitor` also restarts cold every few checks. With the residual bound alone, warm starts were no
  faster than cold ones (it overshoots the asked accuracy by orders of magnitude). The top end is judged relative to |theta_max|, the bottom end relative
  to the spectral norm max |theta| (relative to itself is impractical at the edge of a dense bulk).
* lambda_min honestly: by interlacing every Ritz value lies above lambda_min, so a negative
  theta_min certifies lambda_min <= theta_min < 0 (its Ritz vector is a direction of negative
  curvature); a non-negative theta_min certifies nothing.
* Memory: the basis costs (max_iter + 1) x dim floats. ``basis="auto"`` keeps it on the device when
  it fits the budget, else in host memory, else falls back to the three-vector recurrence (extreme
  eigenvalues only, no Ritz vectors; duplicate "ghost" copies of converged values are harmless
  for the extremes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Which = Literal["top", "bottom", "both"]
WHICH: tuple[str, ...] = ("top", "bottom", "both")
BasisStorage = Literal["auto", "device", "host", "recurrence"]
BASIS_STORAGES: tuple[str, ...] = ("auto", "device", "host", "recurrence")

_DEVICE_BUDGET_FRACTION = 0.3  # of free accelerator memory; the HVPs need the rest
_HOST_BUDGET_FRACTION = 0.5  # of available host memory
_KAHAN_PARLETT = 2**-0.5


@dataclass
class LanczosResult:
    """Ritz pairs of both ends of the spectrum from one Lanczos run.

    Eigenvalue tensors are float64 on the CPU; vectors have the basis dtype on the operator's device.

    Attributes:
        top: the k largest Ritz values, descending.
        bottom: the k smallest Ritz values, ascending (most negative first).
        top_residuals, bottom_residuals: rigorous residual bounds ||A y - theta y|| = beta_m |s_m|;
            an eigenvalue of A lies within each of its Ritz value.
        top_errors, bottom_errors: the error estimates the stopping rule used (the residual bound,
            or r^2/gap once the Ritz value stagnated).
        top_vectors, bottom_vectors: unit Ritz vectors, shape (k, dim); ``None`` in recurrence mode.
        num_iterations: Lanczos steps = operator applications.
        converged: every requested Ritz value met the tolerance.
        top_converged, bottom_converged: the same, per end (``False`` for an end not requested).
        ritz_values: all Ritz values, ascending, shape (m,).
        ritz_weights: squared first components of the Ritz vectors of T (the quadrature weights
            of stochastic Lanczos quadrature), aligned with `ritz_values`; they sum to 1.
        alphas, betas: the tridiagonal matrix T (diagonal, off-diagonal), float64.
        basis: where the basis lived: "device", "host" or "recurrence".
    """

    top: torch.Tensor
    bottom: torch.Tensor
    top_residuals: torch.Tensor
    bottom_residuals: torch.Tensor
    top_errors: torch.Tensor
    bottom_errors: torch.Tensor
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

    @property
    def negative_curvature_certified(self) -> bool:
        """True when theta_min < 0: then lambda_min <= theta_min < 0 is certain (interlacing)."""
        return bool(self.ritz_values[0] < 0)


def start_vector(
    dim: int,
    v0: torch.Tensor | None,
    *,
    warm_random: float,
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator,
) -> torch.Tensor:
    """A unit start vector: random, or a warm start mixed with a random component.

    A warm start is a vector of shape (dim,) or a block (b, dim) of previous Ritz vectors (e.g. the
    top and bottom ones), summed after normalising each row; the result is mixed as
    sqrt(1 - rho^2) u + rho r with r random and rho = `warm_random`, so that an eigenvector that
    has turned since the last check is still reachable from the Krylov space.
    """
    noise = torch.randn(dim, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    noise /= torch.linalg.vector_norm(noise)
    if v0 is None:
        return noise
    block = v0.detach().reshape(-1, dim).to(device=device, dtype=dtype)
    norms = torch.linalg.vector_norm(block, dim=1, keepdim=True)
    block = block[norms.squeeze(1) > 0] / norms[norms.squeeze(1) > 0]
    if block.numel() == 0:
        return noise
    warm = block.sum(dim=0)
    warm_norm = torch.linalg.vector_norm(warm)
    if not torch.isfinite(warm_norm) or warm_norm == 0:
        return noise
    mixed = math.sqrt(1.0 - warm_random**2) * (warm / warm_norm) + warm_random * noise
    return mixed / torch.linalg.vector_norm(mixed)


class _Basis:
    """Storage of the Lanczos vectors and the two-pass Gram-Schmidt against them."""

    def __init__(self, capacity: int, dim: int, storage: str, device: torch.device, dtype: torch.dtype) -> None:
        self.storage = storage
        self.device = device
        self.size = 0
        if storage == "recurrence":
            self.vectors: torch.Tensor | None = None
            self.recent: list[torch.Tensor] = []
        else:
            where = device if storage == "device" else torch.device("cpu")
            pin = storage == "host" and device.type == "cuda"
            self.vectors = torch.empty(capacity, dim, dtype=dtype, device=where, pin_memory=pin)
            self.recent = []

    def append(self, vector: torch.Tensor) -> None:
        if self.vectors is None:
            self.recent = (self.recent + [vector])[-2:]
        else:
            self.vectors[self.size].copy_(vector, non_blocking=False)
        self.size += 1

    def orthogonalise_(self, w: torch.Tensor) -> torch.Tensor:
        """Remove from `w` its components along the basis.

        Classical Gram-Schmidt, repeated only when a pass cancelled more than 1 - 1/sqrt(2) of the
        norm (Kahan-Parlett: "twice is enough", and once is enough when little cancels). Each pass
        reads the whole basis, so skipping the second halves the cost outside the HVPs.
        """
        if self.vectors is None:
            for q in self.recent:
                w -= torch.dot(q, w) * q
            return w
        basis = self.vectors[: self.size]
        for _ in range(2):
            before = torch.linalg.vector_norm(w)
            if self.storage == "host":
                w -= (basis.T @ (basis @ w.cpu())).to(w.device)
            else:
                w -= basis.T @ (basis @ w)
            if torch.linalg.vector_norm(w) > _KAHAN_PARLETT * before:
                break
        return w

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor | None:
        """Rows of ``coefficients.T @ basis``: Ritz vectors from columns of eigenvectors of T."""
        if self.vectors is None:
            return None
        basis = self.vectors[: self.size]
        return (coefficients.T.to(device=basis.device, dtype=basis.dtype) @ basis).to(self.device)


def choose_basis_storage(
    storage: BasisStorage, capacity: int, dim: int, dtype: torch.dtype, device: torch.device, memory_budget: int | None
) -> str:
    """Where the basis of `capacity` vectors lives (see module docstring)."""
    if storage != "auto":
        return storage
    need = capacity * dim * torch.finfo(dtype).bits // 8
    if device.type == "cuda":
        budget = memory_budget if memory_budget is not None else _DEVICE_BUDGET_FRACTION * torch.cuda.mem_get_info(device)[0]
        if need <= budget:
            return "device"
        return "host" if need <= _host_budget() else "recurrence"
    budget = memory_budget if memory_budget is not None else _host_budget()
    return "device" if need <= budget else "recurrence"


def _host_budget() -> float:
    try:
        return _HOST_BUDGET_FRACTION * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return float("inf")


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    *,
    k: int = 1,
    which: Which = "both",
    tol: float = 1e-3,
    max_iter: int | None = None,
    min_iter: int | None = None,
    v0: torch.Tensor | None = None,
    warm_random: float = 0.3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    basis: BasisStorage = "auto",
    memory_budget: int | None = None,
) -> LanczosResult:
    """Extreme eigenvalues of the symmetric operator `matvec` by Lanczos.

    Args:
        matvec: v -> A v on vectors of shape (dim,) (A symmetric).
        dim: the operator's dimension.
        k: Ritz pairs wanted at each requested end.
        which: "top", "bottom" or "both" ends to converge (both are always reported).
        tol: relative accuracy; the top end relative to |theta_max|, the bottom end relative to the
            spectral norm. ``0`` runs exactly `max_iter` steps (stochastic Lanczos quadrature).
        max_iter: most operator applications (default min(dim, 64)).
        min_iter: fewest applications before stopping (default min(dim, max(3, k + 1))); guards
            against false convergence from a warm start.
        v0: warm start (dim,) or block (b, dim), e.g. previous Ritz vectors; see `start_vector`.
        warm_random: weight of the random component mixed into a warm start, in [0, 1].
        seed: seeds the random start; identical on every rank, so data-parallel runs agree.
        device, dtype: where and in what precision the Lanczos vectors live (at least float32).
        basis: "auto", "device", "host" or "recurrence" (see module docstring).
        memory_budget: bytes the basis may take on the device (default: 30% of free memory).
    """
    dim, k, max_iter, min_iter = _validate(dim, k, which, tol, max_iter, min_iter, warm_random, basis)
    device = torch.device(device)
    dtype = torch.promote_types(dtype, torch.float32)
    storage = choose_basis_storage(basis, max_iter, dim, dtype, device, memory_budget)
    generator = torch.Generator().manual_seed(seed)
    q = start_vector(dim, v0, warm_random=warm_random, device=device, dtype=dtype, generator=generator)

    vectors = _Basis(max_iter, dim, storage, device, dtype)
    alphas: list[float] = []
    betas: list[float] = []
    previous: torch.Tensor | None = None
    previous_theta: torch.Tensor | None = None
    # Warm starts trust the gap estimate only after twice the minimum count (module docstring).
    state = _Convergence(k, which, tol, gap_estimates_from=min_iter if v0 is None else 2 * min_iter)
    while True:
        vectors.append(q)
        w = matvec(q).to(dtype)
        alpha = float(torch.dot(q, w))
        # The three-term recurrence first: what is left is nearly orthogonal to the basis, so one
        # reorthogonalisation pass usually suffices.
        w -= alpha * q
        if previous is not None:
            w -= betas[-1] * previous
        vectors.orthogonalise_(w)
        beta = float(torch.linalg.vector_norm(w))
        alphas.append(alpha)
        theta, s = _tridiagonal_eigh(alphas, betas)
        state.update(theta, s, beta, previous_theta, len(alphas) >= min_iter)
        previous_theta = theta
        m = len(alphas)
        if m >= max_iter or (tol > 0 and state.converged) or m >= dim:
            break
        scale = float(theta.abs().max())
        if beta <= 100 * torch.finfo(dtype).eps * max(scale, torch.finfo(dtype).tiny):
            if storage == "recurrence":
                break  # invariant subspace; without a basis there is nothing to restart against
            # Invariant subspace found: continue from a fresh direction orthogonal to it.
            w = torch.randn(dim, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
            vectors.orthogonalise_(w)
            beta_next = 0.0
            w /= torch.linalg.vector_norm(w)
        else:
            beta_next = beta
            w /= beta
        betas.append(beta_next)
        previous, q = q, w
    return state.result(theta, s, vectors, alphas, betas, storage)


def _validate(
    dim: int, k: int, which: str, tol: float, max_iter: int | None, min_iter: int | None, warm_random: float, basis: str
) -> tuple[int, int, int, int]:
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"`dim` must be a positive int, got {dim!r}.")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive int, got {k!r}.")
    if k > dim:
        raise ValueError(f"`k` must be at most the dimension ({dim}), got {k}.")
    if which not in WHICH:
        raise ValueError(f"`which` must be one of {WHICH}, got {which!r}.")
    if not (isinstance(tol, (int, float)) and 0 <= tol < 1):
        raise ValueError(f"`tol` must be a number in [0, 1), got {tol!r}.")
    if not 0.0 <= warm_random <= 1.0:
        raise ValueError(f"`warm_random` must be in [0, 1], got {warm_random!r}.")
    if basis not in BASIS_STORAGES:
        raise ValueError(f"`basis` must be one of {BASIS_STORAGES}, got {basis!r}.")
    if max_iter is None:
        max_iter = min(dim, 64)
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"`max_iter` must be a positive int, got {max_iter!r}.")
    max_iter = min(max_iter, dim)
    if max_iter < k:
        raise ValueError(f"`max_iter` ({max_iter}) must be at least `k` ({k}).")
    if min_iter is None:
        min_iter = max(3, k + 1)
    if not isinstance(min_iter, int) or min_iter < 1:
        raise ValueError(f"`min_iter` must be a positive int, got {min_iter!r}.")
    return dim, k, max_iter, min(min_iter, max_iter)


def _tridiagonal_eigh(alphas: list[float], betas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(t)


class _Convergence:
    """The stopping rule (module docstring) and the assembly of the result."""

    def __init__(self, k: int, which: str, tol: float, gap_estimates_from: int) -> None:
        self.k, self.which, self.tol = k, which, tol
        self.gap_estimates_from = gap_estimates_from
        self.converged = False
        self.top_converged = self.bottom_converged = False
        empty = torch.zeros(0, dtype=torch.float64)
        self.top_residuals = self.bottom_residuals = self.top_errors = self.bottom_errors = empty

    def update(
        self, theta: torch.Tensor, s: torch.Tensor, beta: float, previous: torch.Tensor | None, may_stop: bool
    ) -> None:
        m = theta.numel()
        kk = min(self.k, m)
        residuals = beta * s[-1].abs()
        errors = residuals.clone()
        if previous is not None and may_stop and m >= self.gap_estimates_from:
            errors = torch.minimum(errors, self._gap_estimates(theta, residuals, previous))
        top, bottom = torch.arange(m - 1, m - 1 - kk, -1), torch.arange(kk)
        self.top_residuals, self.bottom_residuals = residuals[top], residuals[bottom]
        self.top_errors, self.bottom_errors = errors[top], errors[bottom]
        spectral_norm = float(theta.abs().max())
        self.top_converged = may_stop and kk == self.k and bool(
            (self.top_errors <= self.tol * abs(float(theta[-1]))).all()
        )
        self.bottom_converged = may_stop and kk == self.k and bool(
            (self.bottom_errors <= self.tol * spectral_norm).all()
        )
        wanted = {"top": [self.top_converged], "bottom": [self.bottom_converged]}
        self.converged = all(
            ok for end in (("top", "bottom") if self.which == "both" else (self.which,)) for ok in wanted[end]
        )

    def _gap_estimates(self, theta: torch.Tensor, residuals: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """r^2 / gap for Ritz values that moved by less than tol * |theta| since the last step."""
        m = theta.numel()
        estimates = torch.full_like(theta, math.inf)
        if m < 2:
            return estimates
        gaps = torch.full_like(theta, math.inf)
        gaps[:-1] = torch.minimum(gaps[:-1], theta[1:] - theta[:-1])
        gaps[1:] = torch.minimum(gaps[1:], theta[1:] - theta[:-1])
        scale = float(theta.abs().max())
        # Ritz values at each end move monotonically outwards (interlacing): compare like with like.
        # The lower half is matched to the previous step's values from the bottom, the upper half
        # from the top (the previous step has one Ritz value fewer).
        half = m // 2
        moved = torch.cat([(theta[:half] - previous[:half]).abs(), (theta[half:] - previous[half - 1 :]).abs()])
        stagnant = moved <= self.tol * scale
        usable = stagnant & (gaps > 0)
        estimates[usable] = residuals[usable] ** 2 / gaps[usable]
        return estimates

    def result(
        self, theta: torch.Tensor, s: torch.Tensor, vectors: _Basis, alphas: list[float], betas: list[float], storage: str
    ) -> LanczosResult:
        m = theta.numel()
        kk = min(self.k, m)
        top, bottom = torch.arange(m - 1, m - 1 - kk, -1), torch.arange(kk)
        return LanczosResult(
            top=theta[top],
            bottom=theta[bottom],
            top_residuals=self.top_residuals,
            bottom_residuals=self.bottom_residuals,
            top_errors=self.top_errors,
            bottom_errors=self.bottom_errors,
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
            basis=storage,
        )
