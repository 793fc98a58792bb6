"""The "auto" schedule with tracking readings: which reading is a full check, how far apart readings
are, what happens when nothing can be tracked, and a resume from a checkpoint saved before tracking."""

import math

import pytest
import torch

from hessdiag.check import schedule as schedule_module
from hessdiag.check.schedule import TRACKING_SHARE, CheckSchedule

CPU = torch.device("cpu")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(schedule_module.time, "perf_counter", fake)
    return fake


class Run:
    """A training loop of `step_seconds` steps that takes each due reading of the kind the schedule
    asks for (full checks of `check_seconds`, tracking readings of `tracking_seconds`), as the
    Monitor does; the readings' own time passes on the clock but is not training time."""

    def __init__(self, clock, schedule, step_seconds=0.01, check_seconds=2.0, tracking_seconds=0.05):
        self.clock, self.schedule = clock, schedule
        self.step_seconds, self.check_seconds, self.tracking_seconds = step_seconds, check_seconds, tracking_seconds
        self.step = 0
        self.readings: list[tuple[int, str]] = []
        self.spent = 0.0

    def until(self, last_step):
        while self.step < last_step:
            self.step += 1
            self.clock.now += self.step_seconds
            self.schedule.step_finished()
            if self.schedule.due(self.step):
                self.read()
        return self

    def read(self):
        kind = self.schedule.kind(CPU)
        seconds = self.check_seconds if kind == "check" else self.tracking_seconds
        self.clock.now += seconds
        self.spent += seconds
        if kind == "check":
            self.schedule.check_finished(self.step, seconds, CPU)
        else:
            self.schedule.tracking_finished(self.step, seconds, CPU)
        self.readings.append((self.step, kind))

    def steps_of(self, kind):
        return [step for step, seen in self.readings if seen == kind]


def test_the_first_reading_is_a_full_check_and_the_early_ones_track_while_it_is_paid_back(clock):
    run = Run(clock, CheckSchedule("auto", overhead_budget=0.05)).until(200)
    # A 2 s check against 10 ms steps: 4000 steps' worth of budget before another one fits.
    assert run.readings == [(10, "check"), (20, "tracking"), (40, "tracking"), (80, "tracking"), (160, "tracking")]


def test_after_the_early_readings_tracking_spaces_readings_by_its_cost_over_its_share_of_the_budget(clock):
    schedule = CheckSchedule("auto", overhead_budget=0.05, min_interval=100)
    run = Run(clock, schedule).until(160)
    expected = math.ceil(0.05 / (TRACKING_SHARE * 0.05 * 0.01))  # 167 steps for 50 ms readings
    assert schedule.interval == pytest.approx(expected, abs=1)  # float rounding of the fake clock
    run.until(2000)
    gaps = {b - a for a, b in zip(run.steps_of("tracking")[3:], run.steps_of("tracking")[4:])}
    assert gaps == {schedule.interval}
    # A cheap reading is never taken more often than every `min_interval` steps.
    cheap = CheckSchedule("auto", overhead_budget=0.05, min_interval=100)
    Run(clock, cheap, tracking_seconds=1e-4).until(200)
    assert cheap.interval == 100
    # A dear one gets the spacing its cost needs: 0.3 s / (0.6 * 5% * 10 ms) = 1000 steps.
    dear = CheckSchedule("auto", overhead_budget=0.05, min_interval=100)
    Run(clock, dear, tracking_seconds=0.3).until(200)
    assert dear.interval == pytest.approx(1000, abs=1)


def test_full_checks_come_back_when_the_whole_budget_pays_for_them_in_advance(clock):
    schedule = CheckSchedule("auto", overhead_budget=0.05)
    run = Run(clock, schedule).until(100_000)  # 1000 s of training: 50 s of budget
    checks = run.steps_of("check")
    assert checks[0] == 10 and len(checks) > 3
    # Each full check started only once the spending so far plus that check fit within the budget.
    spent, tracking_readings = 0.0, 0
    for step, kind in run.readings:
        if kind == "check":
            assert spent + 2.0 <= 0.05 * 0.01 * step + 1e-9 or step == 10, (step, spent)
            spent += 2.0
        else:
            spent += 0.05
            tracking_readings += 1
    assert run.spent <= 0.05 * 0.01 * run.step + 1e-9  # the overhead stays within the budget
    # The full checks take what the tracking readings leave: none is skipped that the budget could pay.
    assert run.spent + 2.0 > 0.05 * 0.01 * (run.step - schedule.interval)
    assert tracking_readings * 0.05 <= TRACKING_SHARE * 0.05 * 0.01 * run.step + 0.05 * 5


def test_without_anything_to_track_every_reading_is_a_full_check_spaced_to_pay_in_advance(clock):
    schedule = CheckSchedule("auto", overhead_budget=0.05, min_interval=100)
    run = Run(clock, schedule).until(400)
    assert run.readings[-1][1] == "tracking"
    schedule.tracking_unavailable()  # the Monitor's reading found nothing to track
    assert schedule.kind(CPU) == "check"
    step = schedule.next_check
    run.until(step)
    assert run.readings[-1] == (step, "check")
    # Pay in advance: the next check once everything spent and one more check fit in 5% of the steps.
    expected = math.ceil((run.spent + 2.0) / (0.05 * 0.01) - schedule.state_dict()["steps_timed"])
    assert schedule.interval == pytest.approx(expected, abs=2) and schedule.interval > 1000
    run.until(step + 3 * schedule.interval)
    assert {kind for at, kind in run.readings if at > step} == {"check"}
    # A tracking reading that works again brings the tracking spacing back.
    schedule.tracking_finished(run.step, 0.05, CPU)
    assert schedule.tracking and schedule.interval == pytest.approx(167, abs=1)


def test_a_fixed_cadence_always_takes_full_checks(clock):
    run = Run(clock, CheckSchedule(25)).until(100)
    assert run.readings == [(25, "check"), (50, "check"), (75, "check"), (100, "check")]


def old_auto_checkpoint():
    """An "auto" schedule's state saved before tracking readings existed: its checks spaced by their
    cost alone, the next one 24000 steps after the last, at step 160."""
    return {
        "check_every": "auto", "interval": 24000, "next_check": 24160, "failures": 0, "checks_done": 5,
        "recent_step_seconds": [0.01] * 150, "steps_timed": 150, "check_seconds": 10.0, "last_check_seconds": 2.0,
    }  # fmt: skip


def test_a_resume_from_a_checkpoint_saved_before_tracking_reads_within_min_interval(clock):
    schedule = CheckSchedule("auto", min_interval=100)
    schedule.load_state_dict(old_auto_checkpoint())
    assert schedule.next_check == 260  # the last check at 160, then min_interval
    assert schedule.tracking and schedule.kind(CPU) == "tracking"  # its checks' cost is not paid back yet
    # A checkpoint with the tracking state keeps its cadence, and round-trips.
    run = Run(clock, CheckSchedule("auto", min_interval=100)).until(400)
    saved = run.schedule.state_dict()
    assert "last_tracking_seconds" in saved and "tracking" in saved
    restored = CheckSchedule("auto", min_interval=100)
    restored.load_state_dict(saved)
    assert restored.state_dict() == saved and restored.next_check == run.schedule.next_check
    # An old checkpoint with its next check already within min_interval keeps it.
    near = old_auto_checkpoint() | {"interval": 50, "next_check": 210}
    schedule = CheckSchedule("auto", min_interval=100)
    schedule.load_state_dict(near)
    assert schedule.next_check == 210
