"""The Monitor's noise scale under DDP: from the ranks' local gradients at every step, read back with
the step statistics (see :mod:`hessdiag.rank_noise_scale`).

Under DDP this replaces the check's batch cut in parts: no extra forward or backward, every step
counted instead of one batch per check, and the batch is the global one (the check's split sees
this rank's batch only).
"""

from __future__ import annotations

import math

from torch import nn

from hessdiag import _distributed
from hessdiag.dashboard import noise_scale_verdict
from hessdiag.rank_noise_scale import RankNoiseScale
from hessdiag.tags import NOISE_SCALE, NOISE_SCALE_SE


class RankNoise:
    """The noise scale from DDP's local and all-reduced gradients, for the Monitor.

    Attributes:
        estimator: the :class:`~hessdiag.rank_noise_scale.RankNoiseScale` (its ``running`` mean).
    """

    def __init__(self) -> None:
        self.estimator = RankNoiseScale()
        self._samples: int | None = None  # this rank's samples of the last step filed

    @property
    def active(self) -> bool:
        return self.estimator.attached

    def watch(self, model: nn.Module) -> str | None:
        """Attach to `model` if it is a DDP over more than one rank; None when attached, else why not
        (a user's own communication hook, which DDP allows only one of; not DDP)."""
        if self.active:
            return None
        if not isinstance(model, nn.parallel.DistributedDataParallel) or not _distributed.is_data_parallel():
            return "the model is not a DistributedDataParallel over more than one rank"
        try:
            self.estimator.attach(model)
        except RuntimeError as error:  # DDP allows one hook: the user's (compression, ...) stays
            return f"the DDP model already has a communication hook ({error})"
        return None

    def close_step(self, samples: int | None) -> None:
        """File the step's norms; `samples`: this rank's samples of the step (None: unknown)."""
        if self.active:
            self._samples = samples
            self.estimator.close_step(samples)

    def read(self) -> dict[str, float]:
        """The running noise scale and its standard error by tag, after adding the filed steps (one
        all-reduce: every rank at the same read-backs); only finite values."""
        if not self.active:
            return {}
        self.estimator.read()
        running = self.estimator.running
        values = {NOISE_SCALE: running.noise_scale, NOISE_SCALE_SE: running.noise_scale_se}
        return {tag: value for tag, value in values.items() if math.isfinite(value)}

    def verdict(self) -> str | None:
        """The running noise scale against the global batch of the last step, in a sentence."""
        running = self.estimator.running
        if not self.active or not math.isfinite(running.noise_scale):
            return None
        batch = self._samples * self.estimator.world_size if self._samples else None
        return noise_scale_verdict(running.noise_scale, running.noise_scale_se, batch)
