"""Flags as data: what a detector raises, and the debouncing every detector shares.

A flag is produced in one place (its detector) and rendered by the writers; nothing here formats
for display beyond the one-line `summary` a detector writes from its own evidence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FLAG_NAMES: tuple[str, ...] = ("plateau", "saddle", "exploding", "vanishing", "edge_of_stability")

EventKind = Literal["onset", "cleared"]
Severity = Literal["info", "warning", "critical"]


@dataclass(frozen=True)
class FlagEvent:
    """A flag raised (``kind="onset"``) or cleared, with the numbers behind it.

    Attributes:
        name: one of :data:`FLAG_NAMES`.
        step: the optimizer step at which it happened.
        kind: ``"onset"`` or ``"cleared"``.
        severity: ``"info"``, ``"warning"`` or ``"critical"``.
        evidence: the numbers that decided it, by name (units in the detector's docstring).
        remedy: one line: what to do about it.
        summary: one line: what was seen.
    """

    name: str
    step: int
    kind: EventKind
    severity: Severity
    evidence: dict[str, float] = field(default_factory=dict)
    remedy: str = ""
    summary: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Primitives only (for checkpoints and JSON)."""
        return asdict(self)


class Hysteresis:
    """Debounces a boolean condition: active after `onset` consecutive triggers, cleared after
    `clear` consecutive non-triggers, so mini-batch noise does not make a flag flicker.

    Args:
        onset: consecutive triggered updates that raise the flag (>= 1).
        clear: consecutive quiet updates that clear it (>= 1).
    """

    def __init__(self, onset: int = 1, clear: int = 1) -> None:
        for name, value in (("onset", onset), ("clear", clear)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        self.onset, self.clear = onset, clear
        self.active = False
        self._run = 0  # consecutive updates that disagree with the current state

    def update(self, triggered: bool, *, immediate: bool = False) -> EventKind | None:
        """Feed one observation; returns ``"onset"`` or ``"cleared"`` when the state flips.

        `immediate` raises the flag at once (for conditions that need no confirmation, e.g. NaN).
        """
        if triggered == self.active:
            self._run = 0
            return None
        self._run += 1
        if (triggered and (immediate or self._run >= self.onset)) or (not triggered and self._run >= self.clear):
            self.active, self._run = triggered, 0
            return "onset" if triggered else "cleared"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "run": self._run}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.active = bool(state.get("active", False))
        self._run = int(state.get("run", 0))
