"""Plumbing shared by the detectors: argument checks and the event factory."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from hessdiag.flags import EventKind, FlagEvent, Hysteresis, Severity


def check_positive(name: str, value: float, *, upper: float | None = None) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0 or (upper is not None and value >= upper):
        allowed = f"in (0, {upper})" if upper is not None else "> 0"
        raise ValueError(f"`{name}` must be a finite number {allowed}, got {value!r}.")
    return float(value)


def check_count(name: str, value: int, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
    return value


class Detector:
    """A flag with hysteresis; subclasses decide `triggered` and write evidence and summary."""

    name: str = ""
    remedy: str = ""

    def __init__(self, onset: int, clear: int) -> None:
        self.hysteresis = Hysteresis(check_count("onset", onset), check_count("clear", clear))
        self.evidence: dict[str, float] = {}
        self.summary = ""

    @property
    def active(self) -> bool:
        return self.hysteresis.active

    def _decide(self, step: int, triggered: bool, severity: Severity, *, immediate: bool = False) -> list[FlagEvent]:
        kind: EventKind | None = self.hysteresis.update(triggered, immediate=immediate)
        if kind is None:
            return []
        return [FlagEvent(self.name, step, kind, severity, dict(self.evidence), self.remedy, self.summary)]

    def state_dict(self) -> dict[str, Any]:
        return {"hysteresis": self.hysteresis.state_dict(), "evidence": dict(self.evidence)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.hysteresis.load_state_dict(state.get("hysteresis", {}))
        self.evidence = dict(state.get("evidence", {}))
