"""The batch of an optimizer step, as a curvature check sees it.

Under gradient accumulation one optimizer step descends the mean of its micro-batches' mean losses
(each micro-batch loss divided by their number, gradients summed): `MicroBatches` carries those
micro-batches to the check, whose loss is that mean (:class:`~hessdiag.operator.closure.PartedClosure`), so
each Hessian-vector product is the equally weighted sum of the micro-batches' products.
`first_samples` (and `take_sub_batch` for the `sub_batch` setting) cuts the batch dimension of every tensor
consistently, and a list of per-sample tensors by element, or refuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hessdiag._distributed import infer_batch_size


class MicroBatches(tuple):
    """The micro-batches of one optimizer step under gradient accumulation, in order.

    Pass it where a batch goes (``monitor.after_step(MicroBatches(micro_batches), loss)``): the
    check's loss is then the mean of ``loss_fn(model, micro_batch)``, the loss that the accumulated
    gradient descends when each micro-batch loss is divided by their number. Memory: a check runs
    every forward, backward and product one micro-batch at a time, freeing its graph before the next,
    so it holds one micro-batch's graph, as the training step does; each product then rebuilds the
    micro-batches' graphs (a forward and a backward each) instead of keeping one graph for all.
    """

    def __new__(cls, micro_batches: Any = ()) -> MicroBatches:
        return super().__new__(cls, micro_batches)


class SampleParts(MicroBatches):
    """One batch cut into parts of consecutive samples, for Hessian-vector products taken one part
    at a time (see :mod:`hessdiag.operator.sample_parts`). The loss of the batch is the mean over its
    samples, so each part weighs its share of the samples: `weights` (summing to 1), from `sizes`.
    """

    sizes: tuple[int, ...]

    def __new__(cls, parts: Any, sizes: Any) -> SampleParts:
        made = super().__new__(cls, parts)
        made.sizes = tuple(sizes)
        return made

    @property
    def weights(self) -> tuple[float, ...]:
        total = sum(self.sizes)
        return tuple(size / total for size in self.sizes)


def split_samples(batch: Any, parts: int) -> SampleParts | None:
    """`batch` cut into `parts` parts of consecutive samples whose sizes differ by at most one (fewer
    where it has fewer samples), or None: a :class:`MicroBatches` (already in parts), a batch whose
    batch dimension cannot be told (see :func:`leading_sizes`), or one of fewer than two samples."""
    if isinstance(batch, MicroBatches):
        return None
    size = _batch_dimension(batch)
    if size is None or size < 2 or parts < 2:
        return None
    count = min(parts, size)
    bounds = [size * index // count for index in range(count + 1)]
    return SampleParts(
        [cut_samples(batch, start, stop) for start, stop in zip(bounds, bounds[1:])],
        [stop - start for start, stop in zip(bounds, bounds[1:])],
    )


def batch_size(batch: Any) -> int | None:
    """Samples in `batch` (all micro-batches of a `MicroBatches`): its batch dimension (see
    :func:`leading_sizes`); when that cannot be told, the leading dimension of its first tensor;
    None if it has no tensor."""
    if isinstance(batch, MicroBatches):
        sizes = [batch_size(micro) for micro in batch]
        return None if None in sizes else sum(sizes)  # type: ignore[arg-type]
    size = _batch_dimension(batch)
    return size if size is not None else infer_batch_size(batch)


def sub_batch_base(batch: Any) -> int | None:
    """The samples `sub_batch` counts in: those of the batch, or of the first micro-batch of a
    `MicroBatches` (which :func:`take_sub_batch` cuts one by one); None if it has no tensor."""
    return batch_size(batch[0] if isinstance(batch, MicroBatches) and batch else batch)


def leading_sizes(item: Any, sizes: set[int]) -> set[int]:
    """The batch sizes that `item`'s tensors (in nested tuples, lists, dicts) claim, added to `sizes`:
    one, the batch dimension, when it can be told; the differing leading dimensions when it cannot;
    none without a tensor.

    Every tensor's first dimension is the batch, except in a list of per-sample tensors: a list (or
    tuple) of tensors whose length is the batch dimension of the other tensors, e.g.
    ``([seq_1, ..., seq_n], labels)`` with sequences of different lengths. A list of tensors that all
    share that batch dimension is a list of fields (``default_collate``'s ``[x, y]``), and a list of
    0-d tensors of another length holds constants.
    """
    size = _batch_dimension(item)
    sizes |= {size} if size is not None else _leading(_tensors(item))
    return sizes


def first_samples(batch: Any, size: int | None) -> Any:
    """The first `size` samples of `batch` (``None``: all): every tensor cut along its leading
    dimension and a list of per-sample tensors by element (see :func:`leading_sizes`); other leaves
    are kept. A `MicroBatches` is cut micro-batch by micro-batch.

    Raises:
        ValueError: the batch dimension cannot be told (the tensors' leading dimensions differ).
    """
    return _first_samples(batch, size, setting=None)


def take_sub_batch(batch: Any, size: int | None) -> Any:
    """:func:`first_samples` for the `sub_batch` setting, whose refusal names it.

    Raises:
        ValueError: the batch dimension cannot be told; the message says to use ``sub_batch=None``.
    """
    return _first_samples(batch, size, setting="sub_batch")


def cut_samples(item: Any, start: int, stop: int) -> Any:
    """Samples `start` to `stop` of `item` (nested tuples, lists, dicts, named tuples): every tensor
    cut along its leading dimension, a list of per-sample tensors by element (see
    :func:`leading_sizes`); other leaves and 0-d tensors are kept as they are."""
    return _cut(item, start, stop, _batch_dimension(item))


#: How to give a batch whose batch dimension can be told.
_COLLATE = (
    "collate the batch so that every tensor's first dimension is the batch, or give tensors of different lengths "
    "as a list of one tensor per sample beside a tensor of one entry per sample, e.g. `([seq_1, ..., seq_n], labels)`"
)


def _first_samples(batch: Any, size: int | None, setting: str | None) -> Any:
    if size is None:
        return batch
    if isinstance(batch, MicroBatches):
        return MicroBatches(_first_samples(micro, size, setting) for micro in batch)
    sizes = leading_sizes(batch, set())
    if len(sizes) > 1:
        found = f"the batch's tensors have leading dimensions {sorted(sizes)}"
        if setting is None:
            raise ValueError(f"the batch dimension cannot be told apart: {found}; {_COLLATE}.")
        raise ValueError(f"`{setting}` cannot tell the batch dimension: {found}. Use `{setting}=None`, or {_COLLATE}.")
    if not sizes or sizes.pop() <= size:
        return batch
    return cut_samples(batch, 0, size)


def _cut(item: Any, start: int, stop: int, size: int | None) -> Any:
    if isinstance(item, torch.Tensor):
        return item[start:stop] if item.dim() > 0 else item
    if isinstance(item, Mapping):
        return type(item)({key: _cut(value, start, stop, size) for key, value in item.items()})
    if isinstance(item, tuple) and hasattr(item, "_fields"):
        return type(item)(*(_cut(value, start, stop, size) for value in item))
    if _tensor_list(item) and _role(item, size) == "samples":
        return type(item)(item[start:stop])
    if isinstance(item, (list, tuple)):
        return type(item)(_cut(value, start, stop, size) for value in item)
    return item


def _batch_dimension(batch: Any) -> int | None:
    """The number of samples in `batch`, or None: it has no tensor with a leading dimension, or its
    tensors disagree (see :func:`leading_sizes`)."""
    lists: list[list[torch.Tensor] | tuple[torch.Tensor, ...]] = []
    others = _leading(_tensors(batch, lists))
    if not others:  # every tensor in a list of tensors (`default_collate`'s [x, y], a bare list)
        sizes = _leading(tensor for values in lists for tensor in values)
        return sizes.pop() if len(sizes) == 1 else None
    if len(others) > 1:
        return None
    (size,) = others
    return size if all(_role(values, size) != "unknown" for values in lists) else None


def _role(values: list[torch.Tensor] | tuple[torch.Tensor, ...], size: int | None) -> str:
    """What a list of tensors is in a batch of `size` samples: "fields" (each cut along its leading
    dimension), "samples" (cut by element), "constants" (kept), or "unknown"."""
    leading = _leading(values)
    if leading and leading == {size}:
        return "fields"
    if len(values) == size:
        return "samples"
    return "unknown" if leading else "constants"


def _tensors(item: Any, lists: list[Any] | None = None) -> list[torch.Tensor]:
    """The tensors in `item`; those inside a list of tensors go to `lists` instead (as the lists)
    when `lists` is given."""
    if isinstance(item, torch.Tensor):
        return [item]
    if isinstance(item, Mapping):
        item = list(item.values())
    elif lists is not None and _tensor_list(item):
        lists.append(item)
        return []
    if isinstance(item, (list, tuple)):
        return [tensor for value in item for tensor in _tensors(value, lists)]
    return []


def _tensor_list(item: Any) -> bool:
    """A list or tuple (not a named tuple, nor :class:`MicroBatches`) of tensors only."""
    return (
        isinstance(item, (list, tuple))
        and not hasattr(item, "_fields")
        and not isinstance(item, MicroBatches)
        and bool(item)
        and all(isinstance(value, torch.Tensor) for value in item)
    )


def _leading(tensors: Any) -> set[int]:
    return {int(tensor.shape[0]) for tensor in tensors if tensor.dim() > 0}


@dataclass(frozen=True)
class CheckBatch:
    """The batch of one curvature reading, measured and cut once where the reading starts.

    Attributes:
        data: the batch cut to the reading's sub-batch (a :class:`MicroBatches` stays one).
        samples: the samples of `data`, or None where they cannot be told.
        step_samples: the samples of the optimizer step's whole batch (all micro-batches), or None.
    """

    data: Any
    samples: int | None
    step_samples: int | None

    @classmethod
    def of(cls, batch: Any, sub_batch: int | None) -> CheckBatch:
        """`batch` cut to its first `sub_batch` samples (None: all of it), with both sizes."""
        step_samples = batch_size(batch)
        if sub_batch is None:
            return cls(batch, step_samples, step_samples)
        data = take_sub_batch(batch, sub_batch)
        return cls(data, batch_size(data), step_samples)

