"""When checks run: fixed cadence, a share of the wall time, back-off after failures."""

import math

import pytest
import torch

from hessdiag.check import schedule as schedule_module
from hessdiag.check.schedule import PLANNED_SHARE, TRACKING_SHARE, CheckSchedule

#: The budget the schedules below plan to spend: 5% less the schedule's margin (4.5%).
PLANNED = 0.05 * PLANNED_SHARE


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_fixed_cadence():
    s = CheckSchedule(10)
    assert [step for step in range(1, 35) if s.due(step) and (s.check_finished(step, 1.0, torch.device("cpu")) or True)] == [10, 20, 30]
    assert not CheckSchedule(0).enabled
    assert CheckSchedule(10, first_check=3).next_check == 10  # `first_check` is for "auto" only
    assert CheckSchedule("auto", min_interval=4).next_check == 4  # never later than min_interval


def _run_steps(clock, schedule, steps, seconds=0.01):
    for _ in range(steps):
        clock.now += seconds
        schedule.step_finished()


def test_auto_draws_a_line_early_then_pays_it_back_and_spaces_readings_by_the_tracking_cost(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(schedule_module.time, "perf_counter", clock)
    s = CheckSchedule("auto", overhead_budget=0.05, min_interval=100)
    cpu = torch.device("cpu")
    readings, step = [], 0
    while step < 5000:  # steps of 10 ms, readings of 50 ms: the early ones over budget, yet a short run sees a line
        _run_steps(clock, s, 1)
        step += 1
        if s.due(step):
            readings.append((step, s.kind(cpu)))
            clock.now += 0.05
            s.tracking_finished(step, 0.05, cpu)
    assert readings[:3] == [(10, "tracking"), (40, "tracking"), (160, "tracking")]
    # The early readings cost 150 ms, more than the 159 steps timed by then pay for (4.5% of 10 ms each):
    # the next reading waits until they are paid back ...
    gaps = [b - a for (a, _), (b, _) in zip(readings[2:], readings[3:])]
    assert gaps[0] == math.ceil((0.15 - PLANNED * 0.01 * 159) / (PLANNED * 0.01)) == 175
    # ... then come at the tracking readings' share of the budget: 50 ms / (0.75 * 4.5% * 10 ms) = 149 steps.
    assert abs(gaps[-1] - math.ceil(0.05 / (TRACKING_SHARE * PLANNED * 0.01))) <= 1
    assert len(readings) * 0.05 <= PLANNED * 0.01 * readings[-1][0]  # paid back: within the budget of the steps
    for _ in range(3):  # readings that became cheap (the typical cost: the median of the last five)
        _run_steps(clock, s, s.interval)
        s.tracking_finished(s.next_check, 1e-5, cpu)
    assert s.interval == 100  # never more often than min_interval


@pytest.mark.parametrize(
    ("check_seconds", "tracking_seconds", "verdict", "fewest_checks"),
    [
        (1.0, 0.05, False, 20),  # tracking takes 75 s of the 100 s budget: about 25 one-second checks
        (2.0, 0.01, True, 35),  # cheap readings every min_interval (20 s): about 40 two-second checks
        (0.3, 0.2, False, 200),  # readings every 667 steps, most of them full checks
        (20.0, 0.05, True, 1),  # only the check the verdict bought fits beside the tracking readings
    ],
)
def test_auto_readings_stay_within_the_overhead_budget_over_a_long_run(
    monkeypatch, check_seconds, tracking_seconds, verdict, fewest_checks
):
    """A loop that takes each reading of the kind the schedule asks for (`verdict`: the saddle rule
    wants the bottom end at every reading, as in a stalled run): the readings' total time, full checks
    included, stays within 5% of the 2000 s of training, and full checks keep coming where it pays."""
    clock = FakeClock()
    monkeypatch.setattr(schedule_module.time, "perf_counter", clock)
    s = CheckSchedule("auto", overhead_budget=0.05)
    cpu = torch.device("cpu")
    spent, checks = 0.0, 0
    for step in range(1, 200_001):
        _run_steps(clock, s, 1)
        if s.due(step):
            if s.kind(cpu, verdict) == "check":
                spent, checks = spent + check_seconds, checks + 1
                s.check_finished(step, check_seconds, cpu)
            else:
                spent += tracking_seconds
                s.tracking_finished(step, tracking_seconds, cpu)
    assert spent / (200_000 * 0.01) <= 0.05
    assert checks >= fewest_checks


def test_single_early_check():
    s = CheckSchedule("auto", early_checks=1)
    s.check_finished(10, 0.0, torch.device("cpu"))  # no step timed yet: the floor applies
    assert s.next_check == 110


def test_pauses_between_steps_are_not_training_time(monkeypatch):
    """A 60 s validation loop between steps must not buy the readings more time: the step time is
    the median gap, not the mean, so the interval is the same as without the pause."""
    clock = FakeClock()
    monkeypatch.setattr(schedule_module.time, "perf_counter", clock)
    s = CheckSchedule("auto", overhead_budget=0.05, min_interval=10, early_checks=1)
    for step in range(100):
        clock.now += 60.0 if step == 50 else 0.01
        s.step_finished()
    s.tracking_finished(100, 0.3, torch.device("cpu"))
    # 0.3 s / (0.75 * 4.5% * 10 ms) = 889 steps; the mean gap (0.61 s) would give 15.
    assert s.interval == pytest.approx(889, abs=1)  # float rounding of the fake clock


def test_failures_back_off_exponentially_up_to_16x():
    s = CheckSchedule(5)
    steps = []
    step = 5
    for _ in range(7):
        s.check_failed(step)
        steps.append(s.next_check - step)
        step = s.next_check
    assert steps == [5, 10, 20, 40, 80, 80, 80]
    s.check_finished(step, 0.1, torch.device("cpu"))
    assert s.next_check == step + 5 and s.failures == 0


def test_state_round_trip():
    s = CheckSchedule(7)
    s.check_failed(7)
    restored = CheckSchedule(7)
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict()
    CheckSchedule(7).load_state_dict({})  # old checkpoints without a schedule


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"check_every": "sometimes"}, "`check_every` must be an int >= 0 or 'auto'"),
        ({"check_every": True}, "`check_every` must be an int >= 0 or 'auto'"),
        ({"overhead_budget": 0}, r"`overhead_budget` must be a number in \(0, 1\)"),
        ({"min_interval": 0}, "`min_interval` must be a positive int"),
        ({"max_interval": 50}, r"`max_interval` \(50\) must be at least `min_interval` \(100\)"),
        ({"first_check": 0}, "`first_check` must be a positive int"),
        ({"early_checks": 0}, "`early_checks` must be a positive int"),
    ],
)
def test_bad_arguments(kwargs, match):
    """The settings' own arguments are checked once, by the settings; the schedule's spacing by it."""
    from hessdiag.settings import DiagnosticsSettings

    with pytest.raises(ValueError, match=match):
        if "check_every" in kwargs or "overhead_budget" in kwargs:
            DiagnosticsSettings(**kwargs)
        else:
            CheckSchedule(**kwargs)
