"""Ops without a second derivative, routed to exact equivalents that have one while the operator
evaluates the loss.

PyTorch has no double backward and no forward-mode rule for some ops that models are built with:
``hardsigmoid`` (Hardsigmoid, the squeeze-excitation gate of MobileNetV3 and many mobile models),
``embedding_bag`` (EmbeddingBag), and sparse ``embedding`` (``nn.Embedding(sparse=True)``, whose
sparse gradient has no forward-mode rule). Each has an exact equivalent built from ops that do:

* ``hardsigmoid(x) = relu6(x + 3) / 6``: the same values bit for bit (CPU, 10^5 normal samples of
  scale 4, and the kinks +-3), the same first derivative to rounding (a division by 6 against a
  product with 1/6), zero at the kinks alike;
* ``embedding_bag``: rows gathered by ``embedding`` and summed per bag with ``index_add`` (weighted by
  `per_sample_weights`, padding rows left out, divided by the bag's count for ``mode="mean"``), equal
  to rounding (the sums' order);
* ``embedding(..., sparse=True)``: the same with ``sparse=False``, which changes only the gradient's
  layout.

:class:`TwiceDifferentiable` is a :class:`torch.overrides.TorchFunctionMode`: active only around the
operator's own forward and backward passes, it leaves the model and every training step as they are.
Cases without an exact equivalent (``mode="max"``, ``max_norm``, ``scale_grad_by_freq``, nested
inputs) run as they are, and an exact method then names the op that failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _hardsigmoid(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    result = F.relu6(input + 3) / 6
    # In place as asked: the copy's backward reaches the input's old value through `result`'s graph.
    return input.copy_(result) if inplace else result


def _embedding(
    input: torch.Tensor,
    weight: torch.Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> torch.Tensor:
    return F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse=False)


def _embedding_bag(
    input: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor | None = None,
    max_norm: float | None = None,
    norm_type: float = 2,
    scale_grad_by_freq: bool = False,
    mode: str = "mean",
    sparse: bool = False,
    per_sample_weights: torch.Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> torch.Tensor:
    """EmbeddingBag's sum or mean as index-and-sum; NotImplemented where it has no exact equivalent here."""
    if mode not in ("sum", "mean") or max_norm is not None or scale_grad_by_freq or input.is_nested or input.dim() not in (1, 2):
        return NotImplemented
    if input.dim() == 2:
        if offsets is not None:
            return NotImplemented  # the op's own error for this misuse
        bag = torch.arange(input.shape[0], device=input.device).repeat_interleave(input.shape[1])
        bags, input = input.shape[0], input.reshape(-1)
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.reshape(-1)
    else:
        if offsets is None:
            return NotImplemented
        starts = offsets[:-1] if include_last_offset else offsets
        bags = starts.numel()
        bag = torch.bucketize(torch.arange(input.numel(), device=input.device), starts, right=True) - 1
    rows = F.embedding(input, weight)
    weights = None if per_sample_weights is None else per_sample_weights.to(rows.dtype)
    if padding_idx is not None:
        keep = (input != (padding_idx % weight.shape[0])).to(rows.dtype)
        weights = keep if weights is None else weights * keep
    if weights is not None:
        rows = rows * weights.unsqueeze(-1)
    total = rows.new_zeros(bags, weight.shape[1]).index_add(0, bag, rows)
    if mode == "sum":
        return total
    counted = torch.ones_like(bag, dtype=rows.dtype) if padding_idx is None else keep
    count = rows.new_zeros(bags).index_add(0, bag, counted)
    return total / count.clamp(min=1).unsqueeze(-1)


#: Each routed function and its equivalent (which may answer NotImplemented: the function then runs as it is).
EQUIVALENTS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.hardsigmoid: _hardsigmoid,
    F.embedding: _embedding,
    F.embedding_bag: _embedding_bag,
}


class TwiceDifferentiable(TorchFunctionMode):
    """Routes the functions of :data:`EQUIVALENTS` to their twice-differentiable equivalents (module
    docstring); every other call runs as it is. Enter it around a forward and the backward passes
    over its graph (a checkpoint recomputing its forward in the backward must see the same ops)."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        equivalent = EQUIVALENTS.get(func)
        if equivalent is not None:
            result = equivalent(*args, **kwargs)
            if result is not NotImplemented:
                return result
        return func(*args, **kwargs)
