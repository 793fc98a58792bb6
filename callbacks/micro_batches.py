"""What one optimizer step trained on, gathered over its micro-batches under gradient accumulation.

Lightning calls the batch hooks once per micro-batch and steps the optimizer after the last one; a
check must measure the loss of the whole step, so the micro-batches of a step with a check due are
kept with their `batch_idx` (references, no copy; at most :data:`hessdiag.batches.MAX_MICRO_BATCHES`,
the last ones; see :class:`~hessdiag.callbacks.loss_closure.StepBatch`) and
the micro-batch losses are summed on the device (Lightning divides each by
``accumulate_grad_batches``, so their sum is the step's mean loss).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hessdiag.batches import MAX_MICRO_BATCHES, MicroBatches
from hessdiag.callbacks.loss_closure import StepBatch


class StepMicroBatches:
    """The micro-batches and the summed loss of the optimizer step under way."""

    def __init__(self) -> None:
        self.batches: list[Any] = []  # the current step's, kept only when a check is due
        self.loss: torch.Tensor | None = None  # the current step's mean loss, summed on the device

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

    def finish(self, batch: Any, batch_idx: int) -> tuple[Any, torch.Tensor | None]:
        """The step's check batch and mean loss, and a fresh start for the next step. The check batch
        is the one kept micro-batch, :class:`~hessdiag.MicroBatches` of several, or `batch` (the
        step's last, at `batch_idx`) when none was kept."""
        batches, loss = self.batches, self.loss
        self.batches, self.loss = [], None
        if not batches:
            return StepBatch(batch, batch_idx), loss
        return (batches[0] if len(batches) == 1 else MicroBatches(batches)), loss
