"""What one optimizer step trained on, gathered over its micro-batches under gradient accumulation.

Lightning calls the batch hooks once per micro-batch and steps the optimizer after the last one; a
check must measure the loss of the whole step, so the micro-batches of a step with a check due are
kept with their `batch_idx` (references, no copy; at most
:data:`~hessdiag.callbacks.settings.MAX_MICRO_BATCHES`, the last ones; see
:class:`~hessdiag.callbacks.loss_closure.StepBatch`) and the micro-batch losses are summed on the device (Lightning divides each by
``accumulate_grad_batches``, so their sum is the step's mean loss). The step's samples are counted
over all its micro-batches (host shapes only): the noise scale under DDP needs this rank's batch.

Under manual optimisation a ``training_step`` may return nothing: the batch's loss is then the one
it logged with ``self.log`` (:class:`LoggedLoss`), and the losses of the batches of one optimizer
step are averaged (there Lightning divides no loss by the batches).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hessdiag.batches import MicroBatches, batch_size
from hessdiag.callbacks.loss_closure import StepBatch
from hessdiag.callbacks.settings import MAX_MICRO_BATCHES

#: How to hand the step's loss to the callback under manual optimisation, in Lightning's terms.
RETURN_THE_LOSS = (
    "return it from `training_step` (`return loss`, or `return {'loss': loss, ...}`; Lightning detaches it) "
    "or log it as `self.log('loss', loss)`"
)


def returned_loss(outputs: Any) -> torch.Tensor | None:
    """The scalar loss in a training step's `outputs` (a tensor or ``{"loss": ...}``), else None."""
    loss = outputs["loss"] if isinstance(outputs, Mapping) and "loss" in outputs else outputs
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


class LoggedLoss:
    """The loss a training step logged with ``self.log``, told from ``trainer.callback_metrics``
    before and after the step.

    Only values logged in this step count: Lightning keeps an older value (another step's, an epoch
    mean) under its key, and a stale loss would be read as this step's measurement. A value logged
    in the step is a new tensor (``self.log`` clones it), so the keys whose tensor changed are the
    step's. Among them the loss is the one key naming a loss (``train_loss``, ``loss_step``), or
    ``loss`` itself; several others (a GAN's ``d_loss`` and ``g_loss``) are not guessed between.
    """

    def __init__(self) -> None:
        self._before: dict[str, Any] = {}
        self.ambiguous: tuple[str, ...] = ()  # the loss keys of the last step that had several and no "loss"

    def before_step(self, metrics: Mapping[str, Any]) -> None:
        """Remember the callback metrics as the step finds them (references, no copy)."""
        self._before = dict(metrics)

    def after_step(self, metrics: Mapping[str, Any]) -> torch.Tensor | None:
        """The loss the step logged, or None (none, or several without one named ``loss``)."""
        logged: dict[str, torch.Tensor] = {}
        for key, value in metrics.items():
            name = key.removesuffix("_step")  # Lightning's step fork of a value logged on_step and on_epoch
            fresh = value is not self._before.get(key)
            if fresh and isinstance(value, torch.Tensor) and value.numel() == 1 and _names_a_loss(name):
                logged[name] = value
        self.ambiguous = tuple(sorted(logged)) if len(logged) > 1 and "loss" not in logged else ()
        if self.ambiguous or not logged:
            return None
        return logged.get("loss", next(iter(logged.values())))

    def advice(self) -> str:
        """What to do about steps without a loss, in Lightning's terms (the last step's case)."""
        found = (
            f"`training_step` returned no loss and logged several ({', '.join(self.ambiguous)}), and which one "
            "the detectors should watch cannot be told"
            if self.ambiguous
            else "`training_step` returned no loss and logged none with `self.log`"
        )
        return (
            f"hessdiag: some optimizer steps have no loss, so the exploding and plateau detectors skip them: {found}. "
            f"Under manual optimisation, {RETURN_THE_LOSS}."
        )


def _names_a_loss(key: str) -> bool:
    return not key.startswith("hessdiag/") and "loss" in key.lower()


class StepMicroBatches:
    """The micro-batches and the loss of the optimizer step under way.

    Args:
        manual: manual optimisation: the step's loss is the mean of its batches' losses, returned or
            logged (see :class:`LoggedLoss`); else the sum of the micro-batches' returned losses.
    """

    def __init__(self, manual: bool = False) -> None:
        self.batches: list[Any] = []  # the current step's, kept only when a check is due
        self.loss: torch.Tensor | None = None  # the current step's losses, summed on the device
        self.losses = 0  # how many were summed
        self.samples: int | None = 0  # the current step's samples so far (None: a micro-batch without a size)
        self.logged: LoggedLoss | None = LoggedLoss() if manual else None

    def count(self, batch: Any) -> None:
        """Add `batch`'s samples (its leading dimension, read from the shape: no device read)."""
        size = batch_size(batch)
        self.samples = None if size is None or self.samples is None else self.samples + size

    def keep(self, batch: Any, batch_idx: int) -> bool:
        """Keep `batch` and its `batch_idx` for the step's check; True when an older one was dropped to
        stay within :data:`~hessdiag.callbacks.settings.MAX_MICRO_BATCHES`."""
        self.batches.append(StepBatch(batch, batch_idx))
        if len(self.batches) > MAX_MICRO_BATCHES:
            self.batches.pop(0)
            return True
        return False

    def add_loss(self, outputs: Any, logged: Mapping[str, Any] | None = None) -> None:
        """Add the micro-batch loss in `outputs` (a scalar tensor or ``{"loss": ...}``); under manual
        optimisation, else the one the step logged (`logged`: ``trainer.callback_metrics`` now)."""
        loss = returned_loss(outputs)
        if loss is None and self.logged is not None and logged is not None:
            loss = self.logged.after_step(logged)
        if loss is not None:
            loss = loss.detach()
            self.loss = loss.clone() if self.loss is None else self.loss + loss
            self.losses += 1

    def finish(self, batch: Any, batch_idx: int) -> tuple[Any, torch.Tensor | None, int | None]:
        """The step's check batch, loss and samples (None: unknown), and a fresh start for the
        next step. The check batch is the one kept micro-batch, :class:`~hessdiag.MicroBatches` of
        several, or `batch` (the step's last, at `batch_idx`) when none was kept."""
        batches, loss, samples = self.batches, self.loss, self.samples
        if loss is not None and self.logged is not None and self.losses > 1:
            loss = loss / self.losses
        self.batches, self.loss, self.losses, self.samples = [], None, 0, 0
        if not batches:
            return StepBatch(batch, batch_idx), loss, samples or None
        return (batches[0] if len(batches) == 1 else MicroBatches(batches)), loss, samples or None
