"""The pace at which a run's loss falls, from the per-step losses a detector has seen.

A least-squares line through (step, loss) gives the pace (loss removed per step) and its standard
error, so a noisy mini-batch loss is not taken for a stalled one: a pace is called slow only when
even its upper confidence bound (pace + 2 standard errors) is slow.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: Fewest losses a line is fitted through (two degrees of freedom left for the standard error).
MIN_POINTS = 4


@dataclass(frozen=True)
class Pace:
    """Loss removed per step over a stretch of steps (positive: the loss falls).

    Attributes:
        rate: least-squares slope, negated.
        stderr: its standard error (0 for an exact line).
        span: steps covered (last step - first step).
        mean: the stretch's mean loss.
    """

    rate: float
    stderr: float
    span: int
    mean: float

    @property
    def upper(self) -> float:
        """The pace at its upper confidence bound (about 97.5%)."""
        return self.rate + 2 * self.stderr

    @property
    def lower(self) -> float:
        """The pace at its lower confidence bound."""
        return self.rate - 2 * self.stderr


def pace_of(points: Sequence[tuple[int, float]]) -> Pace | None:
    """The :class:`Pace` of `points` ``(step, loss)``; None with fewer than MIN_POINTS distinct steps."""
    steps = [float(step) for step, _ in points]
    losses = [loss for _, loss in points]
    if len(points) < MIN_POINTS or len(set(steps)) < 2:
        return None
    mean_step, mean_loss = statistics.fmean(steps), statistics.fmean(losses)
    spread = sum((s - mean_step) ** 2 for s in steps)
    slope = sum((s - mean_step) * (y - mean_loss) for s, y in zip(steps, losses)) / spread
    residual = sum((y - mean_loss - slope * (s - mean_step)) ** 2 for s, y in zip(steps, losses))
    stderr = math.sqrt(residual / (len(points) - 2) / spread)
    return Pace(-slope, stderr, int(steps[-1] - steps[0]), mean_loss)


class LossTrend:
    """The pace of the loss over the last `window` steps, and over the `window` steps before them.

    Comparing with the stretch just before (not with the start of the run) lets a loss decelerate
    as training does: only a pace that dropped within two windows counts as slowed.

    Args:
        window: steps of each stretch (>= 4); at most 2 x `window` losses are kept.
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.points: deque[tuple[int, float]] = deque(maxlen=2 * window)

    def add(self, step: int, loss: float) -> None:
        """Keep `step`'s loss (a non-finite loss is skipped: the exploding detector's business)."""
        if math.isfinite(loss):
            self.points.append((step, loss))

    def recent(self) -> Pace | None:
        """The pace over the last `window` steps, None with too few losses."""
        if not self.points:
            return None
        last = self.points[-1][0]
        return pace_of([point for point in self.points if point[0] > last - self.window])

    def earlier(self) -> Pace | None:
        """The pace over the `window` steps before the recent ones, None with too few losses."""
        if not self.points:
            return None
        last = self.points[-1][0]
        return pace_of([point for point in self.points if last - 2 * self.window < point[0] <= last - self.window])

    def state(self) -> list[list[float]]:
        """The kept ``[step, loss]`` pairs (primitives)."""
        return [[step, loss] for step, loss in self.points]

    def restore(self, points: Iterable[Sequence[float]]) -> None:
        """Replace the kept pairs by `points` (from :meth:`state`)."""
        self.points.clear()
        for step, loss in points:
            self.points.append((int(step), float(loss)))
