"""The Monitor's curvature readings: which one is due, run, judged and written, and a failure reported.

The schedule says whether the due reading is a tracking reading or a full check (a detector that
needs the bottom end of the spectrum counts as a verdict that needs a full check; see
:mod:`hessdiag.check.schedule`); a full check in ``"auto"`` mode measures the bottom end only where a
detector could use it, or at every :data:`~hessdiag.check.schedule.BOTTOM_EVERY`-th check. The runner
takes the reading (with its out-of-memory retry), the reporting hands it to the detectors and the
writers. A reading that fails is warned about once per kind of error and backs the schedule off:
training goes on (``strict`` re-raises).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from hessdiag.check.schedule import BOTTOM_EVERY, CheckSchedule, ReadingKind
from hessdiag.flags import FlagEvent
from hessdiag.monitor.check_runner import CheckRunner
from hessdiag.monitor.detection import Detection
from hessdiag.monitor.faults import FaultPolicy
from hessdiag.monitor.reporting import CheckReporting
from hessdiag.noise.sources import NoiseSources
from hessdiag.settings import DiagnosticsSettings

_Result = TypeVar("_Result")


class CurvatureReadings:
    """Takes the Monitor's curvature readings.

    Args:
        runner: runs the checks and tracking readings.
        reporting: judges and writes each one.
        schedule, detection: decide which reading is due.
        noise: the noise scale measured outside the checks (a check takes its estimate).
        faults: the fault policy (``strict``).
        settings: `check_every` and `tol`.
        device: where training runs (the schedule times readings there; ranks agree through it).
    """

    def __init__(
        self,
        runner: CheckRunner,
        reporting: CheckReporting,
        schedule: CheckSchedule,
        detection: Detection,
        noise: NoiseSources,
        faults: FaultPolicy,
        settings: DiagnosticsSettings,
        device: Callable[[], torch.device],
    ) -> None:
        self._runner, self._reporting, self._schedule, self._detection = runner, reporting, schedule, detection
        self._noise, self._faults, self._settings, self._device = noise, faults, settings, device

    def read(self, step: int, batch: Any, optimizer: torch.optim.Optimizer | None) -> tuple[ReadingKind | None, list[FlagEvent]]:
        """The due reading on `batch` at `step`: the kind recorded (None: it failed) and the new flag events."""
        if self._schedule.kind(self._device(), self._detection.wants_bottom_end()) == "tracking":
            reading = self._reported(step, lambda: self._runner.track(step, batch, optimizer, self._device()))
            return (None, []) if reading is None else ("tracking", self._reporting.tracking(reading))
        checks = len(self._runner.checks)
        events = self.check(step, batch, optimizer, bottom=self._bottom_end_due())
        return ("check" if len(self._runner.checks) > checks else None), events

    def check(self, step: int, batch: Any, optimizer: torch.optim.Optimizer | None, *, bottom: bool = True) -> list[FlagEvent]:
        """A full check on `batch` at `step` now (`bottom` False: the top end only); the new flag events."""
        self._runner.warn_low_precision(self._settings.tol)
        check = self._reported(
            step,
            lambda: self._runner.run(
                step, batch, optimizer, self._device(), noise=self._noise.check_estimate(), bottom=bottom
            ),
        )
        if check is None:
            return []
        checks = self._runner.checks
        return self._reporting.check(check, checks[-2] if len(checks) > 1 else None)

    def _bottom_end_due(self) -> bool:
        """Always with an int `check_every`; in ``"auto"`` mode where a detector could use the bottom
        end (the saddle rule, once the losses show a stall) and at every `BOTTOM_EVERY`-th check."""
        if self._settings.check_every != "auto":
            return True
        return self._detection.wants_bottom_end() or len(self._runner.checks) % BOTTOM_EVERY == BOTTOM_EVERY - 1

    def _reported(self, step: int, take: Callable[[], _Result]) -> _Result | None:
        """`take()`, or None after reporting its failure (diagnostics never crash training)."""
        try:
            return take()
        except Exception as error:
            if self._faults.strict:
                raise
            self._reporting.check_failed(step, self._runner.failed(step, error))
            return None
