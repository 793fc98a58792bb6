"""Plateaus: the loss has stopped improving, the gradient is small, and the loss is not at its floor."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

from hessdiag.detectors._common import Detector, require_count, require_finite, require_optional_positive, require_positive
from hessdiag.detectors.records import Record, StepRecord
from hessdiag.flags import FlagEvent


class PlateauDetector(Detector):
    """Raises ``plateau`` when training stalls well above the loss floor.

    Over the last `window` steps the mean loss of the last quarter is compared with the mean of the
    first quarter. Means of many steps see through mini-batch noise; the minimum of an EMA-smoothed
    loss does not: on a flat but noisy loss it keeps reaching new lows by chance and looks like
    progress. A step triggers when all three hold:

    * stalled: the loss above its floor, E = loss - `loss_floor`, improved by less than a fraction
      `rel_improvement` over the window: (first - last) / (first - `loss_floor`) < `rel_improvement`;
    * gradient small: the median gradient norm of the last quarter is below `grad_fraction` x the
      largest such median seen so far (a run that learned and then stalled); or, once a curvature
      check has measured lambda_max, a full gradient step could remove at most `critical_fraction` of
      the loss above the floor: g^2 / (2 lambda_max) <= `critical_fraction` x (loss - `loss_floor`)
      (the saddle detector's test: it needs no past, so it recognises a run stuck from its first
      step, as from a tiny initialisation); or, when given, it is below `grad_tol`;
    * not at the floor: E of the last quarter exceeds `floor_margin` x the largest E of a quarter so
      far, so a run that has removed nearly all of its loss above the floor is converged, not stalled.

    Units: every test but `grad_tol` compares like with like, so multiplying the loss by a constant
    changes no verdict, and adding a constant changes none once `loss_floor` moves with it (the floor
    is where the loss is measured from: the default 0 is the minimum of cross-entropy and squared
    error; set it for losses whose minimum is not 0). `grad_tol` is in the gradient's units, hence
    off by default.

    Nothing is judged before a full window; then `onset` stalled steps in a row raise the flag.

    Args:
        window: steps compared (default 200, >= 8).
        rel_improvement: relative improvement over the window below which the loss has stalled
            (default 0.01: the quarter means of 50 steps at 20% mini-batch noise differ by about
            2% by chance, so a smaller threshold would let noise hide a flat loss).
        grad_fraction: fraction of the peak gradient norm that counts as small (default 0.1).
        critical_fraction: fraction of the loss left that a gradient step may remove for the gradient
            to count as small, given lambda_max (default 0.01, as for saddles).
        grad_tol: gradient norm that counts as small whatever its past (default None: off; in the
            gradient's units, so it ties the verdict to the loss's scale).
        loss_floor: the lowest attainable loss (default 0; set e.g. the label entropy when it is not 0).
        floor_margin: fraction of the largest loss above the floor seen so far that still counts as
            at the floor (default 0.02: a cross-entropy that started at 2.3 nats is at its floor
            below 0.046).
        onset: consecutive stalled steps that raise the flag (default 50).
        clear: consecutive improving steps that clear it (default 20).

    Raises:
        ValueError: a threshold out of range, named in the message.

    Evidence: ``loss`` (mean of the last quarter), ``relative_improvement`` (of the loss above its
    floor over the window, a fraction; negative when the loss rose), ``loss_left`` (the last quarter's
    loss above the floor over the largest so far, a fraction), ``grad_norm`` (median of the last
    quarter), ``peak_grad_norm`` (largest such median so far), ``gradient_step_gain`` (g^2 /
    (2 lambda_max) in loss units; inf before a curvature check).
    """

    name = "plateau"
    remedy = (
        "Raise the learning rate or use a schedule with warm restarts, add momentum, "
        "or switch to an adaptive optimiser (Adam)."
    )

    def __init__(
        self,
        window: int = 200,
        rel_improvement: float = 0.01,
        grad_fraction: float = 0.1,
        critical_fraction: float = 0.01,
        grad_tol: float | None = None,
        loss_floor: float = 0.0,
        floor_margin: float = 0.02,
        onset: int = 50,
        clear: int = 20,
    ) -> None:
        super().__init__(onset, clear)
        self.window = require_count("window", window, 8)
        self.rel_improvement = require_positive("rel_improvement", rel_improvement, upper=1.0)
        self.grad_fraction = require_positive("grad_fraction", grad_fraction, upper=1.0)
        self.critical_fraction = require_positive("critical_fraction", critical_fraction, upper=1.0)
        self.grad_tol = require_optional_positive("grad_tol", grad_tol)
        self.loss_floor = require_finite("loss_floor", loss_floor)
        self.floor_margin = require_positive("floor_margin", floor_margin, upper=1.0)
        self.losses: deque[float] = deque(maxlen=self.window)
        self.grad_norms: deque[float] = deque(maxlen=self.window // 4)
        self.peak_grad_norm = 0.0
        self.peak_loss_left = 0.0  # the largest quarter mean of loss - loss_floor so far
        self.lambda_max = 0.0  # from the latest curvature check; 0: none yet

    def observe(self, record: Record) -> list[FlagEvent]:
        """Judge a step with its loss and gradient statistics; other records say nothing."""
        if not isinstance(record, StepRecord) or record.loss is None or record.grad_norm is None:
            return []
        return self.update(record.step, record.loss, record.grad_norm, lambda_max=record.lambda_max)

    def update(self, step: int, loss: float, grad_norm: float, lambda_max: float | None = None) -> list[FlagEvent]:
        """Judge one optimizer step from its training `loss` and global gradient L2 norm `grad_norm`.

        `lambda_max`: the largest Hessian eigenvalue of the latest curvature check, when one was made
        (kept until the next one is given). Non-finite values are skipped (the exploding detector's
        business).
        """
        if lambda_max is not None and math.isfinite(lambda_max):
            self.lambda_max = lambda_max
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return []
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        recent_grad = statistics.median(self.grad_norms)
        self.peak_grad_norm = max(self.peak_grad_norm, recent_grad)
        if len(self.losses) < self.window:
            return []
        quarter = self.window // 4
        history = list(self.losses)
        first, last = statistics.fmean(history[:quarter]), statistics.fmean(history[-quarter:])
        first_left, last_left = first - self.loss_floor, last - self.loss_floor
        self.peak_loss_left = max(self.peak_loss_left, first_left, last_left)
        # A loss at or below its floor has nothing left to improve: neither stalled nor above the floor.
        improvement = (first_left - last_left) / first_left if first_left > 0 else math.nan
        loss_left = last_left / self.peak_loss_left if self.peak_loss_left > 0 else 0.0
        stalled = improvement < self.rel_improvement
        gradient_gain = recent_grad**2 / (2 * self.lambda_max) if self.lambda_max > 0 else math.inf
        small_rules = {
            f"gradient <= {self.grad_fraction:g} x its peak": recent_grad <= self.grad_fraction * self.peak_grad_norm,
            f"a full gradient step removes <= {self.critical_fraction:g} of the loss left": gradient_gain
            <= self.critical_fraction * last_left,
            f"gradient <= grad_tol ({self.grad_tol:g})" if self.grad_tol is not None else "": self.grad_tol is not None
            and recent_grad <= self.grad_tol,
        }
        fired = [rule for rule, holds in small_rules.items() if holds]
        small = bool(fired)
        above_floor = loss_left > self.floor_margin
        self.evidence = {
            "loss": last,
            "relative_improvement": improvement,
            "loss_left": loss_left,
            "grad_norm": recent_grad,
            "peak_grad_norm": self.peak_grad_norm,
            "gradient_step_gain": gradient_gain,
        }
        self.summary = (
            f"The loss {_change_in_words(improvement)} over {self.window} steps to {last:.4g}, with gradient norm "
            f"{recent_grad:.2g} (peak {self.peak_grad_norm:.2g})"
            + (f"; small by the rule{'s' if len(fired) > 1 else ''}: {'; '.join(fired)}." if fired else ".")
        )
        return self._decide(step, stalled and small and above_floor, "warning")

    def state_dict(self) -> dict[str, Any]:
        """Hysteresis, evidence, the loss and gradient windows (lists of floats) and the peak."""
        return super().state_dict() | {
            "losses": list(self.losses),
            "grad_norms": list(self.grad_norms),
            "peak_grad_norm": self.peak_grad_norm,
            "peak_loss_left": self.peak_loss_left,
            "lambda_max": self.lambda_max,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; missing keys keep their defaults (empty windows)."""
        super().load_state_dict(state)
        self.losses = deque(state.get("losses", []), maxlen=self.window)
        self.grad_norms = deque(state.get("grad_norms", []), maxlen=self.window // 4)
        self.peak_grad_norm = float(state.get("peak_grad_norm", 0.0))
        self.peak_loss_left = float(state.get("peak_loss_left", 0.0))
        self.lambda_max = float(state.get("lambda_max", 0.0))


def _change_in_words(improvement: float) -> str:
    """'improved by 0.42%', 'rose by 3%', or 'changed by less than 0.01%' for a relative improvement."""
    if abs(improvement) < 1e-4:
        return "changed by less than 0.01%"
    return f"{'improved' if improvement > 0 else 'rose'} by {100 * abs(improvement):.2g}%"
