"""A diagonal block of the Hessian: the operator restricted to some of its parameters.

For a subset S of an open :class:`~hessdiag.operator.HessianOperator`'s parameters, the block H_SS
maps a vector v_S over S's coordinates to the S-coordinates of H (v_S padded with zeros): the
Hessian of the loss as a function of S's parameters alone, the others held where they are. Each
product is one product of the whole operator (the same cost, the same graph, the same method), so a
block needs no forward or backward of its own and no second cross-check.

Sharding: on an FSDP2-sharded operator each rank holds its local shards' coordinates; S's local
coordinates are its parameters' local shards, so the block's vectors are this rank's pieces of
S's whole vectors and their inner products are the same sums over the mesh (a
:class:`~hessdiag.vectors.VectorShard` of the block's local size). Under data parallelism the
vectors are whole on every rank and each product is already the global batch's. Either way the block
is the global block, not a rank-local one.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch

from hessdiag.operator.finite_difference import AlongVector
from hessdiag.operator.hessian import HessianOperator
from hessdiag.vectors import VectorShard, vector_norm


class HessianBlock:
    """The diagonal block H_SS of an open `operator` over the parameters `params` (a subset of its own).

    It offers what :func:`~hessdiag.estimators.eigen.eigenvalues_of` uses of an operator (`matvec`, `along`,
    `gradient`, `norm`, `loss`, `num_hvps`, `product_error`, ...), so the certified Lanczos of the whole
    operator runs on it unchanged. Valid while `operator` is open.

    Args:
        operator: an open :class:`~hessdiag.operator.HessianOperator`.
        params: parameters of `operator` (``operator.params``), at least one, each once; the block's
            vectors are over them in the operator's order.

    Attributes:
        params: the block's parameters, in the operator's order.
        dim, size: the block's number of coordinates, whole and on this rank.
        shard: how the block's vectors are split across processes (FSDP2), or None.
        device, dtype, parameter_dtype, method, model, precision_floor: the operator's.

    Raises:
        ValueError: `params` is empty, repeats a parameter or holds one the operator is not over.
    """

    def __init__(self, operator: HessianOperator, params: Sequence[torch.Tensor]) -> None:
        position = {id(p): index for index, p in enumerate(operator.params)}
        chosen = list(params)
        if not chosen:
            raise ValueError("`params` is empty: a Hessian block needs at least one parameter.")
        if len({id(p) for p in chosen}) != len(chosen):
            raise ValueError("`params` lists the same parameter twice.")
        missing = [index for index, p in enumerate(chosen) if id(p) not in position]
        if missing:
            raise ValueError(f"`params[{missing[0]}]` is not one of the operator's parameters.")
        indices = sorted(position[id(p)] for p in chosen)
        sizes = [p.numel() for p in operator.space.local_params]
        starts = [0, *accumulate(sizes)]
        self._operator = operator
        self._pieces = [(starts[i], sizes[i]) for i in indices]
        self.params: list[torch.Tensor] = [operator.params[i] for i in indices]
        self.dim: int = sum(p.numel() for p in self.params)
        self.size: int = sum(length for _, length in self._pieces)
        shard = operator.shard
        self.shard: VectorShard | None = None if shard is None else VectorShard(self.size, shard.sum_, shard.index)
        self.device, self.dtype, self.model = operator.device, operator.dtype, operator.model
        self.parameter_dtype = operator.parameter_dtype
        self.method = operator.method
        self.precision_floor: float = operator.precision_floor

    def restrict(self, flat: torch.Tensor) -> torch.Tensor:
        """The block's coordinates of a flat vector of the whole operator (a new tensor)."""
        return torch.cat([flat[start : start + length] for start, length in self._pieces])

    def embed(self, block: torch.Tensor) -> torch.Tensor:
        """A flat vector of the whole operator: `block` on the block's coordinates, zero elsewhere."""
        if block.shape != (self.size,):
            raise ValueError(f"Expected a vector of shape ({self.size},), got {tuple(block.shape)}.")
        whole = torch.zeros(self._operator.size, device=block.device, dtype=block.dtype)
        offset = 0
        for start, length in self._pieces:
            whole[start : start + length] = block[offset : offset + length]
            offset += length
        return whole

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """H_SS v: one product of the whole operator with `vector` padded by zeros, restricted."""
        return self.restrict(self._operator.matvec(self.embed(vector)))

    def along(self, vector: torch.Tensor) -> AlongVector:
        """The finite-difference product along a unit block `vector` with its measured error (see
        :meth:`HessianOperator.along`); restricting the product to the block can only shrink its error
        (a projection), so the whole product's error bounds the block's."""
        measured = self._operator.along(self.embed(vector))
        return AlongVector(self.restrict(measured.product), measured.error)

    def gradient(self) -> torch.Tensor:
        """The block's coordinates of the gradient on the operator's batch."""
        return self.restrict(self._operator.gradient())

    def norm(self, flat: torch.Tensor) -> float:
        """The norm of a block vector (of the whole one, when `flat` is this rank's piece)."""
        return float(vector_norm(flat, self.shard))

    @property
    def loss(self) -> float:
        """The operator's loss at the current parameters."""
        return self._operator.loss

    @property
    def num_hvps(self) -> int:
        """Products of the whole operator so far (each of the block's is one)."""
        return self._operator.num_hvps

    @property
    def product_error(self) -> float:
        """The whole operator's error per unit product, which bounds the block's (a restriction)."""
        return self._operator.product_error
