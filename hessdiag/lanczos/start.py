"""Start vectors of a Lanczos run: random, or warm (previous Ritz vectors) with a random part.

Warm starts: a start near the previous top eigenvector, after another direction has overtaken it,
converges at once onto the old one (its residual is tiny) while the new top hides in the random
part, whose weight along it is only about rho / sqrt(dim). So a warm start keeps a random component
and may stop only `warm_steps` products after `min_iter` (default 8: on an overtaken top, dimension
400 to 100 000, gaps 0.5-10%, 2 runs in 90 still stopped on the old top, both at dimension 10 000;
6 steps left 15 in 60). A warm start that is safe in this sense saves products only where a cold run
needs more than `min_iter` + `warm_steps` (a clustered top). Its `top_limit` says how little it
explored: on the digits MLP 10 SGD steps on, 0.25 above theta_max (relative) warm against 8e-3
cold; on the overtaken tops above, always above the new top.
"""

from __future__ import annotations

import math

import torch

from hessdiag.vectors import VectorShard, partial_sums, random_unit_vector, vector_norm


def start_vector(
    dim: int,
    v0: torch.Tensor | None,
    *,
    warm_random: float,
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator,
    shard: VectorShard | None = None,
) -> torch.Tensor:
    """A unit start vector: random, or a warm start mixed with a random component.

    A warm start is a vector of shape (dim,) or a block (b, dim) of previous Ritz vectors (e.g. the
    top and bottom ones), summed after normalising each row; the result is mixed as
    sqrt(1 - rho^2) u + rho r with r random and rho = `warm_random`, so that an eigenvector that
    has turned since the last check is still reachable from the Krylov space. With a `shard`,
    `dim` is this process's size and `v0` its piece.
    """
    noise = random_unit_vector(dim, generator, device, dtype, shard)
    if v0 is None:
        return noise
    block = v0.detach().reshape(-1, dim).to(device=device, dtype=dtype)
    norms = partial_sums(shard)(block.pow(2).sum(dim=1, keepdim=True)).sqrt()
    # Rows of norm zero or NaN count as zero rows (adding an exact zero changes no sum); no indexing,
    # which would read back to the host.
    warm = torch.where(norms > 0, block / norms, 0.0).sum(dim=0)
    warm_norm = vector_norm(warm, shard)
    size = float(warm_norm)  # one read back: no direction (no row left, or not finite) means a cold start
    if not math.isfinite(size) or size == 0:
        return noise
    mixed = math.sqrt(1.0 - warm_random**2) * (warm / warm_norm) + warm_random * noise
    return mixed / vector_norm(mixed, shard)
