"""Shared fixtures of the test suite.

pytest puts this folder on ``sys.path`` (the rootdir conftest), so the shared helper modules are
imported by one spelling everywhere, in the test processes and in the processes they spawn:
``from oracles import dense_hessian`` (float64 references) and ``from spawned import fit_spawned``
(Lightning's ddp_spawn in tests).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest


class RecordingLogger:
    """A Lightning logger that keeps what it is given: ``(step, metrics)`` pairs and its saves."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.saves = 0

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def save(self):
        self.saves += 1


@pytest.fixture
def fake_trainer():
    """The part of a ``pl.Trainer`` the callback's helpers read and write: two recording loggers,
    ``callback_metrics``, ``should_stop``, ``global_step`` and a one-process strategy whose
    ``reduce_boolean_decision`` returns the local decision (set ``strategy.other_ranks`` to True to
    play an onset on another rank)."""
    strategy = SimpleNamespace(other_ranks=False)
    strategy.reduce_boolean_decision = lambda decision, all=True: bool(decision) or strategy.other_ranks
    return SimpleNamespace(
        loggers=[RecordingLogger(), RecordingLogger()], callbacks=[], callback_metrics={}, should_stop=False,
        global_step=7, strategy=strategy,
    )  # fmt: skip
