"""Plumbing shared by the detectors: the validators of their own arguments, and the base that turns a decision into events."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from hessdiag.flags import FlagEvent, Hysteresis, Severity


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_positive(name: str, value: float, *, upper: float | None = None) -> float:
    """`value` as a float if it is finite, > 0 and (when given) < `upper`; else ValueError naming `name`."""
    if not _is_number(value) or value <= 0 or (upper is not None and value >= upper):
        allowed = f"in (0, {upper})" if upper is not None else "> 0"
        raise ValueError(f"`{name}` must be a finite number {allowed}, got {value!r}.")
    return float(value)


def require_finite(name: str, value: float) -> float:
    """`value` as a float if it is a finite number; else ValueError naming `name`."""
    if not _is_number(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    return float(value)


def require_optional_positive(name: str, value: float | None) -> float | None:
    """None, or `value` validated by :func:`require_positive`."""
    return None if value is None else require_positive(name, value)


def require_count(name: str, value: int, low: int = 1) -> int:
    """`value` if it is an int >= `low`; else ValueError naming `name`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
    return value


class Detector:
    """A flag with hysteresis. Subclasses set `evidence` and `summary` on every update, decide
    whether the update triggers, and hand that to :meth:`_decide`, which emits the events.

    Args:
        onset: consecutive triggering updates that raise the flag (>= 1).
        clear: consecutive quiet updates that clear it (>= 1).
    """

    name: ClassVar[str]
    remedy: ClassVar[str]

    def __init__(self, onset: int, clear: int) -> None:
        self.hysteresis = Hysteresis(onset, clear)  # which validates them
        self.evidence: dict[str, float] = {}
        self.summary = ""

    @property
    def active(self) -> bool:
        """Whether the flag is raised now."""
        return self.hysteresis.active

    def _decide(
        self, step: int, triggered: bool, severity: Severity, *, immediate: bool = False, remedy: str | None = None
    ) -> list[FlagEvent]:
        """Events for this update; `remedy` replaces the class's when the cause found needs another one."""
        kind = self.hysteresis.update(triggered, immediate=immediate)
        if kind is None:
            return []
        return [FlagEvent(self.name, step, kind, severity, dict(self.evidence), remedy or self.remedy, self.summary)]

    def state_dict(self) -> dict[str, Any]:
        """Hysteresis state and the latest evidence and summary (primitives)."""
        return {"hysteresis": self.hysteresis.state_dict(), "evidence": dict(self.evidence), "summary": self.summary}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; keys missing in older checkpoints keep their defaults."""
        self.hysteresis.load_state_dict(state.get("hysteresis", {}))
        self.evidence = {key: float(value) for key, value in state.get("evidence", {}).items()}
        self.summary = str(state.get("summary", ""))
