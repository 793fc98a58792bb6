"""FSDP2-sharded parameters (``torch.distributed.fsdp.fully_shard``): the Hessian on local shards.

After ``fully_shard`` each parameter is a DTensor with placements ``(Shard(0),)`` on a 1-D mesh:
``p.to_local()`` is this rank's rows (shards may be uneven, even empty), a view of the storage the
optimizer updates, so writing into it in place moves the parameter that the next forward gathers.
After a plain ``loss.backward()``, ``p.grad`` is a sharded DTensor holding this rank's rows of the
gradient of the *mean over ranks* of the per-rank losses (the reduce-scatter averages). So:

* a Hessian-vector product is a central difference of two such gradients, with the vector's
  pieces added to the local shards: its result is already this rank's piece of the product of the
  averaged loss, with no further all-reduce;
* the Lanczos vectors are flat concatenations of the local shards, inner products and norms are
  summed over the mesh's process group (:class:`~hessdiag.vectors.VectorShard`);
* double backward cannot run: ``torch.autograd.grad`` with respect to the sharded parameters
  returns None (the forward used the gathered copies), and a graph through the gathered ones
  fails ("differentiated Tensor ... appears to not have been used in the graph").

Replicated placements (HSDP's 2-D meshes, ``Replicate()``) would count a coordinate once per
replica in the inner products and are refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor, Shard

from hessdiag.vectors import VectorShard


def is_sharded(params: Sequence[torch.Tensor]) -> bool:
    """Whether any of `params` is a DTensor (FSDP2 or another ``torch.distributed.tensor`` layout)."""
    return any(isinstance(p, DTensor) for p in params)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor (a view of its storage); a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def refuse_fsdp1(model: nn.Module) -> None:
    """FSDP1 (``FullyShardedDataParallel``) flattens parameters into per-rank pieces that are not
    DTensors; taking the Hessian over them would be silently wrong.

    Raises:
        ValueError: `model` contains an FSDP1 wrapper.
    """
    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise ValueError(
            "`model` is wrapped in FSDP1 (FullyShardedDataParallel), whose flat parameters hide the Hessian's "
            "structure: shard with FSDP2 (torch.distributed.fsdp.fully_shard) instead, or use DDP."
        )


def vector_shard(params: Sequence[torch.Tensor]) -> VectorShard:
    """The :class:`VectorShard` of flat vectors over the local shards of `params`.

    Raises:
        ValueError: a parameter is not a DTensor sharded on one dimension of a 1-D mesh, or the
            parameters live on different meshes.
    """
    meshes = set()
    for index, p in enumerate(params):
        if not isinstance(p, DTensor) or p.device_mesh.ndim != 1 or not isinstance(p.placements[0], Shard):
            layout = p.placements if isinstance(p, DTensor) else "a plain tensor"
            raise ValueError(
                f"Parameter {index} is {layout}: sharded models are supported when every chosen parameter is "
                "FSDP2-sharded on a 1-D mesh (placements (Shard(dim),)); pass `params=` with those only."
            )
        meshes.add(p.device_mesh)
    if len(meshes) > 1:
        raise ValueError("The chosen parameters are sharded over different device meshes; pass `params=` from one.")
    group = next(iter(meshes)).get_group()

    def sum_(partial: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
        return partial

    return VectorShard(size=sum(local(p).numel() for p in params), sum_=sum_, index=dist.get_rank(group))


def coarse_compute_dtype(model: nn.Module, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype FSDP2 gathers parameters in for compute (``MixedPrecisionPolicy(param_dtype=...)``)
    when it is coarser than the parameters' own `dtype`, else None. torch has no public reader of a
    module's policy: where its internals differ, None (and finite differences measure what they get)."""
    coarsest = None
    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = getattr(module, "_get_fsdp_state", lambda: None)()
            compute = getattr(getattr(state, "_mp_policy", None), "param_dtype", None)
            if isinstance(compute, torch.dtype) and compute.is_floating_point and torch.finfo(compute).eps > torch.finfo(dtype).eps:
                if coarsest is None or torch.finfo(compute).eps > torch.finfo(coarsest).eps:
                    coarsest = compute
    return coarsest


def mean_over_ranks(value: torch.Tensor, shard: VectorShard) -> torch.Tensor:
    """The mean over the processes of a per-rank scalar (the loss FSDP's gradient belongs to)."""
    world_size = float(shard.sum_(torch.ones(1, dtype=torch.float64, device=value.device)))
    return shard.sum_(value.detach().reshape(1).clone()).reshape(()) / world_size


def norms_over_ranks(norms: torch.Tensor, sharded: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Norms of whole tensors from per-rank norms: sqrt of the sum over ranks of the squares where
    `sharded` (a bool mask like `norms`) says the norm is of a local shard; the others (replicated
    tensors) are taken from rank 0. One all-reduce, float64; NaN and inf propagate."""
    group = next(p for p in params if isinstance(p, DTensor)).device_mesh.get_group()
    squares = norms.double() ** 2
    keep = sharded.to(norms.device) | (dist.get_rank(group) == 0)
    squares = torch.where(keep, squares, torch.zeros_like(squares))
    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)
    return squares.sqrt()


def reshard(model: nn.Module) -> None:
    """Free every gathered (unsharded) parameter copy of the FSDP2 modules in `model`.

    A module FSDP2 treats as a root keeps its gathered parameters after forward (backward needs
    them at once), and a forward reuses them instead of gathering again. When the forward is not
    the root's (Lightning calls ``training_step``, whose submodules become roots), a copy can
    outlive the backward; after the local shards were shifted in place, it would be stale.
    Measured: finite differences then disagreed by 0.5 of a product on a smooth model.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
