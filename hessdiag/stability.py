"""The optimizer's stability threshold, read from the optimizer itself.

On a quadratic with curvature lambda, gradient descent with step lr is stable while
lr * lambda < 2; heavy-ball momentum beta extends this to lr * lambda < 2 + 2 beta; Nesterov's
variant to lr * lambda < (2 + 2 beta) / (1 + 2 beta). Adam and AdamW are preconditioned methods:
their relevant sharpness is lambda_max(P^-1 H), with P = diag(sqrt(v_hat) + eps), and the threshold
is (2 + 2 beta1) / ((1 - beta1) lr) (Cohen et al., 2022, "Adaptive gradient methods at the edge of
stability"). The sharpness is compared with this threshold by the edge-of-stability detector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StabilityThreshold:
    """The largest stable sharpness for an optimizer's current hyper-parameters.

    Attributes:
        threshold: in units of Hessian eigenvalues (1 / lr).
        rule: the formula used, for display.
        preconditioned: compare with lambda_max(P^-1 H) (Adam) instead of lambda_max(H).
    """

    threshold: float
    rule: str
    preconditioned: bool


def stability_threshold(optimizer: torch.optim.Optimizer, param_group: int = 0) -> StabilityThreshold:
    """The stability threshold of `optimizer` (its `param_group`-th group).

    Supports SGD (plain, heavy-ball with dampening, Nesterov), Adam, AdamW and their subclasses.

    Raises:
        ValueError: another optimizer (no known rule), or a non-positive learning rate.
    """
    group = optimizer.param_groups[param_group]
    lr = float(group["lr"])
    if lr <= 0:
        raise ValueError(f"The learning rate must be positive for a stability threshold, got {lr}.")
    if isinstance(optimizer, torch.optim.SGD):
        beta = float(group.get("momentum", 0.0))
        dampening = float(group.get("dampening", 0.0))
        if beta == 0:
            return StabilityThreshold(2.0 / lr, "sgd: 2/lr", False)
        if group.get("nesterov", False):
            return StabilityThreshold((2 + 2 * beta) / ((1 + 2 * beta) * lr), "nesterov: (2+2β)/((1+2β)·lr)", False)
        # With dampening d the momentum buffer averages (1 - d) g: the effective step is lr (1 - d).
        effective = lr * (1 - dampening)
        return StabilityThreshold((2 + 2 * beta) / effective, "heavy-ball: (2+2β)/(lr·(1-dampening))", False)
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        beta1 = float(group["betas"][0])
        return StabilityThreshold((2 + 2 * beta1) / ((1 - beta1) * lr), "adam: (2+2β1)/((1-β1)·lr)", True)
    raise ValueError(
        f"No stability threshold is known for {type(optimizer).__name__}; supported: SGD (with momentum or "
        "Nesterov), Adam, AdamW."
    )


def adam_preconditioner_sqrt(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The flat vector d = (sqrt(v_hat) + eps)^(-1/2) over `params`, in their order.

    D^1/2 H D^1/2 with D = diag(d^2) is symmetric and has the eigenvalues of P^-1 H, so Lanczos can
    compute the preconditioned sharpness. v_hat is the bias-corrected ``exp_avg_sq`` (``max_exp_avg_sq``
    with amsgrad). Parameters without optimizer state get 0 (left out). ``None`` before the first step.
    The optimizer state is only read.
    """
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    pieces, found = [], False
    for p in params:
        state = optimizer.state.get(p, {})
        group = groups.get(id(p))
        if group is None or "exp_avg_sq" not in state:
            pieces.append(torch.zeros(p.numel(), device=p.device, dtype=torch.float32))
            continue
        found = True
        beta2, eps = float(group["betas"][1]), float(group["eps"])
        step = float(state["step"])
        second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        v_hat = second.detach().float().reshape(-1) / (1 - beta2**step)
        pieces.append((v_hat.sqrt() + eps).rsqrt())
    return torch.cat(pieces) if found else None
