"""Edge of stability: the sharpness reaches the optimizer's stability threshold (2/lr for SGD)."""

from __future__ import annotations

import math

from hessdiag.detectors._common import Detector, check_positive
from hessdiag.flags import FlagEvent


class EdgeOfStabilityDetector(Detector):
    """Raises ``edge_of_stability`` when sharpness / threshold reaches `ratio`.

    The threshold comes from :func:`hessdiag.stability.stability_threshold` (2/lr for SGD; Adam uses the
    preconditioned sharpness). Full-batch gradient descent typically sharpens until the ratio hovers
    at 1 (Cohen et al., 2021); beyond it the steepest direction oscillates. The flag clears only once the
    ratio falls below `clear_ratio` (hysteresis on the value as well as on the count).

    Args:
        ratio: sharpness / threshold that triggers (default 0.9).
        clear_ratio: below which a check counts as clear (default 0.8; must be <= `ratio`).
        onset: consecutive triggering checks that raise the flag (default 2).
        clear: consecutive clear checks that clear it (default 2).

    Evidence: ``sharpness``, ``threshold``, ``ratio``. Severity ``warning`` at ratio >= 1, else ``info``.
    """

    name = "edge_of_stability"
    remedy = (
        "The steepest direction oscillates: lower the learning rate or add warm-up; or accept it "
        "(progressive sharpening to 2/lr is common with large steps and often harmless)."
    )

    def __init__(self, ratio: float = 0.9, clear_ratio: float = 0.8, onset: int = 2, clear: int = 2) -> None:
        super().__init__(onset, clear)
        self.ratio = check_positive("ratio", ratio)
        self.clear_ratio = check_positive("clear_ratio", clear_ratio)
        if self.clear_ratio > self.ratio:
            raise ValueError(f"`clear_ratio` ({clear_ratio}) must be at most `ratio` ({ratio}).")

    def update(self, step: int, sharpness: float, threshold: float) -> list[FlagEvent]:
        if not (math.isfinite(sharpness) and math.isfinite(threshold)) or threshold <= 0:
            return []
        ratio = sharpness / threshold
        self.evidence = {"sharpness": sharpness, "threshold": threshold, "ratio": ratio}
        self.summary = f"Sharpness {sharpness:.4g} is {ratio:.2f}x the stability threshold {threshold:.4g}."
        triggered = ratio >= self.ratio or (self.active and ratio >= self.clear_ratio)
        return self._decide(step, triggered, "warning" if ratio >= 1 else "info")
