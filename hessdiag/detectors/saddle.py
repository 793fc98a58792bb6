"""Saddle points: a run slowed near a point with certified, significant negative curvature that a step
along it can leave."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from hessdiag.detectors._common import Detector, require_count, require_finite, require_optional_positive, require_positive
from hessdiag.detectors.loss_trend import LossTrend, Pace
from hessdiag.detectors.records import CheckRecord, Record, StepRecord
from hessdiag.detectors.saddle_words import describe, escape_remedy
from hessdiag.flags import FlagEvent

Classification = Literal[
    "unknown", "progressing", "not critical", "degenerate", "saddle", "no escape", "minimum-like"
]


class SaddleDetector(Detector):
    """Raises ``saddle`` at a curvature check that finds the run slowed by a strict saddle.

    Three things must hold at a check, and each is in the evidence and the summary:

    1. **The run is not making progress.** From the per-step losses the detector has seen (the
       Monitor hands it every step's record), a least-squares line over the last `window` steps
       gives the pace (loss removed per step) and its standard error. The run is stalled when,
       even at the pace's upper confidence bound, the loss fell over the window by less than
       `progress_fraction` of the loss left above `loss_floor`, *and* the pace is below
       `pace_fraction` x the pace of the `window` steps before, whenever those fell
       significantly (a run that falls at its recent pace, however slowly, is never stalled).
       A loss too noisy for its pace to be measured to within `progress_fraction` of the loss left
       over the window (2 standard errors) is never called stalled either: mini-batch noise is
       not a stall (and is itself what the remedy adds); widen `window` to judge such runs. Only with fewer
       than four losses seen (a loop that passes no loss, or a check in the first steps) does the
       quadratic model decide instead: the largest drop of a gradient step, ||g||^2 / (2
       lambda_max), is at most `critical_fraction` of the loss left (or ||g|| <= `grad_tol`).
       The first check can thus still recognise a run that starts at a saddle (a tiny
       initialisation): its loss is flat from the first step. Otherwise ``"progressing"`` (or, by
       the quadratic model, ``"not critical"``).
    2. **Certified, significant negative curvature**: a negative Ritz value proves lambda_min < 0,
       and lambda_min < -`tau` x max(|lambda_max|, |lambda_min|). Judged on the Hessian itself:
       under Adam the preconditioned operator P^-1/2 H P^-1/2 has the same number of negative
       eigenvalues (Sylvester's law of inertia), so negative curvature exists in the optimizer's
       geometry exactly when it does in H; its share of the spectral norm is H's. All curvature ~0
       is ``"degenerate"``: a spectral norm below `flat_tol` x (loss - `loss_floor`), so that a step
       of unit length in parameter space, in any direction, changes the loss through curvature by
       less than `flat_tol` / 2 of the loss left. No certified or no significant negative curvature
       is ``"minimum-like"``.
    3. **An escape it can take**: when the check measured the loss change of a step along the
       bottom eigenvector (``loss_change_along_bottom``), it must be negative; a step that raises
       the loss (the quadratic model does not hold at that scale) is ``"no escape"``, not flagged.
       The remedy states the measured drop, and never claims one that was not measured.

    Only ``"saddle"`` triggers.

    Units: every test compares like with like (paces with paces and with the loss left, eigenvalues
    with each other and, for flatness, with the loss left), so multiplying the loss by a constant
    changes no verdict, and adding one changes none once `loss_floor` moves with it. Only
    `grad_tol`, in the gradient's units, is absolute: it is off by default.

    Args:
        tau: significance of negative curvature relative to the spectral norm (default 0.05: 50x the
            1e-3 relative accuracy of the eigenvalue estimates, and above the slight negative curvature
            that accompanies ordinary training: about 1% of lambda_max on ResNet-18, DESIGN.md).
        window: steps over which the recent pace is measured, and the earlier one before it
            (default 50, >= 4).
        progress_fraction: share of the loss left that the loss must fall by over `window` steps
            for the run to count as progressing on its own (default 0.001: a diffusion loss creeping
            onto its irreducible floor at 0.4% per 50 steps is progressing; a run stuck at a saddle
            from a tiny initialisation moves its loss by 1e-6 or less).
        pace_fraction: the recent pace counts as slowed below this fraction of the earlier pace
            (default 0.25).
        critical_fraction: the quadratic model's test, used without a loss history (default 0.01).
        grad_tol: gradient norm that counts as small whatever the loss, in the quadratic model's
            test only (default None: off).
        loss_floor: the lowest attainable loss (default 0).
        flat_tol: spectral norm, per unit of loss left above `loss_floor` (curvature per loss: 1 /
            parameter units squared), below which the point is degenerate (default 1e-6).
        onset: consecutive saddle checks that raise the flag (default 1: checks are sparse and the
            negative curvature is certified, not estimated).
        clear: consecutive other checks that clear it (default 2).

    Raises:
        ValueError: a threshold out of range, named in the message.

    Evidence: ``grad_norm``, ``lambda_min``, ``lambda_max``, ``curvature_ratio`` (lambda_min / spectral
    norm, in [-1, 1]), ``loss``, ``gradient_step_gain`` (||g||^2 / (2 lambda_max), loss units); with a
    loss history ``loss_drop_over_window`` (the fitted drop over the window over the loss left, a
    fraction) and, when the earlier stretch fell, ``pace_ratio`` (recent pace / earlier pace); when
    measured, ``loss_change_along_bottom`` (negative: an escape direction was found).
    """

    name = "saddle"
    remedy = "Keep or add momentum or gradient noise, so that the run leaves along the direction of negative curvature."

    def __init__(
        self,
        tau: float = 0.05,
        window: int = 50,
        progress_fraction: float = 0.001,
        pace_fraction: float = 0.25,
        critical_fraction: float = 0.01,
        grad_tol: float | None = None,
        loss_floor: float = 0.0,
        flat_tol: float = 1e-6,
        onset: int = 1,
        clear: int = 2,
    ) -> None:
        super().__init__(onset, clear)
        self.tau = require_positive("tau", tau, upper=1.0)
        self.window = require_count("window", window, 4)
        self.progress_fraction = require_positive("progress_fraction", progress_fraction, upper=1.0)
        self.pace_fraction = require_positive("pace_fraction", pace_fraction, upper=1.0)
        self.critical_fraction = require_positive("critical_fraction", critical_fraction, upper=1.0)
        self.grad_tol = require_optional_positive("grad_tol", grad_tol)
        self.loss_floor = require_finite("loss_floor", loss_floor)
        self.flat_tol = require_positive("flat_tol", flat_tol)
        self.trend = LossTrend(self.window)
        self.classification: Classification = "unknown"
        self.too_noisy = False  # the last check's loss pace was too noisy to be measured

    def observe(self, record: Record) -> list[FlagEvent]:
        """Keep each step's loss; judge a curvature check."""
        if isinstance(record, StepRecord):
            if record.loss is not None:
                self.add_loss(record.step, record.loss)
            return []
        if not isinstance(record, CheckRecord):
            return []
        return self.update(
            record.step, grad_norm=record.grad_norm, lambda_max=record.lambda_max, lambda_min=record.lambda_min,
            negative_certified=record.negative_curvature_certified, loss=record.loss,
            loss_change_along_bottom=record.loss_change_along_bottom,
        )  # fmt: skip

    def wants_bottom_end(self) -> bool:
        """Whether a check now could find the run slowed by a saddle, so that it needs the bottom end
        of the spectrum: no loss history yet (the quadratic model decides, with the check's own
        values), or the losses seen so far show a stall (the first condition above)."""
        recent = self.trend.recent()
        if recent is None:
            return True
        loss_left = recent.mean - self.loss_floor
        return loss_left > 0 and self._pace_stalled(recent, loss_left, {})

    def add_loss(self, step: int, loss: float) -> None:
        """Keep the training loss of optimizer step `step` for the pace (non-finite losses are skipped)."""
        self.trend.add(step, loss)

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
        """Classify the point of one curvature check, with the losses given by :meth:`add_loss` so far.

        Args:
            step: the optimizer step of the check.
            grad_norm: global gradient L2 norm on the check's batch.
            lambda_max, lambda_min: the extreme Hessian eigenvalue estimates.
            negative_certified: whether lambda_min < 0 is certified (a negative Ritz value).
            loss: the loss on the check's batch.
            loss_change_along_bottom: loss change of a step along the bottom eigenvector, if measured.
        """
        gradient_gain = grad_norm**2 / (2 * lambda_max) if lambda_max > 0 else math.inf
        spectral_norm = max(abs(lambda_max), abs(lambda_min))
        self.evidence = {
            "grad_norm": grad_norm,
            "lambda_min": lambda_min,
            "lambda_max": lambda_max,
            "curvature_ratio": lambda_min / spectral_norm if spectral_norm > 0 else 0.0,
            "loss": loss,
            "gradient_step_gain": gradient_gain,
        }
        stalled = self._stalled(grad_norm, gradient_gain, loss)
        if loss_change_along_bottom is not None:
            self.evidence["loss_change_along_bottom"] = loss_change_along_bottom
        if not stalled:
            self.classification = "progressing" if "loss_drop_over_window" in self.evidence else "not critical"
        elif spectral_norm < self.flat_tol * (loss - self.loss_floor):
            self.classification = "degenerate"
        elif not (negative_certified and lambda_min < -self.tau * spectral_norm):
            self.classification = "minimum-like"
        elif loss_change_along_bottom is not None and not loss_change_along_bottom < 0:
            self.classification = "no escape"
        else:
            self.classification = "saddle"
        self.summary = describe(self, grad_norm, lambda_min, lambda_max, negative_certified, loss_change_along_bottom)
        return self._decide(step, self.classification == "saddle", "warning", remedy=escape_remedy(self.remedy, loss_change_along_bottom))

    def _stalled(self, grad_norm: float, gradient_gain: float, loss: float) -> bool:
        """Whether the run is not making progress (see the class docstring); writes the pace evidence."""
        recent = self.trend.recent()
        self.too_noisy = False
        if recent is None:  # no loss history: the quadratic model along the gradient
            small_gradient = self.grad_tol is not None and grad_norm <= self.grad_tol
            return gradient_gain <= self.critical_fraction * (loss - self.loss_floor) or small_gradient
        loss_left = recent.mean - self.loss_floor
        if loss_left <= 0:  # at or below its floor: nothing left to make progress on
            self.evidence["loss_drop_over_window"] = 0.0
            return False
        return self._pace_stalled(recent, loss_left, self.evidence)

    def _pace_stalled(self, recent: Pace, loss_left: float, evidence: dict[str, float]) -> bool:
        """The loss history's stall test (`loss_left` > 0); writes the pace into `evidence`."""
        evidence["loss_drop_over_window"] = recent.rate * max(recent.span, 1) / loss_left
        # Slow even at the upper confidence bound, and resolved: a loss too noisy to measure the pace
        # to within `progress_fraction` of the loss left over the window is never called stalled.
        threshold = self.progress_fraction * loss_left
        span = max(recent.span, 1)
        self.too_noisy = 2 * recent.stderr * span > threshold
        slow = recent.upper * span <= threshold and not self.too_noisy
        earlier = self.trend.earlier()
        if earlier is None or earlier.lower <= 0:  # no earlier fall to compare with
            return slow
        evidence["pace_ratio"] = recent.rate / earlier.rate
        return slow and recent.upper <= self.pace_fraction * earlier.rate

    def state_dict(self) -> dict[str, Any]:
        """Hysteresis, evidence, the latest classification and the loss history (primitives)."""
        return super().state_dict() | {"classification": self.classification, "losses": self.trend.state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; missing keys keep their defaults."""
        super().load_state_dict(state)
        self.classification = state.get("classification", "unknown")
        self.trend.restore(state.get("losses", []))
