"""Runs the curvature checks through the probe: the out-of-memory retry, and the history of checks.

Out of memory, a check is retried twice, each time on half the samples, starting cold; the size that
fitted is kept for the next checks. The probe is asked to change itself (``shrink_sub_batch``,
``forget_warm_start``): the runner never writes its attributes. A check that still fails is the
caller's to report (:meth:`CheckRunner.failed` keeps it and backs the schedule off).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hessdiag.isolation import unwrap_model
from hessdiag.batches import sub_batch_base
from hessdiag.check.probe import CurvatureProbe
from hessdiag.check.record import CurvatureCheck
from hessdiag.check.tracking import TrackingReading
from hessdiag.detectors import CheckRecord, TrackingRecord
from hessdiag.errors import HessdiagError
from hessdiag.noise.noise_scale import NoiseScaleEstimate
from hessdiag.operator import PRECISION_FLOOR, is_coarse
from hessdiag.monitor.faults import FaultPolicy
from hessdiag.check.schedule import CheckSchedule

#: Tries of one check: the first, then two on half the samples each.
ATTEMPTS = 3


def is_out_of_memory(error: BaseException) -> bool:
    """A device (or host) allocation failed: worth a retry on fewer samples."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


class CheckRunner:
    """Curvature checks of `probe` with the out-of-memory retry, and what became of them.

    Args:
        model: the network (its parameters' dtype sets the precision warning).
        probe: runs one check.
        schedule: told how long each check took, and of each failure (it backs off).
        faults: reports the retry and the precision problem once; with ``strict`` nothing is retried.

    Attributes:
        checks: the checks that succeeded, in order.
        readings: the tracking readings between them, in order.
        failed_checks: ``(step, reason)`` of each check (or reading) that failed.
    """

    def __init__(self, model: nn.Module, probe: CurvatureProbe, schedule: CheckSchedule, faults: FaultPolicy) -> None:
        self.model = model
        self.probe = probe
        self.schedule = schedule
        self._faults = faults
        self.checks: list[CurvatureCheck] = []
        self.readings: list[TrackingReading] = []
        self.failed_checks: list[tuple[int, str]] = []

    def run(
        self,
        step: int,
        batch: Any,
        optimizer: torch.optim.Optimizer | None,
        device: torch.device,
        noise: NoiseScaleEstimate | None = None,
        bottom: bool = True,
    ) -> CurvatureCheck:
        """One check on `batch` at `step`, kept in :attr:`checks`; raises the error of the last try
        when none succeeded. `device`: where the schedule times the check; `noise`: the step's
        noise-scale estimate measured elsewhere; `bottom`: measure the bottom end too (see
        :meth:`CurvatureProbe.run`)."""
        check = self._run(step, batch, optimizer, noise, bottom)
        self.checks.append(check)
        self.schedule.check_finished(step, check.seconds, device)
        return check

    def track(self, step: int, batch: Any, optimizer: torch.optim.Optimizer | None, device: torch.device) -> TrackingReading:
        """A tracking reading at `step`, kept in :attr:`readings`. Out of memory it is not retried:
        the error is raised for :meth:`failed`."""
        reading = self.probe.track(step, batch, optimizer)
        self.readings.append(reading)
        self.schedule.tracking_finished(step, reading.seconds, device)
        return reading

    def failed(self, step: int, error: BaseException) -> str:
        """Keep a failed check, back the schedule off and warn once per kind of error; returns the message."""
        self.schedule.check_failed(step)
        kind = type(error).__name__
        expected = isinstance(error, (HessdiagError, ValueError, RuntimeError))
        message = (
            f"hessdiag: the curvature check at step {step} failed ({kind}: {error}). Training continues; "
            f"the next check is at step {self.schedule.next_check}."
        )
        self._faults.warn_once(kind if expected else "unexpected", message)
        self.failed_checks.append((step, f"{kind}: {error}"))
        return message

    def no_check_message(self, steps: int) -> str:
        """Why a run of `steps` steps has no curvature (for the end of training)."""
        if self.failed_checks:
            last_step, reason = self.failed_checks[-1]
            return (
                f"hessdiag: no curvature check succeeded in these {steps} steps: {len(self.failed_checks)} "
                f"failed, the last at step {last_step} ({reason})."
            )
        return (
            f"hessdiag: no curvature check ran in these {steps} steps (the first was due at step "
            f"{self.schedule.next_check}). Lower `check_every`, or train longer, to see curvature."
        )

    def _run(
        self, step: int, batch: Any, optimizer: torch.optim.Optimizer | None, noise: NoiseScaleEstimate | None,
        bottom: bool,
    ) -> CurvatureCheck:  # fmt: skip
        sub_batch = None
        for attempt in range(ATTEMPTS):
            try:
                check = self.probe.run(step, batch, optimizer, sub_batch=sub_batch, noise=noise, bottom=bottom)
            except Exception as error:
                if self._faults.strict or not is_out_of_memory(error) or attempt == ATTEMPTS - 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                sub_batch = max(1, (sub_batch or self.probe.sub_batch or sub_batch_base(batch) or 2) // 2)
                self._faults.warn_once("oom", f"Out of memory in a curvature check; retrying on {sub_batch} samples.")
                self.probe.forget_warm_start()
                continue
            if sub_batch is not None:  # keep the size that fits for the next checks
                self.probe.shrink_sub_batch(sub_batch)
            return check
        raise AssertionError("unreachable: the last try returns or raises")

    def warn_low_precision(self, tol: float) -> None:
        """bfloat16/float16 parameters: every product carries the dtype's rounding, which the proven
        bounds include, so a `tol` below its floor cannot be proven; the checks raise it to the floor
        (each check's `tol` says so). Looked at on construction and at each check (Lightning's
        "bf16-true" converts the model after setup)."""
        coarse = {p.dtype for p in unwrap_model(self.model).parameters() if p.requires_grad and is_coarse(p.dtype)}
        if not coarse:
            return
        eps = max(torch.finfo(dtype).eps for dtype in coarse)
        if tol < PRECISION_FLOOR * eps:
            self._faults.warn_once(
                "low precision",
                f"hessdiag: the model's parameters are {sorted(map(str, coarse))}: each Hessian-vector product carries "
                f"their rounding (about {eps:.1g} of ||H||), which the proven bounds include, so `tol`={tol:g} cannot be "
                f"proven: the checks use {PRECISION_FLOOR * eps:.2g} instead. Keep float32 parameters under autocast "
                "(the checks then run in float32) for a tighter tolerance.",
            )


def tracking_record(reading: TrackingReading) -> TrackingRecord:
    """What the detectors see of a tracking reading: lower bounds."""
    return TrackingRecord(reading.step, reading.lambda_max_lower_bound, reading.sharpness_lower_bound, reading.stability_threshold)


def check_record(check: CurvatureCheck) -> CheckRecord:
    """What the detectors see of a check."""
    return CheckRecord(
        step=check.step,
        loss=check.loss,
        grad_norm=check.grad_norm,
        lambda_max=check.lambda_max,
        lambda_min=check.lambda_min,
        negative_curvature_certified=check.negative_curvature_certified,
        loss_change_along_bottom=check.loss_change_along_bottom,
        sharpness=check.sharpness,
        stability_threshold=check.stability.threshold if check.stability is not None else None,
        top_module=check.top_shares[0][0] if check.top_shares else None,
        top_module_share=check.top_shares[0][1] if check.top_shares else None,
        top_module_lambda_max=check.module_sharpness[0].lambda_max if check.module_sharpness else None,
    )
