"""The quadratic model's loss change of the optimizer's update against the observed one: exact on a
quadratic loss, equal to the dense float64 computation by hand on an MLP, no observer effect."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessdiag import Monitor
from hessdiag.reporting import tags

STEPS = 4


def mse(model, batch):
    return (model(batch[0]) - batch[1]).square().mean()


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def data(classes=False):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(16, 3, generator=generator, dtype=torch.float64)
    y = (x[:, 0] > 0).long() if classes else x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    return x, y


def train(model, loss_fn, optimizer_class, watch, **options):
    """Plain or watched (update_ratios=True, a check every 2 steps); per watched check step, the
    parameters before and after the step (by hand)."""
    batch = data(classes=loss_fn is cross_entropy)
    optimizer = optimizer_class(model.parameters(), lr=0.1)
    monitor = Monitor(model, loss_fn, optimizer=optimizer, check_every=2, log_every=1, update_ratios=True, **options) if watch else None
    before = {}
    for step in range(1, STEPS + 1):
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        before[step] = [p.detach().clone() for p in model.parameters()]
        if monitor is not None:
            monitor.after_backward()
        optimizer.step()
        if monitor is not None:
            monitor.after_step(batch, loss)
    return monitor, before, batch


def by_hand(model, loss_fn, batch, start, end):
    """(g'D - D'HD / 2 at the end point, L(end) - L(start)) with the dense float64 Hessian."""
    shapes = [p.shape for p in start]
    flat_end = torch.cat([p.reshape(-1) for p in end])
    delta = flat_end - torch.cat([p.reshape(-1) for p in start])
    names = [name for name, _ in model.named_parameters()]

    def loss_of(flat):
        pieces = torch.split(flat, [s.numel() for s in shapes])
        values = {n: piece.reshape(s) for n, piece, s in zip(names, pieces, shapes)}
        return loss_fn(lambda x: torch.func.functional_call(model, values, (x,)), batch)

    gradient = torch.autograd.functional.jacobian(loss_of, flat_end)
    hessian = torch.autograd.functional.hessian(loss_of, flat_end)
    predicted = float(gradient @ delta - 0.5 * delta @ hessian @ delta)
    observed = float(loss_of(flat_end) - loss_of(flat_end - delta))
    return predicted, observed


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.Adam])
def test_on_a_quadratic_loss_the_prediction_is_exact(optimizer_class):
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()  # mean squared error of a linear model: exactly quadratic
    monitor, _, _ = train(model, mse, optimizer_class, watch=True)
    assert [check.step for check in monitor.checks] == [2, 4]
    for check in monitor.checks:
        update = check.update_prediction
        assert update.observed < 0 and update.update_norm > 0
        assert update.predicted == pytest.approx(update.observed, rel=1e-9)
        assert update.ratio == pytest.approx(1.0, rel=1e-9)
    assert monitor.latest[tags.UPDATE_LOSS_RATIO] == pytest.approx(1.0, rel=1e-9)
    assert monitor.latest[tags.UPDATE_LOSS_OBSERVED] == monitor.checks[-1].update_prediction.observed


def test_on_an_mlp_it_equals_the_dense_computation_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    monitor, before, batch = train(model, cross_entropy, torch.optim.SGD, watch=True, max_iter=8)
    check = monitor.checks[-1]
    # The last check (step 4) ran after step 4, at the parameters training ended with.
    predicted, observed = by_hand(model, cross_entropy, batch, before[4], [p.detach() for p in model.parameters()])
    assert check.update_prediction.predicted == pytest.approx(predicted, rel=1e-9)
    assert check.update_prediction.observed == pytest.approx(observed, rel=1e-9)
    assert check.update_prediction.predicted != pytest.approx(check.update_prediction.observed, rel=1e-6)  # not quadratic


def test_off_by_default_and_the_run_is_unchanged():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    watched = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    watched.load_state_dict(plain.state_dict())
    train(plain, cross_entropy, torch.optim.Adam, watch=False)
    monitor, _, _ = train(watched, cross_entropy, torch.optim.Adam, watch=True, max_iter=8)
    assert all(check.update_prediction is not None for check in monitor.checks)
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a, b)
    model = nn.Linear(3, 1).double()
    default = Monitor(model, mse, check_every=1, log_every=1, max_iter=8)
    batch = data()
    mse(model, batch).backward()
    default.after_backward()
    default.after_step(batch)
    assert default.checks[-1].update_prediction is None and tags.UPDATE_LOSS_RATIO not in default.latest
