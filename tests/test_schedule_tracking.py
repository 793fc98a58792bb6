"""The "auto" schedule with tracking readings: which reading is a full check (the first one bought by
a verdict that needs it, otherwise paid for in advance by the budget), how far apart readings are,
and a resume from a checkpoint saved before tracking."""

import math

import pytest
import torch

from hessdiag.check import schedule as schedule_module
from hessdiag.check.schedule import FIRST_CHECK_ESTIMATE, PLANNED_SHARE, READINGS_MIN_SHARE, TRACKING_SHARE, CheckSchedule

#: The budget the schedules below plan to spend: 5% less the schedule's margin (4.5%).
PLANNED = 0.05 * PLANNED_SHARE

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
    Monitor does; the readings' own time passes on the clock but is not training time.
    `verdict(step)`: whether a detector needs a full check at that step (the saddle rule on a stall).
    `statistics_seconds`: the per-step statistics' time, timed by the schedule inside each step.
    `tracking_seconds`: seconds, or a function of the step."""

    def __init__(
        self,
        clock,
        schedule,
        step_seconds=0.01,
        check_seconds=2.0,
        tracking_seconds=0.05,
        verdict=lambda step: False,
        statistics_seconds=0.0,
    ):
        self.clock, self.schedule, self.verdict = clock, schedule, verdict
        self.step_seconds, self.check_seconds, self.tracking_seconds = step_seconds, check_seconds, tracking_seconds
        self.statistics_seconds = statistics_seconds
        self.step = 0
        self.readings: list[tuple[int, str]] = []
        self.spent = 0.0

    def until(self, last_step):
        while self.step < last_step:
            self.step += 1
            self.clock.now += self.step_seconds
            with self.schedule.statistics_time():
                self.clock.now += self.statistics_seconds
            self.schedule.step_finished()
            if self.schedule.due(self.step):
                self.read()
        return self

    def read(self):
        kind = self.schedule.kind(CPU, self.verdict(self.step))
        tracking = self.tracking_seconds(self.step) if callable(self.tracking_seconds) else self.tracking_seconds
        seconds = self.check_seconds if kind == "check" else tracking
        self.clock.now += seconds
        self.spent += seconds
        if kind == "check":
            self.schedule.check_finished(self.step, seconds, CPU)
        else:
            self.schedule.tracking_finished(self.step, seconds, CPU)
        self.readings.append((self.step, kind))

    def steps_of(self, kind):
        return [step for step, seen in self.readings if seen == kind]


EARLY = [10, 40, 160]

#: Steps after which the early readings are paid back in every case below: the spacing is then the
#: steady one, set by a tracking reading's cost.
PAID_BACK = 20_000


def test_the_first_readings_track_and_draw_a_line_early(clock):
    run = Run(clock, CheckSchedule("auto", overhead_budget=0.05)).until(200)
    # A first full check, estimated as 30 readings of 50 ms, is 3000 steps' worth of budget away.
    assert run.readings == [(step, "tracking") for step in EARLY]


def test_a_verdict_that_needs_a_full_check_buys_the_run_s_first_one_at_once(clock):
    run = Run(clock, CheckSchedule("auto", overhead_budget=0.05), verdict=lambda step: True).until(200)
    # The first reading is a full check whatever it costs; the later ones wait for the budget again.
    assert run.readings == [(10, "check"), (40, "tracking"), (160, "tracking")]
    # A stall that shows later buys the first full check at the reading where it shows.
    run = Run(clock, CheckSchedule("auto", overhead_budget=0.05), verdict=lambda step: step >= 40).until(200)
    assert run.readings == [(10, "tracking"), (40, "check"), (160, "tracking")]


def test_after_the_early_readings_tracking_pays_them_back_then_spaces_readings_by_its_cost(clock):
    schedule = CheckSchedule("auto", overhead_budget=0.05, min_interval=100)
    run = Run(clock, schedule).until(160)
    # The three early readings (150 ms) are more than the 159 steps timed by then pay for (4.5% of 10 ms
    # each): the next waits until they are paid back, longer than the steady spacing below.
    assert schedule.interval == math.ceil((0.15 - PLANNED * 0.01 * 159) / (PLANNED * 0.01)) == 175
    run.until(3000)
    expected = math.ceil(0.05 / (TRACKING_SHARE * PLANNED * 0.01))  # 149 steps for 50 ms readings
    late = [step for step in run.steps_of("tracking") if step >= 1000]
    assert run.steps_of("check") == [] and {b - a for a, b in zip(late, late[1:])} == {schedule.interval}
    assert schedule.interval == pytest.approx(expected, abs=1)  # float rounding of the fake clock
    assert run.spent <= PLANNED * 0.01 * run.step  # paid back: within the planned budget of the steps
    # A cheap reading is never taken more often than every `min_interval` steps.
    cheap = CheckSchedule("auto", overhead_budget=0.05, min_interval=100)
    Run(clock, cheap, tracking_seconds=1e-4, check_seconds=1e-4).until(200)
    assert cheap.interval == 100
    # A dear one gets the spacing its cost needs: 0.3 s / (0.75 * 4.5% * 10 ms) = 889 steps, once paid back.
    dear = CheckSchedule("auto", overhead_budget=0.05, min_interval=100)
    Run(clock, dear, tracking_seconds=0.3).until(PAID_BACK)
    assert dear.interval == pytest.approx(889, abs=1)


def test_the_first_full_check_waits_until_the_whole_budget_pays_for_it_in_advance(clock):
    schedule = CheckSchedule("auto", overhead_budget=0.05)
    run = Run(clock, schedule).until(100_000)  # 1000 s of training: 50 s of budget
    checks = run.steps_of("check")
    # The first: 1.5 s estimated plus the readings so far fit in 4.5% of the steps of 10 ms so far.
    assert len(checks) > 3 and checks[0] > 8000
    # A reading is a full check exactly when the spending so far plus that check (estimated as the last
    # check, or as FIRST_CHECK_ESTIMATE tracking readings before the first) fits within the budget
    # of the steps timed so far (each step but the first).
    spent, last_check, tracking_readings = 0.0, 0.0, 0
    for step, kind in run.readings:
        estimate = last_check or FIRST_CHECK_ESTIMATE * 0.05
        fits = spent + estimate <= PLANNED * 0.01 * (step - 1)
        assert (kind == "check") == fits or abs(spent + estimate - PLANNED * 0.01 * (step - 1)) < 1e-9, (step, spent)
        if kind == "check":
            spent, last_check = spent + 2.0, 2.0
        else:
            spent, tracking_readings = spent + 0.05, tracking_readings + 1
    assert run.spent <= PLANNED * 0.01 * run.step + 1e-9  # the overhead stays within the planned budget
    assert tracking_readings * 0.05 <= TRACKING_SHARE * PLANNED * 0.01 * run.step + 0.05 * 5
    # A cheap tracking reading makes the first full check cheap to estimate: it comes early.
    cheap = Run(clock, CheckSchedule("auto", overhead_budget=0.05), tracking_seconds=1e-4).until(200)
    assert cheap.readings[:2] == [(10, "tracking"), (40, "check")]  # 3 ms estimated <= 4.5% of 39 steps


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
    assert schedule.kind(CPU) == "tracking"  # its checks' cost is not paid back yet
    assert schedule.kind(CPU, True) == "tracking"  # a verdict buys the run's first check only: it had five
    # A checkpoint with the tracking state keeps its cadence, and round-trips.
    run = Run(clock, CheckSchedule("auto", min_interval=100)).until(400)
    saved = run.schedule.state_dict()
    assert "last_tracking_seconds" in saved
    restored = CheckSchedule("auto", min_interval=100)
    restored.load_state_dict(saved)
    assert restored.state_dict() == saved and restored.next_check == run.schedule.next_check
    # An old checkpoint with its next check already within min_interval keeps it.
    near = old_auto_checkpoint() | {"interval": 50, "next_check": 210}
    schedule = CheckSchedule("auto", min_interval=100)
    schedule.load_state_dict(near)
    assert schedule.next_check == 210


@pytest.mark.parametrize("statistics_share", [0.0, 0.01, 0.02])
def test_the_per_step_statistics_are_paid_from_the_budget_before_the_readings(clock, statistics_share):
    """Statistics that add `statistics_share` to each 10 ms step leave the readings the rest of the
    planned 4.5%: tracking readings spaced by that rest, and the whole overhead (statistics, early
    readings, tracking readings, full checks) within 5% of the training time over a long run."""
    schedule = CheckSchedule("auto", overhead_budget=0.05, max_interval=10_000)  # the budget alone spaces them
    run = Run(clock, schedule, statistics_seconds=statistics_share * 0.01).until(1000)
    expected = 0.05 / (TRACKING_SHARE * (PLANNED - statistics_share) * 0.01)
    assert schedule.interval == pytest.approx(math.ceil(expected), abs=1)
    run.until(100_000)
    training = 100_000 * 0.01
    overhead = run.spent + 100_000 * statistics_share * 0.01
    assert overhead <= PLANNED * training
    assert overhead >= 0.04 * training  # and the budget is used: full checks come where it pays
    assert run.steps_of("check")


def test_statistics_that_take_most_of_the_budget_leave_the_readings_their_least_share(clock):
    """Statistics of 4% of each step (steps of a few milliseconds) would leave the readings 0.5%: they
    keep READINGS_MIN_SHARE of the planned budget instead (the curvature goes on; the whole overhead
    exceeds 5%)."""
    schedule = CheckSchedule("auto", overhead_budget=0.05)
    Run(clock, schedule, statistics_seconds=0.04 * 0.01, tracking_seconds=0.2).until(PAID_BACK)
    expected = 0.2 / (TRACKING_SHARE * READINGS_MIN_SHARE * PLANNED * 0.01)  # 1186 steps
    assert schedule.interval == pytest.approx(math.ceil(expected), abs=1)


@pytest.mark.parametrize(
    ("statistics_share", "tracking_seconds", "interval"),
    [
        (0.04, 0.05, 250),  # 297 steps by the readings' budget; 250 keeps tracking alone at 2% of 4.5%
        (0.03, 0.11, 250),  # 652 by the readings' budget; at 250 tracking alone takes 4.4% of 4.5%
        (0.03, 0.12, 712),  # at 250 tracking alone would take 4.8%: the budgeted spacing stands
        (0.0, 0.05, 149),  # within max_interval already
    ],
)
def test_a_reading_comes_at_least_every_max_interval_steps_while_tracking_alone_fits_the_budget(
    clock, statistics_share, tracking_seconds, interval
):
    schedule = CheckSchedule("auto", overhead_budget=0.05)
    Run(clock, schedule, statistics_seconds=statistics_share * 0.01, tracking_seconds=tracking_seconds).until(PAID_BACK)
    assert schedule.max_interval == 250
    assert schedule.interval == pytest.approx(interval, abs=1)


def test_one_slow_reading_does_not_stop_the_curve(clock):
    """A tracking reading that costs ten times the others (a cold one after the trainable parameters
    changed, a stall of the machine) leaves the spacing as it was: the median of the last five
    readings' costs sets it, not the last one's (which would space the next 9,778 steps away here)."""
    schedule = CheckSchedule("auto", overhead_budget=0.05)
    run = Run(clock, schedule, statistics_seconds=0.03 * 0.01, tracking_seconds=0.11).until(PAID_BACK)
    assert schedule.interval == 250
    slow = run.steps_of("tracking")[-1] + 250
    run.tracking_seconds = lambda step: 1.1 if step == slow else 0.11
    run.until(PAID_BACK + 5000)
    late = [step for step in run.steps_of("tracking") if step >= slow]
    assert late[0] == slow and {b - a for a, b in zip(late, late[1:])} == {250} and late[-1] > PAID_BACK + 4750
    # Readings that stay dear are the typical cost after three of them: the budget spaces them again.
    run.tracking_seconds = 1.1
    run.until(PAID_BACK + 30_000)
    assert schedule.interval > 5000
