"""Lanczos for both ends of a symmetric spectrum, from one Krylov run.

Works on any symmetric operator given as ``matvec(v) -> A v`` on flat vectors, so it is tested on
explicit matrices and used on Hessians alike.

* Full Gram-Schmidt reorthogonalisation against the stored basis (tens of vectors) after the
  three-term recurrence, with a second pass when the first cancels much (Kahan-Parlett): no ghost
  eigenvalues, Ritz vectors that are orthonormal to rounding.
* The tridiagonal matrix is kept and solved in float64.
* A single start vector sees each distinct eigenvalue once: with ``k > 1`` the k largest *distinct*
  eigenvalues come back (a repeated eigenvalue is reported once), each within its proven bound of
  *an* eigenvalue; that the i-th is the i-th largest is probable, like the extreme one below
  (measured, k = 2 and 3 on the six families below, 15 seeds, float64 and float32: in 7 of 360
  converged runs a Ritz value after the first sat on a further eigenvalue, up to 1.3e-2 of the
  spectral norm off the one it stands for; the bounds held in all). In float32 a multiple eigenvalue
  splits by rounding into distinct ones, and they come back as such.
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
* Warm starts: a start near the previous top eigenvector, after another direction has overtaken
  it, converges at once onto the old one (its residual is tiny) while the new top hides in the
  random part, whose weight along it is only about rho / sqrt(dim). So a warm start keeps a random
  component and may stop only `warm_steps` products after `min_iter` (default 8: on an overtaken
  top, dimension 400 to 100 000, gaps 0.5-10%, 2 runs in 90 still stopped on the old top, both at
  dimension 10 000; 6 steps left 15 in 60). A warm start that is safe in this sense saves products
  only where a cold run needs more than `min_iter` + `warm_steps` (a clustered top). Its
  `top_limit` says how little it explored: on the digits MLP 10 SGD steps on, 0.25 above theta_max
  (relative) warm against 8e-3 cold; on the overtaken tops above, always above the new top.
* lambda_min honestly: a theta_min below ``-slack`` certifies lambda_min <= theta_min + slack < 0 (its
  Ritz vector is a direction of negative curvature); anything above certifies nothing (a float32
  positive semi-definite matrix gives theta_min of -1e-7 ||A|| by rounding alone).
* Memory: the basis costs (max_iter + 1) x dim floats. ``basis="auto"`` keeps it on the device when
  it fits the budget, else in host memory, else falls back to the three-vector recurrence (extreme
  eigenvalues only, no Ritz vectors; duplicate "ghost" copies of converged values are harmless
  for the extremes; without reorthogonalisation the rounding model above is optimistic, and so are
  the probable limits, which assume the exact Lanczos polynomials).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from hessdiag import _distributed

Which = Literal["top", "bottom", "both"]
WHICH: tuple[str, ...] = ("top", "bottom", "both")
BasisStorage = Literal["auto", "device", "host", "recurrence"]
BASIS_STORAGES: tuple[str, ...] = ("auto", "device", "host", "recurrence")

_DEVICE_BUDGET_FRACTION = 0.3  # of free accelerator memory; the HVPs need the rest
_HOST_BUDGET_FRACTION = 0.5  # of available host memory
_KAHAN_PARLETT = 2**-0.5
_HOST_DRAW_CHUNK = 1 << 22  # random numbers per host draw (32 MB of float64); a multiple of 16
#: The probability, over the random part of the start vector, that an eigenvalue lies beyond the
#: reported `top_limit` / `bottom_limit` (module docstring).
MISS_PROBABILITY = 0.01
# Distances from the extreme Ritz value at which the limits are tried, in units of the spectral norm:
# 10 per decade from 1e-12 to 1e6; the first distance that passes is reported (rounded outwards).
_LIMIT_DISTANCES = torch.logspace(-12, 6, 181, dtype=torch.float64)


@dataclass(frozen=True)
class VectorShard:
    """How the vectors are split across processes (e.g. FSDP2-sharded parameters): each process
    holds `size` of the `dim` coordinates and the inner products are sums over processes.

    Attributes:
        size: this process's number of coordinates (shards may be uneven).
        sum_: sums a tensor of partial inner products over the processes, in place, and returns it.
        index: this process's rank; each process draws its own coordinates of a random vector from
            a generator seeded by (seed, index), so the whole vector has i.i.d. Gaussian entries.
    """

    size: int
    sum_: Callable[[torch.Tensor], torch.Tensor]
    index: int


def _partial_sums(shard: VectorShard | None) -> Callable[[torch.Tensor], torch.Tensor]:
    return (lambda partial: partial) if shard is None else shard.sum_


def vector_norm(w: torch.Tensor, shard: VectorShard | None = None) -> torch.Tensor:
    """The norm of the whole vector of which `w` is this process's piece (0-dim tensor)."""
    if shard is None:
        return torch.linalg.vector_norm(w)
    return shard.sum_(torch.dot(w, w).reshape(1)).sqrt().reshape(())


def random_generator(seed: int, shard: VectorShard | None = None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for random vectors, seeded by `seed`, and with a shard by (seed, rank) so that
    each process draws its own coordinates (the hash of a tuple of ints is fixed).

    It lives on `device`, so that a vector of millions of coordinates is drawn where it is used (a
    host draw costs, on this project's 2-core CPU, 0.26 s for 11 M float64 coordinates, then a copy to
    the GPU; a cold check draws three). Except where several processes must draw the *same* vector
    (a data-parallel process group, vectors not sharded): there it lives on the CPU, whose float64
    draws (scalar code, no CPU-specific vector kernel) agree wherever the same torch runs, while a
    CUDA generator's stream may depend on the GPU model (its launch grid follows the SM count).
    """
    device = torch.device(device)
    if shard is None and _distributed.is_data_parallel():
        device = torch.device("cpu")
    return torch.Generator(device=device).manual_seed(seed if shard is None else hash((seed, shard.index)) % 2**63)


def _gaussian(size: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`size` i.i.d. standard normal numbers from `generator`, on `device` in `dtype`: drawn on the
    generator's device; on the host in float64 (see `random_generator`), in chunks."""
    if generator.device.type != "cpu":
        return torch.randn(size, generator=generator, device=generator.device, dtype=dtype).to(device)
    return _in_host_chunks(size, device, dtype, lambda n: torch.randn(n, generator=generator, dtype=torch.float64))


def random_signs(size: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`size` independent entries +1 or -1 (Rademacher) from `generator`, on `device` in `dtype`:
    drawn on the generator's device; on the host in chunks."""
    if generator.device.type != "cpu":
        bits = torch.randint(0, 2, (size,), generator=generator, device=generator.device, dtype=torch.int8)
        return bits.to(device=device, dtype=dtype).mul_(2).sub_(1)
    bits = _in_host_chunks(size, device, dtype, lambda n: torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8))
    return bits.mul_(2).sub_(1)


def _in_host_chunks(size: int, device: torch.device, dtype: torch.dtype, draw: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """A new tensor on `device` in `dtype` filled by `draw(n)` (a host generator) `_HOST_DRAW_CHUNK`
    numbers at a time, so that the host never holds the whole draw (8 GB of float64 for a billion
    coordinates, on every rank of a node at once). torch's host draws in chunks of a multiple of 16
    numbers give the numbers of one draw (tested)."""
    out = torch.empty(size, device=device, dtype=dtype)
    for start in range(0, size, _HOST_DRAW_CHUNK):
        piece = out[start : start + _HOST_DRAW_CHUNK]
        piece.copy_(draw(piece.numel()))
    return out


def _dot(a: torch.Tensor, b: torch.Tensor, shard: VectorShard | None) -> float:
    return float(_partial_sums(shard)(torch.dot(a, b).reshape(1)))


@dataclass
class LanczosResult:
    """Ritz pairs of both ends of the spectrum from one Lanczos run.

    Eigenvalue tensors are float64 on the CPU; vectors have the basis dtype on the operator's device.

    Attributes:
        top: the k largest Ritz values, descending.
        bottom: the k smallest Ritz values, ascending (most negative first).
        top_residuals, bottom_residuals: the Lanczos residuals beta_m |s_m| (exact products, no
            rounding): ||A y - theta y|| for exact arithmetic.
        top_error_bounds, bottom_error_bounds: proven bounds (module docstring): an eigenvalue of A
            lies within each of its Ritz value, product errors and rounding included. They alone
            decide `converged`.
        top_vectors, bottom_vectors: unit Ritz vectors, shape (k, dim); ``None`` in recurrence mode.
        num_iterations: Lanczos steps = operator applications.
        converged: every requested error bound is within the tolerance.
        top_converged, bottom_converged: the same, per end (``False`` for an end not requested).
        ritz_values: all Ritz values, ascending, shape (m,).
        ritz_weights: squared first components of the Ritz vectors of T (the quadrature weights
            of stochastic Lanczos quadrature), aligned with `ritz_values`; they sum to 1.
        alphas, betas: the tridiagonal matrix T (diagonal, off-diagonal), float64.
        basis: where the basis lived: "device", "host" or "recurrence".
        interlacing_slack: how far a Ritz value may lie outside [lambda_min, lambda_max] because of
            product errors and rounding (sqrt(m) e + rounding).
        top_limit, bottom_limit: probable limits of the whole spectrum: with probability at least
            1 - `MISS_PROBABILITY` over the random part of the start, no eigenvalue lies above
            `top_limit` or below `bottom_limit` (module docstring: a Christoffel-function bound, not
            an estimate). Infinite when the start had no random part; equal to the extreme Ritz
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


def start_vector(
    dim: int,
    v0: torch.Tensor | None,
    *,
    warm_random: float,
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator,
    shard: VectorShard | None = None,
) -> torch.Tensor:
    """A unit start vector: random, or a warm start mixed with a random component.

    A warm start is a vector of shape (dim,) or a block (b, dim) of previous Ritz vectors (e.g. the
    top and bottom ones), summed after normalising each row; the result is mixed as
    sqrt(1 - rho^2) u + rho r with r random and rho = `warm_random`, so that an eigenvector that
    has turned since the last check is still reachable from the Krylov space. With a `shard`,
    `dim` is this process's size and `v0` its piece.
    """
    noise = _gaussian(dim, generator, device, dtype)
    noise /= vector_norm(noise, shard)
    if v0 is None:
        return noise
    block = v0.detach().reshape(-1, dim).to(device=device, dtype=dtype)
    norms = _partial_sums(shard)(block.pow(2).sum(dim=1, keepdim=True)).sqrt()
    block = block[norms.squeeze(1) > 0] / norms[norms.squeeze(1) > 0]
    if block.numel() == 0:
        return noise
    warm = block.sum(dim=0)
    warm_norm = vector_norm(warm, shard)
    if not torch.isfinite(warm_norm) or warm_norm == 0:
        return noise
    mixed = math.sqrt(1.0 - warm_random**2) * (warm / warm_norm) + warm_random * noise
    return mixed / vector_norm(mixed, shard)


class _Basis:
    """Storage of the Lanczos vectors and the two-pass Gram-Schmidt against them."""

    def __init__(
        self, capacity: int, dim: int, storage: str, device: torch.device, dtype: torch.dtype, shard: VectorShard | None
    ) -> None:
        self.storage = storage
        self.shard = shard
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
                w -= _dot(q, w, self.shard) * q
            return w
        basis = self.vectors[: self.size]
        coefficients_of = _partial_sums(self.shard)
        for _ in range(2):
            before = vector_norm(w, self.shard)
            if self.storage == "host":
                w -= (basis.T @ coefficients_of(basis @ w.cpu())).to(w.device)
            else:
                w -= basis.T @ coefficients_of(basis @ w)
            if vector_norm(w, self.shard) > _KAHAN_PARLETT * before:
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
    matvec_error: float | Callable[[], float] = 0.0,
    warm_steps: int = 8,
    shard: VectorShard | None = None,
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
        seed: seeds the random start, drawn on `device` (see `random_generator`); identical on
            every rank, so data-parallel runs agree.
        device, dtype: where and in what precision the Lanczos vectors live (at least float32).
        basis: "auto", "device", "host" or "recurrence" (see module docstring).
        memory_budget: bytes the basis may take on the device (default: 30% of free memory).
        matvec_error: a bound on ||matvec(v) - A v|| for a unit v beyond rounding (absolute; 0 for
            exact products), or a callable returning it, read again at every stopping test.
        warm_steps: with a warm start, products beyond `min_iter` before the run may stop, so that
            the random part of the start can reveal an eigenvalue that overtook the previous top.
        shard: the vectors are split across processes (:class:`VectorShard`): `matvec`, `v0` and
            the Ritz vectors are this process's pieces (``shard.size`` coordinates), `dim` is the
            whole dimension, and every inner product is summed over the processes, so that all of
            them take the same steps and stop together.

    Returns:
        A :class:`LanczosResult`: Ritz values of both ends with their proven error bounds.

    Raises:
        ValueError: bad arguments, or `matvec` returned a tensor of the wrong shape.
        FloatingPointError: `matvec` returned NaN or infinity (with a `shard`: on every process at
            the same step, whichever piece held it).

    Example:
        >>> a = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> result = lanczos(lambda v: a @ v, 100, which="top", dtype=torch.float64)
        >>> result.converged, abs(float(result.top[0]) - 100.0) <= float(result.top_error_bounds[0])
        (True, True)
    """
    dim, k, max_iter, min_iter = _validate(dim, k, which, tol, max_iter, min_iter, warm_random, basis)
    product_error = _product_error_reader(matvec_error)
    if not isinstance(warm_steps, int) or warm_steps < 0:
        raise ValueError(f"`warm_steps` must be a non-negative int, got {warm_steps!r}.")
    device = torch.device(device)
    dtype = torch.promote_types(dtype, torch.float32)
    size = dim if shard is None else shard.size
    storage = choose_basis_storage(basis, max_iter, size, dtype, device, memory_budget)
    if shard is not None:
        # Without a basis the run takes other collective steps: recurrence on one process means on all.
        votes = shard.sum_(torch.tensor([float(storage == "recurrence")], dtype=torch.float64, device=device))
        storage = "recurrence" if float(votes) > 0 else storage
    generator = random_generator(seed, shard, device)
    q = start_vector(size, v0, warm_random=warm_random, device=device, dtype=dtype, generator=generator, shard=shard)

    vectors = _Basis(max_iter, size, storage, device, dtype, shard)
    alphas: list[float] = []
    betas: list[float] = []
    previous: torch.Tensor | None = None
    # A warm start may stop only once its random part had `warm_steps` products to show itself.
    may_stop_from = min_iter if v0 is None else min(min_iter + warm_steps, max_iter)
    state = _Convergence(k, which, tol, dim, torch.finfo(dtype).eps)
    # The random part's weight in the start (a warm start that fell back to noise has more: conservative).
    random_weight = 1.0 if v0 is None else warm_random
    while True:
        vectors.append(q)
        w = _product(matvec, q, dtype)
        alpha = _dot(q, w, shard)
        # Any NaN or infinity in w makes alpha NaN or infinite (0 * inf is NaN): one test on a number
        # every process already holds, so that with sharded vectors they all raise together.
        if not math.isfinite(alpha):
            raise FloatingPointError(
                f"`matvec` returned NaN or infinity at Lanczos step {len(alphas) + 1} (for a unit vector), or values "
                "whose inner product overflows: the operator is not finite there (for a Hessian: a loss that "
                "overflows or a non-smooth point); no eigenvalue reported."
            )
        # The three-term recurrence first: what is left is nearly orthogonal to the basis, so one
        # reorthogonalisation pass usually suffices.
        w -= alpha * q
        if previous is not None:
            w -= betas[-1] * previous
        vectors.orthogonalise_(w)
        beta = float(vector_norm(w, shard))
        alphas.append(alpha)
        theta, s = _tridiagonal_eigh(alphas, betas)
        state.update(theta, s, beta, product_error(), len(alphas) >= may_stop_from)
        m = len(alphas)
        if m >= max_iter or (tol > 0 and state.converged) or m >= dim:
            break
        scale = float(theta.abs().max())
        if beta <= 100 * torch.finfo(dtype).eps * max(scale, torch.finfo(dtype).tiny):
            if storage == "recurrence":
                break  # invariant subspace; without a basis there is nothing to restart against
            # Invariant subspace found: continue from a fresh direction orthogonal to it.
            w = _gaussian(size, generator, device, dtype)
            vectors.orthogonalise_(w)
            beta_next = 0.0
            w /= vector_norm(w, shard)
        else:
            beta_next = beta
            w /= beta
        betas.append(beta_next)
        previous, q = q, w
    return state.result(theta, s, vectors, alphas, betas, storage, random_weight)


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


def _product(matvec: Callable[[torch.Tensor], torch.Tensor], q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A v on a private copy of q, returned as a fresh tensor: a matvec that writes into its
    input, or returns a buffer it reuses (or its input), cannot corrupt the basis or the next step."""
    w = matvec(q.clone())
    if not isinstance(w, torch.Tensor) or w.shape != q.shape:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"`matvec` must return a tensor of shape {tuple(q.shape)}, got {got}.")
    return w.to(device=q.device, dtype=dtype, copy=True)


def _product_error_reader(matvec_error: float | Callable[[], float]) -> Callable[[], float]:
    """`matvec_error` as a callable; a number is validated here, a callable at each read."""

    def checked(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"`matvec_error` must be a finite number >= 0 (or return one), got {value!r}.")
        return float(value)

    if callable(matvec_error):
        return lambda: checked(matvec_error())
    fixed = checked(matvec_error)
    return lambda: fixed


class _Convergence:
    """The stopping rule on proven bounds (module docstring) and the assembly of the result."""

    def __init__(self, k: int, which: str, tol: float, dim: int, eps: float) -> None:
        self.k, self.which, self.tol, self.dim = k, which, tol, dim
        # Rounding per unit of m * ||A||; the constant is justified in the module docstring.
        self.rounding_per_step = (10 + math.log2(dim)) * eps
        self.converged = False
        self.top_converged = self.bottom_converged = False
        self.interlacing_slack = 0.0
        empty = torch.zeros(0, dtype=torch.float64)
        self.top_residuals = self.bottom_residuals = self.top_error_bounds = self.bottom_error_bounds = empty

    def update(self, theta: torch.Tensor, s: torch.Tensor, beta: float, product_error: float, may_stop: bool) -> None:
        m = theta.numel()
        kk = min(self.k, m)
        spectral_norm = float(theta.abs().max())
        rounding = self.rounding_per_step * m * spectral_norm
        residuals = beta * s[-1].abs()
        # ||F s|| <= e sum_j |s_j| + rounding, column by column of s (one column per Ritz vector).
        bounds = residuals + product_error * s.abs().sum(dim=0) + rounding
        self.interlacing_slack = math.sqrt(m) * product_error + rounding
        top, bottom = torch.arange(m - 1, m - 1 - kk, -1), torch.arange(kk)
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
        theta: torch.Tensor,
        s: torch.Tensor,
        vectors: _Basis,
        alphas: list[float],
        betas: list[float],
        storage: str,
        random_weight: float,
    ) -> LanczosResult:
        m = theta.numel()
        kk = min(self.k, m)
        bottom_limit, top_limit = probable_limits(alphas, betas[: m - 1], theta, self.dim, random_weight)
        # Floating point: the run is exact for an operator within the slack of A.
        bottom_limit, top_limit = bottom_limit - self.interlacing_slack, top_limit + self.interlacing_slack
        top, bottom = torch.arange(m - 1, m - 1 - kk, -1), torch.arange(kk)
        return LanczosResult(
            top=theta[top],
            bottom=theta[bottom],
            top_residuals=self.top_residuals,
            bottom_residuals=self.bottom_residuals,
            top_error_bounds=self.top_error_bounds,
            bottom_error_bounds=self.bottom_error_bounds,
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
    passes = _christoffel_sums(alphas, betas, torch.cat([high + distances, low - distances])) >= 1.0 / eta
    above, below = passes[: len(distances)], passes[len(distances) :]
    # K decreases monotonically beyond the extreme Ritz values: the first distance that passes is the limit.
    top = high + float(distances[above.nonzero()[0]]) if bool(above.any()) else math.inf
    bottom = low - float(distances[below.nonzero()[0]]) if bool(below.any()) else -math.inf
    return bottom, top


def _christoffel_sums(alphas: list[float], betas: list[float], x: torch.Tensor) -> torch.Tensor:
    """sum_{j<m} p_j(x)^2 at every point of `x` (float64), the p_j orthonormal for the start's spectral
    measure: beta_j p_{j+1} = (x - alpha_j) p_j - beta_{j-1} p_{j-1}, p_0 = 1. Outside the Ritz
    values this forward recurrence follows its growing solution, so it is stable; an overflow is a
    sum beyond any threshold (infinity)."""
    previous, current = torch.zeros_like(x), torch.ones_like(x)
    total = torch.ones_like(x)
    for j, beta in enumerate(betas):
        below = betas[j - 1] if j > 0 else 0.0
        previous, current = current, ((x - alphas[j]) * current - below * previous) / beta
        total += current * current
    return torch.nan_to_num(total, nan=math.inf)
