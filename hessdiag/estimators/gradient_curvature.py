"""What limits the step: the curvature of the loss along the gradient, and the step's headroom.

``c = g'Hg / ||g||^2`` is the second derivative of the loss along the unit gradient direction (units
of Hessian eigenvalues: loss per squared parameter unit, i.e. 1 / lr). On the quadratic model, a
gradient-descent step -lr g overshoots along its own direction (the loss along the line has its
minimum before the step ends at lr c = 1 and rises above its start beyond lr c = 2) when lr c > 2, and
c is a Rayleigh quotient, so lambda_min <= c <= lambda_max: ``c / lambda_max`` (in [lambda_min /
lambda_max, 1]) says how aligned the gradient is with the sharpest direction.

Preconditioned optimizers step along P^-1 g instead. Given ``scaling`` d (a flat vector with
P^-1 = diag(d^2), e.g. :func:`hessdiag.preconditioners.preconditioner_sqrt`, or the square root of
per-group relative step sizes), the quantity is the curvature of the scaled operator
diag(d) H diag(d) along the scaled gradient u = d * g, ``c = u' dHd u / u'u`` (the direction of the
step in the coordinates where the optimizer is plain gradient descent), and it is compared with the
threshold of :func:`hessdiag.stability.stability_threshold` as lambda_max(P^-1 H) is there. It is the
direction of the preconditioned gradient of this batch, not of the optimizer's momentum.

Exact, up to the products' own error (0 for double backward; measured for finite differences, see
:mod:`hessdiag.operator`), for the batch given: it is a mini-batch quantity, like the check's lambda_max.

Cost: the gradient and one Hessian-vector product on the same batch. On an operator already open for a
check (:func:`gradient_curvature_of`) that is one product (a backward-of-backward with double
backward). Through :func:`gradient_curvature`, opening the operator costs one forward and backward
with graph, plus, with ``hvp_method="auto"`` (the default), its one-time cross-check against finite
differences (four gradients and one product).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hessdiag.isolation import ModelMode
from hessdiag.operator import HessianOperator, HVPMethod, LossFn


@dataclass(frozen=True)
class GradientCurvature:
    """The curvature along the (possibly preconditioned) gradient and the step's headroom.

    Attributes:
        curvature: g'Hg / ||g||^2 (or u' dHd u / u'u with `scaling`, module docstring), in units of
            Hessian eigenvalues (1 / lr). NaN when the direction is zero (see `note`).
        grad_norm: ||g||, the norm of the gradient on the batch (unscaled).
        loss: the loss on the batch.
        threshold: the largest stable curvature: 2 / lr for plain SGD given `lr`, or the
            `threshold` given (e.g. ``stability_threshold(optimizer).threshold``); None if neither.
        headroom: threshold / curvature: the largest stable learning rate along this direction
            over the one in use. Below 1 the step along the gradient overshoots; inf where the
            curvature is <= 0 (no overshoot along it); NaN with the curvature; None without a
            threshold.
        lr: the learning rate given, or None.
        preconditioned: `scaling` was given.
        num_hvps: Hessian-vector products spent (1, or 0 for a zero direction).
        note: why a value is NaN, else None.
    """

    curvature: float
    grad_norm: float
    loss: float
    threshold: float | None
    headroom: float | None
    lr: float | None
    preconditioned: bool
    num_hvps: int
    note: str | None = None

    @property
    def lr_curvature(self) -> float | None:
        """lr * curvature: the step along -g overshoots (plain SGD) when this exceeds 2."""
        return None if self.lr is None else self.lr * self.curvature

    def alignment(self, lambda_max: float) -> float:
        """curvature / lambda_max: 1 when the gradient lies along the sharpest direction (same batch)."""
        return self.curvature / lambda_max if lambda_max != 0 else math.nan


def _checked_threshold(lr: float | None, threshold: float | None) -> float | None:
    if lr is not None and threshold is not None:
        raise ValueError("Pass `lr` (plain SGD: threshold 2 / lr) or `threshold`, not both.")
    if lr is not None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < math.inf):
            raise ValueError(f"`lr` must be a positive finite number, got {lr!r}.")
        return 2.0 / float(lr)
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (0 < threshold < math.inf):
            raise ValueError(f"`threshold` must be a positive finite number, got {threshold!r}.")
        return float(threshold)
    return None


def gradient_curvature_of(
    operator: HessianOperator,
    *,
    lr: float | None = None,
    threshold: float | None = None,
    scaling: torch.Tensor | None = None,
) -> GradientCurvature:
    """:func:`gradient_curvature` on an open :class:`HessianOperator`: one product on its batch.

    Under data parallelism the gradient and the product are the global batch's (every rank gets the
    same numbers); on an FSDP2-sharded model the inner products are summed over ranks.
    """
    stable = _checked_threshold(lr, threshold)
    if scaling is not None and (scaling.dim() != 1 or scaling.numel() != operator.size):
        raise ValueError(f"`scaling` must be a flat tensor of shape ({operator.size},), got {tuple(scaling.shape)}.")
    gradient = operator.gradient()
    grad_norm = operator.norm(gradient)
    direction = gradient if scaling is None else gradient * scaling.to(gradient)
    size = operator.norm(direction)
    loss = operator.loss
    common = dict(
        grad_norm=grad_norm,
        loss=loss,
        threshold=stable,
        lr=None if lr is None else float(lr),
        preconditioned=scaling is not None,
    )
    if not size > 0:  # zero (or non-finite: NaN compares false) direction
        why = "the gradient is zero" if not grad_norm > 0 else "the scaled gradient is zero"
        if not math.isfinite(size):
            why = "the gradient is not finite"
        return GradientCurvature(
            curvature=math.nan, headroom=None if stable is None else math.nan, num_hvps=0,
            note=f"{why}: there is no direction to measure the curvature along.", **common,
        )  # fmt: skip
    unit = direction / size
    # u' dHd u / u'u for the unit u: the product of H with d u, read back along d u (d = 1 unscaled).
    step = unit if scaling is None else unit * scaling.to(gradient)
    partial = torch.dot(step.double(), operator.matvec(step).double()).reshape(1)
    if operator.shard is not None:
        partial = operator.shard.sum_(partial)
    curvature = float(partial)
    if stable is None:
        headroom = None
    elif math.isnan(curvature):
        headroom = math.nan
    else:
        headroom = stable / curvature if curvature > 0 else math.inf
    return GradientCurvature(curvature=curvature, headroom=headroom, num_hvps=1, **common)


def gradient_curvature(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: Iterable[torch.Tensor] | None = None,
    *,
    lr: float | None = None,
    threshold: float | None = None,
    scaling: torch.Tensor | None = None,
    mode: ModelMode = "as_is",
    hvp_method: HVPMethod = "auto",
    seed: int = 0,
    batch_size: int | None = None,
) -> GradientCurvature:
    """The curvature along the gradient, g'Hg / ||g||^2, and the headroom of the step.

    Example::

        c = gradient_curvature(model, loss_fn, batch, lr=0.1)
        c.curvature, c.headroom      # overshoots along -g when c.headroom < 1 (lr * c > 2)

    Args:
        model, loss_fn, batch, params, mode, hvp_method, seed, batch_size: as for
            :func:`hessdiag.hessian_eigenvalues`; the model, its ``.grad``, buffers, modes and the RNG
            are left as found.
        lr: plain SGD's learning rate: the threshold is 2 / lr.
        threshold: or the stable curvature of another optimizer,
            ``hessdiag.stability.stability_threshold(optimizer).threshold``.
        scaling: the flat vector d with P^-1 = diag(d^2) of a preconditioned optimizer (module
            docstring), over the same parameters (this rank's pieces on FSDP2).

    Returns:
        A :class:`GradientCurvature`. A zero gradient gives NaN curvature and a `note`, no error.

    Raises:
        ValueError: both `lr` and `threshold`, a non-positive one, a `scaling` of the wrong shape,
            or bad arguments of :class:`HessianOperator`.
        LossClosureError, NonFiniteLossError, NonFiniteGradientError, SecondDerivativeError, NonSmoothLossError: see
            :mod:`hessdiag.errors`.
    """
    _checked_threshold(lr, threshold)  # before any forward
    if scaling is not None and (not isinstance(scaling, torch.Tensor) or scaling.dim() != 1):
        raise ValueError(f"`scaling` must be a flat tensor over the parameters, got {type(scaling).__name__}.")
    with HessianOperator(
        model, loss_fn, batch, params=params, mode=mode, method=hvp_method, seed=seed, batch_size=batch_size
    ) as operator:
        return gradient_curvature_of(operator, lr=lr, threshold=threshold, scaling=scaling)
