"""Stability thresholds: closed forms, and the real stability edge of each optimizer on a quadratic."""

import pytest
import torch
from torch import nn

from hessdiag.stability import adam_preconditioner_sqrt, stability_threshold


def one_param():
    return [nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), 20.0),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 38.0),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5), 76.0),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 3.8 / 0.28),
        (lambda p: torch.optim.Adam(p, lr=1e-3), 38_000.0),
        (lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.8, 0.99)), 18_000.0),
    ],
)
def test_closed_forms(optimizer, expected):
    assert stability_threshold(optimizer(one_param())).threshold == pytest.approx(expected)


def test_unsupported_optimizer_is_named():
    with pytest.raises(ValueError, match="No stability threshold is known for Adagrad"):
        stability_threshold(torch.optim.Adagrad(one_param(), lr=0.1))


def diverges(make_optimizer, curvature: float, steps: int = 400) -> bool:
    """Run the optimizer on f(x) = curvature * x^2 / 2 and report whether it blew up."""
    x = nn.Parameter(torch.ones(1, dtype=torch.float64))
    optimizer = make_optimizer([x])
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * curvature * x**2).sum().backward()
        optimizer.step()
    return bool(x.abs() > 1.0)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.5),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    ],
)
def test_threshold_is_the_real_edge_on_a_quadratic(make_optimizer):
    threshold = stability_threshold(make_optimizer(one_param())).threshold
    assert not diverges(make_optimizer, 0.95 * threshold)
    assert diverges(make_optimizer, 1.05 * threshold)


def test_adam_preconditioner_by_hand():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4))
    b = nn.Parameter(torch.randn(2))
    frozen = nn.Parameter(torch.randn(3))  # never gets a gradient: no state
    optimizer = torch.optim.Adam([w, b, frozen], lr=1e-2, betas=(0.9, 0.95), eps=1e-6)
    assert adam_preconditioner_sqrt(optimizer, [w, b, frozen]) is None
    squares = [torch.zeros(4), torch.zeros(2)]
    for step in range(3):
        optimizer.zero_grad()
        ((w**3).sum() + (b * step).sum()).backward()
        squares = [0.95 * s + 0.05 * p.grad**2 for s, p in zip(squares, (w, b))]
        optimizer.step()
    state_before = {k: v.clone() for k, v in optimizer.state[w].items()}
    expected = torch.cat([(s / (1 - 0.95**3)).sqrt().add(1e-6).rsqrt() for s in squares] + [torch.zeros(3)])
    got = adam_preconditioner_sqrt(optimizer, [w, b, frozen])
    torch.testing.assert_close(got, expected)
    assert all(torch.equal(optimizer.state[w][k], v) for k, v in state_before.items())
