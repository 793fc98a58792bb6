"""Plateaus: the loss has stopped improving, the gradient is small, and the loss is not at its floor."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

from hessdiag.detectors._common import Detector, check_count, check_positive
from hessdiag.flags import FlagEvent


class PlateauDetector(Detector):
    """Raises ``plateau`` when training stalls well above the loss floor.

    Over the last `window` steps the mean loss of the last quarter is compared with the mean of the
    first quarter: means of many steps see through mini-batch noise, where an EMA minimum would mistake
    noise for progress. Triggers on a step when all three hold:

    * stalled: the relative improvement (first - last) / |first| is below `rel_improvement`;
    * gradient small: the median gradient norm of the last quarter is below `grad_fraction` x the
      largest such median seen so far, or below `grad_tol` in absolute terms (a run stuck from the
      first step has no larger past to compare with);
    * not at the floor: the recent mean loss exceeds `loss_floor` + `floor_margin` (set `loss_floor`
      to the known minimum, e.g. the entropy of the labels, when it is not 0).

    Args:
        window: steps compared (default 200).
        rel_improvement: relative improvement over the window below which the loss has stalled (0.01).
        grad_fraction: fraction of the peak median gradient norm that counts as small (0.1).
        grad_tol: absolute gradient norm that counts as small (1e-3).
        loss_floor, floor_margin: the loss counts as at its floor below loss_floor + floor_margin
            (defaults 0 and 0.05).
        onset: consecutive stalled steps that raise the flag (default 50).
        clear: consecutive improving steps that clear it (default 20).

    Evidence: ``loss`` (recent mean), ``relative_improvement``, ``grad_norm`` (recent median),
    ``peak_grad_norm``.
    """

    name = "plateau"
    remedy = "Raise the learning rate or use a schedule with warm restarts, add momentum, or switch to an adaptive optimiser (Adam)."

    def __init__(
        self,
        window: int = 200,
        rel_improvement: float = 0.01,
        grad_fraction: float = 0.1,
        grad_tol: float = 1e-3,
        loss_floor: float = 0.0,
        floor_margin: float = 0.05,
        onset: int = 50,
        clear: int = 20,
    ) -> None:
        super().__init__(onset, clear)
        self.window = check_count("window", window, 8)
        self.rel_improvement = check_positive("rel_improvement", rel_improvement, upper=1.0)
        self.grad_fraction = check_positive("grad_fraction", grad_fraction, upper=1.0)
        self.grad_tol = check_positive("grad_tol", grad_tol)
        if not isinstance(loss_floor, (int, float)) or not math.isfinite(loss_floor):
            raise ValueError(f"`loss_floor` must be a finite number, got {loss_floor!r}.")
        self.loss_floor = float(loss_floor)
        self.floor_margin = check_positive("floor_margin", floor_margin)
        self.losses: deque[float] = deque(maxlen=self.window)
        self.grad_norms: deque[float] = deque(maxlen=self.window // 4)
        self.peak_grad_norm = 0.0

    def update(self, step: int, loss: float, grad_norm: float) -> list[FlagEvent]:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return []  # the exploding detector's business
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        recent_grad = statistics.median(self.grad_norms)
        self.peak_grad_norm = max(self.peak_grad_norm, recent_grad)
        if len(self.losses) < self.window:
            return []
        quarter = self.window // 4
        history = list(self.losses)
        first, last = statistics.fmean(history[:quarter]), statistics.fmean(history[-quarter:])
        improvement = (first - last) / max(abs(first), 1e-12)
        stalled = improvement < self.rel_improvement
        small = recent_grad <= self.grad_fraction * self.peak_grad_norm or recent_grad <= self.grad_tol
        above_floor = last > self.loss_floor + self.floor_margin
        self.evidence = {
            "loss": last,
            "relative_improvement": improvement,
            "grad_norm": recent_grad,
            "peak_grad_norm": self.peak_grad_norm,
        }
        self.summary = (
            f"The loss moved {100 * improvement:.2g}% over {self.window} steps at {last:.4g}, with gradient norm "
            f"{recent_grad:.2g} (peak {self.peak_grad_norm:.2g})."
        )
        return self._decide(step, stalled and small and above_floor, "warning")

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {
            "losses": list(self.losses),
            "grad_norms": list(self.grad_norms),
            "peak_grad_norm": self.peak_grad_norm,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.losses = deque(state.get("losses", []), maxlen=self.window)
        self.grad_norms = deque(state.get("grad_norms", []), maxlen=self.window // 4)
        self.peak_grad_norm = float(state.get("peak_grad_norm", 0.0))
