"""The detectors of a Monitor: every record to every detector, the flag history, the flag values.

Detectors decide, writers show: this part only routes records and keeps what the detectors raised.
It knows no flag by name, so a custom detector (any :class:`~hessdiag.detectors.FlagDetector`) runs
as the built-in ones do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hessdiag.detectors import FlagDetector, Record
from hessdiag.flags import FlagEvent
from hessdiag.monitor.faults import FaultPolicy
from hessdiag.reporting.tags import flag_tag


class Detection:
    """Runs `detectors` on records, under the fault policy, and keeps their events.

    Args:
        detectors: the detectors, each with its own flag name.
        faults: a failing detector is reported once and skipped; the others go on.
    """

    def __init__(self, detectors: Sequence[FlagDetector], faults: FaultPolicy) -> None:
        self.detectors: dict[str, FlagDetector] = {detector.name: detector for detector in detectors}
        self.events: list[FlagEvent] = []
        self._faults = faults

    def observe(self, records: Sequence[Record]) -> list[FlagEvent]:
        """Every record to every detector, records in order; returns the new events."""
        events: list[FlagEvent] = []
        for record in records:
            for detector in self.detectors.values():
                found: list[FlagEvent] = []
                with self._faults.guard(f"the {detector.name} detector"):
                    found = detector.observe(record)
                events += found
        self.events.extend(events)
        return events

    @property
    def active_flags(self) -> list[str]:
        """Names of the flags raised now."""
        return [name for name, detector in self.detectors.items() if detector.active]

    def wants_bottom_end(self) -> bool:
        """Whether a detector could use the bottom end of the spectrum at a check now (the saddle rule,
        when the run's losses show a stall; see :meth:`~hessdiag.detectors.SaddleDetector.wants_bottom_end`)."""
        return any(getattr(detector, "wants_bottom_end", lambda: False)() for detector in self.detectors.values())

    def flag_scalars(self) -> dict[str, float]:
        """Each flag's value by tag: 1.0 raised, 0.0 clear."""
        return {flag_tag(name): float(detector.active) for name, detector in self.detectors.items()}

    def state_dict(self) -> dict[str, Any]:
        """Each detector's state by flag name, and the events so far (primitives)."""
        return {
            "detectors": {name: detector.state_dict() for name, detector in self.detectors.items()},
            "events": [event.to_dict() for event in self.events],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; states of flags not run here are ignored."""
        for name, detector_state in state.get("detectors", {}).items():
            if name in self.detectors:
                self.detectors[name].load_state_dict(detector_state)
        self.events = [FlagEvent(**event) for event in state.get("events", [])]
