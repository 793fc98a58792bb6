"""What the callback does with flag events: run the user's ``on_flag`` and stop on ``stop_on`` flags."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import pytorch_lightning as pl

from hessdiag.flags import FlagEvent

FlagHook = Callable[[FlagEvent, pl.Trainer, pl.LightningModule], None]
Guard = Callable[[str], contextlib.AbstractContextManager[None]]


class FlagStopping:
    """Stops a fit at the onset of a flag in `stop_on` and calls `on_flag` for every event.

    Args:
        stop_on: flag names whose onset stops training (validated by the settings).
        on_flag: ``on_flag(event, trainer, pl_module)``, or None.
    """

    def __init__(self, stop_on: Sequence[str], on_flag: FlagHook | None) -> None:
        self.stop_on = tuple(stop_on)
        self.on_flag = on_flag
        self.stop_reason: str | None = None  # why the last fit was stopped, if it was

    def call_on_flag(
        self, events: Sequence[FlagEvent], trainer: pl.Trainer, pl_module: pl.LightningModule, guard: Guard
    ) -> None:
        """Call `on_flag` for each event in order, each under `guard` (an error is a diagnostics fault)."""
        if self.on_flag is None:
            return
        for event in events:
            with guard("the `on_flag` callable"):
                self.on_flag(event, trainer, pl_module)

    def stop_if_flagged(self, trainer: pl.Trainer, events: Sequence[FlagEvent]) -> str | None:
        """Stop at the onset of a `stop_on` flag on any rank; returns the reason when stopping.

        A collective when `stop_on` is set: every rank must call it at the same steps."""
        if not self.stop_on:
            return None
        onsets = [event for event in events if event.kind == "onset" and event.name in self.stop_on]
        if not trainer.strategy.reduce_boolean_decision(bool(onsets), all=False):
            return None
        trainer.should_stop = True
        self.stop_reason = _reason(trainer.global_step, onsets[0]) if onsets else (
            f"hessdiag: stopping at step {trainer.global_step}: a flag in stop_on {self.stop_on} was raised on "
            "another rank."
        )  # fmt: skip
        return self.stop_reason


def _reason(step: int, event: FlagEvent) -> str:
    evidence = ", ".join(f"{key}={value:.4g}" for key, value in event.evidence.items())
    return (
        f"hessdiag: stopping at step {step}: `{event.name}` (in stop_on) raised at step "
        f"{event.step}. {event.summary} Evidence: {evidence}. Remedy: {event.remedy}"
    )
