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
  FSDP2-sharded models from this rank's coordinates of the probes, the same on every rank), and the
  conditioning lambda_max / (trace / n) with the trace by Hutch++ (18 more products);
* where the curvature lives: the module shares of the top and bottom Ritz vectors (no product);
  with `module_sharpness` n > 0, lambda_max of the own diagonal blocks of the n modules holding most
  of the top vector (a Lanczos run each on the check's operator);
* what limits the step: the curvature along the gradient g'Hg / ||g||^2 (one product; for Adam and
  per-group learning rates along the preconditioned gradient, with the same preconditioner and
  threshold as the sharpness), its ratio to the sharpness and the learning-rate headroom;
* how much batch the run can use: the gradient noise scale from the check's batch cut in
  `noise_scale_parts` parts (about one more gradient of the check batch, no product), averaged over
  checks in :attr:`CurvatureProbe.noise_scale` (the ratio of one check's estimates is biased).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from hessdiag.isolation import ModelMode, preserved_state, unwrap_model
from hessdiag.batches import batch_size, step_loss, take_sub_batch
from hessdiag.check.starts import CheckStarts
from hessdiag.check.quantities import (
    along_gradient,
    check_noise_scale_parts,
    conditioning,
    escape_probe,
    finite_or_none,
    check_module_sharpness,
    module_shares,
    noise_scale_of,
    stability_of,
    step_batch_size,
    top_module_sharpness,
    update_prediction_at,
)
from hessdiag.check.record import CurvatureCheck
from hessdiag.estimators.eigen import HessianEigenvalues, eigenvalues_of
from hessdiag.noise.noise_scale import NoiseScaleEstimate
from hessdiag.noise.running import RunningNoiseScale
from hessdiag.operator import HessianOperator, HVPMethod, LossFn, trainable_parameters
from hessdiag.estimators.spectrum import SpectralDensity, slq_density
from hessdiag.stability import StabilityThreshold
from hessdiag.estimators.update_prediction import UpdateStart

RankWeighting = Literal["equal", "samples"]


class CurvatureProbe:
    """Curvature checks with warm starts across checks.

    The batch may be :class:`~hessdiag.batches.MicroBatches` (gradient accumulation): the check's loss
    is then the mean of the micro-batches' losses. A closure that changes the model's state (an EMA
    teacher, a counter, a reassigned buffer) is undone after the check (see
    :func:`~hessdiag.isolation.preserved_state`). When the trainable parameters change (unfreezing),
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
        noise_scale_parts: the number of parts the check batch is cut into for the noise scale
            (>= 2; 0: no noise scale). Cost: the parts' forwards and backwards (about one gradient
            of the check batch) and that many flat float64 gradients held at once (2x a float32
            model's parameter memory per part). Under gradient accumulation the first micro-batch
            is cut. Skipped, with a reason in ``check.skipped``, on FSDP2-sharded models and batches
            of fewer samples than parts.
        module_sharpness: how many of the modules holding most of the top eigenvector get the
            lambda_max of their own diagonal Hessian block (0, the default: none; at most 5). Cost per
            module: its Lanczos products (see :mod:`hessdiag.estimators.module_sharpness`).

    Attributes:
        noise_scale: the :class:`~hessdiag.RunningNoiseScale` over this probe's checks.
        starts: what each check starts from (:class:`~hessdiag.check.starts.CheckStarts`).
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
        noise_scale_parts: int = 4,
        module_sharpness: int = 0,
    ) -> None:
        check_noise_scale_parts(noise_scale_parts)
        self.module_sharpness = check_module_sharpness(module_sharpness)
        self.model = model
        self.loss_fn = step_loss(loss_fn)
        self.k, self.tol, self.max_iter = k, tol, max_iter
        self.sub_batch = sub_batch
        self.mode: ModelMode = mode
        self.params = None if params is None else list(params)
        self.rank_weighting: RankWeighting = rank_weighting
        self.density_every, self.density_probes, self.density_iter = density_every, density_probes, density_iter
        self.noise_scale_parts = noise_scale_parts
        self.noise_scale = RunningNoiseScale()
        self.num_checks = 0
        self.starts = CheckStarts(hvp_method, cold_every)
        self._update_start: UpdateStart | None = None

    def run(
        self,
        step: int,
        batch: Any,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        sub_batch: int | None = None,
        noise: NoiseScaleEstimate | None = None,
    ) -> CurvatureCheck:
        """One check on `batch` (cut to `sub_batch` or the probe's own sub-batch size). `noise`: the
        step's noise-scale estimate measured elsewhere (the micro-batches' gradients), added to
        :attr:`noise_scale` instead of cutting the batch.

        Raises the engine's errors (see :mod:`hessdiag.errors`); the caller decides what to do.
        """
        start = time.perf_counter()
        update_start, self._update_start = self._update_start, None
        skipped: dict[str, str] = {}
        step_samples = batch_size(batch)
        batch = take_sub_batch(batch, sub_batch or self.sub_batch)
        seed = self.num_checks  # a fresh dropout draw per check, the same for all products of one check
        operator, cold, reuse = self.starts.open(self.num_checks, lambda method: self._operator(batch, seed, method))
        with preserved_state(unwrap_model(self.model), operator.params), operator:
            warm = None if cold else self.starts.warm_vectors
            result = eigenvalues_of(operator, k=self.k, tol=self.tol, max_iter=self.max_iter, v0=warm, seed=seed)
            stability, sharpness, scale = self._stability(operator, result, optimizer, cold, seed, skipped)
            escape = escape_probe(operator, result)
            top_shares, bottom_shares = module_shares(result, skipped)
            blocks = top_module_sharpness(operator, result, top_shares, self.module_sharpness, self.tol, self.max_iter, seed)
            gradient_curvature, lr_headroom = along_gradient(operator, stability, scale)
            update = update_prediction_at(operator, update_start, step, skipped)
            density = self._density(operator, seed)
            condition = conditioning(result.lambda_max, operator, density, seed)
            num_hvps = operator.num_hvps
        noise = self._noise_scale_estimate(batch, seed, skipped, noise)
        self.starts.warm_vectors = result.warm_start()
        self.num_checks += 1
        return CurvatureCheck(
            step=step,
            **spectrum_fields(result),
            num_hvps=num_hvps,
            seconds=time.perf_counter() - start,
            sharpness=sharpness,
            stability=stability,
            loss_change_along_bottom=escape,
            cold=cold,
            batch_size=batch_size(batch),
            hvp_method=operator.method,
            hvp_method_reason=self.starts.method_reason(step, operator, reuse),
            product_error=operator.product_error,
            density=density,
            top_shares=top_shares,
            bottom_shares=bottom_shares,
            module_sharpness=blocks,
            gradient_curvature=gradient_curvature,
            lr_headroom=lr_headroom,
            noise=noise,
            noise_scale=finite_or_none(self.noise_scale.noise_scale),
            noise_scale_se=finite_or_none(self.noise_scale.noise_scale_se),
            step_batch_size=step_batch_size(step_samples),
            conditioning=condition,
            update_prediction=update,
            skipped=skipped,
        )

    def _density(self, operator: HessianOperator, seed: int) -> SpectralDensity | None:
        # The n-th, 2n-th, ... check: not the first, which is cold and already the dearest
        # (with check_every="auto" a dear first check delays all the others).
        if not self.density_every or (self.num_checks + 1) % self.density_every != 0:
            return None
        return slq_density(
            operator.matvec, operator.dim, num_probes=self.density_probes, num_iter=min(self.density_iter, operator.dim),
            seed=seed, device=operator.device, dtype=operator.dtype, shard=operator.shard,
        )  # fmt: skip

    def _noise_scale_estimate(
        self, batch: Any, seed: int, skipped: dict[str, str], given: NoiseScaleEstimate | None
    ) -> NoiseScaleEstimate | None:
        """This check's noise-scale estimate (`given`, or from the batch cut in parts), added to
        :attr:`noise_scale`; None (and why, in `skipped`) where there is none."""
        if not self.noise_scale_parts:
            return None
        if given is not None:
            self.noise_scale.update(given)
            return given
        estimate, why = noise_scale_of(
            self.model, self.loss_fn, batch, self.noise_scale_parts, params=self.params, mode=self.mode, seed=seed
        )
        if estimate is None:
            skipped["noise_scale"] = f"No gradient noise scale: {why}."
        else:
            self.noise_scale.update(estimate)
        return estimate

    def remember_update_start(self, step: int) -> None:
        """Copy the parameters before optimizer step `step` (its gradients final, the step not yet
        taken), for the check after it to measure the update (:mod:`hessdiag.estimators.update_prediction`).
        Once per step: a second call for the same step (an LBFGS closure) keeps the first copy."""
        if self._update_start is None or self._update_start.step != step:
            self._update_start = UpdateStart(step, trainable_parameters(unwrap_model(self.model), self.params))

    def skip_noise_scale_parts(self) -> None:
        """Cut no batch for the noise scale from now on: it is measured elsewhere (under DDP from the
        ranks' local gradients, see :meth:`hessdiag.Monitor.watch_ranks`)."""
        self.noise_scale_parts = 0

    def shrink_sub_batch(self, size: int) -> None:
        """Use at most `size` samples of each batch from now on (a smaller check fitted in memory)."""
        self.sub_batch = size if self.sub_batch is None else min(self.sub_batch, size)

    def forget_warm_start(self) -> None:
        """Start the next check cold (its warm-start vectors belong to a check that did not finish)."""
        self.starts.forget()

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
        skipped: dict[str, str],
    ) -> tuple[StabilityThreshold | None, float, torch.Tensor | None]:
        """:func:`~hessdiag.check.quantities.stability_of`, warm-started from the last check's
        preconditioned vectors, which its run replaces."""
        threshold, sharpness, scale, preconditioned = stability_of(
            operator, result, optimizer, tol=self.tol, max_iter=self.max_iter,
            v0=None if cold else self.starts.warm_preconditioned, seed=seed, skipped=skipped,
        )  # fmt: skip
        if preconditioned is not None:
            self.starts.warm_preconditioned = preconditioned.top_vectors
        return threshold, sharpness, scale

    def state_dict(self) -> dict[str, Any]:
        """Warm-start vectors, the check count and the running noise scale (tensors and primitives)."""
        return {"num_checks": self.num_checks, **self.starts.state_dict(), "noise_scale": self.noise_scale.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; keys missing in older checkpoints keep their defaults (no
        noise-scale checks yet)."""
        self.num_checks = int(state.get("num_checks", 0))
        self.starts.load_state_dict(state)
        self.noise_scale.load_state_dict(state.get("noise_scale", {}))



def spectrum_fields(result: HessianEigenvalues) -> dict[str, Any]:
    """A check's fields read from its Lanczos result: both ends, their residuals, proven bounds and
    probable limits, the loss and gradient norm at the check's point, the tolerance used."""
    return dict(
        lambda_max=result.lambda_max,
        lambda_min=result.lambda_min,
        negative_curvature_certified=result.negative_curvature_certified,
        residual_max=float(result.residuals["top"][0]),
        residual_min=float(result.residuals["bottom"][0]),
        error_bound_max=float(result.error_bounds["top"][0]),
        error_bound_min=float(result.error_bounds["bottom"][0]),
        lambda_max_limit=result.probable_limits["top"],
        lambda_min_limit=result.probable_limits["bottom"],
        converged=result.converged,
        loss=result.loss,
        grad_norm=result.grad_norm,
        tol=result.tol,
    )
