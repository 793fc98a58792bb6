"""What one curvature check found: the record a :class:`~hessdiag.check.probe.CurvatureProbe` returns
and the Monitor turns into scalars, texts and a detector record."""

from __future__ import annotations

from dataclasses import dataclass, field

from hessdiag.check.quantities import Shares
from hessdiag.estimators.module_sharpness import ModuleSharpness
from hessdiag.noise.noise_scale import NoiseScaleEstimate
from hessdiag.estimators.spectrum import SpectralDensity
from hessdiag.stability import StabilityThreshold
from hessdiag.estimators.update_prediction import UpdatePrediction


@dataclass
class CurvatureCheck:
    """What one curvature check found (python floats; see :func:`~hessdiag.hessian_eigenvalues`).

    Attributes:
        step: the training step.
        lambda_max, lambda_min: extreme Ritz values of the Hessian on the check batch.
        negative_curvature_certified: lambda_min <= lambda_min (the reported value) < 0 is proven.
        residual_max, residual_min: residual bounds of the two values.
        error_bound_max, error_bound_min: their full error bounds (residual, product error and
            rounding; finite differences: measured along each value's own Ritz vector): an
            eigenvalue of the Hessian lies within each of its value.
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
        top_shares, bottom_shares: where the top and bottom Ritz vectors live: the
            :data:`~hessdiag.check.quantities.SHARES_KEPT` modules holding most of each vector's squared norm, with their shares
            (see :func:`hessdiag.estimators.layer_shares`); empty without Ritz vectors (recurrence basis).
        module_sharpness: with ``module_sharpness`` n > 0, lambda_max of the own diagonal Hessian
            blocks of the first n modules of `top_shares`, in that order, with their bounds (see
            :mod:`hessdiag.estimators.module_sharpness`); empty otherwise.
        gradient_curvature: g'Hg / ||g||^2 on the check batch, or along Adam's preconditioned
            gradient in the units of `sharpness` (see :mod:`hessdiag.estimators.gradient_curvature`); None for
            a zero gradient.
        lr_headroom: the stability threshold over `gradient_curvature`: the largest stable learning
            rate along the gradient over the one in use (< 1: the step along it overshoots; inf for
            curvature <= 0); None without a threshold.
        noise: this check's noise-scale estimate (biased as a ratio; see `noise_scale`), or None.
        noise_scale, noise_scale_se: the running noise scale over the checks so far (samples) and
            its standard error (see :class:`~hessdiag.RunningNoiseScale`); None before an estimate.
        step_batch_size: samples of the optimizer step's batch (all micro-batches; times the number
            of ranks under data parallelism), the batch the noise scale compares with.
        conditioning: lambda_max / (trace / n) at a density check, the trace by Hutch++ (see
            :func:`~hessdiag.check.quantities.conditioning`); None elsewhere or when it is <= 0.
        update_prediction: with ``update_ratios=True``, the loss change of the optimizer's update
            that led to this check as the quadratic model predicts it, against the observed one
            (see :mod:`hessdiag.estimators.update_prediction`); None otherwise.
        skipped: ``{quantity: why}`` for each of the above that was not measured for a reason a user
            should hear (a batch too small for the noise scale's parts, a sharded model, ...).
        tol: the tolerance `converged` was tested against: the one asked for, or the precision floor
            of a bfloat16/float16 model when that is larger (see :func:`~hessdiag.hessian_eigenvalues`).
    """

    step: int
    lambda_max: float
    lambda_min: float
    negative_curvature_certified: bool
    residual_max: float
    residual_min: float
    error_bound_max: float
    error_bound_min: float
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
    top_shares: Shares = ()
    bottom_shares: Shares = ()
    module_sharpness: tuple[ModuleSharpness, ...] = ()
    gradient_curvature: float | None = None
    lr_headroom: float | None = None
    noise: NoiseScaleEstimate | None = None
    noise_scale: float | None = None
    noise_scale_se: float | None = None
    step_batch_size: int | None = None
    conditioning: float | None = None
    update_prediction: UpdatePrediction | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def stability_ratio(self) -> float | None:
        """sharpness / threshold: >= 1 means the steepest direction is beyond the stability edge."""
        return self.sharpness / self.stability.threshold if self.stability else None

    @property
    def gradient_alignment(self) -> float | None:
        """gradient_curvature / sharpness: 1 when the (preconditioned) gradient lies along the
        sharpest direction; in [lambda_min / lambda_max, 1] up to the estimates' errors."""
        if self.gradient_curvature is None or self.sharpness == 0:
            return None
        return self.gradient_curvature / self.sharpness
