"""The sharpness the optimizer's stability threshold refers to, and that threshold.

For SGD (with momentum) the sharpness is lambda_max itself (no product). For a preconditioned rule
(Adam and its kin) it is lambda_max(P^-1 H), by Lanczos on the symmetric D^1/2 H D^1/2 with D from
the optimizer's state (see :mod:`hessdiag.stability`), warm-started from the last check's run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from hessdiag.check.quantity import CheckContext, Quantity, Skipped
from hessdiag.check.starts import on_host
from hessdiag.lanczos import lanczos
from hessdiag.operator import HessianOperator
from hessdiag.reporting.tags import RATIO_LOWER, SHARPNESS, SHARPNESS_LOWER, STABILITY_RATIO, STABILITY_THRESHOLD
from hessdiag.preconditioners import Diagonal, preconditioner_diagonal
from hessdiag.stability import NoLearningRate, StabilityThreshold, stability_threshold


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
        spectrum, operator = context.spectrum, context.operator
        rule = stability_rule(context.optimizer, operator)
        if isinstance(rule, Skipped) or rule.threshold is None or rule.scale is None:
            return rule if isinstance(rule, Skipped) else Stability(rule.threshold, spectrum.lambda_max)
        scale = rule.scale
        run = lanczos(
            lambda v: scale * operator.matvec(scale * v), operator.dim, which="top", tol=self.settings.tol,
            max_iter=self.settings.max_iter, v0=None if context.cold else context.starts.warm_preconditioned,
            seed=context.seed, device=operator.device, dtype=operator.dtype, shard=operator.shard,
            memory_budget=context.memory_budget,
        )  # fmt: skip
        context.starts.warm_preconditioned = on_host(run.top_vectors)
        return Stability(rule.threshold, float(run.top[0]), scale)

    @staticmethod
    def scalars(value: Stability, check: Any) -> dict[str, float]:
        if value.threshold is None:
            return {}
        # The dense curve's point (as tracking readings log it): a proven lower bound on the sharpness,
        # lambda_max less its error bound, or the preconditioned run's top Ritz value (interlacing).
        lower = check.lambda_max - check.error_bound_max if value.scale is None else value.sharpness
        return {
            SHARPNESS: value.sharpness,
            STABILITY_THRESHOLD: value.threshold.threshold,
            STABILITY_RATIO: check.stability_ratio,
            SHARPNESS_LOWER: lower,
            RATIO_LOWER: lower / value.threshold.threshold,
        }


def stability_rule(optimizer: torch.optim.Optimizer | None, operator: HessianOperator) -> Stability | Skipped:
    """The optimizer's threshold now and, for a preconditioned rule, the preconditioner's square root
    on `operator`'s parameters as one flat vector in the operator's dtype (the sharpness left at nan:
    the caller measures it); see :func:`stability_diagonal` for when there is no threshold."""
    rule = stability_diagonal(optimizer, operator)
    if isinstance(rule, Skipped):
        return rule
    threshold, diagonal = rule
    scale = None if diagonal is None else diagonal.flat(operator.device).to(dtype=operator.dtype)
    return Stability(threshold, math.nan, scale)


def stability_diagonal(
    optimizer: torch.optim.Optimizer | None, operator: HessianOperator
) -> tuple[StabilityThreshold | None, Diagonal | None] | Skipped:
    """The optimizer's threshold now and, for a preconditioned rule, the preconditioner's square root
    on `operator`'s parameters, computed piece by piece where it is used (a tracking reading's, which
    never holds it whole). No threshold without an optimizer, at a learning rate of 0 (a warm-up's
    first step: nothing to say) and before a preconditioned optimizer's first step (no second-moment
    estimate yet); :class:`Skipped` for an optimizer without a known stability rule."""
    if optimizer is None:
        return None, None
    try:
        threshold = stability_threshold(optimizer)
    except NoLearningRate:
        return None, None
    except ValueError as error:
        return Skipped(f"No edge-of-stability judgement (the flag stays off; sharpness is lambda_max): {error}")
    if not threshold.preconditioned:
        return threshold, None
    diagonal = preconditioner_diagonal(optimizer, operator.params)
    return (None, None) if diagonal is None else (threshold, diagonal)
