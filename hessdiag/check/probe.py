"""The periodic curvature check of a training run.

`CurvatureProbe.run` takes the current batch (or a sub-batch), builds the Hessian operator once and,
reusing its gradient graph, computes lambda_max and lambda_min by one Lanczos run, warm-started from
the previous check's Ritz vectors (every `cold_every`-th check starts cold, so an eigenvector that
turned is found again). Every quantity of :mod:`hessdiag.check.quantities` that is due then reads
what the check holds: the sharpness the optimizer's stability threshold refers to, the escape
probe along the bottom direction, where the curvature lives, what limits the step, the update's
quadratic model, the density and the conditioning (on the open operator), and the gradient noise
scale (after it closed).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from hessdiag.batches import CheckBatch
from hessdiag.check.footprint import TrainingFootprint
from hessdiag.check.quantities import build_quantities
from hessdiag.check.quantities.noise_scale import NoiseScale
from hessdiag.check.quantities.update_prediction import UpdateLossPrediction
from hessdiag.check.quantity import CheckContext, Quantity, Skipped
from hessdiag.check.quantities.stability import stability_diagonal
from hessdiag.check.record import CurvatureCheck
from hessdiag.check.starts import CheckStarts, on_host
from hessdiag.check.tracking import (
    COLD_KRYLOV_STEPS, EDGE_KRYLOV_STEPS, KRYLOV_STEPS, NEAR_EDGE, ONE_STEP_RESIDUAL, TrackingReading, track,
)  # fmt: skip
from hessdiag.estimators.eigen import HessianEigenvalues, eigenvalues_of
from hessdiag.isolation import preserved_state, unwrap_model
from hessdiag.noise.noise_scale import NoiseScaleEstimate
from hessdiag.noise.running import RunningNoiseScale
from hessdiag.operator import HessianOperator, HVPMethod, LossFn, trainable_parameters
from hessdiag.settings import DiagnosticsSettings, product_parts_on
from hessdiag.vectors import random_generator, random_unit_vector


class CurvatureProbe:
    """Curvature checks with warm starts across checks.

    The batch may be :class:`~hessdiag.batches.MicroBatches` (gradient accumulation): the check's loss
    is then the mean of the micro-batches' losses. A closure that changes the model's state (an EMA
    teacher, a counter, a reassigned buffer) is undone after the check (see
    :func:`~hessdiag.isolation.preserved_state`). When the trainable parameters change (unfreezing),
    the next check starts cold.

    Args:
        model, loss_fn: the network and ``loss_fn(model, batch) -> scalar``.
        settings: what the checks compute (see :class:`hessdiag.Monitor` for each field; validated
            when they were built).
        params: the parameters the Hessian is over (default: every trainable one).

    Attributes:
        quantities: the quantities of every check, in the order they are computed.
        starts: what each check starts from (:class:`~hessdiag.check.starts.CheckStarts`).
        footprint: the device memory training reaches, which places the checks' Lanczos bases
            (:mod:`hessdiag.check.footprint`).
        sub_batch: samples of each batch the checks use (None: all).
        product_parts: the parts of the batch each product takes where the Hessian allows (the
            setting, "auto" resolved by the parameters' device at each reading, or 1 once the loss was
            found not to be a mean over the samples), and `parts_reason`: what the last reading's
            products took, and why.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        settings: DiagnosticsSettings | None = None,
        *,
        params: Iterable[torch.Tensor] | None = None,
    ) -> None:
        self.settings = settings if settings is not None else DiagnosticsSettings()
        self.model = model
        self.loss_fn = loss_fn
        self.params = None if params is None else list(params)
        self.sub_batch = self.settings.sub_batch
        self.num_checks = 0
        self.starts = CheckStarts(self.settings.hvp_method, self.settings.cold_every)
        self.footprint = TrainingFootprint()
        self.product_parts = self.settings.product_parts
        self.parts_reason = "no reading yet"
        self._parts_compared = False  # the whole batch's loss found equal to its parts' (once per probe)
        self.quantities: list[Quantity] = build_quantities(self.settings)

    def quantity(self, name: str) -> Quantity:
        """The check quantity called `name`."""
        return next(quantity for quantity in self.quantities if quantity.name == name)

    @property
    def noise_scale(self) -> RunningNoiseScale:
        """The running noise scale over this probe's checks."""
        return self._noise.running

    @property
    def _noise(self) -> NoiseScale:
        return self.quantity("noise_scale")  # type: ignore[return-value]

    def run(
        self,
        step: int,
        batch: Any,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        sub_batch: int | None = None,
        noise: NoiseScaleEstimate | None = None,
        bottom: bool = True,
    ) -> CurvatureCheck:
        """One check on `batch` (cut to `sub_batch` or the probe's own sub-batch size). `noise`: the
        step's noise-scale estimate measured elsewhere (the micro-batches' gradients), used for the
        noise scale instead of cutting the batch. `bottom` False: the Lanczos run stops when the top
        end meets the tolerance (the bottom end, which takes 2-4x its products, is not measured, nor
        what reads it: its layer shares, the escape probe).

        Raises the engine's errors (see :mod:`hessdiag.errors`); the caller decides what to do.
        """
        start = time.perf_counter()
        self._noise.offer(noise)
        batch = CheckBatch.of(batch, sub_batch or self.sub_batch)
        seed = self.num_checks  # a fresh dropout draw per check, the same for all products of one check
        operator, cold, reuse = self.starts.open(self.num_checks, lambda method: self._operator(batch, seed, method))
        values: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        products: dict[str, int] = {}
        # the whole check inside, the quantities computed after the operator closed too: its peak is not training's
        with self.footprint.reading(operator.device) as room:
            with preserved_state(unwrap_model(self.model), operator.params), operator:
                self._settle_parts(operator)
                settings = self.settings
                warm = None if cold else self.starts.warm_vectors
                result = eigenvalues_of(
                    operator, k=settings.k, which="both" if bottom else "top", tol=settings.tol,
                    max_iter=settings.max_iter, v0=warm, seed=seed, memory_budget=room,
                )  # fmt: skip
                products["spectrum"] = operator.num_hvps
                context = CheckContext(
                    step=step, number=self.num_checks, settings=settings, model=self.model, loss_fn=self.loss_fn,
                    params=self.params, operator=operator, spectrum=result, optimizer=optimizer, batch=batch, seed=seed,
                    cold=cold, bottom=bottom, starts=self.starts, values=values, memory_budget=room,
                )  # fmt: skip
                self._compute(context, [q for q in self.quantities if q.uses_operator], skipped, products)
                num_hvps = operator.num_hvps
                method, method_reason = operator.method, self.starts.method_reason(step, operator, reuse)
                product_error = operator.product_error
            context.operator = None
            self._compute(context, [q for q in self.quantities if not q.uses_operator], skipped, products)
        self.starts.warm_vectors = on_host(result.warm_start())
        self.starts.tracked = None if result.top_vectors is None else on_host(result.top_vectors[0])
        self.starts.tracked_residual = None
        if self.starts.warm_preconditioned is not None:
            self.starts.tracked_preconditioned = self.starts.warm_preconditioned[0]
        self.num_checks += 1
        check = CurvatureCheck(
            step=step, **spectrum_fields(result), num_hvps=num_hvps, seconds=time.perf_counter() - start, cold=cold,
            batch_size=batch.samples, hvp_method=method, hvp_method_reason=method_reason,
            product_error=product_error, bottom=bottom, basis=result.lanczos.basis, values=values, skipped=skipped,
            products=products,
        )  # fmt: skip
        self.starts.tracked_ratio = check.stability_ratio
        return check

    @staticmethod
    def _compute(context: CheckContext, quantities: list[Quantity], skipped: dict[str, str], products: dict[str, int]) -> None:
        """Each due quantity's value (or reason) into the context's values, and its products."""
        for quantity in quantities:
            if not quantity.due(context):
                continue
            before = context.operator.num_hvps if context.operator is not None else 0
            value = quantity.compute(context)
            if isinstance(value, Skipped):
                skipped[quantity.name] = value.reason
                value = value.value
            context.values[quantity.name] = value
            if context.operator is not None:
                products[quantity.name] = context.operator.num_hvps - before

    def track(self, step: int, batch: Any, optimizer: torch.optim.Optimizer | None = None) -> TrackingReading:
        """A tracking reading on `batch` (see :mod:`hessdiag.check.tracking`): from the tracked top
        vector (the last check's top Ritz vector, moved by each reading since), or where there is none
        (no full check yet, other parameters since, a basis that kept no vectors) from a random one,
        over :data:`~hessdiag.check.tracking.COLD_KRYLOV_STEPS` products. The product method is the
        last check's; before any, the one asked for ("auto" settles it here, cross-checked as at a
        cold check).

        Raises the engine's errors (see :mod:`hessdiag.errors`); the caller decides what to do.
        """
        start = time.perf_counter()
        starts = self.starts
        operator = self._operator(CheckBatch.of(batch, self.sub_batch), step, starts.method or self.settings.hvp_method)
        # no basis to place, but its peak must not pass for training's at the next reading
        footprint = self.footprint.reading(operator.device)
        with footprint, preserved_state(unwrap_model(self.model), operator.params), operator:
            self._settle_parts(operator)
            if starts.method is None:
                starts.method_reason(step, operator, reuse=False)  # "auto"'s choice, for the readings after
            # the preconditioner's square root computed piece by piece where it is used, never held whole
            rule = stability_diagonal(optimizer, operator)
            found, scale = (None, None) if isinstance(rule, Skipped) else rule
            threshold = None if found is None else found.threshold
            tracked = starts.tracked_preconditioned if scale is not None else starts.tracked
            if tracked is None or tracked.shape[-1] != operator.size:
                generator = random_generator(step, operator.shard, operator.device)
                tracked = random_unit_vector(operator.size, generator, operator.device, operator.dtype, operator.shard)
                steps = COLD_KRYLOV_STEPS
            else:
                close = starts.tracked_residual is not None and starts.tracked_residual < ONE_STEP_RESIDUAL
                near_edge = starts.tracked_ratio is not None and starts.tracked_ratio >= NEAR_EDGE
                steps = 1 if close else EDGE_KRYLOV_STEPS if near_edge else KRYLOV_STEPS
            reading, next_vector = track(operator, step, tracked, threshold=threshold, scale=scale, steps=steps)
            # the whole reading: the gradient graph, "auto"'s cross-check and the preconditioner too
            reading = dataclasses.replace(reading, num_hvps=operator.num_hvps, seconds=time.perf_counter() - start)
        starts.tracked_residual = reading.residual / abs(reading.value) if reading.value else None
        starts.tracked_ratio = reading.stability_ratio_lower_bound
        if scale is not None:
            starts.tracked_preconditioned = on_host(next_vector)
        else:
            starts.tracked = on_host(next_vector)
        return reading

    def remember_update_start(self, step: int) -> None:
        """Copy the parameters before optimizer step `step` (its gradients final, the step not yet
        taken), for the check after it to measure the update (:mod:`hessdiag.estimators.update_prediction`).
        Once per step: a second call for the same step (an LBFGS closure) keeps the first copy."""
        update: UpdateLossPrediction = self.quantity("update_prediction")  # type: ignore[assignment]
        update.remember(step, trainable_parameters(unwrap_model(self.model), self.params))

    def skip_noise_scale_parts(self) -> None:
        """Cut no batch for the noise scale from now on: it is measured elsewhere (under DDP from the
        ranks' local gradients, see :meth:`hessdiag.Monitor.watch_ranks`)."""
        self._noise.skip_parts()

    def shrink_sub_batch(self, size: int) -> None:
        """Use at most `size` samples of each batch from now on (a smaller check fitted in memory)."""
        self.sub_batch = size if self.sub_batch is None else min(self.sub_batch, size)

    def forget_warm_start(self) -> None:
        """Start the next check cold (its warm-start vectors belong to a check that did not finish)."""
        self.starts.forget()

    def _operator(self, batch: CheckBatch, seed: int, method: HVPMethod) -> HessianOperator:
        return HessianOperator(
            self.model, self.loss_fn, batch.data, params=self.params, mode=self.settings.mode, method=method, seed=seed,
            # equal rank weights: every rank counts as one sample
            batch_size=1 if self.settings.rank_weighting == "equal" else batch.samples,
            parts=product_parts_on(self.product_parts, next(unwrap_model(self.model).parameters()).device),
            compare_parts=not self._parts_compared,
        )  # fmt: skip

    def _settle_parts(self, operator: HessianOperator) -> None:
        """After `operator` entered: a loss found to be the samples' mean is not compared again; one
        found not to be is not cut again (its readings hold the whole batch's graph). `parts_reason`
        keeps what the last reading's products took, and why."""
        self.parts_reason = operator.parts_reason
        if operator.num_parts > 1:
            self._parts_compared = True
        elif operator.loss_is_mean is False:
            self.product_parts = 1

    def state_dict(self) -> dict[str, Any]:
        """Warm-start vectors, the check count and the quantities' state (tensors and primitives)."""
        state = {"num_checks": self.num_checks, **self.starts.state_dict()}
        for quantity in self.quantities:
            state |= quantity.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; keys missing in older checkpoints keep their defaults (no
        noise-scale checks yet)."""
        self.num_checks = int(state.get("num_checks", 0))
        self.starts.load_state_dict(state)
        for quantity in self.quantities:
            quantity.load_state_dict(state)


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
