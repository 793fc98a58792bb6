"""What one curvature check found: the spectrum's ends, then each quantity's value or why it was not
measured; the record a :class:`~hessdiag.check.probe.CurvatureProbe` returns and the Monitor turns
into scalars, texts and a detector record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hessdiag.check.quantities.gradient_curvature import AlongGradient
from hessdiag.check.quantities.layer_shares import Shares
from hessdiag.check.quantities.noise_scale import NoiseScaleReading
from hessdiag.check.quantities.stability import Stability
from hessdiag.check.quantity import REGISTRY
from hessdiag.estimators.module_sharpness import ModuleSharpness
from hessdiag.estimators.spectrum import SpectralDensity
from hessdiag.estimators.update_prediction import UpdatePrediction
from hessdiag.noise.noise_scale import NoiseScaleEstimate
from hessdiag.reporting.tags import (
    CHECK_FAILED,
    CHECK_GRAD_NORM,
    CHECK_LOSS,
    CHECK_SECONDS,
    LAMBDA_MAX,
    LAMBDA_MAX_LOWER,
    LAMBDA_MIN,
    NEGATIVE_CURVATURE_CERTIFIED,
    NUM_HVPS,
    PRODUCT_ERROR,
    RESIDUAL_MAX,
    RESIDUAL_MIN,
)
from hessdiag.stability import StabilityThreshold


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
        loss, grad_norm: on the check batch.
        tol: the tolerance `converged` was tested against: the one asked for, or the precision floor
            of a bfloat16/float16 model when that is larger (see :func:`~hessdiag.hessian_eigenvalues`).
        num_hvps: products spent (all estimates of the check).
        seconds: wall time of the check.
        cold: the Lanczos run started from a random vector.
        batch_size: samples in the check batch.
        hvp_method: the product method the check used ("auto" resolved: "double_backward" or
            "finite_difference"; or the one asked for).
        hvp_method_reason: why that method (what "auto"'s cross-check found, "asked for", ...).
        bottom: the check measured the bottom end (lambda_min to the tolerance); False: the Lanczos
            run stopped with the top end, and `lambda_min` is only the bottom Ritz value of its
            Krylov space (an upper bound on lambda_min, not logged).
        basis: where the Lanczos run of both ends kept its vectors: "device", "device+host" (rows
            beyond what training itself reached on the device went to host memory, see
            :mod:`hessdiag.check.footprint`), "host" or "recurrence".
        product_error: the error per product that entered the bounds (0 for exact products; for
            finite differences an estimate measured along the Ritz vectors, see
            :class:`~hessdiag.HessianOperator`).
        values: each quantity's value by name (:mod:`hessdiag.check.quantities`); a quantity not due
            at this check, or undefined, is absent or None.
        skipped: ``{quantity: why}`` for each quantity that was not measured for a reason a user
            should hear (a batch too small for the noise scale's parts, a sharded model, ...).
        products: the products each quantity spent, by name (``"spectrum"``: the Lanczos run).

    The properties below read the values of the quantities the detectors, the writers and the
    adapters use; any other is in :attr:`values`.
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
    loss: float
    grad_norm: float
    tol: float
    num_hvps: int
    seconds: float
    cold: bool
    batch_size: int | None
    hvp_method: str
    hvp_method_reason: str
    product_error: float
    bottom: bool = True
    basis: str = "device"
    values: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    products: dict[str, int] = field(default_factory=dict)

    def _value(self, name: str, kind: type) -> Any:
        value = self.values.get(name)
        return value if isinstance(value, kind) else None

    @property
    def stability(self) -> StabilityThreshold | None:
        """The optimizer's stability threshold, when it has one."""
        value = self._value("stability", Stability)
        return value.threshold if value is not None else None

    @property
    def sharpness(self) -> float:
        """The value compared with the stability threshold: lambda_max, or for a preconditioned rule
        (Adam) lambda_max(P^-1 H)."""
        value = self._value("stability", Stability)
        return value.sharpness if value is not None else self.lambda_max

    @property
    def stability_ratio(self) -> float | None:
        """sharpness / threshold: >= 1 means the steepest direction is beyond the stability edge."""
        return self.sharpness / self.stability.threshold if self.stability else None

    @property
    def loss_change_along_bottom(self) -> float | None:
        """min over +-alpha of L(theta + alpha y_min) - L(theta), with alpha such that the quadratic
        model predicts a 1% drop; None without certified negative curvature."""
        return self._value("loss_change_along_bottom", float)

    @property
    def top_shares(self) -> Shares:
        """The modules holding most of the top Ritz vector's squared norm, with their shares (see
        :func:`hessdiag.layer_shares`); empty without Ritz vectors (recurrence basis)."""
        value = self._value("layer_shares", tuple)
        return value[0] if value is not None else ()

    @property
    def bottom_shares(self) -> Shares:
        """The same for the bottom Ritz vector."""
        value = self._value("layer_shares", tuple)
        return value[1] if value is not None else ()

    @property
    def module_sharpness(self) -> tuple[ModuleSharpness, ...]:
        """With ``module_sharpness`` n > 0, lambda_max of the own diagonal Hessian blocks of the
        first n modules of `top_shares`, in that order, with their bounds; empty otherwise."""
        return self._value("module_sharpness", tuple) or ()

    @property
    def gradient_curvature(self) -> float | None:
        """g'Hg / ||g||^2 on the check batch, or along Adam's preconditioned gradient in the units of
        `sharpness`; None for a zero gradient."""
        value = self._value("gradient_curvature", AlongGradient)
        return value.curvature if value is not None else None

    @property
    def lr_headroom(self) -> float | None:
        """The stability threshold over `gradient_curvature` (< 1: the step along the gradient
        overshoots; inf for curvature <= 0); None without a threshold."""
        value = self._value("gradient_curvature", AlongGradient)
        return value.headroom if value is not None else None

    @property
    def gradient_alignment(self) -> float | None:
        """gradient_curvature / sharpness: 1 when the (preconditioned) gradient lies along the
        sharpest direction; in [lambda_min / lambda_max, 1] up to the estimates' errors."""
        if self.gradient_curvature is None or self.sharpness == 0:
            return None
        return self.gradient_curvature / self.sharpness

    @property
    def density(self) -> SpectralDensity | None:
        """The spectral density, at every `density_every`-th check."""
        return self._value("density", SpectralDensity)

    @property
    def conditioning(self) -> float | None:
        """lambda_max / (trace / n) at a density check; None elsewhere or when it is <= 0."""
        return self._value("conditioning", float)

    @property
    def update_prediction(self) -> UpdatePrediction | None:
        """With ``update_ratios=True``, the update's loss change predicted against the observed one."""
        return self._value("update_prediction", UpdatePrediction)

    @property
    def noise(self) -> NoiseScaleEstimate | None:
        """This check's noise-scale estimate (biased as a ratio; see `noise_scale`), or None."""
        value = self._value("noise_scale", NoiseScaleReading)
        return value.estimate if value is not None else None

    @property
    def noise_scale(self) -> float | None:
        """The running noise scale over the checks so far (samples), None before an estimate."""
        value = self._value("noise_scale", NoiseScaleReading)
        return value.noise_scale if value is not None else None

    @property
    def noise_scale_se(self) -> float | None:
        """The running noise scale's standard error."""
        value = self._value("noise_scale", NoiseScaleReading)
        return value.noise_scale_se if value is not None else None

    @property
    def step_batch_size(self) -> int | None:
        """Samples of the optimizer step's batch (all micro-batches; times the ranks under data
        parallelism), the batch the noise scale compares with."""
        value = self._value("noise_scale", NoiseScaleReading)
        return value.step_batch_size if value is not None else None

    def scalars(self) -> dict[str, float]:
        """The scalars the check logs, by tag: the spectrum's, then each quantity's."""
        scalars = {
            LAMBDA_MAX: self.lambda_max,
            RESIDUAL_MAX: self.residual_max,
            NUM_HVPS: float(self.num_hvps),
            CHECK_SECONDS: self.seconds,
            CHECK_LOSS: self.loss,
            CHECK_GRAD_NORM: self.grad_norm,
            PRODUCT_ERROR: self.product_error,
            CHECK_FAILED: 0.0,
            LAMBDA_MAX_LOWER: self.lambda_max - self.error_bound_max,  # the dense curve's point (tracking)
        }
        if self.bottom:
            scalars |= {
                LAMBDA_MIN: self.lambda_min,
                NEGATIVE_CURVATURE_CERTIFIED: float(self.negative_curvature_certified),
                RESIDUAL_MIN: self.residual_min,
            }
        for name, value in self.values.items():
            if value is not None:
                scalars |= REGISTRY[name].scalars(value, self)
        return scalars

    def texts(self) -> dict[str, str]:
        """The text cards the check writes, by tag; quantities writing the same card are joined
        in their order."""
        texts: dict[str, str] = {}
        for name, value in self.values.items():
            if value is None:
                continue
            for tag, text in REGISTRY[name].texts(value, self).items():
                texts[tag] = texts[tag] + "\n\n" + text if tag in texts else text
        return texts

