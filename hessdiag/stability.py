"""The optimizer's stability threshold, read from the optimizer itself.

On a quadratic with curvature lambda, gradient descent with step lr multiplies the error along that
eigenvector by (1 - lr lambda) per step: it is stable while lr lambda < 2. Heavy-ball momentum beta
(x <- x - lr g + beta (x - x_prev)) extends this to lr lambda < 2 + 2 beta (Polyak, 1964). Each rule
below is the curvature at which the optimizer's linear recurrence on a quadratic gets an eigenvalue
-1 (the steepest direction flips sign and grows), checked in the tests by running the torch
optimizer itself on 0.5 h x^2 and finding the h at which it starts to diverge.

SGD with dampening d feeds (1 - d) g into the momentum buffer, so heavy-ball runs with the step
lr (1 - d). With d = 1 no gradient enters the buffer after the first step (PyTorch starts the buffer
at the first gradient): the steps shrink geometrically whatever the curvature, and there is no
threshold. PyTorch's Nesterov step lr (g + beta buf) has its edge at lr lambda = (2 + 2 beta) /
(1 + beta (2 - d)), i.e. (2 + 2 beta) / (1 + 2 beta) with the dampening 0 that PyTorch requires.

Adam and AdamW are preconditioned: with the preconditioner P = diag(sqrt(v_hat) + eps) frozen, Adam
is heavy-ball on P^-1 H with momentum beta1 and step lr (1 - beta1) / (1 - beta1^t) at step t (its
momentum is an average, m <- beta1 m + (1 - beta1) g, and the bias correction 1 / (1 - beta1^t)
scales the whole step; v's own correction is already in v_hat). So the relevant sharpness is
lambda_max(P^-1 H) and the threshold (2 + 2 beta1)(1 - beta1^t) / ((1 - beta1) lr) (Cohen et al.,
2022, "Adaptive gradient methods at the edge of stability"): early in training the edge is lower
(0.63x the asymptotic one at step 100 with beta1 = 0.99). The step t is that of the step about to be
taken (one more than the optimizer's count).

Weight decay. Coupled (L2) decay wd, as in SGD, adds wd to every eigenvalue the optimizer sees: the
threshold on lambda_max(H) is the decay-free one minus wd. Decoupled decay, as in AdamW, multiplies
the weights by c = 1 - lr wd in the step; along an eigenvector of P^-1 H with eigenvalue mu the
step is m_t = beta1 m_(t-1) + (1 - beta1) mu x_t, x_(t+1) = c x_t - eta m_t with eta = lr / (1 - beta1^t).
With k = eta (1 - beta1) mu, a solution x_t = (-1)^t x_0 needs m_t = (1 - beta1) mu x_t / (1 + beta1)
and then -1 = c - k / (1 + beta1): the eigenvalue -1 appears at k = (1 + c)(1 + beta1), and the
threshold becomes (1 + beta1)(2 - lr wd)(1 - beta1^t) / ((1 - beta1) lr) (the other two conditions of
stability hold for every k > 0: the product of the two eigenvalues is beta1 c, within (-1, 1), and
neither is +1). The decay shrinks the weights, yet
it lowers the edge, because in the oscillating direction it pulls the same way as the curvature,
undamped by the momentum average. lr wd >= 2 flips the weights' sign and grows them: no threshold.
Adam's coupled decay (``Adam(weight_decay=...)``) is not included: it adds wd P^-1, which is not a
multiple of the identity.

Per-group learning rates: with a diagonal of step sizes L (lr_i on the parameters of group i),
gradient descent on H is gradient descent with the reference step lr_0 on S^1/2 H S^1/2,
S = L / lr_0 (substitute x = S^1/2 y). So when the groups' learning rates differ, the sharpness that
meets the reference group's threshold is lambda_max(S^1/2 H S^1/2) (for Adam, S^1/2 P^-1/2 H
P^-1/2 S^1/2). The other hyper-parameters (momentum, dampening, Nesterov, beta1) must agree across
groups: otherwise no single threshold exists. Where the decay (lr_i / lr_0) wd_i of SGD, lr_i wd_i of
AdamW, or Adam's step count differs between groups or parameters, the threshold takes the largest
decay and the smallest step count: the lowest edge of any of them, exact when they agree.

Every case without a threshold (another optimizer, ``maximize=True``, momentum outside [0, 1),
dampening outside [0, 1] or 1 without Nesterov, lr wd >= 2, hyper-parameters that are not numbers)
raises ValueError, which callers catch as "no threshold".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hessdiag._sharded import local


class NoLearningRate(ValueError):
    """The learning rate is 0 (as at the first step of a warm-up): no step, so no threshold now."""


@dataclass(frozen=True)
class StabilityThreshold:
    """The largest stable sharpness for an optimizer's current hyper-parameters.

    Attributes:
        threshold: in units of Hessian eigenvalues (1 / lr).
        rule: the formula used, for display, e.g. ``"sgd: 2/lr"``.
        preconditioned: compare with a preconditioned sharpness instead of lambda_max(H): P^-1 H
            for Adam and AdamW, S^1/2 H S^1/2 for per-group learning rates (module docstring).
    """

    threshold: float
    rule: str
    preconditioned: bool


def stability_threshold(optimizer: torch.optim.Optimizer, param_group: int = 0) -> StabilityThreshold:
    """The stability threshold of `optimizer` for the hyper-parameters of its `param_group`-th group.

    Supports :class:`torch.optim.SGD` (plain, heavy-ball, Nesterov, dampening, weight decay),
    :class:`torch.optim.Adam`, :class:`torch.optim.AdamW` and their subclasses (the rules and their
    derivations are in the module docstring). Adam's threshold depends on the optimizer's step count
    (bias correction) and is read from its state. Callers that accept any optimizer catch the
    ValueError and report the raw sharpness instead.

    Raises:
        NoLearningRate: a learning rate <= 0.
        ValueError: no threshold exists or none is known (the message says why), or `param_group`
            not an index of ``optimizer.param_groups``.

    Example::

        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> round(stability_threshold(torch.optim.SGD(p, lr=0.1, momentum=0.9)).threshold, 9)  # 3.8 / 0.1
        38.0
    """
    groups = optimizer.param_groups
    if not isinstance(param_group, int) or not 0 <= param_group < len(groups):
        raise ValueError(f"`param_group` must be an int in [0, {len(groups)}), got {param_group!r}.")
    group = groups[param_group]
    lr = _hyper(group, "lr")
    if lr <= 0:
        raise NoLearningRate(f"The learning rate must be positive for a stability threshold, got {lr}.")
    if group.get("maximize", False):
        raise ValueError("`maximize=True`: the optimizer ascends the loss; no stability threshold applies to lambda_max.")
    lrs = [_hyper(other, "lr") for other in groups]
    per_group_lr = any(other != lr for other in lrs)
    suffix = f"; per-group lr, relative to group {param_group}" if per_group_lr else ""
    if isinstance(optimizer, torch.optim.SGD):
        threshold, rule = _sgd(groups, group, lr, lrs)
        return StabilityThreshold(threshold, rule + suffix, per_group_lr)
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        threshold, rule = _adam(optimizer, group, lr, lrs)
        return StabilityThreshold(threshold, rule + suffix, True)
    raise ValueError(
        f"No stability threshold is known for {type(optimizer).__name__}; supported: SGD (plain, momentum, "
        "Nesterov), Adam, AdamW and their subclasses."
    )


def _sgd(groups: Sequence[dict[str, Any]], group: dict[str, Any], lr: float, lrs: Sequence[float]) -> tuple[float, str]:
    """SGD's threshold on lambda_max(H) (or of S^1/2 H S^1/2) and its rule; ValueError where none exists."""
    _require_shared(groups, ("momentum", "dampening", "nesterov"))
    beta = _momentum(_hyper(group, "momentum", 0.0), "momentum")
    dampening = _hyper(group, "dampening", 0.0)
    if beta == 0:  # PyTorch keeps no momentum buffer: dampening plays no part
        base, rule = 2.0, "sgd: 2/lr"
    elif not 0 <= dampening <= 1:
        raise ValueError(f"`dampening` must be in [0, 1] for a stability threshold, got {dampening}.")
    elif group.get("nesterov", False):
        base, rule = (2 + 2 * beta) / (1 + beta * (2 - dampening)), "nesterov: (2+2β)/((1+β(2-dampening))·lr)"
    elif dampening == 1:
        raise ValueError(
            "`dampening` 1 with momentum: after the first step no gradient enters the momentum buffer, the steps "
            "shrink geometrically whatever the curvature, and there is no stability threshold."
        )
    else:
        base, rule = (2 + 2 * beta) / (1 - dampening), "heavy-ball: (2+2β)/(lr·(1-dampening))"
    # Coupled decay adds wd_i to the curvature seen by group i: S^1/2 (H + W) S^1/2 = S^1/2 H S^1/2 + S W,
    # whose top eigenvalue is at most the sharpness plus the largest (lr_i / lr) wd_i (Weyl).
    decay = max(other_lr / lr * _hyper(other, "weight_decay", 0.0) for other, other_lr in zip(groups, lrs))
    threshold = base / lr - decay
    if threshold <= 0:
        raise ValueError(f"`weight_decay` {decay} alone is beyond the stability edge {base / lr}: no threshold.")
    return threshold, rule + (" - weight_decay" if decay else "")


def _adam(optimizer: torch.optim.Optimizer, group: dict[str, Any], lr: float, lrs: Sequence[float]) -> tuple[float, str]:
    """Adam's and AdamW's threshold on lambda_max(P^-1 H) and its rule; ValueError where none exists."""
    groups = optimizer.param_groups
    beta1 = _beta1(group)
    if any(_beta1(other) != beta1 for other in groups):
        raise ValueError(
            f"The param groups differ in `betas[0]` ({sorted({_beta1(g) for g in groups})}): no single stability "
            "threshold exists."
        )
    decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
    decay = (
        max(other_lr * _hyper(other, "weight_decay", 0.0) for other, other_lr in zip(groups, lrs)) if decoupled else 0.0
    )
    if decay >= 2:
        raise ValueError(f"lr·weight_decay = {decay} >= 2: the decay alone flips and grows the weights; no threshold.")
    # The edge of the step about to be taken: the smallest step count is the largest bias correction.
    steps = [float(state["step"]) for state in optimizer.state.values() if "step" in state]
    next_step = min(steps, default=0.0) + 1
    bias = 1 - beta1**next_step
    threshold = (1 + beta1) * (2 - decay) * bias / ((1 - beta1) * lr)
    rule = "adam: (1+β1)(2-lr·wd)(1-β1^t)/((1-β1)·lr)" if decoupled else "adam: (2+2β1)(1-β1^t)/((1-β1)·lr)"
    return threshold, f"{rule}, t = {next_step:.0f}"


def _beta1(group: dict[str, Any]) -> float:
    """Adam's beta1 of `group`, in [0, 1); ValueError otherwise."""
    betas = group.get("betas")
    if not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"`betas` must be a pair of numbers for a stability threshold, got {betas!r}.")
    return _momentum(_number("betas[0]", betas[0]), "betas[0]")


def _hyper(group: dict[str, Any], key: str, default: float | None = None) -> float:
    """The group's hyper-parameter `key` as a finite float; ValueError otherwise."""
    return _number(key, group.get(key, default))


def _number(name: str, value: Any) -> float:
    """`value` as a finite float (a 1-element tensor too); ValueError naming `name` otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"`{name}` must be a number for a stability threshold, got {value!r}.") from None
    if not math.isfinite(number):
        raise ValueError(f"`{name}` must be finite for a stability threshold, got {number}.")
    return number


def _momentum(beta: float, name: str) -> float:
    """`beta` if in [0, 1): at 1 or above the momentum never forgets and no curvature is stable."""
    if not 0 <= beta < 1:
        raise ValueError(f"`{name}` must be in [0, 1) for a stability threshold, got {beta}.")
    return beta


def _require_shared(groups: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    """ValueError unless every group has the same value for each key."""
    for key in keys:
        values = {repr(g.get(key)) for g in groups}
        if len(values) > 1:
            raise ValueError(
                f"The param groups differ in `{key}` ({sorted(map(str, values))}): no single stability threshold exists."
            )


@torch.no_grad()
def relative_step_sizes(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], param_group: int = 0
) -> torch.Tensor | None:
    """Each parameter's learning rate over that of `param_group`: the flat diagonal S of the module
    docstring, over `params` in order (float32, on their devices). ``None`` when every parameter has
    the reference learning rate. Parameters the optimizer does not hold get 0: it never moves them."""
    reference = float(optimizer.param_groups[param_group]["lr"])
    lr_of = {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
    ratios = [lr_of.get(id(p), 0.0) / reference for p in params]
    if all(ratio == 1.0 for ratio in ratios):
        return None
    return torch.cat([torch.full((local(p).numel(),), ratio, device=p.device) for p, ratio in zip(params, ratios)])


@torch.no_grad()
def adam_preconditioner_sqrt(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The flat vector d = (sqrt(v_hat) + eps)^(-1/2) over `params`, flattened and concatenated in order.

    With D = diag(d^2) = P^-1, the matrix D^1/2 H D^1/2 is symmetric and similar to P^-1 H (same
    eigenvalues), so Lanczos can compute Adam's preconditioned sharpness. v_hat is the bias-corrected
    second moment ``exp_avg_sq / (1 - beta2^step)`` of each parameter's own ``step`` (``max_exp_avg_sq``
    with amsgrad), and eps that of the parameter's group.

    Returns:
        A float32 vector of ``sum(p.numel())`` entries (this rank's shards' on FSDP2) on the
        parameters' device; entries of parameters without optimizer state (never stepped, or not in the optimizer) are 0, which leaves them out of
        the preconditioned operator, as Adam has never moved them. ``None`` when no parameter has state
        yet (before the first step). The optimizer state is only read.
    """
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    pieces, found = [], False
    for p in params:
        state = optimizer.state.get(p, {})
        group = group_of.get(id(p))
        if group is None or "exp_avg_sq" not in state:
            pieces.append(torch.zeros(local(p).numel(), device=p.device, dtype=torch.float32))
            continue
        found = True
        beta2, eps = float(group["betas"][1]), float(group["eps"])
        second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        v_hat = local(second).detach().float().reshape(-1) / (1 - beta2 ** float(state["step"]))
        pieces.append((v_hat.sqrt() + eps).rsqrt())
    return torch.cat(pieces) if found else None


def preconditioner_sqrt(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The diagonal whose square preconditions H for the stability threshold: Adam's
    (sqrt(v_hat) + eps)^-1/2 and the per-group learning rates' sqrt(lr_i / lr_0), combined; None
    where neither applies (or Adam before its first step)."""
    steps = relative_step_sizes(optimizer, params)
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return None if steps is None else steps.sqrt()
    adam = adam_preconditioner_sqrt(optimizer, params)
    return adam if adam is None or steps is None else adam * steps.sqrt()
