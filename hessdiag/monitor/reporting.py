"""What the Monitor writes about its checks beyond their scalars' fan-out: the detectors' verdict on a
check, its text cards, a failed check, the end of a run without curvature, and notes said once.

Each fallback or fault is reported once: a warning (through the fault policy) and, the first time
only, a text entry on the dashboard, so a long run's dashboard does not fill with repeats.
"""

from __future__ import annotations

from collections.abc import Callable

from hessdiag.check.record import CurvatureCheck
from hessdiag.check.tracking import TrackingReading
from hessdiag.flags import FlagEvent
from hessdiag.monitor.check_runner import check_record, tracking_record
from hessdiag.monitor.detection import Detection
from hessdiag.monitor.faults import FaultPolicy
from hessdiag.noise.sources import NoiseSources
from hessdiag.reporting.writers import WriterFanOut
from hessdiag.reporting.tags import CHECK_FAILED, HVP_METHOD, NOISE_SCALE_VERDICT, event_tag, note_tag


class CheckReporting:
    """Hands each check to the detectors and its values and texts to the writers.

    Args:
        writers: where everything goes.
        detection: judges each check; its flag values go out with the check's scalars.
        noise: the noise scale measured outside the checks (its verdict follows each check's texts).
        faults: says each note once.
        current_step: the optimizer step, for a note.
    """

    def __init__(
        self,
        writers: WriterFanOut,
        detection: Detection,
        noise: NoiseSources,
        faults: FaultPolicy,
        current_step: Callable[[], int],
    ) -> None:
        self._writers = writers
        self._detection = detection
        self._noise = noise
        self._faults = faults
        self._current_step = current_step

    def note(self, key: str, message: str) -> None:
        """Report a fallback once: a warning, and a text entry on the dashboard."""
        if self._faults.warn_once(key, message):
            self._writers.text(self._current_step(), note_tag(key), message)

    def check(self, check: CurvatureCheck, previous: CurvatureCheck | None) -> list[FlagEvent]:
        """Judge `check` and write it (`previous`: the check before it, for the product method's text,
        written when the choice changes). Returns the new flag events."""
        events = self._detection.observe([check_record(check)])
        self._writers.emit(check.step, check.scalars() | self._detection.flag_scalars(), {}, events, check.density)
        for tag, message in check.texts().items():
            self._writers.text(check.step, tag, message)
        verdict = self._noise.verdict()
        if verdict is not None:
            self._writers.text(check.step, NOISE_SCALE_VERDICT, verdict)
        for key, why in check.skipped.items():  # a quantity the check could not measure: said once
            self.note(key, why)
        if previous is None or previous.hvp_method != check.hvp_method:
            method = f"{check.hvp_method} ({check.hvp_method_reason}); product error {check.product_error:.3g}"
            self._writers.text(check.step, HVP_METHOD, method)
        return events

    def tracking(self, reading: TrackingReading) -> list[FlagEvent]:
        """Judge a tracking reading (its lower bounds may raise a flag, never clear one) and write its
        scalars. Returns the new flag events."""
        events = self._detection.observe([tracking_record(reading)])
        self._writers.emit(reading.step, reading.scalars() | self._detection.flag_scalars(), {}, events)
        return events

    def check_failed(self, step: int, message: str) -> None:
        """A check at `step` failed (`message`, already warned): the failure flag and its text."""
        self._writers.scalars(step, {CHECK_FAILED: 1.0} | self._detection.flag_scalars(), {})
        self._writers.text(step, event_tag("check_failed"), message)

    def no_check(self, step: int, message: str) -> None:
        """The run ends at `step` without curvature: `message` written and warned, once."""
        if not self._faults.warned("no check"):
            self._writers.text(step, event_tag("no_check"), message)
        self._faults.warn_once("no check", message)
