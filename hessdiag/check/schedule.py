"""When the next curvature check runs: a fixed cadence, or a share of the training time.

A check costs one forward and backward plus tens of Hessian-vector products (each 2-4x a gradient),
so its price relative to a training step depends on the model, the batch and the optimizer (Adam
adds a preconditioned estimate). ``check_every="auto"`` therefore measures both and spaces the checks
so that they take at most `overhead_budget` of the training time (measured on a CPU GPT: one check
per 100 steps cost +116%; see benchmarks/overhead.py), never more often than every `min_interval`
steps. The first checks come early and double their spacing (steps 10, 20, 40, 80, 160 with the
defaults `first_check` = 10 and `early_checks` = 5), so that a short run draws a line of curvature
rather than one point; they are not budgeted, and the budget pays them back before the next check (a
300-step run thus spends more than `overhead_budget` on checks, a run of thousands of steps does
not). The time of a training step is the median of the last 256 gaps between steps, so pauses in
between (validation, checkpointing, a stalled data loader, other work in the same process) do not
count as training time: the budget is a share of the training steps themselves. A failing check
backs off exponentially (up to 16x). Under data parallelism the ranks agree on the next check (the
largest interval), or some would wait in a collective the others never enter.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections import deque
from collections.abc import Mapping
from typing import Any, Literal

import torch

from hessdiag import _distributed
from hessdiag.errors import HessdiagWarning

_MAX_BACKOFF = 16
_STEP_WINDOW = 256  # recent step times whose median is the typical step

CheckEvery = int | Literal["auto"]


class CheckSchedule:
    """Decides at which optimizer steps curvature checks run.

    Args:
        check_every: an int n (a check every n steps; 0: never) or ``"auto"`` (see module docstring).
        overhead_budget: share of the wall time checks may take in ``"auto"`` mode (default 0.05).
        min_interval: fewest steps between checks in ``"auto"`` mode (100).
        first_check: the step of the first check in ``"auto"`` mode (10; at most `min_interval`).
        early_checks: checks in ``"auto"`` mode placed at doubling steps from `first_check` (5; 1:
            only the first), before the budget spaces them.
    """

    def __init__(
        self,
        check_every: CheckEvery = "auto",
        overhead_budget: float = 0.05,
        min_interval: int = 100,
        first_check: int = 10,
        early_checks: int = 5,
    ) -> None:
        if check_every != "auto" and (not isinstance(check_every, int) or isinstance(check_every, bool) or check_every < 0):
            raise ValueError(f"`check_every` must be an int >= 0 or 'auto', got {check_every!r}.")
        if not isinstance(overhead_budget, (int, float)) or not 0 < overhead_budget < 1:
            raise ValueError(f"`overhead_budget` must be a number in (0, 1), got {overhead_budget!r}.")
        if not isinstance(min_interval, int) or min_interval < 1:
            raise ValueError(f"`min_interval` must be a positive int, got {min_interval!r}.")
        if not isinstance(first_check, int) or isinstance(first_check, bool) or first_check < 1:
            raise ValueError(f"`first_check` must be a positive int, got {first_check!r}.")
        if not isinstance(early_checks, int) or isinstance(early_checks, bool) or early_checks < 1:
            raise ValueError(f"`early_checks` must be a positive int, got {early_checks!r}.")
        self.check_every = check_every
        self.overhead_budget = float(overhead_budget)
        self.min_interval = min_interval
        self.early_checks = early_checks
        self.checks_done = 0
        self.interval = min_interval if check_every == "auto" else check_every
        self.next_check = min(first_check, min_interval) if check_every == "auto" else self.interval
        self.failures = 0
        self._recent_steps: deque[float] = deque(maxlen=_STEP_WINDOW)
        self._steps_timed = 0
        self._check_seconds = 0.0
        self._clock: float | None = None

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def due(self, step: int) -> bool:
        return self.enabled and step >= self.next_check

    def step_finished(self) -> None:
        """Time one training step (host wall time between consecutive calls, checks excluded)."""
        now = time.perf_counter()
        if self._clock is not None:
            self._recent_steps.append(now - self._clock)
            self._steps_timed += 1
        self._clock = now

    def check_finished(self, step: int, seconds: float, device: torch.device) -> None:
        self.failures = 0
        self._check_seconds += seconds
        self.checks_done += 1
        if self.check_every == "auto" and self.checks_done < self.early_checks:
            self.interval = max(step, 1)  # doubling: the next early check at twice this step
        elif self.check_every == "auto" and self._recent_steps:
            # Pay in advance: the next check may start once the checks so far *and* the next one
            # (estimated as long as this one) fit in `overhead_budget` of the training time. So the
            # running total stays within budget even when the run ends right after a check; only
            # the first check, at `first_check`, is unbudgeted, and it is paid back first.
            per_step = max(statistics.median(self._recent_steps), 1e-9)
            owed = (self._check_seconds + seconds) / self.overhead_budget - per_step * self._steps_timed
            interval = max(self.min_interval, math.ceil(owed / per_step))
            if _distributed.is_data_parallel():
                interval = int(_distributed.all_reduce_max_(torch.tensor([float(interval)], device=device)).item())
            self.interval = interval
        if self.check_every == "auto" or step >= self.next_check:  # a check out of a fixed cadence keeps it
            self.next_check = step + self.interval
        self._clock = time.perf_counter()  # the check's own time is not a step's

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
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`. Saved with another `check_every`, the timing history is
        kept but the cadence is this schedule's: the next check comes one new interval after the
        saved last one (a warning says so)."""
        self._recent_steps = deque(map(float, state.get("recent_step_seconds", [])), maxlen=_STEP_WINDOW)
        self._steps_timed = int(state.get("steps_timed", 0))
        self._check_seconds = float(state.get("check_seconds", 0.0))
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
