"""The diagnostics of a training run, for a hand-written loop (and under the Lightning callback).

:class:`Monitor` conducts parts with one job each: :class:`~hessdiag.steps.statistics.StepStatistics`
(per-step gradient statistics and losses, read back together), :mod:`.check_runner` (curvature
checks, tracking readings and the out-of-memory retry), :mod:`.reporting` (a reading's verdict and
texts, notes said once), :mod:`.faults` (never crash training; say it once) and
:mod:`hessdiag.reporting.writers` (fan-out to every :class:`~hessdiag.DiagnosticsWriter`);
:mod:`.parts` builds them, :mod:`.readout` is what adapters read, :mod:`.checkpoint` what a
checkpoint holds. Detectors live in :mod:`hessdiag.detectors`, tag names in :mod:`hessdiag.reporting.tags`.
"""

from hessdiag.monitor.monitor import Monitor

__all__ = ["Monitor"]
