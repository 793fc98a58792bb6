"""What limits the step: the curvature along the gradient g'Hg / ||g||^2 and the learning-rate headroom.

Along the gradient preconditioned as the sharpness is (so the curvature and the threshold are in the
sharpness's units); one product (see :mod:`hessdiag.estimators.gradient_curvature`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hessdiag.check.quantities.stability import Stability
from hessdiag.check.quantity import CheckContext, Quantity
from hessdiag.estimators.gradient_curvature import gradient_curvature_of
from hessdiag.reporting.tags import GRADIENT_ALIGNMENT, GRADIENT_CURVATURE, LR_HEADROOM


@dataclass(frozen=True)
class AlongGradient:
    """g'Hg / ||g||^2 (None for a zero gradient) and the headroom threshold / curvature (None
    without a threshold; inf for curvature <= 0)."""

    curvature: float | None
    headroom: float | None


class GradientCurvature(Quantity):
    """The curvature along the (preconditioned) gradient and the headroom (value: :class:`AlongGradient`)."""

    name = "gradient_curvature"
    needs = ("stability",)

    def compute(self, context: CheckContext) -> AlongGradient:
        stability = context.values.get("stability")
        stability = stability if isinstance(stability, Stability) else None
        threshold = stability.threshold.threshold if stability is not None and stability.threshold is not None else None
        threshold = threshold if threshold is not None and 0 < threshold < math.inf else None
        along = gradient_curvature_of(context.operator, threshold=threshold, scaling=stability.scale if stability else None)
        curvature = None if math.isnan(along.curvature) else along.curvature
        headroom = None if along.headroom is None or math.isnan(along.headroom) else along.headroom
        return AlongGradient(curvature, headroom)

    @staticmethod
    def scalars(value: AlongGradient, check: Any) -> dict[str, float]:
        found = {
            GRADIENT_CURVATURE: value.curvature,
            GRADIENT_ALIGNMENT: check.gradient_alignment,
            LR_HEADROOM: value.headroom,  # inf (curvature <= 0: no overshoot) is left out of the chart
        }
        return {tag: v for tag, v in found.items() if v is not None and math.isfinite(v)}
