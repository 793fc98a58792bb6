"""Products on parts of the batch: a reading's memory follows one part's graph, not the batch's.

A double-backward product holds the batch's gradient graph: on an activation-heavy model (a
transformer) about three times what a training step holds (measured on the small GPT of
``benchmarks/cost.py``). Where the loss is the mean of per-sample losses, the Hessian of the batch's
loss is the sample-weighted sum of its parts' Hessians, exactly, so each product can be taken one part
at a time (:class:`~hessdiag.operator.double_backward.PartByPart`), one part's graph alive, as under
gradient accumulation. The price: each product rebuilds the parts' graphs but one.

That identity fails where a layer couples the samples or the loss is not their mean, and a product
taken in parts would then be the Hessian of another loss. So the batch is cut only where

* no BatchNorm is in training mode (its batch statistics couple the samples), and
* the loss of the whole batch equals the sample-weighted sum of its parts' losses, compared once
  (two forwards without graph, dropout layers off so that both sides draw no masks): a sum over
  samples, a loss that mixes samples (contrastive, a mixture-of-experts balance term over the
  batch), or a layer that does, differs there; so does a loss that draws random numbers by the
  batch's shape (a GAN's or a diffusion model's noise), which keeps the whole batch too.

Otherwise the products take the whole batch, and :func:`cut_for_products` says why. Not for FSDP2-sharded
models (whose products are finite differences, which keep no graph).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from hessdiag.batches import split_samples
from hessdiag.errors import LossClosureError
from hessdiag.operator.closure import LossFn, PartedClosure
from hessdiag.operator.parameter_space import ParameterSpace

#: How far the whole batch's loss may sit from the weighted sum of its parts' (relative): float32
#: rounding of the two reductions and of kernels that pick another algorithm for another batch size
#: (TF32 rounds each input alike whatever the kernel; its sums are float32's), below what a sum over
#: samples (a factor of the parts' number) or a layer that mixes the samples changes, and about what
#: a mixture-of-experts balance term over the batch weighing 1% of the loss changes when it differs
#: by a tenth between the batch and its parts. A bfloat16 or float16 model's rounding is above it: its
#: products take the whole batch.
SAME_LOSS = 1e-4

#: The layers whose forward in training mode mixes the samples of a batch.
COUPLING_LAYERS = (nn.modules.batchnorm._BatchNorm,)

#: The layers switched off for the comparison: their masks are drawn by shape, so a part draws
#: other masks than the whole batch does.
DROPOUT_LAYERS = (nn.modules.dropout._DropoutNd,)


def coupling_layer(model: nn.Module) -> str | None:
    """The name of a layer of `model` that couples the samples in its current mode (BatchNorm in
    training mode), or None."""
    for name, module in model.named_modules():
        if isinstance(module, COUPLING_LAYERS) and module.training:
            return name or type(module).__name__
    return None


class Cut(NamedTuple):
    """What :func:`cut_for_products` decided: the batch the products take, why, and whether the
    loss was found to be a mean over the samples (False also where it could not be evaluated on
    the parts; None: not compared)."""

    batch: Any
    reason: str
    loss_is_mean: bool | None = None


def cut_for_products(
    model: nn.Module, loss_fn: LossFn, batch: Any, parts: int, space: ParameterSpace, seed: int, *, compare: bool = True
) -> Cut:
    """The batch the products take: `batch` cut into `parts` :class:`~hessdiag.batches.SampleParts`
    where that leaves the Hessian unchanged, else `batch` itself; and why, in words.

    Call it where the estimate runs (inside :func:`~hessdiag.isolation.isolation`: modules in the
    estimate's modes, RNG forked). `compare` False skips the loss comparison (for a caller that made
    it on this model and loss already); the coupling layers are looked for every time, since a
    module's mode may change. A batch whose own loss cannot be evaluated, or is not finite, is left
    whole and undecided: the estimate's evaluation reports it.
    """
    if parts < 2:
        return Cut(batch, "the whole batch (one part asked for)")
    cut = split_samples(batch, parts)
    if cut is None:
        return Cut(batch, "the whole batch: it is in micro-batches already, or has fewer than two samples that can be told apart")
    layer = coupling_layer(model)
    if layer is not None:
        return Cut(batch, f"the whole batch: BatchNorm in training mode ({layer!r}) couples the samples")
    if compare:
        with dropout_off(model), torch.no_grad():
            try:
                whole = float(PartedClosure(model, loss_fn, batch, space, seed).evaluate())
            except LossClosureError:
                return Cut(batch, "the whole batch: its loss could not be evaluated")
            if not math.isfinite(whole):
                return Cut(batch, f"the whole batch: its loss is {whole}")
            closure = PartedClosure(model, loss_fn, cut, space, seed)  # each part's loss as its share
            try:
                weighted = sum(float(closure.evaluate(part)) for part in range(len(cut)))
            except LossClosureError:
                return Cut(batch, "the whole batch: the loss could not be evaluated on its parts", loss_is_mean=False)
        if not abs(whole - weighted) <= SAME_LOSS * max(abs(whole), abs(weighted), 1e-30):
            reason = (
                f"the whole batch: its loss ({whole:.6g}) is not the sample-weighted sum of its parts' ({weighted:.6g}), "
                "so the loss is not a mean over the samples (a sum, or a term that mixes them), or draws random "
                "numbers outside dropout layers (a GAN's or a diffusion model's noise, stochastic depth)"
            )
            return Cut(batch, reason, loss_is_mean=False)
    sizes = sorted(set(cut.sizes))
    reason = f"{len(cut)} parts of {' or '.join(map(str, sizes))} samples, one part's graph at a time"
    return Cut(cut, reason, loss_is_mean=True if compare else None)


@contextlib.contextmanager
def dropout_off(model: nn.Module) -> Iterator[None]:
    """The dropout layers of `model` that are in training mode switched off, then back on."""
    dropout = [module for module in model.modules() if isinstance(module, DROPOUT_LAYERS) and module.training]
    try:
        for module in dropout:
            module.training = False
        yield
    finally:
        for module in dropout:
            module.training = True
