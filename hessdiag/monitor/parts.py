"""What the Monitor is built from: its arguments validated, its curvature probe from the settings, and its
parts wired together (each part gets the fault policy; the writers learn the flags before the first
read-back)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hessdiag.isolation import unwrap_model
from hessdiag.check.probe import CurvatureProbe
from hessdiag.monitor.check_runner import CheckRunner
from hessdiag.monitor.readings import CurvatureReadings
from hessdiag.monitor.detection import Detection
from hessdiag.monitor.faults import FaultPolicy
from hessdiag.noise.sources import NoiseSources
from hessdiag.monitor.reporting import CheckReporting
from hessdiag.steps.statistics import StepStatistics
from hessdiag.reporting.writers import WriterFanOut, resolve_writers
from hessdiag.operator import LossFn
from hessdiag.check.schedule import CheckSchedule
from hessdiag.settings import DiagnosticsSettings, resolve_detectors


def validate_arguments(
    model: Any, loss_fn: Any, optimizer: Any, grad_scaler: Any, *, curvature: bool
) -> None:
    """ValueError naming the first argument that is not what the Monitor needs."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if curvature and loss_fn is None:
        raise ValueError("`loss_fn` is required for curvature checks (or set `check_every=0`).")
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"`loss_fn` must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}.")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    if grad_scaler is not None and not callable(getattr(grad_scaler, "is_enabled", None)):
        raise ValueError(f"`grad_scaler` must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}.")


def probe_from_settings(
    model: nn.Module, loss_fn: LossFn, settings: DiagnosticsSettings, params: Iterable[torch.Tensor] | None
) -> CurvatureProbe:
    """The curvature probe that `settings` describe, over `params` (default: all trainable ones)."""
    return CurvatureProbe(model, loss_fn, settings, params=params)


@dataclass(frozen=True)
class MonitorParts:
    """The parts a Monitor conducts (`probe`, `runner` and `readings` None without a `loss_fn`)."""

    schedule: CheckSchedule
    faults: FaultPolicy
    writers: WriterFanOut
    statistics: StepStatistics
    probe: CurvatureProbe | None
    runner: CheckRunner | None
    noise: NoiseSources
    detection: Detection
    reporting: CheckReporting
    readings: CurvatureReadings | None


def build_parts(
    model: nn.Module,
    loss_fn: LossFn | None,
    settings: DiagnosticsSettings,
    *,
    optimizer: torch.optim.Optimizer | None,
    writer: Any,
    params: Iterable[torch.Tensor] | None,
    detectors: Sequence[Any] | None,
    grad_scaler: torch.amp.GradScaler | None,
    current_step: Callable[[], int],
) -> MonitorParts:
    """The Monitor's parts for these arguments, validated first (ValueError naming a bad one);
    `current_step`: the Monitor's optimizer step, for the messages."""
    schedule = CheckSchedule(settings.check_every, settings.overhead_budget)
    validate_arguments(model, loss_fn, optimizer, grad_scaler, curvature=schedule.enabled)
    faults = FaultPolicy(strict=settings.strict, current_step=current_step)
    writers = WriterFanOut(resolve_writers(writer), faults)
    statistics = StepStatistics(model, track_updates=settings.update_ratios, grad_scaler=grad_scaler, faults=faults)
    probe = probe_from_settings(model, loss_fn, settings, params) if loss_fn is not None else None
    runner = CheckRunner(model, probe, schedule, faults) if probe is not None else None
    chosen = probe.params if probe is not None else None  # the checks' parameters
    noise = NoiseSources(lambda: chosen or list(unwrap_model(model).parameters()))
    detection = Detection(resolve_detectors(detectors), faults)
    writers.remember(detection.flag_scalars())  # the flags exist from the start
    reporting = CheckReporting(writers, detection, noise, faults, current_step)
    readings = None
    if runner is not None:
        # the device read at each reading: Lightning moves the model after the Monitor is built
        readings = CurvatureReadings(
            runner, reporting, schedule, detection, noise, faults, settings, lambda: statistics.device
        )
        if schedule.enabled:
            runner.warn_low_precision(settings.tol)
    return MonitorParts(schedule, faults, writers, statistics, probe, runner, noise, detection, reporting, readings)
