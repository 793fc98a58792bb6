"""Edge of stability: the sharpness reaches the optimizer's stability threshold (2/lr for SGD)."""

from __future__ import annotations

import math

from hessdiag.detectors._common import Detector, require_positive
from hessdiag.detectors.records import CheckRecord, Record, TrackingRecord
from hessdiag.flags import FlagEvent
from hessdiag.estimators.layer_shares import module_label


class EdgeOfStabilityDetector(Detector):
    """Raises ``edge_of_stability`` when sharpness / threshold reaches `ratio`.

    The threshold comes from :func:`hessdiag.stability.stability_threshold` (2/lr for SGD; for Adam
    it applies to the preconditioned sharpness). On a quadratic, gradient descent diverges along the
    steepest direction once the sharpness exceeds the threshold; in networks, full-batch gradient
    descent sharpens until the ratio hovers at 1 and the steepest direction oscillates (Cohen et al.,
    2021, "Gradient descent on neural networks typically occurs at the edge of stability"). The flag
    rises a little before 1 (`ratio` 0.9) because the sharpness of one batch is an estimate and the
    ratio oscillates around 1 at the edge. It clears only once the ratio falls below `clear_ratio`
    (hysteresis on the value as well as on the count), so a ratio hovering at 0.85-0.95 keeps it up.

    Args:
        ratio: sharpness / threshold that triggers (default 0.9).
        clear_ratio: below which a check counts as clear (default 0.8; at most `ratio`).
        onset: consecutive triggering checks that raise the flag (default 2).
        clear: consecutive clear checks that clear it (default 2).

    Raises:
        ValueError: a threshold out of range, named in the message.

    Evidence: ``sharpness`` (lambda_max, or lambda_max(P^-1 H) for Adam), ``threshold`` (same units,
    1/lr), ``ratio`` (sharpness / threshold), and when the check knows where the top eigenvector lives,
    ``top_module_share`` (the share of it in the module named in the summary and the remedy, which
    then says what to do with that module), and with ``module_sharpness`` ``top_module_lambda_max``
    (lambda_max of that module's own Hessian block, in the summary beside the whole lambda_max). Severity ``warning`` at ratio >= 1 (beyond the edge),
    else ``info``.
    """

    name = "edge_of_stability"
    remedy = (
        "The steepest direction oscillates: lower the learning rate or add warm-up; or accept it "
        "(progressive sharpening to the edge is common with full-batch GD and often harmless; "
        "adaptive methods see the preconditioned sharpness)."
    )

    def __init__(self, ratio: float = 0.9, clear_ratio: float = 0.8, onset: int = 2, clear: int = 2) -> None:
        super().__init__(onset, clear)
        self.ratio = require_positive("ratio", ratio)
        self.clear_ratio = require_positive("clear_ratio", clear_ratio)
        if self.clear_ratio > self.ratio:
            raise ValueError(f"`clear_ratio` ({clear_ratio}) must be at most `ratio` ({ratio}).")

    def observe(self, record: Record) -> list[FlagEvent]:
        """Judge a curvature check that has a stability threshold, and a tracking reading whose lower
        bound on the sharpness proves the ratio at or above the trigger (above `clear_ratio` while
        the flag is up); a lower bound below says nothing (only a full check may clear the flag);
        other records say nothing."""
        if isinstance(record, TrackingRecord):
            sharpness, threshold = record.sharpness_lower_bound, record.stability_threshold
            if sharpness is None or threshold is None or not threshold > 0:
                return []
            keeps = self.ratio if not self.active else self.clear_ratio
            if not sharpness / threshold >= keeps:
                return []
            return self.update(record.step, sharpness, threshold, lower_bound=True)
        if not isinstance(record, CheckRecord) or record.stability_threshold is None:
            return []
        return self.update(
            record.step, record.sharpness, record.stability_threshold,
            top_module=record.top_module, top_module_share=record.top_module_share,
            top_module_lambda_max=record.top_module_lambda_max, lambda_max=record.lambda_max,
        )  # fmt: skip

    def update(
        self,
        step: int,
        sharpness: float,
        threshold: float,
        *,
        top_module: str | None = None,
        top_module_share: float | None = None,
        top_module_lambda_max: float | None = None,
        lambda_max: float | None = None,
        lower_bound: bool = False,
    ) -> list[FlagEvent]:
        """Judge one curvature check: `sharpness` against the optimizer's stability `threshold`.

        `top_module`, `top_module_share`: the module holding the largest share of the top
        eigenvector, and that share, named in the summary and the remedy. `top_module_lambda_max`:
        lambda_max of that module's own diagonal block, set beside the whole `lambda_max` in the
        summary ("`layer4.1.conv2` alone has lambda_max 380 of the whole 412"). A non-finite value or a
        threshold <= 0 says nothing and is skipped. `lower_bound`: `sharpness` is a proven lower bound
        (a tracking reading), said so in the summary.
        """
        if not (math.isfinite(sharpness) and math.isfinite(threshold)) or threshold <= 0:
            return []
        ratio = sharpness / threshold
        self.evidence = {"sharpness": sharpness, "threshold": threshold, "ratio": ratio}
        self.summary = f"Sharpness {sharpness:.4g} is {ratio:.2f}x the stability threshold {threshold:.4g}."
        if lower_bound:
            self.summary = (
                f"Sharpness at least {sharpness:.4g} (a proven lower bound, from a tracking reading) is at least "
                f"{ratio:.2f}x the stability threshold {threshold:.4g}."
            )
        remedy = None
        if top_module is not None and top_module_share is not None:
            self.evidence["top_module_share"] = top_module_share
            where = module_label(top_module)
            self.summary += f" The sharpest direction lies {top_module_share:.0%} in `{where}`."
            if top_module_lambda_max is not None and lambda_max is not None:
                self.evidence["top_module_lambda_max"] = top_module_lambda_max
                self.summary += f" `{where}` alone has lambda_max {top_module_lambda_max:.4g} of the whole {lambda_max:.4g}."
            remedy = (
                f"The steepest direction oscillates, {top_module_share:.0%} of it in `{where}`: give `{where}` a lower "
                "learning rate (a parameter group of its own), normalise around it (a norm layer after it, a "
                "smaller initialisation), or warm up the learning rate; or accept it (progressive sharpening to "
                "the edge is common with full-batch GD and often harmless)."
            )
        triggered = ratio >= self.ratio or (self.active and ratio >= self.clear_ratio)
        return self._decide(step, triggered, "warning" if ratio >= 1 else "info", remedy=remedy)
