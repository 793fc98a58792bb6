"""What the noise scale says about the batch, in words: one sentence for the text tab.

The check's noise-scale quantity and the Monitor's cheaper sources (:mod:`hessdiag.noise.sources`)
log the same sentence under ``hessdiag/noise_scale_verdict``; batch sizes never become scalar tags.
"""

from __future__ import annotations

import math

from hessdiag.noise.noise_scale import NoiseScaleEstimate

#: A noise scale is resolved once its standard error is at most this share of it (the value then lies
#: at least two standard errors from 0, and the factor-of-2 bands of the verdict mean something).
NOISE_SCALE_RESOLVED = 0.5


def samples(value: float) -> str:
    """A sample count to two significant figures, with thousands separators: ``~2,100``."""
    rounded = float(f"{value:.2g}")
    return f"~{rounded:,.0f}" if abs(rounded) >= 10 else f"~{rounded:.2g}"


def noise_scale_verdict(noise_scale: float, noise_scale_se: float | None, batch: int | None) -> str:
    """One sentence: the noise scale (samples) against the step's `batch`, and what it means
    (McCandlish et al., 2018): well below the noise scale, steps fall nearly in proportion to the
    batch (a larger batch costs few extra samples); well above it, a larger batch buys few steps.

    A verdict needs a resolved estimate: a standard error at most :data:`NOISE_SCALE_RESOLVED` of
    the value. Before that (or without a standard error, after a single estimate) the sentence says
    the estimate is not resolved yet instead of advising on the batch."""
    known_error = noise_scale_se is not None and math.isfinite(noise_scale_se)
    error = f" (+- {samples(noise_scale_se)[1:]})" if known_error else ""
    head = f"noise scale {samples(noise_scale)} samples{error}"
    if batch is None:
        return head
    if not known_error or not noise_scale_se <= NOISE_SCALE_RESOLVED * noise_scale:
        why = f"a standard error above {NOISE_SCALE_RESOLVED:.0%} of the value" if known_error else "no standard error yet"
        return f"{head} vs batch {batch:,}: not resolved yet ({why}; more checks narrow it), no verdict on the batch"
    ratio = noise_scale / batch
    if ratio >= 2:
        meaning = "a larger batch would cost little sample efficiency (fewer steps for nearly the same samples)"
    elif ratio <= 0.5:
        meaning = "a smaller batch would reach the same loss on fewer samples; a larger one would buy few steps"
    else:
        meaning = "the batch is near the noise scale, the usual compromise between steps and samples"
    return f"{head} vs batch {batch:,}: {meaning}"


def noise_scale_unresolved(estimate: NoiseScaleEstimate) -> str:
    """One sentence for a check whose noise scale is measured but not resolved: the mean ||G||^2
    estimate over the checks is still <= 0 (the gradient's signal is below its noise)."""
    return (
        f"noise scale not resolved yet: the mean ||G||^2 estimate over the checks is <= 0 (this check's "
        f"{estimate.grad_sq_norm:.3g} +- {estimate.grad_sq_norm_se:.2g}): at {estimate.big_batch} samples the "
        "gradient's signal is below its noise, so the noise scale is probably well above the batch."
    )
