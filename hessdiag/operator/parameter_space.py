"""The flat vector space of the chosen parameters: what the Hessian is taken over, and how vectors
map to parameter-shaped pieces.

A vector of the operator is the concatenation of one flat piece per chosen parameter, in their
order. Under data parallelism every rank holds the whole vector and a product is finished by
weighting this rank's product by its share n_r / N of the global batch and summing over ranks (see
:mod:`hessdiag._distributed`). On an FSDP2-sharded model (see :mod:`hessdiag._sharded`) each rank
holds only its local shards' coordinates (`size` of `dim`), and norms are summed over the ranks
through a :class:`~hessdiag.vectors.VectorShard`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from hessdiag import _distributed, _sharded
from hessdiag.isolation import unwrap_model
from hessdiag.errors import HessdiagError, NonFiniteGradientError
from hessdiag.vectors import VectorShard, random_generator, random_unit_vector, vector_norm


def trainable_parameters(model: nn.Module, params: Iterable[torch.Tensor] | None) -> list[torch.Tensor]:
    """The parameters the Hessian is taken over: `params`, or every trainable one of `model`.

    Raises:
        ValueError: none is trainable, a given tensor does not require grad or is not a
            parameter of `model`, or they span several devices or dtypes.
    """
    model = unwrap_model(model)
    owned = {id(p) for p in model.parameters()}
    if params is None:
        chosen = [p for p in model.parameters() if p.requires_grad]
        if not chosen:
            raise ValueError("The model has no trainable parameters (none has requires_grad=True).")
    else:
        chosen = list(params)
        if not chosen:
            raise ValueError("`params` is empty: pass at least one parameter, or None for all trainable ones.")
        for index, p in enumerate(chosen):
            if id(p) not in owned:
                raise ValueError(f"`params[{index}]` is not a parameter of the model.")
            if not p.requires_grad:
                raise ValueError(f"`params[{index}]` does not require grad, so its Hessian block is undefined.")
    if len({id(p) for p in chosen}) != len(chosen):
        raise ValueError("`params` lists the same parameter twice.")
    devices = {p.device for p in chosen}
    dtypes = {p.dtype for p in chosen}
    if len(devices) > 1 or len(dtypes) > 1:
        raise ValueError(
            f"The parameters span devices {sorted(map(str, devices))} and dtypes {sorted(map(str, dtypes))}; "
            "pass `params=` with parameters of one device and dtype."
        )
    if not chosen[0].dtype.is_floating_point:
        raise ValueError(f"Parameters must be floating point, got {chosen[0].dtype}.")
    return chosen


def refuse_coarse_compute(model: nn.Module, dtype: torch.dtype) -> None:
    """Refuse an FSDP2 model that gathers its `dtype` parameters in a coarser dtype for compute.

    FSDP2 allows finite differences of gradients only, and with ``MixedPrecisionPolicy(param_dtype=
    torch.bfloat16)`` the shifted parameters are rounded to bfloat16 before the forward: a shift
    smaller than a coordinate's bfloat16 spacing is lost or becomes a whole spacing, an error of the
    shift's direction that grows as sqrt(dim) for a step of fixed norm. Measured on two gloo
    processes (tanh MLPs, float32 masters, against the dense float64 Hessian of the union batch):
    with the float32 step the two step sizes disagree by 0.63 of a product at 435 parameters; with a
    step sized for bfloat16 (eps^(1/3)) a check at 435 parameters was right (lambda_max off by 2e-4)
    but could prove only 1.5% (64 products, against 28 to 1e-3 in float32), and at 4,803 parameters
    the step sizes disagree by 0.1 of a product (not a curvature any more). Models sharded with FSDP2
    are far larger. Nor can the check gather in float32 instead: FSDP2 fixes the gathered dtype at its
    first all-gather and has no public way to change it.

    Raises:
        HessdiagError: a ``MixedPrecisionPolicy(param_dtype=...)`` coarser than `dtype` is in force.
    """
    compute = _sharded.coarse_compute_dtype(model, dtype)
    if compute is not None:
        raise HessdiagError(
            f"FSDP2 gathers these {dtype} parameters in {compute} for compute (MixedPrecisionPolicy("
            f"param_dtype={compute})), and its only Hessian-vector products, finite differences of gradients, "
            f"then measure {compute} rounding, not curvature: the shifted parameters are rounded to {compute} "
            f"(spacing {torch.finfo(compute).eps:.1g} relative) before the forward, an error that grows with the "
            "square root of the parameter count (measured: disagreement 0.1 of a product at 4.8k parameters with "
            f"a step sized for {compute}). To check curvature, shard the monitored run with param_dtype=None (compute in {dtype}), "
            "or train with DDP and autocast (checks then run in float32); the other diagnostics (gradient "
            "statistics, flags) work as they are."
        )


class ParameterSpace:
    """Flat vectors over the chosen parameters of a model, whole or this rank's shard of them.

    Args:
        model: the network (unwrapped).
        params: parameters to differentiate (default: all with ``requires_grad``); validated by
            :func:`trainable_parameters`.
        distributed: average products over the process group when one is initialised. Sharded
            models never are (FSDP's gradient already averages the ranks).

    Attributes:
        params: the chosen parameters; `device`, `dtype` theirs.
        dim: the number of coordinates of the whole vectors.
        shard: how vectors are split across processes (FSDP2), or None.
        size: this process's number of coordinates (`dim` unless sharded).
        distributed: products are weighted by `share` and summed over the ranks.
        share: this rank's fraction n_r / N of the global batch (1 until :meth:`weigh_batch`).
    """

    def __init__(self, model: nn.Module, params: Iterable[torch.Tensor] | None, *, distributed: bool) -> None:
        self.params: list[torch.Tensor] = trainable_parameters(model, params)
        self.device: torch.device = self.params[0].device
        self.dtype: torch.dtype = self.params[0].dtype
        self.dim: int = sum(p.numel() for p in self.params)
        self.shard: VectorShard | None = _sharded.vector_shard(self.params) if _sharded.is_sharded(self.params) else None
        self.size: int = self.dim if self.shard is None else self.shard.size
        #: This rank's pieces of the parameters (the parameters themselves unless sharded).
        self.local_params: list[torch.Tensor] = [_sharded.local(p) for p in self.params]
        # Fixed for the space's lifetime; read at every product (split and flatten).
        self._sizes = [p.numel() for p in self.local_params]
        self._shapes = [p.shape for p in self.local_params]
        self.distributed: bool = distributed and self.shard is None and _distributed.is_data_parallel()
        self.share = 1.0

    def weigh_batch(self, batch: Any, batch_size: int | None) -> None:
        """Set `share` from this rank's number of samples (`batch_size`, or the leading dimension of
        the first tensor in `batch`); one all-reduce. Only under data parallelism.

        Raises:
            ValueError: the batch size cannot be inferred.
        """
        if not self.distributed:
            return
        size = batch_size or _distributed.infer_batch_size(batch)
        if size is None:
            raise ValueError("Cannot infer the batch size for data-parallel weighting: pass `batch_size=`.")
        self.share = _distributed.batch_share(size, self.device)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector (this rank's coordinates), one per parameter, shaped like it."""
        return [piece.view(shape) for piece, shape in zip(flat.split_with_sizes(self._sizes), self._shapes)]

    def flatten(self, tensors: Sequence[torch.Tensor | None], out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor per parameter (None for zero, DTensors as their local shards, sparse as dense)
        as a new flat vector, or written into the flat vector `out`. Each piece is copied straight
        into its slice, all in one fused copy: a piece that is not contiguous (a convolution's weight
        gradient in another memory layout) is not first copied whole by a reshape, as a concatenation
        would, and a model of hundreds of tensors does not pay a kernel launch per piece."""
        sharded = self.shard is not None  # plain tensors otherwise: no DTensor test per piece
        flat = torch.empty(self.size, device=self.device, dtype=self.dtype) if out is None else out
        targets, sources = [], []
        for tensor, piece in zip(tensors, self.split(flat)):
            if tensor is None:
                piece.zero_()
            else:
                targets.append(piece)
                sources.append(dense(_sharded.local(tensor) if sharded else tensor))
        if targets:
            torch._foreach_copy_(targets, sources)
        return flat

    def finish(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's product as the global batch's: weighted by `share` and summed over the ranks
        (in place); as it is without data parallelism."""
        if not self.distributed:
            return local
        return _distributed.all_reduce_sum_(local.mul_(self.share))

    def total(self, local: torch.Tensor) -> float:
        """A per-rank value of the loss (0-dim tensor) as the global batch's: weighted and summed
        under data parallelism, the mean over ranks on a sharded model (as FSDP averages)."""
        if self.shard is not None:
            return float(_sharded.mean_over_ranks(local, self.shard))
        value = local * self.share
        if self.distributed:
            _distributed.all_reduce_sum_(value)
        return float(value.item())

    def norm(self, flat: torch.Tensor) -> float:
        """The norm of a flat vector (of the whole vector, when `flat` is this rank's piece)."""
        return float(vector_norm(flat, self.shard))

    def random_unit_vector(self, seed: int) -> torch.Tensor:
        """A random unit vector, the same on every rank (seeded by `seed`); on a sharded model
        this rank's piece of one."""
        generator = random_generator(seed, self.shard, self.device)
        return random_unit_vector(self.size, generator, self.device, self.dtype, self.shard)


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """Sparse gradients (``nn.Embedding(sparse=True)``) as dense tensors, for the flat vectors."""
    return tensor.to_dense() if tensor.is_sparse else tensor


def refuse_non_finite_gradient(
    model: nn.Module, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], where: str = ""
) -> None:
    """Refuse a gradient (one entry per parameter of `params`, None for zero) that holds NaN or
    infinity; one host read.

    Raises:
        NonFiniteGradientError: naming the parameters (by their names in `model`) whose gradient is
            not finite; `where` completes the message (e.g. " on a part of the batch").
    """
    present = [(index, p, g) for index, (p, g) in enumerate(zip(params, grads)) if g is not None]
    if not present:
        return
    finite = torch.stack([torch.isfinite(dense(_sharded.local(g))).all() for _, _, g in present]).tolist()
    if all(finite):
        return
    names = {id(p): name for name, p in unwrap_model(model).named_parameters(remove_duplicate=False)}
    bad = [names.get(id(p), f"params[{index}]") for (index, p, _), ok in zip(present, finite) if not ok]
    raise NonFiniteGradientError(bad, where)
