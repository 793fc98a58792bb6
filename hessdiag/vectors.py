"""Flat vectors, whole or split across processes: norms, inner products and random draws.

The solver (:mod:`hessdiag.lanczos`), the operator (:mod:`hessdiag.operator`) and the spectrum
estimators all work on flat vectors of the chosen parameters' coordinates. This module is the
plumbing they share, so that neither the solver nor the operator imports the other: how a vector is
split across processes (:class:`VectorShard`), its norm and inner products summed over them, and the
random vectors (Gaussian, Rademacher) drawn identically wherever they must agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hessdiag import _distributed

#: Random numbers per host draw (32 MB of float64); a multiple of 16 (see `in_host_chunks`).
HOST_DRAW_CHUNK = 1 << 22


@dataclass(frozen=True)
class VectorShard:
    """How the vectors are split across processes (e.g. FSDP2-sharded parameters): each process
    holds `size` of the `dim` coordinates and the inner products are sums over processes.

    Attributes:
        size: this process's number of coordinates (shards may be uneven).
        sum_: sums a tensor of partial inner products over the processes, in place, and returns it.
        index: this process's rank; each process draws its own coordinates of a random vector from
            a generator seeded by (seed, index), so the whole vector has i.i.d. Gaussian entries.
    """

    size: int
    sum_: Callable[[torch.Tensor], torch.Tensor]
    index: int


def partial_sums(shard: VectorShard | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """What finishes a tensor of partial inner products: the sum over processes with a `shard`,
    nothing without one."""
    return (lambda partial: partial) if shard is None else shard.sum_


def vector_norm(w: torch.Tensor, shard: VectorShard | None = None) -> torch.Tensor:
    """The norm of the whole vector of which `w` is this process's piece (0-dim tensor)."""
    if shard is None:
        return torch.linalg.vector_norm(w)
    return shard.sum_(torch.dot(w, w).reshape(1)).sqrt().reshape(())


def dot(a: torch.Tensor, b: torch.Tensor, shard: VectorShard | None = None) -> float:
    """The inner product of the whole vectors of which `a` and `b` are this process's pieces."""
    return float(partial_sums(shard)(torch.dot(a, b).reshape(1)))


def random_generator(seed: int, shard: VectorShard | None = None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for random vectors on `device`, seeded by `seed`, and with a shard by (seed, rank)
    so that each process draws its own coordinates (the hash of a tuple of ints is fixed).

    It lives on `device`, so that a vector of millions of coordinates is drawn where it is used (a
    host draw costs, on this project's 2-core CPU, 0.26 s for 11 M float64 coordinates, then a copy to
    the GPU; a cold check draws three). Where several processes must hold the *same* vector (a
    data-parallel process group, vectors not sharded), a CUDA generator's stream may depend on the
    GPU model (its launch grid follows the SM count), so the draws take rank 0's numbers
    (:func:`agreed_draw`).
    """
    return torch.Generator(device=torch.device(device)).manual_seed(seed if shard is None else hash((seed, shard.index)) % 2**63)


def agreed_draw(draw: torch.Tensor, shard: VectorShard | None) -> torch.Tensor:
    """`draw` as every process must hold it: rank 0's numbers under data parallelism with unsharded
    vectors (one broadcast, on the device), this process's own with a `shard` or alone."""
    if shard is None and _distributed.is_data_parallel():
        _distributed.broadcast_from_first_(draw)
    return draw


def gaussian(
    size: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype, shard: VectorShard | None = None
) -> torch.Tensor:
    """`size` i.i.d. standard normal numbers from `generator`, on `device` in `dtype`, the same on
    every process where they must be (:func:`agreed_draw`): drawn on the generator's device; a host
    generator draws float64, in chunks (:func:`in_host_chunks`)."""
    if generator.device.type != "cpu":
        noise = torch.randn(size, generator=generator, device=generator.device, dtype=dtype).to(device)
    else:
        noise = in_host_chunks(size, device, dtype, lambda n: torch.randn(n, generator=generator, dtype=torch.float64))
    return agreed_draw(noise, shard)


def random_unit_vector(
    size: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype, shard: VectorShard | None = None
) -> torch.Tensor:
    """A uniformly random unit vector (a normalised Gaussian one); with a `shard`, this process's
    piece (`size` coordinates) of one."""
    noise = gaussian(size, generator, device, dtype, shard)
    noise /= vector_norm(noise, shard)
    return noise


def random_signs(
    size: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype, shard: VectorShard | None = None
) -> torch.Tensor:
    """`size` independent entries +1 or -1 (Rademacher) from `generator`, on `device` in `dtype`, the
    same on every process where they must be (:func:`agreed_draw`): drawn on the generator's device;
    on the host in chunks."""
    if generator.device.type != "cpu":
        bits = torch.randint(0, 2, (size,), generator=generator, device=generator.device, dtype=torch.int8)
        signs = bits.to(device=device, dtype=dtype).mul_(2).sub_(1)
    else:
        bits = in_host_chunks(size, device, dtype, lambda n: torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8))
        signs = bits.mul_(2).sub_(1)
    return agreed_draw(signs, shard)


def in_host_chunks(size: int, device: torch.device, dtype: torch.dtype, draw: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """A new tensor on `device` in `dtype` filled by `draw(n)` (a host generator, i.e. a model on the
    CPU) `HOST_DRAW_CHUNK` numbers at a time, so that the host never holds a second float64 copy of
    the whole draw. torch's host draws in chunks of a multiple of 16
    numbers give the numbers of one draw (tested)."""
    out = torch.empty(size, device=device, dtype=dtype)
    for start in range(0, size, HOST_DRAW_CHUNK):
        piece = out[start : start + HOST_DRAW_CHUNK]
        piece.copy_(draw(piece.numel()))
    return out
