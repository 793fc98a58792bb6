"""The batch of an optimizer step, as a curvature check sees it.

Under gradient accumulation one optimizer step descends the mean of its micro-batches' mean losses
(each micro-batch loss divided by their number, gradients summed): `MicroBatches` carries those
micro-batches to the check, and :func:`step_loss` turns the user's ``loss_fn(model, batch)`` into that
mean, so each Hessian-vector product is the equally weighted sum of the micro-batches' products.
`take_sub_batch` cuts the batch dimension of every tensor consistently, or refuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hessdiag._distributed import infer_batch_size
from hessdiag.operator import LossFn

#: The most micro-batches of one step a check keeps (the Lightning callback keeps the last ones
#: beyond it, with a note): a check holds the graphs of all of them at once, so its memory grows as a
#: batch of their total size would.
MAX_MICRO_BATCHES = 16


class MicroBatches(tuple):
    """The micro-batches of one optimizer step under gradient accumulation, in order.

    Pass it where a batch goes (``monitor.after_step(MicroBatches(micro_batches), loss)``): the
    check's loss is then the mean of ``loss_fn(model, micro_batch)``, the loss that the accumulated
    gradient descends when each micro-batch loss is divided by their number. Memory: a check keeps the
    graphs of all micro-batches at once, as a check on one batch of their total size would.
    """

    def __new__(cls, micro_batches: Any = ()) -> MicroBatches:
        return super().__new__(cls, micro_batches)


def step_loss(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` extended to `MicroBatches`: the mean of the micro-batches' losses."""

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        if isinstance(batch, MicroBatches):
            return torch.stack([loss_fn(model, micro).reshape(()) for micro in batch]).mean()
        return loss_fn(model, batch)

    return loss


def batch_size(batch: Any) -> int | None:
    """Samples in `batch` (all micro-batches of a `MicroBatches`): the leading dimension of its
    first tensor; None if it has none."""
    if isinstance(batch, MicroBatches):
        sizes = [infer_batch_size(micro) for micro in batch]
        return None if None in sizes else sum(sizes)  # type: ignore[arg-type]
    return infer_batch_size(batch)


def sub_batch_base(batch: Any) -> int | None:
    """The samples `sub_batch` counts in: those of the batch, or of the first micro-batch of a
    `MicroBatches` (which :func:`take_sub_batch` cuts one by one); None if it has no tensor."""
    return infer_batch_size(batch[0] if isinstance(batch, MicroBatches) and batch else batch)


def leading_sizes(item: Any, sizes: set[int]) -> set[int]:
    """The leading dimensions of every tensor in `item` (nested tuples, lists, dicts), added to `sizes`."""
    if isinstance(item, torch.Tensor):
        if item.dim() > 0:
            sizes.add(int(item.shape[0]))
    elif isinstance(item, Mapping):
        for value in item.values():
            leading_sizes(value, sizes)
    elif isinstance(item, (list, tuple)):
        for value in item:
            leading_sizes(value, sizes)
    return sizes


def take_sub_batch(batch: Any, size: int | None) -> Any:
    """The first `size` samples of `batch`: every tensor (in nested tuples, lists, dicts, named
    tuples) cut along its leading dimension, which must be the same for all of them; other leaves
    are kept. A `MicroBatches` is cut micro-batch by micro-batch. ``None`` keeps the whole batch.

    Raises:
        ValueError: the tensors' leading dimensions differ (e.g. a list of sequences of different
            lengths), so the batch dimension cannot be told apart; use ``sub_batch=None``.
    """
    if size is None:
        return batch
    if isinstance(batch, MicroBatches):
        return MicroBatches(take_sub_batch(micro, size) for micro in batch)
    sizes = leading_sizes(batch, set())
    if len(sizes) > 1:
        raise ValueError(
            f"`sub_batch` cannot tell the batch dimension: the batch's tensors have leading dimensions "
            f"{sorted(sizes)} (a list of samples of different lengths?). Use `sub_batch=None`, or collate the "
            "batch so that every tensor's first dimension is the batch."
        )
    if not sizes or sizes.pop() <= size:
        return batch

    return cut_samples(batch, 0, size)


def cut_samples(item: Any, start: int, stop: int) -> Any:
    """Samples `start` to `stop` of every tensor in `item` (nested tuples, lists, dicts, named tuples),
    cut along the leading dimension; other leaves and 0-d tensors are kept as they are."""
    if isinstance(item, torch.Tensor):
        return item[start:stop] if item.dim() > 0 else item
    if isinstance(item, Mapping):
        return type(item)({key: cut_samples(value, start, stop) for key, value in item.items()})
    if isinstance(item, tuple) and hasattr(item, "_fields"):
        return type(item)(*(cut_samples(value, start, stop) for value in item))
    if isinstance(item, (list, tuple)):
        return type(item)(cut_samples(value, start, stop) for value in item)
    return item
