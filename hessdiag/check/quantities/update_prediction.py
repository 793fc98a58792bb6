"""The quadratic model's loss change of the optimizer's update that led to the check, against the
observed one (with ``update_ratios=True``; one product and one forward; see
:mod:`hessdiag.estimators.update_prediction`)."""

from __future__ import annotations

import math
from typing import Any

import torch

from hessdiag.check.quantity import CheckContext, Quantity, Skipped
from hessdiag.estimators.update_prediction import UpdatePrediction, UpdateStart, predict_update
from hessdiag.reporting.tags import UPDATE_LOSS_OBSERVED, UPDATE_LOSS_PREDICTED, UPDATE_LOSS_RATIO


class UpdateLossPrediction(Quantity):
    """The prediction for the update of the check's step (value: :class:`~hessdiag.estimators.update_prediction.UpdatePrediction`);
    None without a parameter copy of that step (see :meth:`remember`)."""

    name = "update_prediction"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._start: UpdateStart | None = None

    def remember(self, step: int, params: list[torch.Tensor]) -> None:
        """Copy `params` before optimizer step `step` (its gradients final, the step not yet taken).
        Once per step: a second call for the same step (an LBFGS closure) keeps the first copy."""
        if self._start is None or self._start.step != step:
            self._start = UpdateStart(step, params)

    def compute(self, context: CheckContext) -> UpdatePrediction | Skipped | None:
        start, self._start = self._start, None
        if start is None or start.step != context.step:  # no copy, or one of a step without its check
            return None
        prediction, why = predict_update(context.operator, start)
        return Skipped(f"No prediction of the update's loss change: {why}.") if prediction is None else prediction

    @staticmethod
    def scalars(value: UpdatePrediction, check: Any) -> dict[str, float]:
        found = {UPDATE_LOSS_PREDICTED: value.predicted, UPDATE_LOSS_OBSERVED: value.observed, UPDATE_LOSS_RATIO: value.ratio}
        return {tag: v for tag, v in found.items() if v is not None and math.isfinite(v)}
