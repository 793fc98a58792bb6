"""The noise scale under gradient accumulation from the micro-batches' gradients (tensor hooks): equal
to the split of the step's batch at the same parameters, no observer effect, refused where invalid."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessdiag import Monitor, gradient_noise_scale
from hessdiag.noise.micro_batches import MicroBatchNoise

MICRO, COUNT = 6, 4


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(MICRO * COUNT, 3, generator=generator, dtype=torch.float64)
    return model, (x, (x[:, 0] > 0).long())


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def micro_batches(batch, sizes=(MICRO,) * COUNT):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(batch[0][s : s + n], batch[1][s : s + n]) for s, n in zip(starts, sizes)]


def accumulate(model, batch, noise=None, monitor=None, sizes=(MICRO,) * COUNT):
    """One step's backward passes over the micro-batches, each loss divided by their number."""
    micros = micro_batches(batch, sizes)
    for micro in micros:
        if noise is not None:
            noise.begin(model.parameters(), len(micro[0]), 1 / len(micros))
        if monitor is not None:
            monitor.begin_micro_batch(len(micro[0]), 1 / len(micros))
        (loss_fn(model, micro) / len(micros)).backward()


def test_the_estimate_equals_the_split_of_the_steps_batch_into_its_micro_batches():
    model, batch = problem()
    noise = MicroBatchNoise()
    accumulate(model, batch, noise)
    noise.close(model.parameters())
    assert not noise.armed
    estimate, why = noise.estimate()
    expected = gradient_noise_scale(model, loss_fn, batch, num_parts=COUNT)  # the same parts, the same parameters
    assert why == "" and (estimate.small_batch, estimate.big_batch, estimate.num_small) == (MICRO, MICRO * COUNT, COUNT)
    assert estimate.grad_sq_norm == pytest.approx(expected.grad_sq_norm, rel=1e-10)
    assert estimate.trace_covariance == pytest.approx(expected.trace_covariance, rel=1e-10)
    assert noise.estimate() == (None, "no accumulated step was measured")  # read once
    # The hooks are gone: a later backward records nothing.
    loss_fn(model, batch).backward()
    noise.close(model.parameters())
    assert noise.estimate()[0] is None


def test_unequal_micro_batches_and_a_single_one_are_refused_with_a_reason():
    model, batch = problem()
    noise = MicroBatchNoise()
    accumulate(model, batch, noise, sizes=(6, 6, 12))
    noise.close(model.parameters())
    estimate, why = noise.estimate()
    assert estimate is None and "not all equal" in why
    model.zero_grad()
    accumulate(model, batch, noise, sizes=(24,))
    noise.close(model.parameters())
    assert noise.estimate() == (None, "the step has one micro-batch")


def train(watch, steps=4):
    model, batch = problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    monitor = Monitor(model, loss_fn, optimizer=optimizer, check_every=2, log_every=1, max_iter=8) if watch else None
    expected = {}
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        accumulate(model, batch, monitor=monitor)
        if monitor is not None:
            monitor.after_backward()
            expected[step] = gradient_noise_scale(model, loss_fn, batch, num_parts=COUNT)  # at the step's parameters
        optimizer.step()
        if monitor is not None:
            monitor.after_step(batch, torch.tensor(0.0))
    return model, monitor, expected


def test_a_monitor_check_takes_the_micro_batches_estimate_and_leaves_the_run_unchanged():
    plain, _, _ = train(False)
    watched, monitor, expected = train(True)
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a, b)
    assert [check.step for check in monitor.checks] == [2, 4]
    for check in monitor.checks:
        assert check.noise.num_small == COUNT and check.noise.big_batch == MICRO * COUNT
        assert check.noise.trace_covariance == pytest.approx(expected[check.step].trace_covariance, rel=1e-10)
        assert check.noise.grad_sq_norm == pytest.approx(expected[check.step].grad_sq_norm, rel=1e-10)
    assert math.isfinite(monitor.latest["hessdiag/noise_scale"])
    assert not any(p._backward_hooks for p in watched.parameters())  # nothing left registered


def test_steps_without_a_check_are_not_measured():
    model, batch = problem()
    monitor = Monitor(model, loss_fn, check_every=3, log_every=1, max_iter=8)
    accumulate(model, batch, monitor=monitor)  # step 1: no check follows
    assert not monitor.noise.micro_batches.armed
