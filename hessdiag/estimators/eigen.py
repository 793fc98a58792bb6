"""`hessian_eigenvalues`: the top and bottom Hessian eigenvalues of a training loss.

One Lanczos run over exact Hessian-vector products gives both ends of the spectrum. The gradient
graph is built once per estimate and every product reuses it, so an estimate of m products costs
one forward, one backward and m backward-of-backward passes.

With finite-difference products the error of a product depends on its direction (four orders of
magnitude apart on a transformer: large along residual-stream biases, small along a random vector),
so the error measured on a random vector only steers the stopping rule. Each reported value is then
re-measured along its own Ritz vector y (:meth:`~hessdiag.operator.HessianOperator.along`): the value
is the Rayleigh quotient theta = y.R y of the extrapolated product R, its bound
||R y - theta y|| + ||R y - H y|| (the second term measured as ||R(eps) y - R(2 eps) y||, about 15
times R's truncation along y) plus rounding, and `converged` rests on these bounds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from hessdiag.isolation import ModelMode
from hessdiag.errors import HessdiagWarning
from hessdiag.estimators.layer_shares import layer_shares
from hessdiag.lanczos import BasisStorage, LanczosResult, MemoryBudget, Which, lanczos
from hessdiag.operator import HVP_METHODS, HessianBlock, HessianOperator, HVPMethod, LossFn
from hessdiag.vectors import dot


@dataclass
class HessianEigenvalues:
    """The result of :func:`hessian_eigenvalues`.

    What is proven and what is probable (details in :mod:`hessdiag.lanczos.certificates`): each Ritz value has an
    eigenvalue of the Hessian within its error bound, rounding and product errors included; that
    this eigenvalue is the extreme one (no larger eigenvalue hides outside the Krylov space) is
    probable only, set by the random part of the start vector. With finite-difference products each
    value and its bound are measured along the value's own Ritz vector (module docstring): the product
    error there is an estimate (conservative: about 15 times the truncation it stands for), not a proof,
    so the bounds and `converged` hold as far as it does. Without Ritz vectors (``basis="recurrence"``)
    finite-difference values cannot be re-measured: `converged` and the negative-curvature
    certificate are then False.

    Every value is a Python float (lists of k per end), like `lambda_max`; only the vectors and the
    solver's own record (`lanczos`) are tensors.

    Attributes:
        top: the k largest eigenvalue estimates (Ritz values), descending.
        bottom: the k smallest, ascending (most negative first).
        error_bounds: ``{"top": [...], "bottom": [...]}`` proven bounds, aligned with `top` and
            `bottom`: an eigenvalue of the Hessian lies within each of its Ritz value. They include
            the residual, the products' error (finite differences: measured along each Ritz vector)
            and rounding.
        residuals: ``{"top": [...], "bottom": [...]}`` the residuals alone (the bounds without product
            errors and rounding): beta_m |s_m| for exact products, ||R y - theta y|| for finite
            differences.
        probable_limits: ``{"top": ..., "bottom": ...}``: with probability at least 99% over the
            random part of the start vector (``hessdiag.lanczos.MISS_PROBABILITY``), no eigenvalue of
            the Hessian lies above ``probable_limits["top"]`` or below ``probable_limits["bottom"]``: a
            bound (Christoffel function of the run, see :mod:`hessdiag.lanczos.certificates`), not an estimate. So
            lambda_max lies between ``top[0]`` (less ``lanczos.interlacing_slack``: proven) and
            ``probable_limits["top"]`` (probable), and likewise lambda_min at the bottom.
        num_hvps: Hessian-vector products spent.
        converged: every requested error bound is within `tol` (lambda_max relative to itself,
            lambda_min relative to the spectral norm).
        tol: the tolerance `converged` was tested against: the one asked for, or, for a bfloat16 or
            float16 model, the precision floor its bounds can reach when that is larger
            (``HessianOperator.precision_floor``).
        top_vectors, bottom_vectors: unit Ritz vectors, shape (k, dim), flat over the parameters in
            order; pass the result itself (or a block of vectors) as the next `v0`. ``None`` when the
            basis did not fit in memory (recurrence mode). On an FSDP2-sharded model, this rank's
            pieces: shape (k, operator size), over its local shards.
        negative_curvature_certified: theta_min is below zero by more than the run's rounding and
            product errors, which proves lambda_min < 0 and makes ``bottom_vectors[0]`` a direction
            of negative curvature. ``False`` proves nothing.
        loss: the loss at the point (global batch under data parallelism; the mean over ranks of
            the per-rank losses on an FSDP2-sharded model, as FSDP averages them).
        grad_norm: the norm of the gradient on the same batch.
        lanczos: the underlying :class:`~hessdiag.lanczos.LanczosResult` (tridiagonal, all Ritz values;
            tensors, float64 on the CPU; with finite differences its values are the solver's, before
            the re-measurement along the Ritz vectors).
        model, params: the network and the parameters the vectors are over (what :meth:`layer_shares`
            groups by module); None for a result built by hand.
    """

    top: list[float]
    bottom: list[float]
    error_bounds: dict[str, list[float]]
    residuals: dict[str, list[float]]
    probable_limits: dict[str, float]
    num_hvps: int
    converged: bool
    top_vectors: torch.Tensor | None
    bottom_vectors: torch.Tensor | None
    negative_curvature_certified: bool
    loss: float
    grad_norm: float
    lanczos: LanczosResult
    tol: float
    model: nn.Module | None = field(default=None, repr=False)
    params: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def lambda_max(self) -> float:
        return float(self.top[0])

    @property
    def lambda_min(self) -> float:
        return float(self.bottom[0])

    def layer_shares(self, which: Literal["top", "bottom"] = "top") -> dict[str, float]:
        """Where the extreme eigenvector of `which` end lives: per module, the share of its squared
        norm (see :func:`hessdiag.estimators.layer_shares`), ``{module_name: share}`` summing to 1, most first.

        ``result.layer_shares("top")`` of a check whose top vector lies 71% in ``layer4.1.conv2``
        starts with ``{"layer4.1.conv2": 0.71, ...}``. Free: no product, one host read (an
        all-reduce of one float per module on an FSDP2-sharded model).

        Raises:
            ValueError: `which` is not "top" or "bottom"; the result has no Ritz vectors (the basis
                lived in the three-vector recurrence, ``basis="recurrence"`` or a model too large for
                `memory_budget`: the vectors were not kept) or no model (built by hand).
        """
        if which not in ("top", "bottom"):
            raise ValueError(f"`which` must be 'top' or 'bottom', got {which!r}.")
        vectors = self.top_vectors if which == "top" else self.bottom_vectors
        if vectors is None:
            raise ValueError(
                f"This result has no {which} Ritz vector: Lanczos ran as a three-vector recurrence (the basis did "
                "not fit in `memory_budget`, or basis='recurrence'), which keeps no eigenvectors; no layer shares."
            )
        if self.model is None:
            raise ValueError("This result does not know its model (built by hand): call hessdiag.estimators.layer_shares(model, vector).")
        return layer_shares(self.model, vectors[0], self.params)

    def warm_start(self) -> torch.Tensor | None:
        """The block of Ritz vectors (top, then bottom) to start the next estimate from."""
        blocks = [v for v in (self.top_vectors, self.bottom_vectors) if v is not None]
        return torch.cat(blocks) if blocks else None


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    k: int = 1,
    which: Which = "both",
    tol: float = 1e-3,
    max_iter: int | None = None,
    min_iter: int | None = None,
    v0: torch.Tensor | HessianEigenvalues | None = None,
    params: Iterable[torch.Tensor] | None = None,
    mode: ModelMode = "as_is",
    hvp_method: HVPMethod = "auto",
    warm_random: float = 0.3,
    seed: int = 0,
    basis: BasisStorage = "auto",
    memory_budget: MemoryBudget = None,
    batch_size: int | None = None,
) -> HessianEigenvalues:
    """Top and bottom Hessian eigenvalues of ``loss_fn(model, batch)`` by Lanczos.

    Example::

        result = hessian_eigenvalues(model, loss_fn, batch)             # k=1, both ends, tol=1e-3
        result.lambda_max, result.error_bounds["top"][0]               # value, proven bound (floats)
        if result.negative_curvature_certified:                        # lambda_min < 0, proven
            escape = result.bottom_vectors[0]
        later = hessian_eigenvalues(model, loss_fn, next_batch, v0=result)   # warm start

    Args:
        model: the network; its parameters, buffers, modes, ``.grad`` and the RNG are left as found.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batch: passed to `loss_fn`.
        k: eigenvalues per end.
        which: the end(s) that must converge: "top", "bottom" or "both" (both are reported).
        tol: relative accuracy, in (0, 1): lambda_max relative to itself, lambda_min relative to the
            spectral norm. For a bfloat16 or float16 model, raised to the precision floor its bounds
            can reach (8 eps of the dtype: 0.0625 for bfloat16, 0.0078 for float16), with a warning.
        max_iter: most Hessian-vector products (default min(dim, 64)).
        min_iter: fewest products before stopping (default max(3, k + 1)).
        v0: warm start: a previous result, a vector (dim,) or a block (b, dim).
        params: parameters to take the Hessian over (default: all trainable ones).
        mode: "as_is" (default: each module keeps its mode, so a frozen backbone held in eval, e.g.
            BatchNorm on running statistics, stays so: the loss the optimizer sees, as the callback
            and the Monitor measure it), "train" (every module in train mode) or "eval".
        hvp_method: "auto" (default: double backward, cross-checked once against finite differences,
            which replace it where it fails or is incomplete), "double_backward",
            "forward_over_reverse" or "finite_difference" (see :mod:`hessdiag.operator`).
        warm_random: weight of the random component mixed into a warm start.
        seed: seeds the random start vector and dropout inside the estimate.
        basis, memory_budget: where the Lanczos basis lives (see :mod:`hessdiag.lanczos.basis`).
        batch_size: local samples, to weight ranks under data parallelism (default: inferred).

    Returns:
        A :class:`HessianEigenvalues`: both ends with their proven error bounds, `converged`,
        the negative-curvature certificate, the Ritz vectors for the next warm start.

    Raises:
        ValueError: bad arguments (no trainable parameters, k larger than the dimension, ...).
        LossClosureError, NonFiniteLossError, NonFiniteGradientError, SecondDerivativeError, NonSmoothLossError,
            CoarseFiniteDifferenceError: see :mod:`hessdiag.errors`.
    """
    if hvp_method not in HVP_METHODS:
        raise ValueError(f"`hvp_method` must be one of {HVP_METHODS}, got {hvp_method!r}.")
    _validate_tol(tol)
    operator = HessianOperator(
        model, loss_fn, batch, params=params, mode=mode, method=hvp_method, seed=seed, batch_size=batch_size
    )
    with operator:
        result = eigenvalues_of(
            operator, k=k, which=which, tol=tol, max_iter=max_iter, min_iter=min_iter, v0=v0,
            warm_random=warm_random, seed=seed, basis=basis, memory_budget=memory_budget,
        )  # fmt: skip
    _warn_if_raised(tol, result.tol, operator.parameter_dtype)
    return result


def _warn_if_raised(asked: float, used: float, dtype: torch.dtype) -> None:
    """Warn the caller of :func:`hessian_eigenvalues` when `tol` was raised to the precision floor
    of a bfloat16/float16 model (the Monitor warns once, in its own words)."""
    if used > asked:
        warnings.warn(
            f"`tol`={asked:g} is below what the bounds of this {dtype} model can prove (its products carry "
            f"the dtype's rounding): raised to {used:.3g}. Keep float32 parameters (e.g. under autocast) "
            "for a tighter tolerance.",
            HessdiagWarning,
            stacklevel=3,
        )


def _validate_tol(tol: object) -> None:
    """`tol` must be a number in (0, 1): at 0 no bound could ever be met (the solver would spend
    `max_iter` products and report ``converged=False``).

    Raises:
        ValueError: otherwise, naming `tol`.
    """
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ValueError(f"`tol` must be a number in (0, 1), got {tol!r}.")


@dataclass(frozen=True)
class _End:
    """One end of the spectrum: values, residuals, bounds (Python floats) and whether it converged."""

    values: list[float]
    residuals: list[float]
    bounds: list[float]
    converged: bool

    @classmethod
    def of(cls, result: LanczosResult, end: str, converged: bool) -> _End:
        """The solver's values, residuals and bounds of `end` ("top" or "bottom") as floats."""
        values, residuals, bounds = (getattr(result, name) for name in (end, f"{end}_residuals", f"{end}_error_bounds"))
        return cls(values.tolist(), residuals.tolist(), bounds.tolist(), converged)


def _measured_along_ritz_vectors(
    operator: HessianOperator | HessianBlock, result: LanczosResult, which: Which, tol: float
) -> tuple[dict[str, _End], bool]:
    """Both ends re-measured along their Ritz vectors with finite-difference products (module
    docstring), and the negative-curvature certificate from them: y.H y <= theta + error < 0 proves
    lambda_min < 0. Without Ritz vectors nothing is re-measured and nothing is claimed."""
    if result.top_vectors is None or result.bottom_vectors is None:
        return {end: _End.of(result, end, False) for end in ("top", "bottom")}, False
    eps = torch.finfo(torch.promote_types(operator.dtype, torch.float32)).eps
    rounding_per_unit = (10 + math.log2(operator.dim)) * eps  # the arithmetic of theta and the residual
    measured: dict[str, tuple[list[float], list[float], list[float]]] = {}
    for end, vectors in (("top", result.top_vectors), ("bottom", result.bottom_vectors)):
        values, residuals, errors = [], [], []
        for y in vectors:
            y = y / operator.norm(y)
            along = operator.along(y)
            theta = float(dot(y, along.product, operator.shard))
            values.append(theta)
            residuals.append(operator.norm(along.product - theta * y))
            errors.append(along.error + rounding_per_unit * operator.norm(along.product))
        measured[end] = (values, residuals, errors)
    scale = max(float(result.ritz_values.abs().max()), *(abs(v) for m in measured.values() for v in m[0]))
    ends = {}
    for end, (values, residuals, errors) in measured.items():
        bounds = [r + e for r, e in zip(residuals, errors)]
        reference = abs(values[0]) if end == "top" else scale
        ends[end] = _End(values, residuals, bounds, all(b <= tol * reference for b in bounds))
    values, _, errors = measured["bottom"]
    return ends, values[0] + errors[0] < 0


def eigenvalues_of(
    operator: HessianOperator | HessianBlock,
    *,
    k: int = 1,
    which: Which = "both",
    tol: float = 1e-3,
    max_iter: int | None = None,
    min_iter: int | None = None,
    v0: torch.Tensor | HessianEigenvalues | None = None,
    warm_random: float = 0.3,
    seed: int = 0,
    basis: BasisStorage = "auto",
    memory_budget: MemoryBudget = None,
) -> HessianEigenvalues:
    """:func:`hessian_eigenvalues` on an open :class:`HessianOperator` (whose graph other
    estimates of the same check can reuse), or on a diagonal block of one (:class:`HessianBlock`).
    Arguments as for :func:`hessian_eigenvalues`; `tol` is
    raised to ``operator.precision_floor`` silently (the result's `tol` says so)."""
    _validate_tol(tol)
    if isinstance(v0, HessianEigenvalues):
        v0 = v0.warm_start()
    if not isinstance(k, int) or not 1 <= k <= operator.dim:
        raise ValueError(f"`k` must be an int in [1, {operator.dim}] (the number of parameters), got {k!r}.")
    if v0 is not None and v0.numel() % operator.size != 0:
        raise ValueError(f"`v0` must have shape ({operator.size},) or (b, {operator.size}), got {tuple(v0.shape)}.")
    hvps_before = operator.num_hvps
    tol = max(tol, operator.precision_floor)
    grad_norm = operator.norm(operator.gradient())
    result = lanczos(
        operator.matvec,
        operator.dim,
        k=k,
        which=which,
        tol=tol,
        max_iter=max_iter,
        min_iter=min_iter,
        v0=v0,
        warm_random=warm_random,
        seed=seed,
        device=operator.device,
        dtype=operator.dtype,
        basis=basis,
        memory_budget=memory_budget,
        matvec_error=lambda: operator.product_error,
        shard=operator.shard,
    )
    ends = {"top": _End.of(result, "top", result.top_converged), "bottom": _End.of(result, "bottom", result.bottom_converged)}
    certified = result.negative_curvature_certified
    if operator.method == "finite_difference":
        ends, certified = _measured_along_ritz_vectors(operator, result, which, tol)
    wanted = ("top", "bottom") if which == "both" else (which,)
    return HessianEigenvalues(
        top=ends["top"].values,
        bottom=ends["bottom"].values,
        error_bounds={end: ends[end].bounds for end in ends},
        residuals={end: ends[end].residuals for end in ends},
        probable_limits={"top": float(result.top_limit), "bottom": float(result.bottom_limit)},
        num_hvps=operator.num_hvps - hvps_before,
        converged=all(ends[end].converged for end in wanted),
        top_vectors=result.top_vectors,
        bottom_vectors=result.bottom_vectors,
        negative_curvature_certified=certified,
        loss=operator.loss,
        grad_norm=grad_norm,
        lanczos=result,
        tol=tol,
        model=operator.model,
        params=list(operator.params),
    )
