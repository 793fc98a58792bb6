"""The parts of the Monitor as units: the fault policy, the writer fan-out, the per-step statistics
and the check runner's out-of-memory retry (the Monitor as a whole: tests/test_monitor.py)."""

import math
import warnings

import pytest
import torch
from torch import nn

from hessdiag.batches import MicroBatches
from hessdiag.check.probe import CurvatureProbe
from hessdiag.settings import DiagnosticsSettings
from hessdiag.detectors import StepRecord
from hessdiag.errors import HessdiagWarning
from hessdiag.flags import FlagEvent
from hessdiag.monitor.check_runner import CheckRunner
from hessdiag.monitor.faults import FaultPolicy
from hessdiag.steps.statistics import StepStatistics
from hessdiag.reporting.writers import WriterFanOut, resolve_writers
from hessdiag.check.schedule import CheckSchedule
from hessdiag.reporting.tensorboard import TensorBoardWriter


def faults(strict=False, step=7):
    return FaultPolicy(strict=strict, current_step=lambda: step)


def mse(model, batch):
    return (model(batch[0]) - batch[1]).pow(2).mean()


def regression(n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=generator), torch.randn(n, 1, generator=generator)


# -- fault policy -------------------------------------------------------------------------------
def test_guard_warns_once_per_kind_and_goes_on():
    policy = faults()
    with pytest.warns(HessdiagWarning, match=r"the writer failed at step 7 \(OSError: disk full\)"):
        with policy.guard("the writer"):
            raise OSError("disk full")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with policy.guard("the writer"):  # the same kind again: silent
            raise OSError("disk full")
    with pytest.warns(HessdiagWarning, match="ValueError"):  # another kind: reported
        with policy.guard("the writer"):
            raise ValueError("bad value")


def test_strict_guard_re_raises():
    with pytest.raises(OSError, match="disk full"):
        with faults(strict=True).guard("the writer"):
            raise OSError("disk full")


def test_warn_once_says_whether_it_warned():
    policy = faults()
    assert not policy.warned("key")
    with pytest.warns(HessdiagWarning, match="first"):
        assert policy.warn_once("key", "first")
    assert policy.warned("key") and not policy.warn_once("key", "second")


# -- writers ------------------------------------------------------------------------------------
class Recorder:
    """A DiagnosticsWriter that keeps every call."""

    def __init__(self):
        self.calls = []

    def scalars(self, step, values, layers):
        self.calls.append(("scalars", step, dict(values), layers))

    def events(self, step, events):
        self.calls.append(("events", step, list(events)))

    def density(self, step, density):
        self.calls.append(("density", step, density))

    def text(self, step, tag, message):
        self.calls.append(("text", step, tag, message))

    def flush(self):
        self.calls.append(("flush",))


class Broken(Recorder):
    def scalars(self, step, values, layers):
        raise OSError("No space left on device")


class FakeSummaryWriter:
    def add_scalar(self, tag, scalar_value, global_step=None): ...

    def add_custom_scalars(self, layout): ...

    def add_histogram(self, tag, values, global_step=None): ...

    def add_text(self, tag, text_string, global_step=None): ...

    def flush(self): ...


def test_writers_are_resolved_once_summary_writers_wrapped():
    recorder, summary = Recorder(), FakeSummaryWriter()
    resolved = resolve_writers([summary, recorder])
    assert isinstance(resolved[0], TensorBoardWriter) and resolved[0].summary_writer is summary
    assert resolved[1] is recorder
    assert resolve_writers(None) == [] and resolve_writers(recorder) == [recorder]
    with pytest.raises(ValueError, match="`writer` must be a SummaryWriter, a DiagnosticsWriter or a list of them, got int"):
        resolve_writers([recorder, 3])


def test_fan_out_reaches_every_writer_past_a_broken_one():
    first, second = Broken(), Recorder()
    fan_out = WriterFanOut([first, second], faults())
    event = FlagEvent("exploding", 3, "onset", "critical")
    with pytest.warns(HessdiagWarning, match=r"Broken.scalars failed at step 7 \(OSError"):
        fan_out.emit(3, {"hessdiag/loss": 1.0}, {"layer_grad_norm": {"0": 2.0}}, [event])
    fan_out.emit(4, {"hessdiag/loss": 0.5}, {})  # no events, no density: not sent
    fan_out.text(4, "hessdiag/notes/x", "note")
    fan_out.flush()
    assert second.calls == [
        ("scalars", 3, {"hessdiag/loss": 1.0}, {"layer_grad_norm": {"0": 2.0}}),
        ("events", 3, [event]),
        ("scalars", 4, {"hessdiag/loss": 0.5}, {}),
        ("text", 4, "hessdiag/notes/x", "note"),
        ("flush",),
    ]
    assert fan_out.latest == {"hessdiag/loss": 0.5}  # what was sent, even where a writer failed


# -- step statistics ----------------------------------------------------------------------------
def backward(model, batch):
    model.zero_grad()
    mse(model, batch).backward()


def test_step_statistics_read_back_one_record_per_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    statistics = StepStatistics(model, track_updates=False, grad_scaler=None, faults=faults())
    batch = regression()
    for step in (1, 2, 3):
        backward(model, batch)
        statistics.observe_gradients(step)
        if step != 2:  # step 2 without its loss
            statistics.add_loss(step, mse(model, batch).detach())
    with pytest.warns(HessdiagWarning, match="without the step's `loss`"):
        readout = statistics.read(lambda_max=2.5)
    assert [r.step for r in readout.records] == [1, 2, 3] and readout.step == 3
    assert readout.records[1].loss is None and readout.records[0].loss == pytest.approx(mse(model, batch).item())
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert readout.records[-1].grad_norm == pytest.approx(grad_norm, rel=1e-6)
    assert all(r.lambda_max == 2.5 for r in readout.records)
    assert [name for name, _ in readout.records[0].layer_grad_norms] == ["0", "2"]
    assert set(readout.values) == {"hessdiag/grad_norm", "hessdiag/loss"}
    assert set(readout.layers) == {"layer_grad_norm", "layer_grad_to_weight", "layer_weight_norm"}
    assert set(readout.layers["layer_weight_norm"]) == {"0", "2"}
    assert statistics.read(lambda_max=None) is None  # nothing new


def test_step_statistics_without_gradients_record_the_loss_alone():
    statistics = StepStatistics(nn.Linear(2, 1), track_updates=False, grad_scaler=None, faults=faults())
    statistics.add_loss(1, 1.5)
    with pytest.warns(HessdiagWarning, match=r"got shape \(2,\); its mean is used"):
        statistics.add_loss(2, torch.tensor([math.nan, 1.0]))  # not a scalar
    with pytest.warns(HessdiagWarning, match="without `after_backward`"):
        readout = statistics.read(lambda_max=None)
    assert readout.records[0] == StepRecord(step=1, loss=1.5)
    assert readout.records[1].grad_norm is None and math.isnan(readout.records[1].loss)
    assert readout.layers == {} and set(readout.values) == {"hessdiag/loss"}


class AlwaysScaling:
    def is_enabled(self):
        return True


def test_step_statistics_count_loss_scaler_skips():
    model = nn.Linear(2, 1)
    statistics = StepStatistics(model, track_updates=False, grad_scaler=AlwaysScaling(), faults=faults())
    for step, grad in ((1, 1.0), (2, math.inf), (3, 1.0)):
        for p in model.parameters():
            p.grad = torch.full_like(p, grad)
        statistics.observe_gradients(step)
        statistics.add_loss(step, 1.0)
    readout = statistics.read(lambda_max=None)
    assert [r.overflow_skip for r in readout.records] == [False, True, False]
    assert statistics.overflow_skips == 1 and readout.values["hessdiag/overflow_skips"] == 1.0
    restored = StepStatistics(model, track_updates=False, grad_scaler=None, faults=faults())
    restored.load_state_dict(statistics.state_dict())
    assert restored.overflow_skips == 1


# -- check runner -------------------------------------------------------------------------------
def runner_for(loss_fn, *, strict=False, sub_batch=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    settings = DiagnosticsSettings(tol=1e-6, max_iter=20, sub_batch=sub_batch, hvp_method="double_backward", product_parts=1)
    probe = CurvatureProbe(model, loss_fn, settings)  # products on the whole batch: its size is what runs out of memory
    return CheckRunner(model, probe, CheckSchedule(10, 0.05), faults(strict=strict)), probe


def fits_in(samples):
    """A loss that runs out of memory on batches of more than `samples` samples."""

    def loss(model, batch):
        if batch[0].shape[0] > samples:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return mse(model, batch)

    return loss


def test_out_of_memory_retries_on_halves_cold_and_keeps_the_size_that_fits():
    runner, probe = runner_for(fits_in(2))
    runner.run(10, regression(n=2), None, torch.device("cpu"))  # fits: warm vectors for the next check
    with pytest.warns(HessdiagWarning, match="Out of memory in a curvature check; retrying on 4 samples"):
        check = runner.run(20, regression(n=8), None, torch.device("cpu"))
    assert check.batch_size == 2 and check.cold  # the warm start of a failed try is forgotten
    assert probe.sub_batch == 2 and [c.step for c in runner.checks] == [10, 20]


def test_out_of_memory_in_every_try_and_strict_runs_raise():
    runner, probe = runner_for(fits_in(0))
    with pytest.warns(HessdiagWarning, match="retrying"), pytest.raises(torch.OutOfMemoryError):
        runner.run(10, regression(n=8), None, torch.device("cpu"))
    assert runner.checks == [] and probe.sub_batch is None  # nothing fitted: nothing kept
    strict, _ = runner_for(fits_in(2), strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(torch.OutOfMemoryError):
            strict.run(10, regression(n=8), None, torch.device("cpu"))


def test_out_of_memory_retry_halves_each_micro_batch():
    runner, probe = runner_for(fits_in(3))
    with pytest.warns(HessdiagWarning, match="retrying on 3 samples"):
        check = runner.run(10, MicroBatches([regression(n=6), regression(n=6, seed=1)]), None, torch.device("cpu"))
    assert probe.sub_batch == 3 and check.batch_size == 6


def test_a_failed_check_is_kept_and_backs_off():
    runner, _ = runner_for(mse)
    with pytest.warns(HessdiagWarning, match=r"the curvature check at step 10 failed \(ValueError: bad\)"):
        message = runner.failed(10, ValueError("bad"))
    assert runner.failed_checks == [(10, "ValueError: bad")] and "next check is at step" in message
    assert "1 failed, the last at step 10 (ValueError: bad)" in runner.no_check_message(12)
