"""The spectral density by stochastic Lanczos quadrature, every `density_every`-th check.

On FSDP2-sharded models from this rank's coordinates of the probes, the same on every rank (see
:func:`~hessdiag.estimators.spectrum.slq_density`). Cost: :data:`DENSITY_PROBES` x :data:`DENSITY_ITER` products.
"""

from __future__ import annotations

from hessdiag.check.quantity import CheckContext, Quantity
from hessdiag.estimators.spectrum import SpectralDensity, slq_density

#: Size of the estimate: probes, and Lanczos steps per probe.
DENSITY_PROBES = 2
DENSITY_ITER = 20


class Density(Quantity):
    """The density (value: :class:`~hessdiag.SpectralDensity`), written as a histogram."""

    name = "density"

    def due(self, context: CheckContext) -> bool:
        # The n-th, 2n-th, ... check: not the first, which is cold and already the dearest
        # (with check_every="auto" a dear first check delays all the others).
        every = self.settings.density_every
        return bool(every) and (context.number + 1) % every == 0

    def compute(self, context: CheckContext) -> SpectralDensity:
        operator = context.operator
        return slq_density(
            operator.matvec, operator.dim, num_probes=DENSITY_PROBES, num_iter=min(DENSITY_ITER, operator.dim),
            seed=context.seed, device=operator.device, dtype=operator.dtype, shard=operator.shard,
            memory_budget=context.memory_budget,
        )  # fmt: skip
