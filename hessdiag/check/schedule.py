"""When the next curvature reading runs, and whether it is a full check or a tracking reading.

A full check costs one forward and backward plus tens of Hessian-vector products (each 2-4x a
gradient): 30-200 training steps. A tracking reading (:mod:`hessdiag.check.tracking`) costs one
gradient graph and one or two products: a few steps. With ``check_every="auto"`` the schedule spaces
readings so that the curvature is read all through the run within `overhead_budget` of the training
time:

* Readings come early, at steps growing fourfold from `first_check` (10, 40, 160 with
  `early_checks` = 3), so a short run draws a line of curvature rather than one point.
* The budget is the whole overhead, and the schedule plans to spend :data:`PLANNED_SHARE` of it (the
  rest a margin for the error of its own timing): the per-step statistics (gradient norms, the loss,
  the detectors at each read-back; their host time, measured by the Monitor) are paid first, and the
  readings get the rest, at least :data:`READINGS_MIN_SHARE` of the planned budget.
* Then a reading every `interval` steps: the typical cost of a tracking reading (the median of the
  last five, so that one slow reading, a cold one after the trainable parameters changed or a stall
  of the machine, does not stop the curve for thousands of steps) over
  :data:`TRACKING_SHARE` of the readings' budget, or longer while the budget of the steps so far has
  not paid the readings so far back (the early readings, whose cost their few steps cannot pay, are
  paid back by the next gaps), never more often than every `min_interval` steps (100), and at least every
  `max_interval` steps (250) where the tracking readings alone stay within the whole planned budget
  at that spacing. So where the per-step statistics leave too little (steps of a few milliseconds) the curve
  keeps its density, and the whole overhead exceeds the budget by at most the statistics' share and
  the excess of a slow reading (which a cap of 250 steps leaves no gap to pay back).
* Each reading is a full check when the readings' budget can pay for it in advance (the readings so
  far *and* this check, estimated as long as the last full check, or :data:`FIRST_CHECK_ESTIMATE`
  tracking readings before the first, fit in it), otherwise a tracking reading. A verdict that needs
  a full check (the saddle rule, which reads the bottom end, once the losses show a stall) buys the
  run's first one at once. So the tracking readings carry the curve from the first reading on, and
  full checks (both ends, every quantity; the only readings that can clear a flag) come as often as
  the rest of the budget allows.

The time of a training step is the median of the last 256 gaps between steps, so pauses in between
(validation, checkpointing, a stalled data loader) do not count as training time. A failing reading
backs off exponentially (up to 16x). Under data parallelism the ranks agree on the next reading (the
largest interval) and on its kind (a full check only when every rank can afford it), or some would
wait in a collective the others never enter. With an int `check_every` every reading is a full check,
every `check_every` steps.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import warnings
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch

from hessdiag import _distributed
from hessdiag.errors import HessdiagWarning

_MAX_BACKOFF = 16
_STEP_WINDOW = 256  # recent step times whose median is the typical step
_TRACKING_WINDOW = 5  # recent tracking readings whose median is the typical one's cost

CheckEvery = int | Literal["auto"]
ReadingKind = Literal["check", "tracking"]

#: In ``"auto"`` mode every n-th full check measures the bottom end of the spectrum even when no
#: detector needs it (the saddle rule asks for it whenever the losses show a stall).
BOTTOM_EVERY = 4

#: Before the first full check its cost is unknown: estimated as this many tracking readings (a full
#: check measured 15-40 of them on the CPU benchmarks), so that it waits until the budget can pay.
FIRST_CHECK_ESTIMATE = 30

#: The early readings in ``"auto"`` mode come at steps growing by this factor (10, 40, 160).
EARLY_GROWTH = 4

#: The share of the readings' budget that sets the spacing of tracking readings; the rest pays for
#: the full checks (the first one included).
TRACKING_SHARE = 0.75

#: The share of `overhead_budget` the schedule plans to spend. The rest is a margin for the error of
#: its estimates (a typical step is a median of recent steps, a reading's cost one of the last five
#: readings, and no timing sees a cache a reading evicted), so that a run ends within the budget
#: rather than on it.
PLANNED_SHARE = 0.9

#: The least share of the planned budget left to the readings, however much the per-step statistics take.
READINGS_MIN_SHARE = 0.5


class CheckSchedule:
    """Decides at which optimizer steps curvature readings run, and of which kind.

    Args:
        check_every: an int n (a full check every n steps; 0: never) or ``"auto"`` (see module docstring).
        overhead_budget: share of the training time that hessdiag may add in ``"auto"`` mode, the
            per-step statistics and the readings together (default 0.05).
        min_interval: fewest steps between readings in ``"auto"`` mode (100).
        max_interval: most steps between readings in ``"auto"`` mode while the tracking readings alone
            fit in `overhead_budget` (250; at least `min_interval`).
        first_check: the step of the first check in ``"auto"`` mode (10; at most `min_interval`).
        early_checks: readings in ``"auto"`` mode at steps growing fourfold from `first_check` (3:
            10, 40, 160; 1: only the first), before the budget spaces them.
    """

    def __init__(
        self,
        check_every: CheckEvery = "auto",
        overhead_budget: float = 0.05,
        min_interval: int = 100,
        max_interval: int = 250,
        first_check: int = 10,
        early_checks: int = 3,
    ) -> None:
        named = (("min_interval", min_interval), ("max_interval", max_interval), ("first_check", first_check), ("early_checks", early_checks))
        for name, value in named:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        self.check_every = check_every
        self.overhead_budget = float(overhead_budget)
        if max_interval < min_interval:
            raise ValueError(f"`max_interval` ({max_interval}) must be at least `min_interval` ({min_interval}).")
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.early_checks = early_checks
        self.checks_done = 0  # readings of either kind
        self.interval = min_interval if check_every == "auto" else check_every
        self.next_check = min(first_check, min_interval) if check_every == "auto" else self.interval
        self.failures = 0
        self._recent_steps: deque[float] = deque(maxlen=_STEP_WINDOW)
        self._steps_timed = 0
        self._check_seconds = 0.0  # full checks and tracking readings
        self._statistics_seconds = 0.0  # the per-step statistics over the timed steps
        self._step_statistics = 0.0  # those of the step under way
        self._last_check = 0.0  # the last full check's seconds
        self._recent_tracking: deque[float] = deque(maxlen=_TRACKING_WINDOW)  # tracking readings' seconds
        self._clock: float | None = None

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def due(self, step: int) -> bool:
        """A reading (of either kind) is due at `step`."""
        return self.enabled and step >= self.next_check

    def kind(self, device: torch.device, verdict_needs_check: bool = False) -> ReadingKind:
        """What the due reading is: a full check, or a tracking reading (see the module docstring).
        `verdict_needs_check`: a detector needs what only a full check measures (the saddle rule, the
        bottom end); it buys the run's first full check whatever the budget, later ones as it allows."""
        if self.check_every != "auto":
            return "check"
        if verdict_needs_check and not self._last_check:
            affordable = True
        elif not self._recent_steps or not (self._last_check or self._recent_tracking):
            affordable = False  # nothing timed yet: a tracking reading, whose cost is small
        else:
            plain_step, share = self._readings_budget()
            estimate = self._last_check or FIRST_CHECK_ESTIMATE * self._typical_tracking()
            affordable = self._check_seconds + estimate <= share * plain_step * self._steps_timed
        if _distributed.is_data_parallel():  # a full check only where every rank can afford it
            refused = _distributed.all_reduce_max_(torch.tensor([0.0 if affordable else 1.0], device=device))
            affordable = not refused.item()
        return "check" if affordable else "tracking"

    @contextlib.contextmanager
    def statistics_time(self) -> Iterator[None]:
        """Time the per-step statistics run inside (host time; the caller leaves a device wait
        outside): paid from the budget before the readings."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._step_statistics += time.perf_counter() - start

    def _readings_budget(self) -> tuple[float, float]:
        """(a training step's time without hessdiag, the share of it left to the readings): the
        typical step less the statistics' mean time per step, and the planned budget
        (:data:`PLANNED_SHARE` of `overhead_budget`) less the statistics' share (at least
        :data:`READINGS_MIN_SHARE` of it)."""
        per_step = statistics.median(self._recent_steps)
        per_step_statistics = self._statistics_seconds / max(self._steps_timed, 1)  # the run's mean
        plain_step = max(per_step - per_step_statistics, 0.5 * per_step, 1e-9)
        planned = PLANNED_SHARE * self.overhead_budget
        share = max(planned - per_step_statistics / plain_step, READINGS_MIN_SHARE * planned)
        return plain_step, share

    def step_finished(self) -> None:
        """Time one training step (host wall time between consecutive calls, readings excluded)."""
        now = time.perf_counter()
        if self._clock is not None:
            self._recent_steps.append(now - self._clock)
            self._steps_timed += 1
            self._statistics_seconds += self._step_statistics  # paired with the steps timed
        self._step_statistics = 0.0
        self._clock = now

    def check_finished(self, step: int, seconds: float, device: torch.device) -> None:
        """A full check at `step` took `seconds`."""
        self._last_check = seconds
        self._finished(step, seconds, device)

    def tracking_finished(self, step: int, seconds: float, device: torch.device) -> None:
        """A tracking reading at `step` took `seconds`."""
        self._recent_tracking.append(seconds)
        self._finished(step, seconds, device)

    def _finished(self, step: int, seconds: float, device: torch.device) -> None:
        self.failures = 0
        self._check_seconds += seconds
        self.checks_done += 1
        if self.check_every == "auto" and self.checks_done < self.early_checks:
            self.interval = (EARLY_GROWTH - 1) * max(step, 1)  # the next early reading at 4x this step
        elif self.check_every == "auto" and self._recent_steps:
            plain_step, share = self._readings_budget()
            tracking = self._typical_tracking()
            # the tracking readings' share of the readings' budget (none timed yet: min_interval), or
            # longer, until the readings' budget has paid the readings so far back ...
            debt = self._check_seconds - share * plain_step * self._steps_timed
            spacing = max(tracking / (TRACKING_SHARE * share * plain_step), debt / (share * plain_step))
            # ... but a reading at least every max_interval steps where tracking alone then stays
            # within the whole planned budget (otherwise the budgeted spacing stands)
            affordable = tracking / (PLANNED_SHARE * self.overhead_budget * plain_step) <= self.max_interval
            interval = max(self.min_interval, math.ceil(min(spacing, self.max_interval) if affordable else spacing))
            if _distributed.is_data_parallel():
                interval = int(_distributed.all_reduce_max_(torch.tensor([float(interval)], device=device)).item())
            self.interval = interval
        if self.check_every == "auto" or step >= self.next_check:  # a check out of a fixed cadence keeps it
            self.next_check = step + self.interval
        self._clock = time.perf_counter()  # the reading's own time is not a step's

    def _typical_tracking(self) -> float:
        """The median of the recent tracking readings' seconds (0 before any)."""
        return statistics.median(self._recent_tracking) if self._recent_tracking else 0.0

    def check_failed(self, step: int) -> None:
        self.failures += 1
        self.next_check = step + self.interval * min(2 ** (self.failures - 1), _MAX_BACKOFF)
        self._clock = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        return {
            "check_every": self.check_every,
            "interval": self.interval,
            "next_check": self.next_check,
            "failures": self.failures,
            "checks_done": self.checks_done,
            "recent_step_seconds": list(self._recent_steps),
            "steps_timed": self._steps_timed,
            "check_seconds": self._check_seconds,
            "statistics_seconds": self._statistics_seconds,
            "last_check_seconds": self._last_check,
            "last_tracking_seconds": self._recent_tracking[-1] if self._recent_tracking else 0.0,
            "recent_tracking_seconds": list(self._recent_tracking),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`. Saved with another `check_every`, the timing history is
        kept but the cadence is this schedule's: the next reading comes one new interval after the
        saved last one (a warning says so). In ``"auto"`` mode the next reading comes at most one
        interval after the resume (a checkpoint of a run that spaced its checks by their cost alone
        could otherwise leave the resumed run without curvature for thousands of steps)."""
        self._recent_steps = deque(map(float, state.get("recent_step_seconds", [])), maxlen=_STEP_WINDOW)
        self._steps_timed = int(state.get("steps_timed", 0))
        self._check_seconds = float(state.get("check_seconds", 0.0))
        self._statistics_seconds = float(state.get("statistics_seconds", 0.0))
        self._last_check = float(state.get("last_check_seconds", 0.0))
        last_tracking = float(state.get("last_tracking_seconds", 0.0))  # a checkpoint of before the window: the last
        recent = state.get("recent_tracking_seconds", [last_tracking] if last_tracking else [])
        self._recent_tracking = deque(map(float, recent), maxlen=_TRACKING_WINDOW)
        self.failures = int(state.get("failures", 0))
        # A checkpoint from before early checks: its run is past them.
        self.checks_done = int(state.get("checks_done", self.early_checks))
        saved_every = state.get("check_every", self.check_every)
        if saved_every != self.check_every:
            interval = int(state.get("interval", self.interval))
            last_check = int(state.get("next_check", interval)) - interval
            self.next_check = max(last_check, 0) + self.interval
            self.failures = 0
            warnings.warn(
                f"hessdiag: the checkpoint was saved with check_every={saved_every!r}, this run has "
                f"check_every={self.check_every!r}: the new cadence applies (next check at step {self.next_check}); "
                "the rest of the diagnostics state is restored.",
                HessdiagWarning,
                stacklevel=2,
            )
            return
        self.interval = int(state.get("interval", self.interval))
        self.next_check = int(state.get("next_check", self.next_check))
        if self.check_every == "auto" and "last_tracking_seconds" not in state:
            # Saved before tracking readings, its checks spaced by their cost alone (thousands of
            # steps): the next reading comes at most `min_interval` after the last check.
            self.next_check = min(self.next_check, self.next_check - self.interval + self.min_interval)
