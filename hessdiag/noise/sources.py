"""Where the Monitor's noise scale comes from when a cheaper source than the check's split exists.

* Under DDP, every step's local gradients against the all-reduced one (:mod:`hessdiag.noise.ranks`,
  a communication hook; no extra backward), read back with the step statistics. It replaces the
  checks' split: every step counted instead of one batch per check, and the global batch (the
  split sees this rank's batch only).
* Under gradient accumulation, the micro-batches' gradients against the accumulated one, on the
  steps a check follows (:mod:`hessdiag.noise.micro_batches`, tensor hooks; no extra backward). The
  check then adds that estimate instead of cutting its batch.

Elsewhere, and where neither can be measured, the check cuts its batch in parts as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from hessdiag import _distributed
from hessdiag.noise.micro_batches import MicroBatchNoise
from hessdiag.noise.noise_scale import NoiseScaleEstimate
from hessdiag.noise.ranks import RankNoiseScale
from hessdiag.noise.verdict import noise_scale_verdict
from hessdiag.reporting.tags import NOISE_SCALE, NOISE_SCALE_SE


class NoiseSources:
    """The noise scale from DDP's ranks or from the micro-batches, for the Monitor.

    Args:
        params: the parameters whose gradient counts (called when needed: they may change).

    Attributes:
        ranks: the :class:`~hessdiag.noise.ranks.RankNoiseScale` (its ``running`` mean).
        micro_batches: the :class:`~hessdiag.noise.micro_batches.MicroBatchNoise`.
    """

    def __init__(self, params: Callable[[], list[torch.Tensor]]) -> None:
        self.ranks = RankNoiseScale()
        self.micro_batches = MicroBatchNoise()
        self._params = params
        self._samples: int | None = None  # this rank's samples of the last step filed

    @property
    def from_ranks(self) -> bool:
        """Whether the noise scale comes from the ranks (the hook is attached)."""
        return self.ranks.attached

    def watch(self, model: nn.Module) -> str | None:
        """Attach to `model` if it is a DDP over more than one rank; None when attached, else why not
        (a user's own communication hook, which DDP allows only one of; not DDP)."""
        if self.from_ranks:
            return None
        if not isinstance(model, nn.parallel.DistributedDataParallel) or not _distributed.is_data_parallel():
            return "the model is not a DistributedDataParallel over more than one rank"
        try:
            self.ranks.attach(model)
        except RuntimeError as error:  # DDP allows one hook: the user's (compression, ...) stays
            return f"the DDP model already has a communication hook ({error})"
        return None

    # -- gradient accumulation -------------------------------------------------------------------
    def begin_micro_batch(self, samples: int | None, loss_scale: float) -> None:
        """A micro-batch of a step that a check follows starts (see :class:`MicroBatchNoise`)."""
        self.micro_batches.begin(self._params(), samples, loss_scale)

    def gradients_final(self) -> None:
        """The step's gradients are final: close the micro-batches' measurement (device only; nothing
        on a step without one, which is every step but a check's)."""
        if self.micro_batches.armed:
            self.micro_batches.close(self._params())

    def check_estimate(self) -> NoiseScaleEstimate | None:
        """The micro-batches' estimate of the step a check runs at (one transfer), or None: the
        check then cuts its batch."""
        return self.micro_batches.estimate()[0]

    # -- data parallelism -----------------------------------------------------------------------
    def close_step(self, samples: int | None) -> None:
        """File the step's rank norms; `samples`: this rank's samples of the step (None: unknown)."""
        if self.from_ranks:
            self._samples = samples
            self.ranks.close_step(samples)

    def read(self) -> dict[str, float]:
        """The ranks' running noise scale and its standard error by tag, after adding the filed
        steps (one all-reduce: every rank at the same read-backs); only finite values."""
        if not self.from_ranks:
            return {}
        self.ranks.read()
        running = self.ranks.running
        values = {NOISE_SCALE: running.noise_scale, NOISE_SCALE_SE: running.noise_scale_se}
        return {tag: value for tag, value in values.items() if math.isfinite(value)}

    def verdict(self) -> str | None:
        """The ranks' running noise scale against the global batch of the last step, in a sentence."""
        running = self.ranks.running
        if not self.from_ranks or not math.isfinite(running.noise_scale):
            return None
        batch = self._samples * self.ranks.world_size if self._samples else None
        return noise_scale_verdict(running.noise_scale, running.noise_scale_se, batch)
