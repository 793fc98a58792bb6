"""What a detector observes, and the one interface every detector implements.

The Monitor routes every record to every detector (``detector.observe(record)``); a detector takes
the records of the kind it judges and returns ``[]`` for the others. A custom detector therefore
needs no built-in flag name and no change to the Monitor: it implements :class:`FlagDetector`.

Records hold host floats only (read back already): a detector never synchronises with the device.
A value that was not measured is ``None``, never a placeholder a rule could take for a measurement.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from hessdiag.flags import FlagEvent

#: ``((module name, value), ...)``, ordered from the input (shallow) to the output (deep).
LayerSeries = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step's statistics, as read back (one record per step, in step order).

    Attributes:
        step: the optimizer step.
        loss: the step's training loss (the rank mean under data parallelism); None when the loop
            did not pass it.
        grad_norm: the global gradient L2 norm; None when there are no gradient statistics (no
            ``after_backward``), and then every layer series is empty.
        nonfinite_tensors: gradient tensors with a non-finite norm.
        overflow_skip: the loss scaler skipped this step for overflow (fp16 AMP): not an explosion.
        layer_grad_norms: per module, its gradient norm.
        layer_weight_norms: per module, its parameter norm (read once per read-back).
        layer_ratios: per module, gradient- and update-to-weight ratios (see
            :meth:`hessdiag.steps.gradients.GradientReadout.layer_ratios`).
        lambda_max: the largest Hessian eigenvalue of the latest curvature check, if any.
    """

    step: int
    loss: float | None = None
    grad_norm: float | None = None
    nonfinite_tensors: int = 0
    overflow_skip: bool = False
    layer_grad_norms: LayerSeries = ()
    layer_weight_norms: LayerSeries = ()
    layer_ratios: LayerSeries = ()
    lambda_max: float | None = None


@dataclass(frozen=True)
class CheckRecord:
    """What one curvature check found (see :class:`hessdiag.check.record.CurvatureCheck`).

    Attributes:
        step: the optimizer step of the check.
        loss, grad_norm: on the check batch.
        lambda_max, lambda_min: extreme Ritz values of the Hessian.
        negative_curvature_certified: lambda_min < 0 is proven beyond rounding.
        loss_change_along_bottom: the loss change of a short step along the bottom Ritz vector, with
            certified negative curvature only (else None).
        sharpness: lambda_max, or for Adam the preconditioned lambda_max(P^-1 H).
        stability_threshold: the optimizer's stability threshold in the units of `sharpness`; None
            when the optimizer has none (or none was given).
        top_module: the qualified name of the module holding the largest share of the top Ritz
            vector (``""`` for the root's own parameters); None when the check kept no vectors.
        top_module_share: that share of the vector's squared norm, in [0, 1]; None with `top_module`.
        top_module_lambda_max: lambda_max of `top_module`'s own diagonal Hessian block (the
            Hessian of the loss in that module's parameters alone), when the check measured it
            (``module_sharpness`` > 0); else None. At most `lambda_max` (Cauchy interlacing).
    """

    step: int
    loss: float
    grad_norm: float
    lambda_max: float
    lambda_min: float
    negative_curvature_certified: bool
    loss_change_along_bottom: float | None
    sharpness: float
    stability_threshold: float | None
    top_module: str | None = None
    top_module_share: float | None = None
    top_module_lambda_max: float | None = None


@dataclass(frozen=True)
class TrackingRecord:
    """What a tracking reading between full checks proved (see :mod:`hessdiag.check.tracking`):
    lower bounds only, so a detector may raise on them (a lower bound above a threshold proves it
    crossed) but never clear (a "below" claim needs a full check).

    Attributes:
        step: the optimizer step of the reading.
        lambda_max_lower_bound: a proven lower bound on lambda_max; None where the reading tracked the
            preconditioned operator only.
        sharpness_lower_bound: a proven lower bound on the sharpness of the stability rule (lambda_max,
            or for Adam the preconditioned lambda_max(P^-1 H)); None without a threshold.
        stability_threshold: the optimizer's stability threshold in the units of the sharpness, or None.
    """

    step: int
    lambda_max_lower_bound: float | None
    sharpness_lower_bound: float | None
    stability_threshold: float | None


Record = StepRecord | CheckRecord | TrackingRecord


@runtime_checkable
class FlagDetector(Protocol):
    """The interface the Monitor runs: a named flag that observes records.

    `state_dict` holds primitives only; `load_state_dict` reads older states with defaults.
    """

    name: str

    @property
    def active(self) -> bool: ...

    def observe(self, record: Record) -> list[FlagEvent]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
