"""Did the optimizer's step stay where the quadratic model holds? Its predicted loss change against the
observed one, for the update the optimizer actually made.

At a check step the parameters theta_0 are copied when the gradients are final (before
``optimizer.step()``: :class:`UpdateStart`, made only for a step a check follows); the check runs
after the step, at theta_1 = theta_0 + Delta, on the batch that step trained on. There, on the check's
open operator (gradient g and Hessian H at theta_1, same batch and dropout masks):

    predicted  L(theta_1) - L(theta_0) ~ g'Delta - 1/2 Delta'H Delta     (the quadratic model at theta_1,
                                                                          evaluated back at theta_0)
    observed   L(theta_1) - L(theta_0)                                    (one forward at theta_0)

Both are exact for a quadratic loss; their ratio observed / predicted near 1 says the step stayed in
the region where the second-order model (and so lambda_max's stability threshold) describes the
loss; far from 1, the step was too long for the local curvature to predict it. The model is taken
at the check's point, where the operator already is, rather than at theta_0: that would need a
second operator (its gradient graph) at parameters the run has left.

Cost per check: one parameter copy held from the gradients to the check (one step), one
Hessian-vector product and one forward. Not on FSDP2-sharded models (the operator's vectors are
local shards there; skipped with a reason).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hessdiag.operator import HessianOperator


@dataclass(frozen=True)
class UpdatePrediction:
    """The quadratic model's loss change of the optimizer's update against the observed one.

    Attributes:
        predicted: g'Delta - 1/2 Delta'H Delta at the step's end point (loss units).
        observed: L(theta_1) - L(theta_0) on the check's batch (loss units).
        update_norm: ||Delta|| over the check's parameters.
    """

    predicted: float
    observed: float
    update_norm: float

    @property
    def ratio(self) -> float | None:
        """observed / predicted (1: the quadratic model predicted the step); None when predicted is 0."""
        return self.observed / self.predicted if self.predicted != 0 else None


class UpdateStart:
    """The parameters before one optimizer step, copied (on their device) to measure its update."""

    def __init__(self, step: int, params: list[torch.Tensor]) -> None:
        self.step = step
        self._copies = {id(p): p.detach().clone() for p in params}

    def update(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """The flat update Delta of `params` since the copy, in their order; None when one of them
        was not copied (the trainable parameters changed)."""
        if any(id(p) not in self._copies for p in params):
            return None
        return torch.cat([(p.detach() - self._copies[id(p)]).reshape(-1) for p in params])


def predict_update(operator: HessianOperator, start: UpdateStart) -> tuple[UpdatePrediction | None, str]:
    """The prediction for the update since `start`, on `operator` (open, at the step's end point),
    or (None, why not). One product and one forward."""
    if operator.shard is not None:
        return None, "the model is FSDP2-sharded (the update's pieces are local shards)"
    delta = start.update(operator.params)
    if delta is None:
        return None, "the trainable parameters changed during the step"
    delta = delta.to(device=operator.device, dtype=operator.dtype)
    gradient = operator.gradient().to(delta.dtype)
    curvature = float(torch.dot(delta, operator.matvec(delta)))
    predicted = float(torch.dot(gradient, delta)) - 0.5 * curvature
    observed = operator.loss - operator.loss_along(delta, -1.0)
    if not (math.isfinite(predicted) and math.isfinite(observed)):
        return None, "the loss or its model is not finite along the update"
    return UpdatePrediction(predicted, observed, float(delta.norm())), ""
