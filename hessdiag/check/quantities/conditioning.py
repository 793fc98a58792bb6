"""The conditioning lambda_max / (trace / n) at a density check, the trace by Hutch++.

The Hessian's trace is dominated by its few large eigenvalues, which Hutch++ takes exactly, where
Hutchinson's estimate (the density's mean eigenvalue) carries their variance. On an FSDP2-sharded
model (Hutch++'s sketch would need a QR across ranks) the density's mean eigenvalue is used:
stochastic Lanczos quadrature is exact for degree-1 polynomials, so it is Hutchinson's estimate with
the density's probes.
"""

from __future__ import annotations

import math
from typing import Any

from hessdiag.check.quantity import CheckContext, Quantity
from hessdiag.estimators.spectrum import SpectralDensity, hutchpp_trace
from hessdiag.reporting.tags import CONDITIONING

#: Products of the Hutch++ trace behind the conditioning (a third sketch the dominant subspace, a
#: third take its exact trace, a third feed Hutchinson on the rest): exact when the Hessian's rank
#: is at most a third of it.
CONDITIONING_TRACE_MATVECS = 18


class Conditioning(Quantity):
    """lambda_max / (trace / n); None when the trace is <= 0."""

    name = "conditioning"
    needs = ("density",)

    def due(self, context: CheckContext) -> bool:
        return isinstance(context.values.get("density"), SpectralDensity)

    def compute(self, context: CheckContext) -> float | None:
        operator, density = context.operator, context.values["density"]
        if operator.shard is not None:
            mean = density.moment(1)
        else:
            trace = hutchpp_trace(
                operator.matvec, operator.dim, num_matvecs=CONDITIONING_TRACE_MATVECS, seed=context.seed,
                device=operator.device, dtype=operator.dtype,
            )  # fmt: skip
            mean = trace.trace / operator.dim
        return context.spectrum.lambda_max / mean if mean > 0 else None

    @staticmethod
    def scalars(value: float, check: Any) -> dict[str, float]:
        return {CONDITIONING: value} if math.isfinite(value) else {}
