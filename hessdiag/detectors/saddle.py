"""Saddle points: a near-critical point with certified, significant negative curvature."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from hessdiag.detectors._common import Detector, check_finite, check_optional_positive, check_positive
from hessdiag.detectors.records import CheckRecord, Record
from hessdiag.flags import FlagEvent

Classification = Literal["unknown", "not critical", "degenerate", "saddle", "minimum-like"]


class SaddleDetector(Detector):
    """Raises ``saddle`` at a curvature check that finds the run near a strict saddle.

    Near a critical point L(theta + v) ~ L(theta) + v^T H v / 2: eigenvalues of both signs make a
    saddle. Each check classifies the point (``classification``):

    * ``"not critical"``: the gradient is not small;
    * ``"degenerate"``: all curvature is ~0 (max |lambda| < `flat_tol`): flat in every direction
      measured, never called a strict saddle;
    * ``"saddle"``: negative curvature is *certified* (a negative Ritz value proves lambda_min < 0)
      and significant: lambda_min < -`tau` x max(|lambda_max|, |lambda_min|);
    * ``"minimum-like"``: otherwise (no certified or no significant negative curvature).

    The gradient is small (the point near-critical) when a gradient step could remove at most a
    fraction `critical_fraction` of the loss above its floor: ||g||^2 / (2 lambda_max) <=
    `critical_fraction` x (loss - `loss_floor`), where ||g||^2 / (2 lambda_max) is the largest decrease
    of the quadratic model along -g; or, when given, when ||g|| <= `grad_tol`. This needs no history
    of past checks, so the very first check can recognise a saddle (a run starting at one, as from a
    tiny initialisation, has no larger past gradient to compare with). Only ``"saddle"`` triggers.

    Units: both sides of the test are loss changes, and the curvature tests compare eigenvalues with
    each other, so multiplying the loss by a constant changes no verdict; adding one changes none once
    `loss_floor` moves with it (the loss left, loss - `loss_floor`, is the scale against which a
    gradient step counts as small; a loss at or below its floor is never near-critical).
    `grad_tol` (gradient units) and `flat_tol` (curvature units) are absolute: `grad_tol` is off by
    default; `flat_tol` only tells an all-flat point (a dead network) from a saddle, at 1e-6.

    Args:
        tau: significance of negative curvature relative to the spectral norm (default 0.05: 50x the
            1e-3 relative accuracy of the eigenvalue estimates, and above the slight negative curvature
            that accompanies ordinary training: about 1% of lambda_max on ResNet-18, DESIGN.md).
        critical_fraction: see above (default 0.01).
        grad_tol: gradient norm that counts as small whatever the loss (default None: off; in the
            gradient's units, so it ties the verdict to the loss's scale).
        loss_floor: the lowest attainable loss (default 0).
        flat_tol: spectral norm below which the point is degenerate (default 1e-6, in Hessian
            eigenvalue units: loss per squared parameter unit).
        onset: consecutive saddle checks that raise the flag (default 1: checks are sparse and the
            negative curvature is certified, not estimated).
        clear: consecutive other checks that clear it (default 2).

    Raises:
        ValueError: a threshold out of range, named in the message.

    Evidence: ``grad_norm``, ``lambda_min``, ``lambda_max``, ``curvature_ratio`` (lambda_min / spectral
    norm, in [-1, 1]), ``loss``, ``gradient_step_gain`` (||g||^2 / (2 lambda_max), loss units), and,
    when measured, ``loss_change_along_bottom`` (loss change of a step along the bottom eigenvector:
    negative means an escape direction was found).
    """

    name = "saddle"
    remedy = (
        "Keep or add momentum or gradient noise; a step along the bottom eigenvector (escape direction) lowers the loss."
    )

    def __init__(
        self,
        tau: float = 0.05,
        critical_fraction: float = 0.01,
        grad_tol: float | None = None,
        loss_floor: float = 0.0,
        flat_tol: float = 1e-6,
        onset: int = 1,
        clear: int = 2,
    ) -> None:
        super().__init__(onset, clear)
        self.tau = check_positive("tau", tau, upper=1.0)
        self.critical_fraction = check_positive("critical_fraction", critical_fraction, upper=1.0)
        self.grad_tol = check_optional_positive("grad_tol", grad_tol)
        self.loss_floor = check_finite("loss_floor", loss_floor)
        self.flat_tol = check_positive("flat_tol", flat_tol)
        self.classification: Classification = "unknown"

    def observe(self, record: Record) -> list[FlagEvent]:
        """Judge a curvature check; other records say nothing."""
        if not isinstance(record, CheckRecord):
            return []
        return self.update(
            record.step, grad_norm=record.grad_norm, lambda_max=record.lambda_max, lambda_min=record.lambda_min,
            negative_certified=record.negative_curvature_certified, loss=record.loss,
            loss_change_along_bottom=record.loss_change_along_bottom,
        )  # fmt: skip

    def update(
        self,
        step: int,
        grad_norm: float,
        lambda_max: float,
        lambda_min: float,
        negative_certified: bool,
        loss: float,
        loss_change_along_bottom: float | None = None,
    ) -> list[FlagEvent]:
        """Classify the point of one curvature check.

        Args:
            step: the optimizer step of the check.
            grad_norm: global gradient L2 norm on the check's batch.
            lambda_max, lambda_min: the extreme Hessian eigenvalue estimates.
            negative_certified: whether lambda_min < 0 is certified (a negative Ritz value).
            loss: the loss on the check's batch.
            loss_change_along_bottom: loss change of a step along the bottom eigenvector, if measured.
        """
        gradient_gain = grad_norm**2 / (2 * lambda_max) if lambda_max > 0 else math.inf
        small = gradient_gain <= self.critical_fraction * (loss - self.loss_floor) or (
            self.grad_tol is not None and grad_norm <= self.grad_tol
        )
        spectral_norm = max(abs(lambda_max), abs(lambda_min))
        if not small:
            self.classification = "not critical"
        elif spectral_norm < self.flat_tol:
            self.classification = "degenerate"
        elif negative_certified and lambda_min < -self.tau * spectral_norm:
            self.classification = "saddle"
        else:
            self.classification = "minimum-like"
        curvature_ratio = lambda_min / spectral_norm if spectral_norm > 0 else 0.0
        self.evidence = {
            "grad_norm": grad_norm,
            "lambda_min": lambda_min,
            "lambda_max": lambda_max,
            "curvature_ratio": curvature_ratio,
            "loss": loss,
            "gradient_step_gain": gradient_gain,
        }
        if loss_change_along_bottom is not None:
            self.evidence["loss_change_along_bottom"] = loss_change_along_bottom
        self.summary = self._describe(grad_norm, lambda_min, lambda_max, negative_certified, loss_change_along_bottom)
        return self._decide(step, self.classification == "saddle", "warning")

    def _describe(
        self,
        grad_norm: float,
        lambda_min: float,
        lambda_max: float,
        negative_certified: bool,
        loss_change_along_bottom: float | None,
    ) -> str:
        """One sentence that says why the point got its classification, in words that match its numbers."""
        share = abs(self.evidence["curvature_ratio"])
        numbers = f"gradient norm {grad_norm:.2g}, lambda_min {lambda_min:.4g}, lambda_max {lambda_max:.4g}"
        if self.classification == "saddle":
            escape = (
                f"; a step along it changes the loss by {loss_change_along_bottom:.3g}"
                if loss_change_along_bottom is not None
                else ""
            )
            return (
                f"Near-critical point ({numbers}) with certified negative curvature: |lambda_min| is "
                f"{100 * share:.3g}% of the spectral norm{escape}."
            )
        if self.classification == "not critical":
            return f"Not near a critical point: a gradient step would still remove a real share of the loss ({numbers})."
        if self.classification == "degenerate":
            return f"Near-critical point with no curvature to speak of in any direction ({numbers})."
        if lambda_min < 0 and not negative_certified:
            reason = "negative curvature is not certified beyond rounding"
        elif lambda_min < 0:
            reason = f"the negative curvature is small: |lambda_min| is {100 * share:.3g}% of the spectral norm"
        else:
            reason = "no negative curvature found"
        return f"Near-critical point, not a saddle: {reason} ({numbers})."

    def state_dict(self) -> dict[str, Any]:
        """Hysteresis, evidence and the latest classification (primitives)."""
        return super().state_dict() | {"classification": self.classification}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; missing keys keep their defaults."""
        super().load_state_dict(state)
        self.classification = state.get("classification", "unknown")
