"""The noise scale of a run: the ratio of running means over checks, not a mean of per-check ratios.

One check's estimate (:func:`hessdiag.gradient_noise_scale`) is the ratio of two noisy unbiased
estimates, which is biased; accumulating tr(Sigma) and ||G||^2 separately over checks and dividing
at the end is consistent. Its state is primitives only, for checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from hessdiag.noise.noise_scale import NoiseScaleEstimate

_STATE_KEYS = ("weight", "weight_sq", "trace", "grad_sq", "trace_sq", "grad_sq_sq", "cross")


class RunningNoiseScale:
    """The noise scale as the ratio of running means of tr(Sigma) and ||G||^2 over checks.

    A ratio of two noisy estimates is biased (E[S / G] != E[S] / E[G]); their running means are
    unbiased, and so their ratio is consistent. ``decay`` < 1 weights recent checks more
    (weights decay^age, like McCandlish et al.'s moving averages: the noise scale grows during
    training); 1 (default) weights all checks equally.

    Example::

        running = RunningNoiseScale(decay=0.9)
        running.update(gradient_noise_scale(model, loss_fn, batch))
        running.noise_scale, running.noise_scale_se

    State (``state_dict``): floats only, summed over checks (per-rank values are not combined: pass
    each check's global estimate).
    """

    def __init__(self, decay: float = 1.0) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise ValueError(f"`decay` must be a number in (0, 1], got {decay!r}.")
        self.decay: float = float(decay)
        self.count: int = 0
        self._sums: dict[str, float] = dict.fromkeys(_STATE_KEYS, 0.0)

    def update(self, estimate: NoiseScaleEstimate) -> None:
        """Add one check's estimate (its ingredients; a non-finite one is skipped)."""
        trace, grad_sq = float(estimate.trace_covariance), float(estimate.grad_sq_norm)
        if not (math.isfinite(trace) and math.isfinite(grad_sq)):
            return
        sums = self._sums
        for key in sums:
            sums[key] *= self.decay**2 if key == "weight_sq" else self.decay  # weights decay^age, squares decay^(2 age)
        sums["weight"] += 1.0
        sums["weight_sq"] += 1.0
        sums["trace"] += trace
        sums["grad_sq"] += grad_sq
        sums["trace_sq"] += trace * trace
        sums["grad_sq_sq"] += grad_sq * grad_sq
        sums["cross"] += trace * grad_sq
        self.count += 1

    @property
    def trace_covariance(self) -> float:
        """The weighted mean of the checks' tr(Sigma) estimates (NaN before the first)."""
        return self._mean("trace")

    @property
    def grad_sq_norm(self) -> float:
        """The weighted mean of the checks' ||G||^2 estimates (NaN before the first)."""
        return self._mean("grad_sq")

    @property
    def noise_scale(self) -> float:
        """trace_covariance / grad_sq_norm, in samples; NaN while the mean ||G||^2 is <= 0."""
        grad_sq = self.grad_sq_norm
        return self.trace_covariance / grad_sq if grad_sq > 0 else math.nan

    @property
    def trace_covariance_se(self) -> float:
        """Standard error of `trace_covariance` from the spread over checks (NaN under 2 checks)."""
        return math.sqrt(self._covariance("trace_sq", "trace", "trace"))

    @property
    def grad_sq_norm_se(self) -> float:
        """Standard error of `grad_sq_norm` from the spread over checks (NaN under 2 checks)."""
        return math.sqrt(self._covariance("grad_sq_sq", "grad_sq", "grad_sq"))

    @property
    def noise_scale_se(self) -> float:
        """Standard error of `noise_scale` by the delta method (first order in the means' errors)."""
        scale, grad_sq = self.noise_scale, self.grad_sq_norm
        if math.isnan(scale):
            return math.nan
        variance = (
            self._covariance("trace_sq", "trace", "trace")
            - 2 * scale * self._covariance("cross", "trace", "grad_sq")
            + scale**2 * self._covariance("grad_sq_sq", "grad_sq", "grad_sq")
        ) / grad_sq**2
        return math.sqrt(max(variance, 0.0)) if not math.isnan(variance) else math.nan

    def _mean(self, key: str) -> float:
        weight = self._sums["weight"]
        return self._sums[key] / weight if weight > 0 else math.nan

    def _covariance(self, product: str, first: str, second: str) -> float:
        """The variance of the weighted mean (covariance of two means): the weighted sample
        covariance with reliability weights, times sum(w^2) / sum(w)^2."""
        weight, weight_sq = self._sums["weight"], self._sums["weight_sq"]
        if self.count < 2 or weight**2 <= weight_sq:
            return math.nan
        spread = self._sums[product] / weight - self._mean(first) * self._mean(second)
        sample = spread * weight**2 / (weight**2 - weight_sq)
        return sample * weight_sq / weight**2

    def state_dict(self) -> dict[str, float | int]:
        return {"decay": self.decay, "count": self.count, **self._sums}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; missing keys (an older checkpoint) take their defaults."""
        self.decay = float(state.get("decay", self.decay))
        self.count = int(state.get("count", 0))
        self._sums = {key: float(state.get(key, 0.0)) for key in _STATE_KEYS}
