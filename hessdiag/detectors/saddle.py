"""Saddle points: a near-critical point with certified, significant negative curvature."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

from hessdiag.detectors._common import Detector, check_count, check_positive
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

    The gradient is small when its norm is below `grad_fraction` x the median of past checks, or below
    `grad_tol`. Only ``"saddle"`` triggers.

    Args:
        tau: significance of negative curvature relative to the spectral norm (default 0.05).
        grad_fraction: fraction of the median past gradient norm that counts as small (0.1).
        grad_tol: absolute gradient norm that counts as small (1e-3).
        flat_tol: spectral norm below which the point is degenerate (1e-6).
        onset: consecutive saddle checks that raise the flag (default 1: checks are sparse and the
            negative curvature is certified, not estimated).
        clear: consecutive other checks that clear it (default 2).

    Evidence: ``grad_norm``, ``lambda_min``, ``lambda_max``, ``curvature_ratio`` (lambda_min /
    spectral norm), ``loss``, and ``loss_change_along_bottom`` (negative: stepping along the bottom
    eigenvector lowers the loss, an escape direction).
    """

    name = "saddle"
    remedy = (
        "Keep or add momentum or gradient noise; a step along the bottom eigenvector (escape direction) lowers the loss."
    )

    def __init__(
        self,
        tau: float = 0.05,
        grad_fraction: float = 0.1,
        grad_tol: float = 1e-3,
        flat_tol: float = 1e-6,
        onset: int = 1,
        clear: int = 2,
    ) -> None:
        super().__init__(onset, clear)
        self.tau = check_positive("tau", tau, upper=1.0)
        self.grad_fraction = check_positive("grad_fraction", grad_fraction, upper=1.0)
        self.grad_tol = check_positive("grad_tol", grad_tol)
        self.flat_tol = check_positive("flat_tol", flat_tol)
        self.grad_history: deque[float] = deque(maxlen=check_count("history", 20))
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
        median = statistics.median(self.grad_history) if len(self.grad_history) >= 3 else math.nan
        small = grad_norm <= self.grad_tol or grad_norm <= self.grad_fraction * median
        self.grad_history.append(grad_norm)
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
        return super().state_dict() | {"grad_history": list(self.grad_history), "classification": self.classification}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.grad_history = deque(state.get("grad_history", []), maxlen=self.grad_history.maxlen)
        self.classification = str(state.get("classification", "unknown"))
