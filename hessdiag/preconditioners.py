"""The diagonal preconditioners of the adaptive optimizers, read from their state.

An adaptive optimizer divides each coordinate's step by P_i, a function of that coordinate's gradient
history. With P frozen (it moves slowly next to the steep direction's oscillation) the optimizer is a
fixed-step method on P^-1 H, so its edge of stability is a threshold on lambda_max(P^-1 H) (the
thresholds are in :mod:`hessdiag.stability`). This module reads P from the optimizer's state, as the
optimizer's own next step would use it:

==============================  ==========================================================
Adam, AdamW, NAdam              sqrt(v / (1 - beta2^t)) + eps (``max_exp_avg_sq`` with amsgrad)
RAdam (rectified phase)         (sqrt(v) + eps) / sqrt(1 - beta2^t)
Adamax                          u, the decayed infinity norm ``exp_inf`` (eps is inside it)
RMSprop                         sqrt(square_avg) + eps; centered: sqrt(square_avg - grad_avg^2) + eps
Adagrad                         sqrt(sum) + eps, the accumulated sum of squared gradients
==============================  ==========================================================

(t: the parameter's own step count.) RAdam has no preconditioner while its variance estimate is not
tractable (rho_t <= 5, its first few steps): it then steps like SGD with momentum.

:func:`preconditioner_sqrt` (whole) and :func:`preconditioner_diagonal` (piece by piece, see
:class:`Diagonal`) give the diagonal d whose square preconditions H for the stability threshold:
P^-1/2 combined with the per-group learning rates' sqrt(lr_i / lr_0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hessdiag._sharded import local

#: The optimizers whose steps are divided by a diagonal preconditioner (and their subclasses).
ADAPTIVE = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


def next_steps(optimizer: torch.optim.Optimizer) -> list[float]:
    """The distinct step counts of the parameters' next steps (one more than their ``step`` state),
    ascending; ``[1.0]`` before the first step."""
    taken = {float(state["step"]) for state in optimizer.state.values() if "step" in state}
    return sorted(step + 1 for step in taken) or [1.0]


def radam_rectification(beta2: float, step: float) -> float | None:
    """RAdam's variance rectification r_t at step `step`; None in its SGD-like phase.

    rho_inf = 2 / (1 - beta2) - 1 and rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t) are the lengths of
    the exact and the approximated simple moving average of the squared gradients; while rho_t <= 5 the
    variance of the adaptive step is not tractable and RAdam steps with the momentum alone (Liu et
    al., 2020, "On the variance of the adaptive learning rate and beyond").
    """
    rho_inf = 2 / (1 - beta2) - 1
    rho = rho_inf - 2 * step * beta2**step / (1 - beta2**step)
    if rho <= 5:
        return None
    return math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))


def preconditions(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's next step divides by a diagonal preconditioner (RAdam: once its
    variance is tractable at the parameters' smallest next step)."""
    if isinstance(optimizer, torch.optim.RAdam):
        beta2 = float(optimizer.param_groups[0]["betas"][1])
        return radam_rectification(beta2, next_steps(optimizer)[0]) is not None
    return isinstance(optimizer, ADAPTIVE)


def _bias2(group: Mapping[str, Any], state: Mapping[str, Any]) -> float:
    return 1 - float(group["betas"][1]) ** float(state["step"])


def _adam(state: Mapping[str, Any], group: Mapping[str, Any]) -> torch.Tensor | None:
    if "exp_avg_sq" not in state:
        return None
    second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    return (local(second).float() / _bias2(group, state)).sqrt() + float(group["eps"])


def _radam(state: Mapping[str, Any], group: Mapping[str, Any]) -> torch.Tensor | None:
    if "exp_avg_sq" not in state:
        return None
    return (local(state["exp_avg_sq"]).float().sqrt() + float(group["eps"])) / math.sqrt(_bias2(group, state))


def _adamax(state: Mapping[str, Any], group: Mapping[str, Any]) -> torch.Tensor | None:
    return local(state["exp_inf"]).float() if "exp_inf" in state else None


def _rmsprop(state: Mapping[str, Any], group: Mapping[str, Any]) -> torch.Tensor | None:
    if "square_avg" not in state:
        return None
    variance = local(state["square_avg"]).float()
    if group.get("centered", False):  # rounding may take the difference a hair below 0
        variance = (variance - local(state["grad_avg"]).float() ** 2).clamp_min(0)
    return variance.sqrt() + float(group["eps"])


def _adagrad(state: Mapping[str, Any], group: Mapping[str, Any]) -> torch.Tensor | None:
    # Adagrad creates its state at construction: before the first step the sum is no estimate.
    if "sum" not in state or float(state["step"]) == 0:
        return None
    return local(state["sum"]).float().sqrt() + float(group["eps"])


StateRule = Callable[[Mapping[str, Any], Mapping[str, Any]], "torch.Tensor | None"]
_DIAGONALS: tuple[tuple[tuple[type, ...], StateRule], ...] = (
    ((torch.optim.RAdam,), _radam),
    ((torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam), _adam),
    ((torch.optim.Adamax,), _adamax),
    ((torch.optim.RMSprop,), _rmsprop),
    ((torch.optim.Adagrad,), _adagrad),
)


class Diagonal:
    """A diagonal over the flat vector of some parameters (flattened and concatenated in order, this
    rank's shards on FSDP2), computed piece by piece when used and never held whole: a tracking
    reading scales its operand and its product with it, one parameter-sized vector less at its peak
    than a flat vector held through the reading. The entries are read afresh at each use (from the
    optimizer's state, which must not change while the diagonal is used), each piece the same float32
    numbers as its slice of :meth:`flat`.

    Args:
        sizes: each parameter's number of entries.
        piece: the entries of the parameter at an index (flat; float32 for an optimizer's, cast to
            the vector's dtype where used), or None where they are 0.
    """

    def __init__(self, sizes: Sequence[int], piece: Callable[[int], "torch.Tensor | None"]) -> None:
        self.sizes = list(sizes)
        self.piece = piece
        self._max_abs: float | None = None

    @classmethod
    def whole(cls, flat: torch.Tensor) -> Diagonal:
        """A diagonal held as the one flat vector `flat` (one piece)."""
        return cls([flat.numel()], lambda _index: flat)

    @torch.no_grad()
    def flat(self, device: torch.device | str) -> torch.Tensor:
        """The whole diagonal as one float32 vector on `device`, each piece written into its slice."""
        out = torch.empty(sum(self.sizes), device=device, dtype=torch.float32)
        for index, slot in enumerate(out.split(self.sizes)):
            value = self.piece(index)
            if value is None:
                slot.zero_()
            else:
                slot.copy_(value)
        return out

    @torch.no_grad()
    def mul(self, vector: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """d * `vector` (flat, in its dtype), as a new vector or into `out`, which may be `vector`
        itself: the same numbers as ``flat(...).to(vector) * vector``, zero pieces included
        (0 * inf is nan there too)."""
        out = torch.empty_like(vector) if out is None else out
        largest: list[torch.Tensor] = []  # per piece, on the device: read back once
        for index, (source, target) in enumerate(zip(vector.split(self.sizes), out.split(self.sizes))):
            value = self.piece(index)
            if value is None:
                torch.mul(source, 0.0, out=target)
                continue
            torch.mul(source, value.to(vector), out=target)
            if self._max_abs is None and value.numel():
                largest.append(value.abs().max().float())
        if self._max_abs is None:
            self._max_abs = float(torch.stack(largest).max()) if largest else 0.0
        return out

    def max_abs(self) -> float:
        """||d||_inf (read along the first :meth:`mul`, or here; one read-back)."""
        if self._max_abs is None:
            values = (self.piece(index) for index in range(len(self.sizes)))
            largest = [v.abs().max().float() for v in values if v is not None and v.numel()]
            self._max_abs = float(torch.stack(largest).max()) if largest else 0.0
        return self._max_abs

    def scaled(self, factors: Sequence[float]) -> Diagonal:
        """This diagonal with each parameter's piece times its factor (a float32 number)."""
        return Diagonal(self.sizes, lambda index: _times(self.piece(index), factors[index]))


def _times(value: torch.Tensor | None, factor: float) -> torch.Tensor | None:
    return None if value is None else value * factor


@torch.no_grad()
def adaptive_preconditioner_diagonal(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> Diagonal | None:
    """d = P^(-1/2) over `params` as a :class:`Diagonal` computed piece by piece (what
    :func:`adaptive_preconditioner_sqrt` returns whole); None where that returns None."""
    diagonal = next((rule for kinds, rule in _DIAGONALS if isinstance(optimizer, kinds)), None)
    if diagonal is None:
        return None
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}

    def piece(index: int) -> torch.Tensor | None:
        p = params[index]
        group = group_of.get(id(p))
        value = None if group is None else diagonal(optimizer.state.get(p, {}), group)
        return None if value is None else torch.rsqrt(value.detach().reshape(-1))

    root = Diagonal([local(p).numel() for p in params], piece)
    found = any(_has_state(diagonal, optimizer.state.get(p, {}), group_of.get(id(p))) for p in params)
    return root if found else None


def _has_state(diagonal: StateRule, state: Mapping[str, Any], group: Mapping[str, Any] | None) -> bool:
    return group is not None and diagonal(state, group) is not None


@torch.no_grad()
def adaptive_preconditioner_sqrt(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> torch.Tensor | None:
    """The flat vector d = P^(-1/2) over `params`, flattened and concatenated in order, for the
    optimizers of :data:`ADAPTIVE` (P per optimizer: the module docstring).

    With D = diag(d^2) = P^-1, the matrix D^1/2 H D^1/2 is symmetric and similar to P^-1 H (same
    eigenvalues), so Lanczos can compute the preconditioned sharpness. P is read with the group's eps
    and the parameter's own step count.

    Returns:
        A float32 vector of ``sum(p.numel())`` entries (this rank's shards' on FSDP2) on the
        parameters' device; entries of parameters without optimizer state (never stepped, or not in
        the optimizer) are 0, which leaves them out of the preconditioned operator, as the optimizer
        has never moved them. ``None`` when no parameter has state yet (before the first step), or
        for an optimizer without a diagonal preconditioner. The optimizer state is only read.
    """
    root = adaptive_preconditioner_diagonal(optimizer, params)
    return None if root is None else root.flat(params[0].device)


#: Adam's case of :func:`adaptive_preconditioner_sqrt`, under the name it had when Adam was the only one.
adam_preconditioner_sqrt = adaptive_preconditioner_sqrt


def step_size_ratios(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], param_group: int = 0
) -> list[float] | None:
    """Each parameter's learning rate over that of `param_group` (the diagonal S of
    :mod:`hessdiag.stability`, one number per parameter, in the order of `params`); ``None`` when every
    parameter has the reference learning rate. Parameters the optimizer does not hold get 0: it never
    moves them."""
    reference = float(optimizer.param_groups[param_group]["lr"])
    lr_of = {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
    ratios = [lr_of.get(id(p), 0.0) / reference for p in params]
    return None if all(ratio == 1.0 for ratio in ratios) else ratios


def preconditioner_sqrt(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The diagonal whose square preconditions H for the stability threshold: the adaptive optimizer's
    P^-1/2 (:func:`adaptive_preconditioner_sqrt`) and the per-group learning rates' sqrt(lr_i / lr_0),
    combined, as one flat float32 vector; None where neither applies (or an adaptive optimizer before
    its first step)."""
    diagonal = preconditioner_diagonal(optimizer, params)
    return None if diagonal is None else diagonal.flat(params[0].device)


def preconditioner_diagonal(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> Diagonal | None:
    """:func:`preconditioner_sqrt` as a :class:`Diagonal`, computed piece
    by piece where it is used (a tracking reading never holds it whole)."""
    ratios = step_size_ratios(optimizer, params)
    # sqrt(lr_i / lr_0) in float32, as the flat vector's sqrt would round it
    factors = None if ratios is None else [float(torch.tensor(ratio, dtype=torch.float32).sqrt()) for ratio in ratios]
    if not preconditions(optimizer):
        if factors is None:
            return None
        return Diagonal([local(p).numel() for p in params], lambda index: _constant(params[index], factors[index]))
    root = adaptive_preconditioner_diagonal(optimizer, params)
    return root if root is None or factors is None else root.scaled(factors)


def _constant(param: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((local(param).numel(),), value, device=param.device)
