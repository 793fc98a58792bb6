"""The optimizer's stability threshold, read from the optimizer itself.

On a quadratic with curvature lambda, gradient descent with step lr multiplies the error along that
eigenvector by (1 - lr lambda) per step: it is stable while lr lambda < 2. Heavy-ball momentum beta
(x <- x - lr g + beta (x - x_prev)) extends this to lr lambda < 2 + 2 beta (Polyak, 1964); PyTorch's
Nesterov variant to lr lambda < (2 + 2 beta) / (1 + 2 beta). Adam and AdamW are preconditioned: with
the preconditioner P = diag(sqrt(v_hat) + eps) frozen, Adam is heavy-ball momentum on P^-1 H with the
step lr (1 - beta1) (its momentum is an average, m <- beta1 m + (1 - beta1) g), so the relevant
sharpness is lambda_max(P^-1 H) and the threshold (2 + 2 beta1) / ((1 - beta1) lr) (Cohen et al.,
2022, "Adaptive gradient methods at the edge of stability").

Per-group learning rates: with a diagonal of step sizes L (lr_i on the parameters of group i),
gradient descent on H is gradient descent with the reference step lr_0 on S^1/2 H S^1/2,
S = L / lr_0 (substitute x = S^1/2 y). So when the groups' learning rates differ, the sharpness that
meets the reference group's threshold is lambda_max(S^1/2 H S^1/2) (for Adam, S^1/2 P^-1/2 H
P^-1/2 S^1/2). The other hyper-parameters (momentum, dampening, Nesterov, beta1) must agree across
groups: otherwise no single threshold exists.

Weight decay is not included. Coupled (L2) decay wd adds wd to every eigenvalue the optimizer sees:
for SGD the threshold on lambda_max(H) is really 2/lr - wd (a negligible shift for usual wd), for Adam
the operator is P^-1 (H + wd I). AdamW's decoupled decay multiplies the weights by (1 - lr wd) per
step, which only damps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


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

    Supports :class:`torch.optim.SGD` (plain, heavy-ball, Nesterov), :class:`torch.optim.Adam`,
    :class:`torch.optim.AdamW` and their subclasses. SGD's dampening d scales the gradient entering the
    momentum buffer by (1 - d), so the effective step of heavy-ball is lr (1 - d). Callers that accept
    any optimizer catch the ValueError and report the raw sharpness instead.

    Raises:
        ValueError: another optimizer (no known rule; the message names its type), a learning rate
            <= 0, or `param_group` not an index of ``optimizer.param_groups``.

    Example::

        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> round(stability_threshold(torch.optim.SGD(p, lr=0.1, momentum=0.9)).threshold, 9)  # 3.8 / 0.1
        38.0
    """
    groups = optimizer.param_groups
    if not isinstance(param_group, int) or not 0 <= param_group < len(groups):
        raise ValueError(f"`param_group` must be an int in [0, {len(groups)}), got {param_group!r}.")
    group = groups[param_group]
    lr = float(group["lr"])
    if lr <= 0:
        raise ValueError(f"The learning rate must be positive for a stability threshold, got {lr}.")
    per_group_lr = any(float(other["lr"]) != lr for other in groups)
    suffix = f"; per-group lr, relative to group {param_group}" if per_group_lr else ""
    if isinstance(optimizer, torch.optim.SGD):
        _require_shared(groups, ("momentum", "dampening", "nesterov"))
        beta = float(group.get("momentum", 0.0))
        if beta == 0:
            rule = "sgd: 2/lr"
            return StabilityThreshold(2.0 / lr, rule + suffix, per_group_lr)
        if group.get("nesterov", False):  # PyTorch requires dampening 0 with Nesterov
            rule = "nesterov: (2+2β)/((1+2β)·lr)"
            return StabilityThreshold((2 + 2 * beta) / ((1 + 2 * beta) * lr), rule + suffix, per_group_lr)
        effective_lr = lr * (1 - float(group.get("dampening", 0.0)))
        rule = "heavy-ball: (2+2β)/(lr·(1-dampening))"
        return StabilityThreshold((2 + 2 * beta) / effective_lr, rule + suffix, per_group_lr)
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        _require_shared(groups, ("betas",), first_only=True)
        beta1 = float(group["betas"][0])
        return StabilityThreshold((2 + 2 * beta1) / ((1 - beta1) * lr), "adam: (2+2β1)/((1-β1)·lr)" + suffix, True)
    raise ValueError(
        f"No stability threshold is known for {type(optimizer).__name__}; supported: SGD (plain, momentum, "
        "Nesterov), Adam, AdamW and their subclasses."
    )


def _require_shared(groups: Sequence[dict[str, Any]], keys: Sequence[str], first_only: bool = False) -> None:
    """ValueError unless every group has the same value for each key (for `betas`: beta1 only)."""
    for key in keys:
        values = {(g.get(key)[0] if first_only else g.get(key)) for g in groups}
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
    return torch.cat([torch.full((p.numel(),), ratio, device=p.device) for p, ratio in zip(params, ratios)])


@torch.no_grad()
def adam_preconditioner_sqrt(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The flat vector d = (sqrt(v_hat) + eps)^(-1/2) over `params`, flattened and concatenated in order.

    With D = diag(d^2) = P^-1, the matrix D^1/2 H D^1/2 is symmetric and similar to P^-1 H (same
    eigenvalues), so Lanczos can compute Adam's preconditioned sharpness. v_hat is the bias-corrected
    second moment ``exp_avg_sq / (1 - beta2^step)`` of each parameter's own ``step`` (``max_exp_avg_sq``
    with amsgrad), and eps that of the parameter's group.

    Returns:
        A float32 vector of ``sum(p.numel())`` entries on the parameters' device; entries of parameters
        without optimizer state (never stepped, or not in the optimizer) are 0, which leaves them out of
        the preconditioned operator, as Adam has never moved them. ``None`` when no parameter has state
        yet (before the first step). The optimizer state is only read.
    """
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    pieces, found = [], False
    for p in params:
        state = optimizer.state.get(p, {})
        group = group_of.get(id(p))
        if group is None or "exp_avg_sq" not in state:
            pieces.append(torch.zeros(p.numel(), device=p.device, dtype=torch.float32))
            continue
        found = True
        beta2, eps = float(group["betas"][1]), float(group["eps"])
        second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        v_hat = second.detach().float().reshape(-1) / (1 - beta2 ** float(state["step"]))
        pieces.append((v_hat.sqrt() + eps).rsqrt())
    return torch.cat(pieces) if found else None
