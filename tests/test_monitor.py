"""The Monitor as the adapters use it: built from shared settings, told the step, asked what is due,
routing every record to every detector; and the tag names."""

import re
import time
import dataclasses

import pytest
import torch
from torch import nn

from hessdiag import Monitor
from hessdiag.check.schedule import PLANNED_SHARE
from hessdiag.reporting import tags
from hessdiag.reporting.dashboard import layout
from hessdiag.detectors import CheckRecord, PlateauDetector, StepRecord
from hessdiag.flags import FLAG_NAMES
from hessdiag.settings import DiagnosticsSettings
from loops import one_step


def mse(model, batch):
    return (model(batch[0]) - batch[1]).pow(2).mean()


def regression(n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=generator), torch.randn(n, 1, generator=generator)


def train(make_monitor, steps=12, adopt_step=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = make_monitor(model, optimizer)
    batch = regression()
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss = mse(model, batch)
        loss.backward()
        monitor.after_backward()
        optimizer.step()
        monitor.after_step(batch, loss, step=step if adopt_step else None)
    return monitor


OPTIONS = {"check_every": 4, "log_every": 3, "max_iter": 10, "tol": 1e-4}


def test_from_settings_runs_as_the_keyword_constructor_does():
    by_keywords = train(lambda model, optimizer: Monitor(model, mse, optimizer=optimizer, **OPTIONS))
    by_settings = train(
        lambda model, optimizer: Monitor.from_settings(model, mse, DiagnosticsSettings(**OPTIONS), optimizer=optimizer)
    )
    assert by_settings.settings == by_keywords.settings
    assert [dataclasses.replace(c, seconds=0.0) for c in by_settings.checks] == [
        dataclasses.replace(c, seconds=0.0) for c in by_keywords.checks
    ]
    assert {k: v for k, v in by_settings.latest.items() if "seconds" not in k} == {
        k: v for k, v in by_keywords.latest.items() if "seconds" not in k
    }


def test_an_adopted_step_is_the_counted_one():
    counted = train(lambda model, optimizer: Monitor(model, mse, optimizer=optimizer, **OPTIONS))
    adopted = train(lambda model, optimizer: Monitor(model, mse, optimizer=optimizer, **OPTIONS), adopt_step=True)
    assert adopted.step == counted.step == 12
    assert [c.step for c in adopted.checks] == [c.step for c in counted.checks] == [4, 8, 12]
    assert [c.lambda_max for c in adopted.checks] == [c.lambda_max for c in counted.checks]
    resumed = Monitor(nn.Linear(3, 1), mse, check_every=0)
    resumed.after_step(step=40)  # a trainer resumed at step 40
    assert resumed.step == 40


def test_due_queries_follow_the_cadence():
    monitor = Monitor(nn.Linear(3, 1), mse, check_every=5, log_every=4)
    assert [s for s in range(1, 13) if monitor.read_back_due(s)] == [4, 8, 12]
    assert not monitor.check_due(4) and monitor.check_due(5)  # due from step 5 until a check runs
    assert not Monitor(nn.Linear(3, 1), check_every=0).check_due(5)  # no loss_fn: nothing to check


def test_use_optimizer_sets_the_stability_threshold_source():
    model = nn.Linear(3, 1)
    monitor = Monitor(model, mse, check_every=1, max_iter=5)
    monitor.after_step(regression())
    assert monitor.last_check.stability is None  # no optimizer: no threshold
    monitor.use_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    assert monitor.optimizer is not None
    monitor.after_step(regression())
    assert monitor.last_check.stability.threshold == pytest.approx(20.0)  # 2 / lr
    with pytest.raises(ValueError, match="`optimizer` must be a torch.optim.Optimizer, got str"):
        monitor.use_optimizer("sgd")


class Watching(PlateauDetector):
    """Keeps every record it is shown, and judges them as the plateau detector does."""

    def __init__(self):
        super().__init__()
        self.records = []

    def observe(self, record):
        self.records.append(record)
        return super().observe(record)


def test_every_record_reaches_every_detector():
    watching = Watching()
    monitor = train(
        lambda model, optimizer: Monitor(model, mse, optimizer=optimizer, detectors=[watching, "saddle"], **OPTIONS)
    )
    steps = [r.step for r in watching.records if isinstance(r, StepRecord)]
    checks = [r.step for r in watching.records if isinstance(r, CheckRecord)]
    assert steps == list(range(1, 13)) and checks == [4, 8, 12]
    assert len(monitor.detectors["plateau"].losses) == 12  # the plateau rule judged every step
    by_check = {r.step: r for r in watching.records if isinstance(r, CheckRecord)}
    assert by_check[8].lambda_max == monitor.checks[1].lambda_max
    assert by_check[8].stability_threshold == monitor.checks[1].stability.threshold


def test_a_check_is_judged_with_every_loss_before_it():
    """A check reads back first: its record reaches the detectors after every step's loss up to it,
    however rarely the Monitor reads back otherwise (the saddle rule needs the loss history)."""
    watching = Watching()
    options = OPTIONS | {"log_every": 50}
    train(lambda model, optimizer: Monitor(model, mse, optimizer=optimizer, detectors=[watching, "saddle"], **options))
    order = [(type(r).__name__, r.step) for r in watching.records]
    for check in (4, 8, 12):
        before = order[: order.index(("CheckRecord", check))]
        assert [step for kind, step in before if kind == "StepRecord"] == list(range(1, check + 1))


# -- tags ---------------------------------------------------------------------------------------
def test_tags_are_named_under_the_prefix():
    assert tags.flag_tag("saddle") == "hessdiag/flags/saddle" and tags.event_tag("saddle") == "hessdiag/events/saddle"
    assert tags.note_tag("oom") == "hessdiag/notes/oom"
    assert tags.layer_tag("layer_grad_norm", "blocks.0") == "hessdiag/layer_grad_norm/blocks.0"
    assert tags.layer_summary_tag("layer_grad_norm", "max") == "hessdiag/layers/grad_norm/max"
    assert tags.layer_histogram_tag("layer_weight_norm") == "hessdiag/layer_weight_norms"
    named = [value for name, value in vars(tags).items() if name.isupper() and isinstance(value, str)]
    assert all(value.startswith("hessdiag/") for value in named if value != tags.PREFIX)


def test_the_layout_charts_every_logged_tag_family():
    logged = [tags.LAMBDA_MAX, tags.LAMBDA_MIN, tags.GRAD_NORM, tags.LOSS, tags.flag_tag(FLAG_NAMES[0])]
    logged.append(tags.layer_summary_tag("layer_grad_norm", "max"))
    patterns = [p for category in layout(logged).values() for _, series in category.values() for p in series]
    assert all(any(re.search(p, tag) for p in patterns) for tag in logged)


def loop_with_a_skipped_backward(monitor, model, optimizer, losses):
    """A loop that skips backward and the optimizer step on a non-finite loss (a common guard)."""
    batch = regression()
    for loss in losses:
        optimizer.zero_grad()
        if torch.isfinite(loss):
            mse(model, batch).backward()
            monitor.after_backward()
            optimizer.step()
        monitor.after_step(None, loss)


def test_a_nan_loss_on_a_step_whose_backward_was_skipped_is_flagged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = Monitor(model, check_every=0, log_every=4)
    losses = [torch.tensor(1.0)] * 5 + [torch.tensor(float("nan"))] + [torch.tensor(1.0)] * 2
    loop_with_a_skipped_backward(monitor, model, optimizer, losses)
    assert [(event.name, event.step, event.kind) for event in monitor.events] == [("exploding", 6, "onset")]


@pytest.mark.parametrize("extra", [{}, {"logits": torch.zeros(3)}])
def test_after_step_takes_a_mapping_with_a_loss_entry(extra):
    monitor = train(lambda model, optimizer: Monitor(model, optimizer=optimizer, check_every=0, log_every=4), steps=0)
    monitor.after_backward()
    monitor.after_step(None, {"loss": torch.tensor(0.5)} | extra)
    monitor.read_back()
    assert monitor.latest[tags.LOSS] == 0.5


def test_after_step_with_an_unreadable_loss_says_which_forms_it_takes():
    monitor = train(lambda model, optimizer: Monitor(model, optimizer=optimizer, check_every=0, log_every=1), steps=0)
    with pytest.warns(UserWarning, match=r"a tensor, a float, or a mapping with a 'loss' entry; got a mapping with keys \['aux', 'total'\]") as caught:
        monitor.after_step(None, {"total": torch.tensor(1.0), "aux": torch.tensor(0.1)})
    assert not any("float()" in str(warning.message) or "TypeError" in str(warning.message) for warning in caught)


def test_a_layer_replaced_after_the_monitor_is_built_is_followed_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    monitor = Monitor(model, check_every=0, log_every=4)
    batch = regression()

    def step():
        model.zero_grad()
        loss = mse(model, batch)
        loss.backward()
        monitor.after_backward()
        monitor.after_step(None, loss)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()

    for _ in range(4):
        step()
    model[2] = nn.Linear(8, 1)  # e.g. a new head for fine-tuning
    with pytest.warns(UserWarning, match="parameters changed since the Monitor was built"):
        norms = [step() for _ in range(8)]
    assert monitor.latest[tags.GRAD_NORM] == pytest.approx(norms[-1], rel=1e-5)


def _outcomes(monitor, model, optimizer, batch, steps, loss=True):
    if loss:
        return {step: one_step(model, optimizer, mse, batch, monitor) for step in range(1, steps + 1)}
    outcomes = {}
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        mse(model, batch).backward()
        monitor.after_backward()
        optimizer.step()
        outcomes[step] = monitor.after_step(batch)
    return outcomes


def test_after_step_says_what_it_did_read_backs_readings_and_the_events():
    """What an adapter needs from a step, without recomputing the cadence: whether it read back (the
    same steps on every rank), which reading it recorded, and its events (iterating the outcome)."""
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    batch = (x, x @ torch.tensor([[1.0], [-2.0], [0.5]]))
    model = nn.Linear(3, 1)
    design = torch.cat([x, torch.ones(64, 1)], dim=1)
    top = float(torch.linalg.eigvalsh(2 * design.T @ design / 64)[-1])  # the Hessian of the mean squared error
    optimizer = torch.optim.SGD(model.parameters(), lr=2.1 / top)  # beyond the edge: flags come
    monitor = Monitor(model, mse, optimizer=optimizer, log_every=7)  # the auto schedule: checks and tracking
    # No loss passed: the saddle rule has no loss history, a verdict that buys the first full check
    # (step 10); the readings after it track (20, 40).
    outcomes = _outcomes(monitor, model, optimizer, batch, steps=45, loss=False)
    checks, readings = {c.step for c in monitor.checks}, {r.step for r in monitor.readings}
    assert checks and readings  # both kinds ran
    assert {step for step, o in outcomes.items() if o.reading == "check"} == checks
    assert {step for step, o in outcomes.items() if o.reading == "tracking"} == readings
    assert {step for step, o in outcomes.items() if o.read_back} == {7, 14, 21, 28, 35, 42} | checks | readings
    assert [event for o in outcomes.values() for event in o] == monitor.events and monitor.events
    assert all(len(o) == len(o.events) for o in outcomes.values())


def test_a_failed_check_reads_back_and_records_no_reading():
    def fails(model, batch):
        raise RuntimeError("no curvature here")

    model = nn.Linear(3, 1)
    monitor = Monitor(model, fails, check_every=1, log_every=5)
    loss = mse(model, regression())
    loss.backward()
    monitor.after_backward()
    with pytest.warns(UserWarning, match="no curvature here"):
        outcome = monitor.after_step(regression(), loss.detach())
    assert (outcome.read_back, outcome.reading, monitor.checks) == (True, None, [])
    assert monitor.checks_enabled and not Monitor(model, check_every=0).checks_enabled


class Slow(PlateauDetector):
    """A detector that takes 2 ms per record: per-step statistics the budget must pay for."""

    def observe(self, record):
        time.sleep(0.002)
        return super().observe(record)


def test_the_per_step_statistics_are_timed_into_the_budget():
    """The host time of the per-step path (here a detector's 2 ms per step at each read-back) is what
    the schedule pays before the readings; the readings themselves are not counted in it."""
    monitor = train(lambda model, optimizer: Monitor(model, mse, optimizer=optimizer, detectors=[Slow()], log_every=5), steps=41)
    state = monitor.schedule.state_dict()
    # steps 2-41 are timed (the first has no step before it), 2 ms each at least
    assert 40 * 0.002 <= state["statistics_seconds"] < 40 * 0.002 + 40 * 0.05
    assert monitor.readings and state["check_seconds"] > 0  # readings at 10 and 40: timed apart
    # The statistics' share of the measured steps comes off the readings' budget.
    plain_step, share = monitor.schedule._readings_budget()
    per_step = state["statistics_seconds"] / state["steps_timed"]
    planned = 0.05 * PLANNED_SHARE
    assert share == pytest.approx(max(planned - per_step / plain_step, planned / 2))
