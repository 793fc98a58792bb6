"""What the loop and the adapters read of a :class:`~hessdiag.Monitor`: what a step did
(:class:`StepOutcome`), its counters, the checks and flags so far, the latest values, and when the
next read-back or check comes.

Read only: every property and query here reads the Monitor's parts and changes nothing, so an
adapter (the Lightning callback, a user's loop) may ask at any time, as often as it likes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hessdiag.check.probe import CurvatureProbe
from hessdiag.check.record import CurvatureCheck
from hessdiag.check.tracking import TrackingReading
from hessdiag.detectors import FlagDetector
from hessdiag.flags import FlagEvent
from hessdiag.monitor.check_runner import CheckRunner
from hessdiag.monitor.detection import Detection
from hessdiag.steps.statistics import StepStatistics
from hessdiag.reporting.writers import WriterFanOut
from hessdiag.check.schedule import CheckSchedule, ReadingKind
from hessdiag.settings import DiagnosticsSettings


@dataclass(frozen=True)
class StepOutcome:
    """What one :meth:`~hessdiag.Monitor.after_step` did. Iterating it yields the new flag events, so
    ``for event in monitor.after_step(batch, loss)`` reads them directly.

    Attributes:
        events: the new flag events (onsets and clearances), in the order they happened.
        read_back: whether the step read back, judged and logged the statistics since the last
            read-back: every `log_every` steps, and before every curvature reading. The same on
            every rank (it depends on the step only).
        reading: the curvature reading this step recorded: ``"check"`` (a full check, now last in
            :attr:`~hessdiag.Monitor.checks`), ``"tracking"`` (a tracking reading, last in
            :attr:`~hessdiag.Monitor.readings`), or None: none was due, or the due one failed (reported
            once, backed off). A decision every rank must share rests on `read_back`, not on this.
    """

    events: tuple[FlagEvent, ...] = ()
    read_back: bool = False
    reading: ReadingKind | None = None

    def __iter__(self) -> Iterator[FlagEvent]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)


class MonitorView:
    """The read-only side of the Monitor (a base class of :class:`~hessdiag.Monitor`, which sets
    the parts below)."""

    settings: DiagnosticsSettings
    schedule: CheckSchedule
    statistics: StepStatistics
    detection: Detection
    writers: WriterFanOut
    probe: CurvatureProbe | None
    _runner: CheckRunner | None
    _optimizer: torch.optim.Optimizer | None
    _step: int

    @property
    def step(self) -> int:
        """Optimizer steps taken (counted by :meth:`after_step`, or adopted from its `step`)."""
        return self._step

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer the stability threshold reads (see :meth:`use_optimizer`)."""
        return self._optimizer

    @property
    def latest(self) -> dict[str, float]:
        """The last value of every scalar tag, as written at the last read-back or check (host floats)."""
        return self.writers.latest

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return self.statistics.grad_scaler

    @property
    def overflow_skips(self) -> int:
        """Steps the fp16 loss scaler skipped for overflow, so far."""
        return self.statistics.overflow_skips

    @property
    def detectors(self) -> dict[str, FlagDetector]:
        """The detectors by flag name."""
        return self.detection.detectors

    @property
    def events(self) -> list[FlagEvent]:
        """Every flag event so far, in order."""
        return self.detection.events

    @property
    def active_flags(self) -> list[str]:
        """Names of the flags raised now."""
        return self.detection.active_flags

    @property
    def checks(self) -> list[CurvatureCheck]:
        """The curvature checks that succeeded, in order."""
        return self._runner.checks if self._runner is not None else []

    @property
    def readings(self) -> list[TrackingReading]:
        """The tracking readings between the checks, in order (proven lower bounds; see
        :mod:`hessdiag.check.tracking`)."""
        return self._runner.readings if self._runner is not None else []

    @property
    def failed_checks(self) -> list[tuple[int, str]]:
        """``(step, reason)`` of each check that failed."""
        return self._runner.failed_checks if self._runner is not None else []

    @property
    def last_check(self) -> CurvatureCheck | None:
        return self.checks[-1] if self.checks else None

    @property
    def checks_enabled(self) -> bool:
        """Whether this Monitor takes curvature readings at all (a `loss_fn` was given and
        `check_every` is not 0)."""
        return self._runner is not None and self.schedule.enabled

    def read_back_due(self, step: int) -> bool:
        """Whether :meth:`after_step` reads back (detects, logs) at optimizer step `step`."""
        return step % self.settings.log_every == 0

    def check_due(self, step: int) -> bool:
        """Whether a curvature reading (a full check or a tracking reading) is due at optimizer step
        `step` (the same on every rank)."""
        return self.probe is not None and self.schedule.due(step)
