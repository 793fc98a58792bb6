"""Data-parallel plumbing: the Hessian of the *global*-batch loss from per-rank pieces.

With ranks holding n_r samples each, the loss the optimizer sees is sum_r n_r L_r / N, so its
Hessian-vector product is sum_r (n_r / N) H_r v: each rank scales its local product by its share
of the batch and one SUM all-reduce finishes the job. Every rank then holds the same vector, so
the Lanczos recurrences stay identical across ranks without further communication.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from hessdiag.errors import HessdiagError

T = TypeVar("T")


def is_data_parallel() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def infer_batch_size(batch: object) -> int | None:
    """The leading dimension of the first tensor found in `batch` (tensor, sequence or mapping)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        for item in batch:
            size = infer_batch_size(item)
            if size is not None:
                return size
    return None


def batch_share(local_batch_size: int, device: torch.device) -> float:
    """This rank's fraction n_r / N of the global batch (one all-reduce)."""
    total = torch.tensor([float(local_batch_size)], device=device, dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return local_batch_size / float(total.item())


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM all-reduce; returns `tensor` for chaining."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_first_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: rank 0's values on every rank; returns `tensor`."""
    dist.broadcast(tensor, src=0)
    return tensor


def all_reduce_min_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place MIN all-reduce (e.g. "did every rank succeed?"); returns `tensor`."""
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place MAX all-reduce; returns `tensor`."""
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def agreed(build: Callable[[], T], device: torch.device) -> T:
    """`build()` on this rank, once every rank knows that every rank's build worked (one MIN
    all-reduce): a rank that failed (a NaN on its shard) re-raises its error, the others raise too,
    so that none is left waiting forever in a later collective.

    Raises:
        HessdiagError: another rank's build failed.
    """
    failure: BaseException | None = None
    try:
        result = build()
    except Exception as error:  # re-raised below, after the other ranks know
        failure = error
    everyone_ok = torch.tensor([0.0 if failure else 1.0], device=device)
    all_reduce_min_(everyone_ok)
    if failure is not None:
        raise failure
    if everyone_ok.item() < 1:
        raise HessdiagError("Another rank could not build its part of the curvature check; skipped on every rank.")
    return result
