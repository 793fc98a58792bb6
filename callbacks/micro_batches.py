"""What one optimizer step trained on, gathered over its micro-batches under gradient accumulation.

Lightning calls the batch hooks once per micro-batch and steps the optimizer after the last one; a
check must measure the loss of the whole step, so the micro-batches of a step with a check due are
kept with their `batch_idx` (references, no copy; at most :data:`hessdiag.batches.MAX_MICRO_BATCHES`,
the last ones; see :class:`~hessdiag.callbacks.loss_closure.StepBatch`) and
the micro-batch losses are summed on the device (Lightning divides each by
``accumulate_grad_batches``, so their sum is the step's mean loss). The step's samples are counted
over all its micro-batches (host shapes only): the noise scale under DDP needs this rank's batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hessdiag.batches import MAX_MICRO_BATCHES, MicroBatches, batch_size
from hessdiag.callbacks.loss_closure import StepBatch


class StepMicroBatches:
    """The micro-batches and the summed loss of the optimizer step under way."""

    def __init__(self) -> None:
        self.batches: list[Any] = []  # the current step's, kept only when a check is due
        self.loss: torch.Tensor | None = None  # the current step's mean loss, summed on the device
        self.samples: int | None = 0  # the current step's samples so far (None: a micro-batch without a size)

    def count(self, batch: Any) -> None:
        """Add `batch`'s samples (its leading dimension, read from the shape: no device read)."""
        size = batch_size(batch)
        self.samples = None if size is None or self.samples is None else self.samples + size

    def keep(self, batch: Any, batch_idx: int) -> bool:
        """Keep `batch` and its `batch_idx` for the step's check; True when an older one was dropped to
        stay within :data:`~hessdiag.batches.MAX_MICRO_BATCHES`."""
        self.batches.append(StepBatch(batch, batch_idx))
        if len(self.batches) > MAX_MICRO_BATCHES:
            self.batches.pop(0)
            return True
        return False

    def add_loss(self, outputs: Any) -> None:
        """Add the micro-batch loss in `outputs` (a scalar tensor or ``{"loss": ...}``; else nothing)."""
        loss = outputs["loss"] if isinstance(outputs, Mapping) and "loss" in outputs else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            loss = loss.detach()
            self.loss = loss.clone() if self.loss is None else self.loss + loss

    def finish(self, batch: Any, batch_idx: int) -> tuple[Any, torch.Tensor | None, int | None]:
        """The step's check batch, mean loss and samples (None: unknown), and a fresh start for the
        next step. The check batch is the one kept micro-batch, :class:`~hessdiag.MicroBatches` of
        several, or `batch` (the step's last, at `batch_idx`) when none was kept."""
        batches, loss, samples = self.batches, self.loss, self.samples
        self.batches, self.loss, self.samples = [], None, 0
        if not batches:
            return StepBatch(batch, batch_idx), loss, samples or None
        return (batches[0] if len(batches) == 1 else MicroBatches(batches)), loss, samples or None
