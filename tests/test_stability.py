"""Stability thresholds: closed forms, and the real stability edge of each optimizer on a quadratic."""

import pytest
import torch
from torch import nn

from hessdiag import Monitor
from hessdiag.stability import adam_preconditioner_sqrt, relative_step_sizes, stability_threshold


def one_param():
    return [nn.Parameter(torch.zeros(3))]


class ScheduledSGD(torch.optim.SGD):
    """A user's subclass: the rule of its base applies."""


@pytest.mark.parametrize(
    ("optimizer", "expected", "rule", "preconditioned"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), 2 / 0.1, "sgd: 2/lr", False),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 3.8 / 0.1, "heavy-ball", False),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5), 3.8 / 0.05, "heavy-ball", False),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 3.8 / (2.8 * 0.1), "nesterov", False),
        (lambda p: ScheduledSGD(p, lr=0.5), 2 / 0.5, "sgd: 2/lr", False),
        (lambda p: torch.optim.Adam(p, lr=1e-3), 3.8 / (0.1 * 1e-3), "adam", True),
        (lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.8, 0.99)), 3.6 / (0.2 * 1e-3), "adam", True),
    ],
)
def test_closed_forms(optimizer, expected, rule, preconditioned):
    threshold = stability_threshold(optimizer(one_param()))
    assert threshold.threshold == pytest.approx(expected)
    assert threshold.rule.startswith(rule) and threshold.preconditioned == preconditioned


def test_reads_the_requested_param_group():
    a, b = one_param(), one_param()
    optimizer = torch.optim.SGD([{"params": a}, {"params": b, "lr": 0.5}], lr=0.1)
    assert stability_threshold(optimizer, param_group=1).threshold == pytest.approx(4.0)
    with pytest.raises(ValueError, match=r"`param_group` must be an int in \[0, 2\), got 2"):
        stability_threshold(optimizer, param_group=2)


def test_per_group_learning_rates_precondition_the_sharpness():
    a, b, frozen = one_param(), one_param(), one_param()
    optimizer = torch.optim.SGD([{"params": a}, {"params": b, "lr": 0.4}], lr=0.1, momentum=0.9)
    threshold = stability_threshold(optimizer)
    assert threshold.threshold == pytest.approx(38.0) and threshold.preconditioned
    assert "per-group lr, relative to group 0" in threshold.rule
    assert relative_step_sizes(optimizer, a + b + frozen).tolist() == pytest.approx([1] * 3 + [4] * 3 + [0] * 3)
    assert relative_step_sizes(torch.optim.SGD([{"params": a}, {"params": b}], lr=0.1), a + b) is None
    assert not stability_threshold(torch.optim.SGD([{"params": a}, {"params": b}], lr=0.1)).preconditioned
    with pytest.raises(ValueError, match="The param groups differ in `momentum`"):
        stability_threshold(torch.optim.SGD([{"params": a}, {"params": b, "momentum": 0.0}], lr=0.1, momentum=0.9))
    with pytest.raises(ValueError, match="The param groups differ in `betas`"):
        stability_threshold(torch.optim.Adam([{"params": a}, {"params": b, "betas": (0.5, 0.999)}], lr=0.1))


class TwoGroupQuadratic(nn.Module):
    """f(a, b) = x^T A x / 2 with x = (a, b): the curvature couples the two parameter groups."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.ones(2, dtype=torch.float64))
        self.b = nn.Parameter(torch.ones(2, dtype=torch.float64))

    def forward(self, _batch):
        x = torch.cat([self.a, self.b])
        return 0.5 * x @ CURVATURE @ x


def test_per_group_threshold_is_the_real_edge_of_sgd():
    """Group b steps 3x faster than group a: the preconditioned sharpness of the check, against
    2/lr of group a, predicts whether SGD converges, 5% on either side of the edge."""
    scale = torch.diag(torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=torch.float64))
    edge_lr = 2 / float(torch.linalg.eigvalsh(scale.sqrt() @ CURVATURE @ scale.sqrt()).max())
    assert edge_lr < 2 / LAMBDA_MAX / 1.5  # group 0's lr alone would put the edge elsewhere
    for lr in (0.95 * edge_lr, 1.05 * edge_lr):
        model = TwoGroupQuadratic()
        optimizer = torch.optim.SGD([{"params": [model.a]}, {"params": [model.b], "lr": 3 * lr}], lr=lr)
        monitor = Monitor(model, lambda m, batch: m(batch), optimizer=optimizer, check_every=1, tol=1e-8)
        for step in range(600):
            optimizer.zero_grad()
            model(None).backward()
            monitor.after_backward()
            optimizer.step()
            if step == 0:
                monitor.after_step(0, None)
                ratio = monitor.checks[0].stability_ratio
        converged = float(torch.cat([model.a, model.b]).detach().norm()) < 1e-3
        assert ratio == pytest.approx(lr / edge_lr, rel=1e-6)
        assert converged == (ratio < 1)


@pytest.mark.parametrize(
    ("optimizer", "name"),
    [(lambda p: torch.optim.Adagrad(p, lr=0.1), "Adagrad"), (lambda p: torch.optim.LBFGS(p), "LBFGS")],
)
def test_unsupported_optimizer_is_named(optimizer, name):
    with pytest.raises(ValueError, match=f"No stability threshold is known for {name}"):
        stability_threshold(optimizer(one_param()))


def test_zero_learning_rate_is_rejected():
    with pytest.raises(ValueError, match="learning rate must be positive"):
        stability_threshold(torch.optim.SGD(one_param(), lr=0.0))


# A quadratic f(x) = x^T A x / 2 with eigenvalues 1 .. 4 in a rotated basis.
_Q = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
CURVATURE = _Q @ torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)) @ _Q.T
LAMBDA_MAX = 4.0


def converges(make_optimizer, lr: float, steps: int = 600) -> bool:
    """Run the optimizer on the quadratic from x0 = 1; True if it converged, False if it blew up."""
    x = nn.Parameter(torch.ones(4, dtype=torch.float64))
    optimizer = make_optimizer([x], lr)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * x @ CURVATURE @ x).backward()
        optimizer.step()
    distance = float(x.detach().norm())
    assert distance < 1e-3 or distance > 1e3, "neither converged nor diverged: run longer"
    return distance < 1e-3


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p, lr: torch.optim.SGD(p, lr=lr),
        lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
        lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.5, dampening=0.5),
        lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True),
    ],
    ids=["sgd", "heavy-ball", "dampened", "nesterov"],
)
def test_threshold_is_the_real_edge_on_a_quadratic(make_optimizer):
    """lambda_max below the threshold: gradient descent converges; 5% above: it diverges."""
    # The threshold is c / lr: the edge is the lr at which it equals lambda_max.
    edge_lr = stability_threshold(make_optimizer(one_param(), 1.0)).threshold / LAMBDA_MAX
    for lr in (0.95 * edge_lr, 1.05 * edge_lr):
        threshold = stability_threshold(make_optimizer(one_param(), lr)).threshold
        assert converges(make_optimizer, lr) == (LAMBDA_MAX < threshold)


def test_adam_rule_is_dampened_heavy_ball_on_the_preconditioned_problem():
    """With its preconditioner frozen, Adam is heavy-ball with dampening beta1 on P^-1 H."""
    adam = stability_threshold(torch.optim.Adam(one_param(), lr=1e-3, betas=(0.9, 0.999)))
    sgd = stability_threshold(torch.optim.SGD(one_param(), lr=1e-3, momentum=0.9, dampening=0.9))
    assert adam.threshold == pytest.approx(sgd.threshold)


def second_moments(optimizer, params, beta2, steps):
    """Run `steps` steps of a fixed loss and track the second moments of `params` by hand."""
    squares = [torch.zeros_like(p) for p in params]
    peaks = [torch.zeros_like(p) for p in params]
    for step in range(steps):
        optimizer.zero_grad()
        sum(((p**3).sum() + (p * step).sum()) for p in params).backward()
        squares = [beta2 * s + (1 - beta2) * p.grad**2 for s, p in zip(squares, params)]
        peaks = [torch.maximum(m, s) for m, s in zip(peaks, squares)]
        optimizer.step()
    return squares, peaks


@pytest.mark.parametrize(("make", "amsgrad"), [(torch.optim.Adam, False), (torch.optim.AdamW, False), (torch.optim.Adam, True)])
def test_adam_preconditioner_by_hand_after_three_steps(make, amsgrad):
    generator = torch.Generator().manual_seed(0)
    w, b = nn.Parameter(torch.randn(2, 2, generator=generator)), nn.Parameter(torch.randn(2, generator=generator))
    frozen = nn.Parameter(torch.randn(3, generator=generator))  # never gets a gradient: no state
    optimizer = make([w, b, frozen], lr=1e-2, betas=(0.9, 0.95), eps=1e-6, amsgrad=amsgrad)
    assert adam_preconditioner_sqrt(optimizer, [w, b, frozen]) is None  # before the first step
    squares, peaks = second_moments(optimizer, [w, b], beta2=0.95, steps=3)
    state_before = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in (w, b)}
    v = peaks if amsgrad else squares
    expected = torch.cat([(s.flatten() / (1 - 0.95**3)).sqrt().add(1e-6).rsqrt() for s in v] + [torch.zeros(3)])
    got = adam_preconditioner_sqrt(optimizer, [w, b, frozen])
    assert got.dtype == torch.float32 and got.device == w.device
    torch.testing.assert_close(got, expected)
    for p in (w, b):  # only read
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in state_before[p].items())
