"""What a Monitor's checkpoint holds: each part's state under its key, and the defaults that a
checkpoint written before a key existed restores (so an older run resumes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hessdiag.check.probe import CurvatureProbe
from hessdiag.monitor.detection import Detection
from hessdiag.noise.sources import NoiseSources
from hessdiag.steps.statistics import StepStatistics
from hessdiag.check.schedule import CheckSchedule


def monitor_state(
    step: int,
    schedule: CheckSchedule,
    probe: CurvatureProbe | None,
    detection: Detection,
    statistics: StepStatistics,
    noise: NoiseSources,
) -> dict[str, Any]:
    """The checkpoint of a Monitor at optimizer step `step` (primitives and tensors)."""
    return {
        "step": step,
        "schedule": schedule.state_dict(),
        "probe": probe.state_dict() if probe is not None else {},
        **detection.state_dict(),  # "detectors" and "events"
        "overflow_skips": statistics.overflow_skips,
        "rank_noise_scale": noise.ranks.state_dict(),
    }


def restore_monitor_state(
    state: Mapping[str, Any],
    schedule: CheckSchedule,
    probe: CurvatureProbe | None,
    detection: Detection,
    statistics: StepStatistics,
    noise: NoiseSources,
) -> int:
    """Hand each part its state of :func:`monitor_state`'s `state`; returns the optimizer step."""
    step = int(state.get("step", 0))
    schedule.load_state_dict(state.get("schedule", {}))
    statistics.load_state_dict({"overflow_skips": state.get("overflow_skips", 0)})
    if probe is not None:
        probe.load_state_dict(state.get("probe", {}))
    noise.ranks.load_state_dict(state.get("rank_noise_scale", {}))
    detection.load_state_dict(state)
    return step
