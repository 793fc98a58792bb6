"""Saddle points: a near-critical point with certified, significant negative curvature."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from hessdiag.detectors._common import Detector, check_positive
from hessdiag.flags import FlagEvent


class SaddleDetector(Detector):
    """Raises ``saddle`` at a curvature check that finds the run near a strict saddle.

    Near a critical point L(theta + v) ~ L(theta) + v^T H v / 2: eigenvalues of both signs make a
    saddle. The check classifies the point (``classification``):

    * ``"not critical"``: the gradient is not small;
    * ``"degenerate"``: all curvature is ~0 (max |lambda| < `flat_tol`); never called a strict saddle;
    * ``"saddle"``: negative curvature is *certified* (a negative Ritz value proves lambda_min < 0)
      and significant: lambda_min < -`tau` x max(|lambda_max|, |lambda_min|);
    * ``"minimum-like"``: otherwise.

    The gradient is small (the point near-critical) when a gradient step could remove at most a
    fraction `critical_fraction` of the loss above its floor: ||g||^2 / (2 lambda_max) <=
    critical_fraction x (loss - loss_floor), the best decrease of the quadratic model along -g; or
    when ||g|| <= `grad_tol`. This is scale-free and needs no history, so the first check can tell.
    Only ``"saddle"`` triggers.

    Args:
        tau: significance of negative curvature relative to the spectral norm (default 0.05).
        critical_fraction: see above (default 0.01).
        grad_tol: absolute gradient norm that counts as small (1e-3).
        loss_floor: the lowest attainable loss (default 0).
        flat_tol: spectral norm below which the point is degenerate (1e-6).
        onset: consecutive saddle checks that raise the flag (default 1: checks are sparse and the
            negative curvature is certified, not estimated).
        clear: consecutive other checks that clear it (default 2).

    Evidence: ``grad_norm``, ``lambda_min``, ``lambda_max``, ``curvature_ratio`` (lambda_min /
    spectral norm), ``loss``, ``gradient_step_gain`` (||g||^2 / 2 lambda_max), and ``loss_change_along_bottom`` (negative: stepping along the bottom
    eigenvector lowers the loss, an escape direction).
    """

    name = "saddle"
    remedy = (
        "Keep or add momentum or gradient noise; a step along the bottom eigenvector (escape direction) lowers the loss."
    )

    def __init__(
        self,
        tau: float = 0.05,
        critical_fraction: float = 0.01,
        grad_tol: float = 1e-3,
        loss_floor: float = 0.0,
        flat_tol: float = 1e-6,
        onset: int = 1,
        clear: int = 2,
    ) -> None:
        super().__init__(onset, clear)
        self.tau = check_positive("tau", tau, upper=1.0)
        self.critical_fraction = check_positive("critical_fraction", critical_fraction, upper=1.0)
        self.grad_tol = check_positive("grad_tol", grad_tol)
        self.flat_tol = check_positive("flat_tol", flat_tol)
        if not isinstance(loss_floor, (int, float)) or not math.isfinite(loss_floor):
            raise ValueError(f"`loss_floor` must be a finite number, got {loss_floor!r}.")
        self.loss_floor = float(loss_floor)
        self.classification = "unknown"

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
        gradient_gain = grad_norm**2 / (2 * lambda_max) if lambda_max > 0 else math.inf
        small = grad_norm <= self.grad_tol or gradient_gain <= self.critical_fraction * (loss - self.loss_floor)
        spectral_norm = max(abs(lambda_max), abs(lambda_min))
        if not small:
            self.classification = "not critical"
        elif spectral_norm < self.flat_tol:
            self.classification = "degenerate"
        elif negative_certified and lambda_min < -self.tau * spectral_norm:
            self.classification = "saddle"
        else:
            self.classification = "minimum-like"
        self.evidence = {
            "grad_norm": grad_norm,
            "lambda_min": lambda_min,
            "lambda_max": lambda_max,
            "curvature_ratio": lambda_min / spectral_norm if spectral_norm > 0 else 0.0,
            "loss": loss,
            "gradient_step_gain": gradient_gain,
        }
        if loss_change_along_bottom is not None:
            self.evidence["loss_change_along_bottom"] = loss_change_along_bottom
        escape = (
            f"; a step along it changes the loss by {loss_change_along_bottom:.3g}" if loss_change_along_bottom is not None else ""
        )
        self.summary = (
            f"Gradient norm {grad_norm:.2g} with certified negative curvature lambda_min {lambda_min:.4g} "
            f"({100 * lambda_min / spectral_norm if spectral_norm else 0:.1f}% of the spectral norm){escape}."
            if self.classification == "saddle"
            else f"Point classified {self.classification} (gradient {grad_norm:.2g}, lambda_min {lambda_min:.4g}, lambda_max {lambda_max:.4g})."
        )
        return self._decide(step, self.classification == "saddle", "warning")

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"classification": self.classification}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.classification = str(state.get("classification", "unknown"))
