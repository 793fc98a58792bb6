"""The sharpness the optimizer's stability threshold refers to, and that threshold.

For SGD (with momentum) the sharpness is lambda_max itself (no product). For a preconditioned rule
(Adam and its kin) it is lambda_max(P^-1 H), by Lanczos on the symmetric D^1/2 H D^1/2 with D from
the optimizer's state (see :mod:`hessdiag.stability`), warm-started from the last check's run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hessdiag.check.quantity import CheckContext, Quantity, Skipped
from hessdiag.lanczos import lanczos
from hessdiag.reporting.tags import SHARPNESS, STABILITY_RATIO, STABILITY_THRESHOLD
from hessdiag.stability import NoLearningRate, StabilityThreshold, preconditioner_sqrt, stability_threshold


@dataclass(frozen=True)
class Stability:
    """The threshold (None without a known rule), the sharpness compared with it (lambda_max, or
    the preconditioned lambda_max), and the preconditioner's square root d under which that
    sharpness is lambda_max(dHd) (None unless preconditioned)."""

    threshold: StabilityThreshold | None
    sharpness: float
    scale: torch.Tensor | None = None


class StabilitySharpness(Quantity):
    """The stability threshold and the sharpness compared with it (value: :class:`Stability`)."""

    name = "stability"

    def compute(self, context: CheckContext) -> Stability | Skipped:
        spectrum, optimizer, operator = context.spectrum, context.optimizer, context.operator
        plain = Stability(None, spectrum.lambda_max)
        if optimizer is None:
            return plain
        try:
            threshold = stability_threshold(optimizer)
        except NoLearningRate:  # a warm-up's first step: nothing to say
            return plain
        except ValueError as error:  # no known stability rule: the raw sharpness, and why
            return Skipped(f"No edge-of-stability judgement (the flag stays off; sharpness is lambda_max): {error}")
        if not threshold.preconditioned:
            return Stability(threshold, spectrum.lambda_max)
        scale = preconditioner_sqrt(optimizer, operator.params)
        if scale is None:  # before the first step: no second-moment estimate yet
            return plain
        scale = scale.to(device=operator.device, dtype=operator.dtype)
        run = lanczos(
            lambda v: scale * operator.matvec(scale * v), operator.dim, which="top", tol=self.settings.tol,
            max_iter=self.settings.max_iter, v0=None if context.cold else context.starts.warm_preconditioned,
            seed=context.seed, device=operator.device, dtype=operator.dtype, shard=operator.shard,
        )  # fmt: skip
        context.starts.warm_preconditioned = run.top_vectors
        return Stability(threshold, float(run.top[0]), scale)

    @staticmethod
    def scalars(value: Stability, check: Any) -> dict[str, float]:
        if value.threshold is None:
            return {}
        return {
            SHARPNESS: value.sharpness,
            STABILITY_THRESHOLD: value.threshold.threshold,
            STABILITY_RATIO: check.stability_ratio,
        }
