"""When checks run: fixed cadence, a share of the wall time, back-off after failures."""

import pytest
import torch

from hessdiag.check import schedule as schedule_module
from hessdiag.check.schedule import CheckSchedule


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


def test_without_tracking_auto_draws_a_line_early_then_spaces_checks_to_the_overhead_budget(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(schedule_module.time, "perf_counter", clock)
    s = CheckSchedule("auto", overhead_budget=0.05, min_interval=100)
    s.tracking_unavailable()  # nothing to track (no Ritz vectors): every reading is a full check
    cpu = torch.device("cpu")
    early, step = [], 0
    while len(early) < 5:  # steps of 10 ms, checks of 2 s: far over budget, yet a short run sees a line
        _run_steps(clock, s, 1)
        step += 1
        if s.due(step):
            early.append(step)
            clock.now += 2.0
            s.check_finished(step, 2.0, cpu)
    assert early == [10, 20, 40, 80, 160]
    # Then the budget: the five checks so far and the next one (12 s) are 5% of 240 s of steps.
    assert s.interval == pytest.approx(24000 - 159, abs=2) and s.next_check == 160 + s.interval
    _run_steps(clock, s, s.interval)
    s.check_finished(s.next_check, 0.001, cpu)  # a cheap check: never more often than min_interval
    assert s.interval == 100


def test_without_tracking_auto_overhead_stays_within_budget_over_a_long_run(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(schedule_module.time, "perf_counter", clock)
    s = CheckSchedule("auto", overhead_budget=0.05)
    s.tracking_unavailable()
    check_seconds = 0.0
    for step in range(1, 200_001):
        _run_steps(clock, s, 1)
        if s.due(step):
            check_seconds += 1.0
            s.check_finished(step, 1.0, torch.device("cpu"))
    assert check_seconds / (200_000 * 0.01) <= 0.05


def test_single_early_check():
    s = CheckSchedule("auto", early_checks=1)
    s.check_finished(10, 0.0, torch.device("cpu"))  # no step timed yet: the floor applies
    assert s.next_check == 110


def test_pauses_between_steps_are_not_training_time(monkeypatch):
    """A 60 s validation loop between steps must not buy the checks 3 s more: the step time is the
    median gap, not the mean, so the interval is the same as without the pause."""
    clock = FakeClock()
    monkeypatch.setattr(schedule_module.time, "perf_counter", clock)
    s = CheckSchedule("auto", overhead_budget=0.05, min_interval=100, early_checks=1)
    s.tracking_unavailable()
    for step in range(100):
        clock.now += 60.0 if step == 50 else 0.01
        s.step_finished()
    s.check_finished(100, 2.0, torch.device("cpu"))
    assert s.interval == pytest.approx(7901, abs=1)  # float rounding of the fake clock


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
