"""The diagnostics of a training run, for a hand-written loop (and under the Lightning callback).

:class:`Monitor` conducts parts with one job each: :mod:`.step_statistics` (per-step gradient
statistics and losses, read back together), :mod:`.check_runner` (curvature checks and their
out-of-memory retry), :mod:`.reporting` (a check's verdict and texts, notes said once),
:mod:`.faults` (never crash training; say it once) and :mod:`.writers` (fan-out to every
:class:`~hessdiag.reporting.tensorboard.DiagnosticsWriter`); :mod:`.assembly` builds them, :mod:`.view` is
what adapters read, :mod:`.checkpoint` what a checkpoint holds. Detectors live in
:mod:`hessdiag.detectors`, tag names in :mod:`hessdiag.reporting.tags`.
"""

from hessdiag.monitor.monitor import Monitor

__all__ = ["Monitor"]
