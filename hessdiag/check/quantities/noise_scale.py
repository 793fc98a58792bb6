"""How much batch the run can use: the gradient noise scale, from the check batch cut in parts.

About one more gradient of the check batch (the parts' forwards and backwards, no product), computed
after the check's operator closed. Each check's estimate is added to a running mean over the run's
checks (:class:`~hessdiag.RunningNoiseScale`: the ratio of one check's estimates is biased); where
the run measures the noise scale elsewhere (the micro-batches' gradients), that estimate is offered
to the check (:meth:`NoiseScale.offer`) instead of cutting its batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hessdiag import _distributed, _sharded
from hessdiag.batches import MicroBatches, batch_size, first_samples
from hessdiag.check.quantity import CheckContext, Quantity, Skipped
from hessdiag.errors import HessdiagError
from hessdiag.isolation import unwrap_model
from hessdiag.noise.noise_scale import NoiseScaleEstimate, gradient_noise_scale
from hessdiag.noise.running import RunningNoiseScale
from hessdiag.noise.verdict import noise_scale_unresolved, noise_scale_verdict
from hessdiag.reporting.tags import NOISE_SCALE, NOISE_SCALE_SE, NOISE_SCALE_VERDICT


@dataclass(frozen=True)
class NoiseScaleReading:
    """This check's estimate (None where none was made), the running noise scale over the checks so
    far and its standard error (None before an estimate), and the samples of the optimizer step
    (all micro-batches; times the ranks under data parallelism) that it compares with."""

    estimate: NoiseScaleEstimate | None
    noise_scale: float | None
    noise_scale_se: float | None
    step_batch_size: int | None


class NoiseScale(Quantity):
    """The noise scale of the check batch and of the run (value: :class:`NoiseScaleReading`).

    Attributes:
        running: the running noise scale over this run's checks.
    """

    name = "noise_scale"
    uses_operator = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parts = self.settings.noise_scale_parts
        self.running = RunningNoiseScale()
        self._offered: NoiseScaleEstimate | None = None

    def offer(self, estimate: NoiseScaleEstimate | None) -> None:
        """The next check's estimate, measured elsewhere (None: the check cuts its batch)."""
        self._offered = estimate

    def skip_parts(self) -> None:
        """Cut no batch from now on: the noise scale is measured elsewhere (under DDP from the ranks'
        local gradients, see :meth:`hessdiag.Monitor.watch_ranks`)."""
        self.parts = 0

    def compute(self, context: CheckContext) -> NoiseScaleReading | Skipped:
        offered, self._offered = self._offered, None
        why = None
        estimate = None
        if self.parts:
            estimate, why = (offered, "") if offered is not None else self._estimate(context)
            if estimate is not None:
                self.running.update(estimate)
        reading = NoiseScaleReading(
            estimate, _finite_or_none(self.running.noise_scale), _finite_or_none(self.running.noise_scale_se),
            _step_batch_size(context.batch.step_samples),
        )  # fmt: skip
        return Skipped(f"No gradient noise scale: {why.rstrip('.')}.", reading) if why else reading

    def _estimate(self, context: CheckContext) -> tuple[NoiseScaleEstimate | None, str]:
        """The check batch cut in :attr:`parts` (its first samples, a multiple of the parts; under
        gradient accumulation the first micro-batch's), or (None, why not): an FSDP2-sharded model,
        fewer samples than parts, a batch that cannot be cut or a part with a non-finite loss. The
        noise scale is a property of the data and the parameters, not of the batch it is measured
        on: a smaller batch gives a noisier estimate of the same number."""
        batch, parts = context.batch.data, self.parts
        if isinstance(batch, MicroBatches):
            if not batch:
                return None, "the check batch holds no micro-batch"
            batch = batch[0]
        samples = batch_size(batch)
        if _sharded.is_sharded(list(unwrap_model(context.model).parameters())):
            return None, "the model is FSDP2-sharded: a gradient per part would need FSDP's backward per part"
        if samples is None or samples < parts:
            return None, f"the check batch has {samples or 0} samples, fewer than the {parts} parts the noise scale cuts it in"
        try:
            estimate = gradient_noise_scale(
                context.model, context.loss_fn, first_samples(batch, samples - samples % parts), num_parts=parts,
                params=context.params, mode=self.settings.mode, seed=context.seed,
            )  # fmt: skip
        except (ValueError, HessdiagError) as error:  # a batch that cannot be cut, a non-finite part's loss
            return None, str(error)
        return estimate, ""

    @staticmethod
    def scalars(value: NoiseScaleReading, check: Any) -> dict[str, float]:
        found = {NOISE_SCALE: value.noise_scale, NOISE_SCALE_SE: value.noise_scale_se}
        return {tag: v for tag, v in found.items() if v is not None and math.isfinite(v)}

    @staticmethod
    def texts(value: NoiseScaleReading, check: Any) -> dict[str, str]:
        if value.noise_scale is not None:
            return {NOISE_SCALE_VERDICT: noise_scale_verdict(value.noise_scale, value.noise_scale_se, value.step_batch_size)}
        if value.estimate is not None:  # measured, but the mean ||G||^2 estimate is still <= 0
            return {NOISE_SCALE_VERDICT: noise_scale_unresolved(value.estimate)}
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"noise_scale": self.running.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.running.load_state_dict(state.get("noise_scale", {}))


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _step_batch_size(local: int | None) -> int | None:
    """Samples of the optimizer step: this rank's times the ranks (equal local batches assumed)."""
    if local is None:
        return None
    return local * torch.distributed.get_world_size() if _distributed.is_data_parallel() else local
