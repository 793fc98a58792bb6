"""The values the callback hands the trainer: ``trainer.callback_metrics`` (for EarlyStopping and
ModelCheckpoint, with the out-of-cadence first values they need) and the progress bar.

A value measured only at curvature checks (lambda_max, the sharpness, the headroom, ...) stays in
``trainer.callback_metrics`` with the value of the last check until the next one: a
``ModelCheckpoint(monitor="hessdiag/lambda_max", every_n_train_steps=5)`` saves at its own cadence on
that value, whatever the checks' cadence."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch

from hessdiag.flags import FlagEvent
from hessdiag.monitor import Monitor
from hessdiag.monitor.readout import StepOutcome
from hessdiag.reporting.tags import CALLBACK_METRICS, FLAGS_PREFIX, GRAD_NORM, LOSS, is_hessdiag_tag

__all__ = [
    "CALLBACK_METRICS",
    "first_values",
    "is_callback_metric",
    "publish",
    "show_in_progress_bar",
    "watched_by_another_callback",
    "watches_curvature",
]


def is_callback_metric(tag: str) -> bool:
    """Whether `tag` always goes to ``trainer.callback_metrics``."""
    return tag in CALLBACK_METRICS or tag.startswith(FLAGS_PREFIX)


def watched_keys(trainer: pl.Trainer) -> set[str]:
    """Our keys watched (``monitor=``) by a callback of the trainer, as EarlyStopping and
    ModelCheckpoint do, or by a learning-rate scheduler (ReduceLROnPlateau's ``"monitor"`` in
    ``configure_optimizers``)."""
    watched = {getattr(callback, "monitor", None) for callback in trainer.callbacks}
    watched |= {getattr(config, "monitor", None) for config in getattr(trainer, "lr_scheduler_configs", [])}
    return {key for key in watched if isinstance(key, str) and is_hessdiag_tag(key)}


def publish(trainer: pl.Trainer, latest: Mapping[str, float]) -> None:
    """Put the latest values (host floats already read back, so no host sync) in
    ``trainer.callback_metrics`` as 0-d float32 CPU tensors: those of :func:`is_callback_metric`,
    and any other of our values a callback watches (``hessdiag/sharpness``, say). A value of the
    checks keeps its last check's value there until the next check."""
    watched = watched_keys(trainer)
    for tag, value in latest.items():
        if is_callback_metric(tag) or tag in watched:
            trainer.callback_metrics[tag] = torch.tensor(value, dtype=torch.float32)


def watched_by_another_callback(trainer: pl.Trainer) -> bool:
    """Whether one of our values is watched by a callback of the trainer (see :func:`watched_keys`):
    each reads the key at its first epoch end."""
    return bool(watched_keys(trainer))


def watches_curvature(trainer: pl.Trainer) -> bool:
    """Whether a watched value of ours exists only once a curvature check ran (not a flag, nor a
    per-step statistic that the first read-back gives)."""
    return any(not key.startswith(FLAGS_PREFIX) and key not in (GRAD_NORM, LOSS) for key in watched_keys(trainer))


def first_values(monitor: Monitor, batch: Any, outcome: StepOutcome, check: bool) -> list[FlagEvent]:
    """A read-back, and with `check` a curvature check on `batch`, now, out of cadence, unless this
    step's `outcome` already holds them. For the first optimizer step of a fit in which another
    callback watches one of our values (`check`: one that only a check gives, see
    :func:`watches_curvature`): without them, a watcher that reads the key before the first check (an
    epoch shorter than `check_every`) stops the run: Lightning's ModelCheckpoint and EarlyStopping
    raise on a missing key. Returns the new flag events."""
    events = [] if outcome.read_back else monitor.read_back()
    if check and outcome.reading != "check" and monitor.checks_enabled:  # not with check_every=0
        events += monitor.check_curvature(batch)
    return events


def show_in_progress_bar(trainer: pl.Trainer, lambda_max: float, active_flags: int) -> None:
    """Show the last check's lambda_max and the number of active flags in the progress bar (not in
    the loggers, which get them from the writers).

    Host numbers go straight into ``trainer.progress_bar_metrics``, the dict the progress bar reads:
    ``pl_module.log`` would turn them into device tensors that Lightning reads back at every step
    (a host-device synchronisation per value and step on a GPU)."""
    trainer.progress_bar_metrics["λmax"] = float(lambda_max)
    trainer.progress_bar_metrics["flags"] = int(active_flags)
