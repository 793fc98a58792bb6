"""The periodic curvature check of a training run.

`CurvatureProbe.run` takes the current batch (or a sub-batch), builds the Hessian operator once and,
reusing its gradient graph, computes:

* lambda_max and lambda_min by one Lanczos run, warm-started from the previous check's Ritz vectors
  (every `cold_every`-th check starts cold, so an eigenvector that turned is found again);
* for Adam/AdamW, the preconditioned sharpness lambda_max(P^-1 H), by Lanczos on the symmetric
  D^1/2 H D^1/2 (D = diag(1 / (sqrt(v_hat) + eps)) from the optimizer's ``exp_avg_sq``), which is
  what the stability threshold of an adaptive method refers to; with per-group learning rates,
  also scaled by lr_i / lr_0 (see :mod:`hessdiag.stability`);
* when negative curvature is certified, the loss change along the bottom Ritz vector (both signs,
  the better one): a direct check that it is an escape direction;
* every `density_every`-th check, the spectral density by stochastic Lanczos quadrature (on
  FSDP2-sharded models from this rank's coordinates of the probes, the same on every rank).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from hessdiag._isolation import ModelMode, preserved_state, unwrap_model
from hessdiag.batches import batch_size, step_loss, take_sub_batch
from hessdiag.eigen import HessianEigenvalues, eigenvalues_of
from hessdiag.operator import HessianOperator, HVPMethod, LossFn
from hessdiag.lanczos import lanczos
from hessdiag.spectrum import SpectralDensity, slq_density
from hessdiag.stability import StabilityThreshold, adam_preconditioner_sqrt, relative_step_sizes, stability_threshold

#: The escape probe steps so that the quadratic model predicts a loss drop of this fraction.
_ESCAPE_PROBE_FRACTION = 0.01

RankWeighting = Literal["equal", "samples"]


@dataclass
class CurvatureCheck:
    """What one curvature check found (python floats; see :func:`~hessdiag.hessian_eigenvalues`).

    Attributes:
        step: the training step.
        lambda_max, lambda_min: extreme Ritz values of the Hessian on the check batch.
        negative_curvature_certified: lambda_min <= lambda_min (the reported value) < 0 is proven.
        residual_max, residual_min: residual bounds of the two values.
        lambda_max_limit, lambda_min_limit: with probability at least 99% over the random part of the
            start, no eigenvalue lies above `lambda_max_limit` or below `lambda_min_limit` (the run's
            ``probable_limits``: how far a warm start that stopped early may be from the true ends).
        converged: both ends met the tolerance.
        num_hvps: products spent (all estimates of the check).
        seconds: wall time of the check.
        loss, grad_norm: on the check batch.
        sharpness: the value compared with the stability threshold: lambda_max, or for Adam the
            preconditioned lambda_max(P^-1 H).
        stability: the optimizer's stability threshold, when it has one.
        loss_change_along_bottom: min over +-alpha of L(theta + alpha y_min) - L(theta), with alpha
            such that the quadratic model predicts a 1% drop; ``None`` without certified negative curvature.
        cold: the Lanczos run started from a random vector.
        hvp_method: the product method the check used ("auto" resolved: "double_backward" or
            "finite_difference"; or the one asked for).
        hvp_method_reason: why that method (what "auto"'s cross-check found, "asked for", ...).
        product_error: the error per product that entered the bounds (0 for exact products; for
            finite differences an estimate measured on one random vector, see
            :class:`~hessdiag.HessianOperator`).
        batch_size: samples in the check batch.
        tol: the tolerance `converged` was tested against: the one asked for, or the precision floor
            of a bfloat16/float16 model when that is larger (see :func:`~hessdiag.hessian_eigenvalues`).
    """

    step: int
    lambda_max: float
    lambda_min: float
    negative_curvature_certified: bool
    residual_max: float
    residual_min: float
    lambda_max_limit: float
    lambda_min_limit: float
    converged: bool
    num_hvps: int
    seconds: float
    loss: float
    grad_norm: float
    sharpness: float
    stability: StabilityThreshold | None
    loss_change_along_bottom: float | None
    cold: bool
    batch_size: int | None
    hvp_method: str
    hvp_method_reason: str
    product_error: float
    tol: float
    density: SpectralDensity | None = None

    @property
    def stability_ratio(self) -> float | None:
        """sharpness / threshold: >= 1 means the steepest direction is beyond the stability edge."""
        return self.sharpness / self.stability.threshold if self.stability else None


class CurvatureProbe:
    """Curvature checks with warm starts across checks.

    The batch may be :class:`~hessdiag.batches.MicroBatches` (gradient accumulation): the check's loss
    is then the mean of the micro-batches' losses. A closure that changes the model's state (an EMA
    teacher, a counter, a reassigned buffer) is undone after the check (see
    :func:`~hessdiag._isolation.preserved_state`). When the trainable parameters change (unfreezing),
    the next check starts cold.

    Args:
        model, loss_fn: the network and ``loss_fn(model, batch) -> scalar``.
        k, tol, max_iter: as for :func:`~hessdiag.hessian_eigenvalues`.
        cold_every: every n-th check starts from a random vector (0: never after the first); with
            ``hvp_method="auto"`` only cold checks cross-check double backward against finite
            differences, warm ones reuse an approval.
        sub_batch: samples of the batch to use (default: all).
        mode, hvp_method, params: as for :class:`~hessdiag.HessianOperator`; the default mode
            ``"as_is"`` keeps each module's mode of the training step (a frozen backbone in eval).
        rank_weighting: under data parallelism, ``"equal"`` (default): the mean of the ranks' losses,
            which is what DDP's gradient averaging descends; ``"samples"``: the mean over the union of
            the ranks' samples (differs when local batches differ in size).
        density_every: every n-th check also estimates the spectral density (0: never).
        density_probes, density_iter: size of that estimate.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        k: int = 1,
        tol: float = 1e-3,
        max_iter: int | None = None,
        cold_every: int = 5,
        sub_batch: int | None = None,
        mode: ModelMode = "as_is",
        hvp_method: HVPMethod = "auto",
        params: Iterable[torch.Tensor] | None = None,
        rank_weighting: RankWeighting = "equal",
        density_every: int = 0,
        density_probes: int = 2,
        density_iter: int = 20,
    ) -> None:
        self.model = model
        self.loss_fn = step_loss(loss_fn)
        self.k, self.tol, self.max_iter = k, tol, max_iter
        self.cold_every = cold_every
        self.sub_batch = sub_batch
        self.mode: ModelMode = mode
        self.hvp_method: HVPMethod = hvp_method
        self.params = None if params is None else list(params)
        self.rank_weighting: RankWeighting = rank_weighting
        self.density_every, self.density_probes, self.density_iter = density_every, density_probes, density_iter
        self.num_checks = 0
        self.warm_vectors: torch.Tensor | None = None
        self.warm_preconditioned: torch.Tensor | None = None
        #: The step of the last cold check whose cross-check ("auto") chose double backward, else None.
        self.verified_step: int | None = None

    def run(self, step: int, batch: Any, optimizer: torch.optim.Optimizer | None = None, *, sub_batch: int | None = None) -> CurvatureCheck:
        """One check on `batch` (cut to `sub_batch` or the probe's own sub-batch size).

        Raises the engine's errors (see :mod:`hessdiag.errors`); the caller decides what to do.
        """
        start = time.perf_counter()
        batch = take_sub_batch(batch, sub_batch or self.sub_batch)
        seed = self.num_checks  # a fresh dropout draw per check, the same for all products of one check
        cold = self.warm_vectors is None or (self.cold_every > 0 and self.num_checks % self.cold_every == 0)
        # "auto"'s cross-check (about four gradients and two products) runs on cold checks; a warm one
        # reuses the last verdict for exact products: the same model and loss run the same ops.
        reuse = self.hvp_method == "auto" and self.verified_step is not None and not cold
        operator = self._operator(batch, seed, "double_backward" if reuse else self.hvp_method)
        if self.warm_vectors is not None and self.warm_vectors.shape[-1] != operator.size:
            self.warm_vectors = self.warm_preconditioned = None  # the trainable parameters changed
            cold = True
            if reuse:  # parameters that were not cross-checked: check them
                reuse, operator = False, self._operator(batch, seed, self.hvp_method)
        with preserved_state(unwrap_model(self.model), operator.params), operator:
            result = eigenvalues_of(
                operator, k=self.k, tol=self.tol, max_iter=self.max_iter, v0=None if cold else self.warm_vectors, seed=seed
            )
            stability, sharpness = self._stability(operator, result, optimizer, cold, seed)
            escape = self._escape_probe(operator, result)
            density = None
            # The n-th, 2n-th, ... check: not the first, which is cold and already the dearest
            # (with check_every="auto" a dear first check delays all the others).
            if self.density_every and (self.num_checks + 1) % self.density_every == 0:
                density = slq_density(
                    operator.matvec, operator.dim, num_probes=self.density_probes,
                    num_iter=min(self.density_iter, operator.dim), seed=seed,
                    device=operator.device, dtype=operator.dtype, shard=operator.shard,
                )  # fmt: skip
            num_hvps = operator.num_hvps
        self.warm_vectors = result.warm_start()
        self.num_checks += 1
        method_reason = operator.method_reason
        if reuse:
            method_reason = (
                f"cross-checked against finite differences at step {self.verified_step} (again at every cold check)"
            )
        elif self.hvp_method == "auto":
            self.verified_step = step if operator.method == "double_backward" else None
        return CurvatureCheck(
            step=step,
            lambda_max=result.lambda_max,
            lambda_min=result.lambda_min,
            negative_curvature_certified=result.negative_curvature_certified,
            residual_max=float(result.residuals["top"][0]),
            residual_min=float(result.residuals["bottom"][0]),
            lambda_max_limit=result.probable_limits["top"],
            lambda_min_limit=result.probable_limits["bottom"],
            converged=result.converged,
            num_hvps=num_hvps,
            seconds=time.perf_counter() - start,
            loss=result.loss,
            grad_norm=result.grad_norm,
            sharpness=sharpness,
            stability=stability,
            loss_change_along_bottom=escape,
            cold=cold,
            batch_size=batch_size(batch),
            hvp_method=operator.method,
            hvp_method_reason=method_reason,
            product_error=operator.product_error,
            tol=result.tol,
            density=density,
        )

    def shrink_sub_batch(self, size: int) -> None:
        """Use at most `size` samples of each batch from now on (a smaller check fitted in memory)."""
        self.sub_batch = size if self.sub_batch is None else min(self.sub_batch, size)

    def forget_warm_start(self) -> None:
        """Start the next check cold (its warm-start vectors belong to a check that did not finish)."""
        self.warm_vectors = self.warm_preconditioned = None

    def _operator(self, batch: Any, seed: int, method: HVPMethod) -> HessianOperator:
        return HessianOperator(
            self.model, self.loss_fn, batch, params=self.params, mode=self.mode, method=method, seed=seed,
            # equal rank weights: every rank counts as one sample
            batch_size=1 if self.rank_weighting == "equal" else batch_size(batch),
        )  # fmt: skip

    def _stability(
        self,
        operator: HessianOperator,
        result: HessianEigenvalues,
        optimizer: torch.optim.Optimizer | None,
        cold: bool,
        seed: int,
    ) -> tuple[StabilityThreshold | None, float]:
        if optimizer is None:
            return None, result.lambda_max
        try:
            threshold = stability_threshold(optimizer)
        except ValueError:  # an optimizer without a known stability rule: report the raw sharpness
            return None, result.lambda_max
        if not threshold.preconditioned:
            return threshold, result.lambda_max
        scale = self._preconditioner_sqrt(optimizer, operator.params)
        if scale is None:  # Adam before its first step: no second-moment estimate yet
            return None, result.lambda_max
        scale = scale.to(device=operator.device, dtype=operator.dtype)
        preconditioned = lanczos(
            lambda v: scale * operator.matvec(scale * v),
            operator.dim,
            which="top",
            tol=self.tol,
            max_iter=self.max_iter,
            v0=None if cold else self.warm_preconditioned,
            seed=seed,
            device=operator.device,
            dtype=operator.dtype,
            shard=operator.shard,
        )
        self.warm_preconditioned = preconditioned.top_vectors
        return threshold, float(preconditioned.top[0])

    @staticmethod
    def _preconditioner_sqrt(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The diagonal whose square preconditions H for the stability threshold: Adam's
        (sqrt(v_hat) + eps)^-1/2 and the per-group learning rates' sqrt(lr_i / lr_0), combined."""
        steps = relative_step_sizes(optimizer, params)
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            return None if steps is None else steps.sqrt()
        adam = adam_preconditioner_sqrt(optimizer, params)
        return adam if adam is None or steps is None else adam * steps.sqrt()

    @staticmethod
    def _escape_probe(operator: HessianOperator, result: HessianEigenvalues) -> float | None:
        if not result.negative_curvature_certified or result.bottom_vectors is None:
            return None
        curvature = abs(result.lambda_min)
        alpha = math.sqrt(2 * _ESCAPE_PROBE_FRACTION * max(abs(result.loss), 1e-12) / curvature)
        direction = result.bottom_vectors[0]
        base = result.loss
        return min(operator.loss_along(direction, alpha), operator.loss_along(direction, -alpha)) - base

    def state_dict(self) -> dict[str, Any]:
        """Warm-start vectors and the check count (tensors and ints only)."""
        return {
            "num_checks": self.num_checks,
            "warm_vectors": None if self.warm_vectors is None else self.warm_vectors.detach().cpu(),
            "warm_preconditioned": None if self.warm_preconditioned is None else self.warm_preconditioned.detach().cpu(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.num_checks = int(state.get("num_checks", 0))
        self.warm_vectors = state.get("warm_vectors")
        self.warm_preconditioned = state.get("warm_preconditioned")
