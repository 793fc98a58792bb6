"""Flags as data: what a detector raises, and the debouncing every detector shares.

A flag is produced in one place (its detector) and rendered by the writers; nothing here formats
for display beyond the one-line `summary` a detector writes from its own evidence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

FLAG_NAMES: tuple[str, ...] = ("plateau", "saddle", "exploding", "vanishing", "edge_of_stability")

EventKind = Literal["onset", "cleared"]
Severity = Literal["info", "warning", "critical"]


@dataclass(frozen=True)
class FlagEvent:
    """A flag raised (``kind="onset"``) or cleared, with the numbers behind it.

    Attributes:
        name: the flag's name: one of :data:`FLAG_NAMES` for the built-in detectors, any other
            non-empty string for a custom one.
        step: the optimizer step at which it happened.
        kind: ``"onset"`` or ``"cleared"``.
        severity: ``"info"``, ``"warning"`` or ``"critical"``.
        evidence: the numbers that decided it, by name (units in the detector's docstring).
        remedy: one line: what to do about it.
        summary: one line: what was seen.

    Raises:
        ValueError: an empty `name`, or `kind` or `severity` outside the values above.
    """

    name: str
    step: int
    kind: EventKind
    severity: Severity
    evidence: dict[str, float] = field(default_factory=dict)
    remedy: str = ""
    summary: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"`name` must be a non-empty string, got {self.name!r}.")
        for attribute, allowed in (("kind", get_args(EventKind)), ("severity", get_args(Severity))):
            if getattr(self, attribute) not in allowed:
                raise ValueError(f"`{attribute}` must be one of {allowed}, got {getattr(self, attribute)!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Primitives only (for checkpoints and JSON); ``FlagEvent(**event.to_dict())`` restores it."""
        return {
            "name": self.name,
            "step": int(self.step),
            "kind": self.kind,
            "severity": self.severity,
            "evidence": {key: float(value) for key, value in self.evidence.items()},
            "remedy": self.remedy,
            "summary": self.summary,
        }


class Hysteresis:
    """Debounces a boolean condition: active after `onset` consecutive triggers, cleared after
    `clear` consecutive non-triggers, so mini-batch noise does not make a flag flicker.

    Args:
        onset: consecutive triggered updates that raise the flag (>= 1).
        clear: consecutive quiet updates that clear it (>= 1).

    Raises:
        ValueError: `onset` or `clear` not an int >= 1.

    Example::

        >>> h = Hysteresis(onset=2, clear=1)
        >>> [h.update(x) for x in (True, True, False)]
        [None, 'onset', 'cleared']
    """

    def __init__(self, onset: int, clear: int) -> None:
        for name, value in (("onset", onset), ("clear", clear)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        self.onset, self.clear = onset, clear
        self._active = False
        self._run = 0  # consecutive updates that disagree with the current state

    @property
    def active(self) -> bool:
        """Whether the flag is raised now."""
        return self._active

    def update(self, triggered: bool, *, immediate: bool = False) -> EventKind | None:
        """Feed one observation; returns ``"onset"`` or ``"cleared"`` when the state flips, else None.

        `immediate` raises the flag at once (for conditions that need no confirmation, e.g. NaN).
        """
        if triggered == self._active:
            self._run = 0
            return None
        self._run += 1
        if (triggered and (immediate or self._run >= self.onset)) or (not triggered and self._run >= self.clear):
            self._active, self._run = triggered, 0
            return "onset" if triggered else "cleared"
        return None

    def state_dict(self) -> dict[str, Any]:
        """The state and the length of the current disagreeing run (primitives)."""
        return {"active": self._active, "run": self._run}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; missing keys (an empty dict) mean inactive and no run."""
        self._active = bool(state.get("active", False))
        self._run = int(state.get("run", 0))
