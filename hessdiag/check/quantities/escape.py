"""Is the bottom direction an escape? The loss change one step along the bottom Ritz vector.

Measured only where negative curvature is certified: the step (the better of both signs) is sized
so that the quadratic model predicts a drop of :data:`ESCAPE_PROBE_FRACTION` of the loss. Two
forwards, no product.
"""

from __future__ import annotations

import math
from typing import Any

from hessdiag.check.quantity import CheckContext, Quantity
from hessdiag.reporting.tags import LOSS_CHANGE_ALONG_BOTTOM

#: The escape probe steps so that the quadratic model predicts a loss drop of this fraction.
ESCAPE_PROBE_FRACTION = 0.01


class LossChangeAlongBottom(Quantity):
    """min over +-alpha of L(theta + alpha y_min) - L(theta); None without certified negative curvature."""

    name = "loss_change_along_bottom"

    def due(self, context: CheckContext) -> bool:
        return context.bottom

    def compute(self, context: CheckContext) -> float | None:
        result = context.spectrum
        if not result.negative_curvature_certified or result.bottom_vectors is None:
            return None
        alpha = math.sqrt(2 * ESCAPE_PROBE_FRACTION * max(abs(result.loss), 1e-12) / abs(result.lambda_min))
        direction = result.bottom_vectors[0]
        loss_along = context.operator.loss_along
        return min(loss_along(direction, alpha), loss_along(direction, -alpha)) - result.loss

    @staticmethod
    def scalars(value: float, check: Any) -> dict[str, float]:
        return {LOSS_CHANGE_ALONG_BOTTOM: value}
