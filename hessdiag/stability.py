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

The adaptive optimizers (Adam, AdamW, NAdam, RAdam, Adamax, RMSprop, Adagrad) divide each
coordinate's step by a diagonal P read from their state (:mod:`hessdiag.preconditioners`). With P
frozen, each is one of the fixed-step methods above on P^-1 H, so its threshold applies to the
preconditioned sharpness lambda_max(P^-1 H), and the threshold is the one its momentum sets; each
rule's derivation is in the docstring of its function below. Adam: heavy-ball on P^-1 H with momentum
beta1 and step lr (1 - beta1) / (1 - beta1^t) at step t (its momentum is an average, m <- beta1 m +
(1 - beta1) g, and the bias correction 1 / (1 - beta1^t) scales the whole step), so the threshold is
(2 + 2 beta1)(1 - beta1^t) / ((1 - beta1) lr) (Cohen et al., 2022, "Adaptive gradient methods at the
edge of stability"): early in training the edge is lower (0.63x the asymptotic one at step 100 with
beta1 = 0.99). The step t is that of the step about to be taken (one more than the optimizer's count).

Weight decay. Coupled (L2) decay wd, as in SGD, adds wd to every eigenvalue the optimizer sees: the
threshold on lambda_max(H) is the decay-free one minus wd. Decoupled decay, as in AdamW, multiplies
the weights by c = 1 - lr wd in the step; along an eigenvector of P^-1 H with eigenvalue mu the
step is m_t = beta1 m_(t-1) + (1 - beta1) mu x_t, x_(t+1) = c x_t - eta m_t with eta = lr / (1 - beta1^t).
With k = eta (1 - beta1) mu, a solution x_t = (-1)^t x_0 needs m_t = (1 - beta1) mu x_t / (1 + beta1)
and then -1 = c - k / (1 + beta1): the eigenvalue -1 appears at k = (1 + c)(1 + beta1), and the
threshold becomes (1 + beta1)(2 - lr wd)(1 - beta1^t) / ((1 - beta1) lr) (the other two conditions of
stability hold for every k > 0: the product of the two eigenvalues is beta1 c, within (-1, 1), and
neither is +1). The decay shrinks the weights, yet it lowers the edge, because in the oscillating
direction it pulls the same way as the curvature, undamped by the momentum average. lr wd >= 2 flips
the weights' sign and grows them: no threshold. An adaptive optimizer's coupled decay (``Adam(
weight_decay=...)``, RMSprop's, Adagrad's, Adamax's) is not included (the rule says so): it adds
wd P^-1, which is not a multiple of the identity.

Per-group learning rates: with a diagonal of step sizes L (lr_i on the parameters of group i),
gradient descent on H is gradient descent with the reference step lr_0 on S^1/2 H S^1/2,
S = L / lr_0 (substitute x = S^1/2 y). So when the groups' learning rates differ, the sharpness that
meets the reference group's threshold is lambda_max(S^1/2 H S^1/2) (for Adam, S^1/2 P^-1/2 H
P^-1/2 S^1/2). The other hyper-parameters (momentum, dampening, Nesterov, betas, lr_decay) must agree
across groups: otherwise no single threshold exists. Where the decay (lr_i / lr_0) wd_i of SGD,
lr_i wd_i of AdamW, or the step count differs between groups or parameters, the threshold takes the
largest decay and the lowest edge over the step counts: exact when they agree.

Every case without a threshold (another optimizer, ``maximize=True``, momentum outside [0, 1),
dampening outside [0, 1] or 1 without Nesterov, lr wd >= 2, hyper-parameters that are not numbers)
raises ValueError, which callers catch as "no threshold".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from hessdiag.preconditioners import next_steps, preconditions, radam_rectification

__all__ = ["NoLearningRate", "StabilityThreshold", "stability_threshold"]


class NoLearningRate(ValueError):
    """The learning rate is 0 (as at the first step of a warm-up): no step, so no threshold now."""


@dataclass(frozen=True)
class StabilityThreshold:
    """The largest stable sharpness for an optimizer's current hyper-parameters.

    Attributes:
        threshold: in units of Hessian eigenvalues (1 / lr).
        rule: the formula used, for display, e.g. ``"sgd: 2/lr"``.
        preconditioned: compare with a preconditioned sharpness instead of lambda_max(H): P^-1 H
            for the adaptive optimizers, S^1/2 H S^1/2 for per-group learning rates (module docstring).
    """

    threshold: float
    rule: str
    preconditioned: bool


Group = dict[str, Any]
Rule = Callable[[Optimizer, Group, float, Sequence[float]], tuple[float, str]]


def stability_threshold(optimizer: torch.optim.Optimizer, param_group: int = 0) -> StabilityThreshold:
    """The stability threshold of `optimizer` for the hyper-parameters of its `param_group`-th group.

    Supports :class:`torch.optim.SGD` (plain, heavy-ball, Nesterov, dampening, weight decay), Adam,
    AdamW, NAdam, RAdam, Adamax, RMSprop, Adagrad and their subclasses (the rules and their
    derivations are in the module docstring and the rules' docstrings). The adaptive optimizers'
    thresholds may depend on the step count (bias correction, NAdam's momentum schedule, RAdam's
    rectification, Adagrad's lr decay), read from their state. Callers that accept any optimizer catch
    the ValueError and report the raw sharpness instead.

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
    rule = next((rule for kinds, rule in _RULES if isinstance(optimizer, kinds)), None)
    if rule is None:
        raise ValueError(_no_rule(optimizer))
    threshold, words = rule(optimizer, group, lr, lrs)
    return StabilityThreshold(threshold, words + suffix, per_group_lr or preconditions(optimizer))


def _no_rule(optimizer: torch.optim.Optimizer) -> str:
    """Why no threshold is known for `optimizer`, and what is supported."""
    name = type(optimizer).__name__
    supported = (
        "supported: SGD (plain, momentum, Nesterov), Adam, AdamW, NAdam, RAdam, Adamax, RMSprop, Adagrad and their "
        "subclasses."
    )
    if isinstance(optimizer, torch.optim.LBFGS):
        why = "its step is a line search along a quasi-Newton direction built from past gradients, not a fixed step"
    elif hasattr(optimizer, "base_optimizer"):
        why = ("it steps with the gradient at a perturbed point (sharpness-aware minimisation), whose edge depends on "
               "the gradient norm, not only on the hyper-parameters")  # fmt: skip
    else:
        why = "its update rule is not one of the known ones"
    return f"No stability threshold is known for {name}: {why}; {supported}"


def _sgd(optimizer: Optimizer, group: Group, lr: float, lrs: Sequence[float]) -> tuple[float, str]:
    """SGD's threshold on lambda_max(H) (or of S^1/2 H S^1/2) and its rule; ValueError where none exists."""
    groups = optimizer.param_groups
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


def _averaged_momentum_edge(beta1: float, decay: float, bias: float, step: float) -> float:
    """The edge, in units of 1/lr, of m <- beta1 m + (1 - beta1) g, x <- (1 - decay) x - step m / bias
    (step: the step size over lr) on P^-1 H: (1 + beta1)(2 - decay) bias / ((1 - beta1) step)."""
    return (1 + beta1) * (2 - decay) * bias / ((1 - beta1) * step)


def _adam(optimizer: Optimizer, group: Group, lr: float, lrs: Sequence[float]) -> tuple[float, str]:
    """Adam's and AdamW's threshold on lambda_max(P^-1 H) (module docstring); also Adamax's, whose
    recurrence is Adam's with P = u, the decayed infinity norm of the gradients."""
    beta1 = _shared_beta(optimizer.param_groups, 0)
    decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
    decay = _decoupled_decay(optimizer, lrs) if decoupled else 0.0
    # The edge of the step about to be taken: the smallest step count is the largest bias correction.
    next_step = next_steps(optimizer)[0]
    threshold = _averaged_momentum_edge(beta1, decay, 1 - beta1**next_step, 1.0) / lr
    name = "adamax" if isinstance(optimizer, torch.optim.Adamax) else "adam"
    rule = "(1+β1)(2-lr·wd)(1-β1^t)/((1-β1)·lr)" if decoupled else "(2+2β1)(1-β1^t)/((1-β1)·lr)"
    return threshold, f"{name}: {rule}, t = {next_step:.0f}" + _coupled_note(optimizer, decoupled)


def _nadam(optimizer: Optimizer, group: Group, lr: float, lrs: Sequence[float]) -> tuple[float, str]:
    """NAdam's threshold on lambda_max(P^-1 H).

    At step t NAdam takes x <- c x - lr (a g + b m) / P with the averaged momentum m <- beta1 m +
    (1 - beta1) g, a = (1 - mu_t) / (1 - Pi_t), b = mu_(t+1) / (1 - Pi_(t+1)), where mu_t = beta1 (1 -
    0.5 x 0.96^(t psi)) is its momentum schedule (psi: `momentum_decay`), Pi_t = mu_1 ... mu_t, and
    c = 1 - lr wd (decoupled decay; 1 otherwise): Nesterov's look-ahead with Dozat's schedule. Along
    an eigenvector of P^-1 H with eigenvalue h, x_t = (-1)^t needs m_t = (1 - beta1) h x_t / (1 + beta1),
    and -1 = c - lr h (a + b (1 - beta1) / (1 + beta1)): the edge is h = (1 + beta1)(1 + c) /
    (lr ((1 + beta1) a + (1 - beta1) b)). The other stability conditions hold below it: the
    determinant of the recurrence is beta1 (c - lr a h), within (-1, 1) since lr a h <= 1 + c there,
    and 1 - trace + determinant = (1 - beta1)(1 - c + lr (a + b) h) > 0. With beta1 = 0 it is 2/lr.
    Pi_(t-1) is read from the state (``mu_product``); the lowest edge over the parameters is taken.
    """
    groups = optimizer.param_groups
    beta1 = _shared_beta(groups, 0)
    _require_shared(groups, ("momentum_decay",))
    psi = _hyper(group, "momentum_decay")
    if psi < 0:
        raise ValueError(f"`momentum_decay` must be >= 0 for a stability threshold, got {psi}.")
    decoupled = bool(group.get("decoupled_weight_decay", False))
    decay = _decoupled_decay(optimizer, lrs) if decoupled else 0.0
    moments = {(float(s["step"]) + 1, float(s["mu_product"])) for s in optimizer.state.values() if "mu_product" in s}

    def edge(step: float, product: float) -> float:
        mu, mu_next = (beta1 * (1 - 0.5 * 0.96 ** (k * psi)) for k in (step, step + 1))
        a, b = (1 - mu) / (1 - product * mu), mu_next / (1 - product * mu * mu_next)
        return (1 + beta1) * (2 - decay) / ((1 + beta1) * a + (1 - beta1) * b)

    step, product = min(moments or {(1.0, 1.0)}, key=lambda moment: edge(*moment))
    rule = "nadam: (1+β1)(2-lr·wd)/(lr((1+β1)a+(1-β1)b)), a = (1-μ_t)/(1-Π_t), b = μ_t+1/(1-Π_t+1)"
    return edge(step, product) / lr, f"{rule}, t = {step:.0f}" + _coupled_note(optimizer, decoupled)


def _radam(optimizer: Optimizer, group: Group, lr: float, lrs: Sequence[float]) -> tuple[float, str]:
    """RAdam's threshold: on lambda_max(P^-1 H) once its variance is tractable, on lambda_max(H) before.

    Rectified phase (rho_t > 5, :func:`hessdiag.preconditioners.radam_rectification`): RAdam takes
    Adam's step times the rectification r_t, with P = (sqrt(v) + eps) / sqrt(1 - beta2^t): the edge of
    Adam with the step lr r_t, (1 + beta1)(2 - lr wd)(1 - beta1^t) / ((1 - beta1) lr r_t). Before
    (its first few steps), it steps x <- c x - lr m / (1 - beta1^t) with no preconditioner: the same
    recurrence on H itself, with r_t = 1. The phase and r_t are those of the next step; parameters
    whose step counts put them in different phases have no single threshold.
    """
    groups = optimizer.param_groups
    beta1, beta2 = _shared_beta(groups, 0), _shared_beta(groups, 1)
    decoupled = bool(group.get("decoupled_weight_decay", False))
    decay = _decoupled_decay(optimizer, lrs) if decoupled else 0.0
    steps = next_steps(optimizer)
    rectified = {radam_rectification(beta2, step) is not None for step in steps}
    if len(rectified) > 1:
        raise ValueError(
            "RAdam's parameters are at step counts on both sides of its rectification (rho_t > 5): some step with "
            "the preconditioner, some without, and no single stability threshold exists."
        )

    def edge(t: float) -> float:
        return _averaged_momentum_edge(beta1, decay, 1 - beta1**t, radam_rectification(beta2, t) or 1.0)

    step = min(steps, key=edge)
    rule = "radam: (1+β1)(2-lr·wd)(1-β1^t)/((1-β1)·lr·r_t)"
    if rectified == {False}:
        rule = "radam, SGD-like phase: (1+β1)(2-lr·wd)(1-β1^t)/((1-β1)·lr)"
    return edge(step) / lr, f"{rule}, t = {step:.0f}" + _coupled_note(optimizer, decoupled)


def _rmsprop(optimizer: Optimizer, group: Group, lr: float, lrs: Sequence[float]) -> tuple[float, str]:
    """RMSprop's threshold on lambda_max(P^-1 H): buf <- mu buf + g / P, x <- x - lr buf is heavy-ball
    with momentum mu and step lr on P^-1 H (the buffer is a sum, not an average, and there is no bias
    correction), so (2 + 2 mu) / lr; 2 / lr without momentum. ``centered`` and ``alpha`` change only P
    (:mod:`hessdiag.preconditioners`)."""
    _require_shared(optimizer.param_groups, ("momentum",))
    mu = _momentum(_hyper(group, "momentum", 0.0), "momentum")
    return (2 + 2 * mu) / lr, "rmsprop: (2+2μ)/lr" + _coupled_note(optimizer, False)


def _adagrad(optimizer: Optimizer, group: Group, lr: float, lrs: Sequence[float]) -> tuple[float, str]:
    """Adagrad's threshold on lambda_max(P^-1 H): x <- x - clr g / P, clr = lr / (1 + (t - 1) lr_decay),
    is gradient descent with step clr on P^-1 H, so 2 (1 + (t - 1) lr_decay) / lr at the next step t.
    P = sqrt(sum of squared gradients) + eps only grows, so Adagrad reaches its edge only where the
    curvature grows faster than P."""
    _require_shared(optimizer.param_groups, ("lr_decay",))
    lr_decay = _hyper(group, "lr_decay", 0.0)
    if lr_decay < 0:
        raise ValueError(f"`lr_decay` must be >= 0 for a stability threshold, got {lr_decay}.")
    step = next_steps(optimizer)[0]
    rule = "adagrad: 2(1+(t-1)·lr_decay)/lr" + (f", t = {step:.0f}" if lr_decay else "")
    return 2 * (1 + (step - 1) * lr_decay) / lr, rule + _coupled_note(optimizer, False)


_RULES: tuple[tuple[tuple[type, ...], Rule], ...] = (
    ((torch.optim.SGD,), _sgd),
    ((torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax), _adam),
    ((torch.optim.NAdam,), _nadam),
    ((torch.optim.RAdam,), _radam),
    ((torch.optim.RMSprop,), _rmsprop),
    ((torch.optim.Adagrad,), _adagrad),
)


def _decoupled_decay(optimizer: torch.optim.Optimizer, lrs: Sequence[float]) -> float:
    """The largest lr_i wd_i over the groups; ValueError at 2 or above."""
    decay = max(other_lr * _hyper(other, "weight_decay", 0.0) for other, other_lr in zip(optimizer.param_groups, lrs))
    if decay >= 2:
        raise ValueError(f"lr·weight_decay = {decay} >= 2: the decay alone flips and grows the weights; no threshold.")
    return decay


def _coupled_note(optimizer: torch.optim.Optimizer, decoupled: bool) -> str:
    """The rule's note that an adaptive optimizer's coupled (L2) decay is left out (module docstring)."""
    coupled = not decoupled and any(_hyper(g, "weight_decay", 0.0) for g in optimizer.param_groups)
    return "; coupled weight_decay not included" if coupled else ""


def _shared_beta(groups: Sequence[dict[str, Any]], index: int) -> float:
    """``betas[index]`` in [0, 1), the same in every group; ValueError otherwise."""
    values = [_beta(g, index) for g in groups]
    if len(set(values)) > 1:
        raise ValueError(
            f"The param groups differ in `betas[{index}]` ({sorted(set(values))}): no single stability threshold exists."
        )
    return values[0]


def _beta(group: dict[str, Any], index: int) -> float:
    """``betas[index]`` of `group`, in [0, 1); ValueError otherwise."""
    betas = group.get("betas")
    if not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"`betas` must be a pair of numbers for a stability threshold, got {betas!r}.")
    return _momentum(_number(f"betas[{index}]", betas[index]), f"betas[{index}]")


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
