"""Stability thresholds: closed forms, and the real stability edge of each optimizer on a quadratic."""

import pytest
import torch
from torch import nn

from hessdiag import Monitor
from hessdiag.preconditioners import adam_preconditioner_sqrt, step_size_ratios
from hessdiag.stability import stability_threshold


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
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.5), 38 - 0.5, "heavy-ball", False),
        # Before the first step Adam's next step is step 1: bias correction 1 - beta1.
        (lambda p: torch.optim.Adam(p, lr=1e-3), 3.8 / 1e-3, "adam", True),
        (lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.8, 0.99)), 1.8 * (2 - 1e-5) / 1e-3, "adam", True),
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
    assert step_size_ratios(optimizer, a + b + frozen) == pytest.approx([1, 4, 0])  # per parameter
    assert step_size_ratios(torch.optim.SGD([{"params": a}, {"params": b}], lr=0.1), a + b) is None
    assert not stability_threshold(torch.optim.SGD([{"params": a}, {"params": b}], lr=0.1)).preconditioned
    with pytest.raises(ValueError, match="The param groups differ in `momentum`"):
        stability_threshold(torch.optim.SGD([{"params": a}, {"params": b, "momentum": 0.0}], lr=0.1, momentum=0.9))
    with pytest.raises(ValueError, match=r"The param groups differ in `betas\[0\]`"):
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
    """With its preconditioner frozen and its bias correction spent, Adam is heavy-ball with dampening
    beta1 on P^-1 H."""
    params = one_param()
    adam = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
    params[0].grad = torch.zeros(3)
    adam.step()
    adam.state[params[0]]["step"].fill_(10_000)
    sgd = stability_threshold(torch.optim.SGD(one_param(), lr=1e-3, momentum=0.9, dampening=0.9))
    assert stability_threshold(adam).threshold == pytest.approx(sgd.threshold)


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


# -- degenerate hyper-parameters, decoupled decay, bias correction: the real edge in 1-D ---------
def diverges(optimizer, curvature: float, hold_step: int | None = None, max_steps: int = 2000) -> bool:
    """Run the torch `optimizer` (built on one float64 parameter) on f(x) = curvature x^2 / 2 from
    x0 = 1e-12: True once |x| has grown 1000x, False once it has shrunk 1000x.

    One step with a zero gradient first creates the optimizer's state. `hold_step` holds Adam's step
    counter at that step (the counter is reset before every step), so that the run is the map of that
    one step repeated: its bias correction stays put. From x0 = 1e-12, sqrt(v_hat) stays below 1e-6,
    so with eps = 1 Adam's preconditioner is frozen at 1 and the curvature is the preconditioned one.
    """
    (x,) = optimizer.param_groups[0]["params"]
    x.grad = torch.zeros_like(x)
    optimizer.step()
    x.data.fill_(1e-12)
    for _ in range(max_steps):
        if hold_step is not None:
            optimizer.state[x]["step"].fill_(hold_step - 1)
        optimizer.zero_grad()
        (0.5 * curvature * x.pow(2)).sum().backward()
        optimizer.step()
        growth = abs(float(x.detach())) / 1e-12
        if growth > 1e3 or growth < 1e-3:
            return growth > 1e3
    raise AssertionError("neither converged nor diverged: run longer")


def scalar():
    return [nn.Parameter(torch.zeros(1, dtype=torch.float64))]


@pytest.mark.parametrize(
    ("make", "hold_step", "expected"),
    [
        # AdamW at lr wd = 0.1: (1 + b1)(2 - lr wd) / ((1 - b1) lr) = 361, not (2 + 2 b1) / ((1 - b1) lr) = 380.
        (lambda p: torch.optim.AdamW(p, lr=0.1, betas=(0.9, 0.999), eps=1.0, weight_decay=1.0), 10**6, 361.0),
        (lambda p: torch.optim.AdamW(p, lr=0.1, betas=(0.9, 0.999), eps=1.0, weight_decay=5.0), 10**6, 285.0),
        # Adam at step 5 with b1 = 0.9: the asymptotic 3800 times 1 - 0.9^5 = 0.41.
        (lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.999), eps=1.0), 5, 3800 * (1 - 0.9**5)),
        # Early in a run with b1 = 0.99: at step 100 the threshold is 0.63x the asymptotic 39800.
        (lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.99, 0.999), eps=1.0), 100, 39800 * (1 - 0.99**100)),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5.0), None, 33.0),
    ],
    ids=["adamw-lr-wd-0.1", "adamw-lr-wd-0.5", "adam-step-5", "adam-step-100", "sgd-coupled-decay"],
)
def test_threshold_is_the_real_edge_in_one_dimension(make, hold_step, expected):
    """3% below the threshold the torch optimizer converges, 3% above it diverges."""
    optimizer = make(scalar())
    if hold_step is not None:  # the threshold of the step the simulation holds
        (x,) = optimizer.param_groups[0]["params"]
        x.grad = torch.zeros_like(x)
        optimizer.step()
        optimizer.state[x]["step"].fill_(hold_step - 1)
    threshold = stability_threshold(optimizer).threshold
    assert threshold == pytest.approx(expected, rel=1e-6)
    assert not diverges(make(scalar()), 0.97 * threshold, hold_step)
    assert diverges(make(scalar()), 1.03 * threshold, hold_step)


def test_nesterov_with_dampening_set_after_construction_is_the_real_edge():
    """PyTorch refuses Nesterov with dampening at construction, not a group changed later."""

    def make(params):
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)
        optimizer.param_groups[0]["dampening"] = 0.5
        return optimizer

    threshold = stability_threshold(make(scalar())).threshold
    assert threshold == pytest.approx(3.8 / (1 + 0.9 * 1.5) / 0.1)
    assert not diverges(make(scalar()), 0.97 * threshold) and diverges(make(scalar()), 1.03 * threshold)


def test_adam_threshold_follows_the_step_count_of_a_real_run():
    """Adam's local edge rises from (1 - b1) x to 1 x the asymptotic one as its bias correction fades."""
    params = one_param()
    optimizer = torch.optim.Adam(params, lr=1e-2, betas=(0.99, 0.999))
    asymptotic = 3.98 / (0.01 * 1e-2)
    for step in range(1, 301):
        optimizer.zero_grad()
        params[0].pow(2).sum().backward()
        optimizer.step()
        if step in (99, 300):
            ratio = stability_threshold(optimizer).threshold / asymptotic
            assert ratio == pytest.approx(1 - 0.99 ** (step + 1))  # the step about to be taken
    assert "t = 301" in stability_threshold(optimizer).rule


def test_sgd_with_dampening_one_never_diverges():
    """No gradient enters the buffer after the first step: no curvature makes the run diverge."""
    x = nn.Parameter(torch.ones(1, dtype=torch.float64))
    optimizer = torch.optim.SGD([x], lr=0.1, momentum=0.9, dampening=1.0)
    for _ in range(200):
        optimizer.zero_grad()
        (0.5 * 1e4 * x.pow(2)).sum().backward()  # 500x the undampened edge 2/lr
        optimizer.step()
    assert abs(float(x.detach())) < 1e4  # moved by -lr g0 / (1 - beta) in all, then stopped
    with pytest.raises(ValueError, match="`dampening` 1 with momentum: .* no stability threshold"):
        stability_threshold(optimizer)


def mutated(make, key, value):
    def build(params):
        optimizer = make(params)
        optimizer.param_groups[0][key] = value
        return optimizer

    return build


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=1.0), "`dampening` 1 with momentum"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=1.5), r"`dampening` must be in \[0, 1\]"),
        (mutated(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5), "momentum", 1.0), r"`momentum` must be in \[0, 1\)"),
        (lambda p: torch.optim.SGD(p, lr=0.1, maximize=True), "`maximize=True`"),
        (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=30.0), "`weight_decay` 30.0 alone is beyond"),
        (mutated(lambda p: torch.optim.SGD(p, lr=0.1), "momentum", None), "`momentum` must be a number"),
        (mutated(lambda p: torch.optim.SGD(p, lr=0.1), "lr", float("inf")), "`lr` must be finite"),
        (mutated(lambda p: torch.optim.Adam(p, lr=0.1), "betas", (1.0, 0.999)), r"`betas\[0\]` must be in \[0, 1\)"),
        (mutated(lambda p: torch.optim.Adam(p, lr=0.1), "betas", 0.9), "`betas` must be a pair"),
        (lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=25.0), "lr·weight_decay = 2.5 >= 2"),
    ],
    ids=["dampening-1", "dampening-1.5", "momentum-1", "maximize", "sgd-decay", "momentum-none", "lr-inf",
         "beta1-1", "betas-scalar", "adamw-decay"],
)  # fmt: skip
def test_degenerate_hyper_parameters_have_no_threshold(make, match):
    with pytest.raises(ValueError, match=match):
        stability_threshold(make(one_param()))


def test_a_check_with_dampening_one_reports_the_raw_sharpness():
    """The monitor's check takes the "no threshold" path: no crash, no edge-of-stability verdict."""
    model = TwoGroupQuadratic()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=1.0)
    monitor = Monitor(model, lambda m, batch: m(batch), optimizer=optimizer, check_every=1, tol=1e-8)
    optimizer.zero_grad()
    model(None).backward()
    monitor.after_backward()
    optimizer.step()
    monitor.after_step(0, None)
    (check,) = monitor.checks
    assert check.stability is None and check.sharpness == pytest.approx(LAMBDA_MAX)


def test_an_optimizer_without_a_known_rule_is_said_once_and_a_zero_lr_passes_in_silence():
    """Rprop has no stability threshold (its step is the sign of the gradient): the checks report the
    raw sharpness and say why once (warning and dashboard note); a warm-up's first step at lr 0 is no
    reason to say anything."""
    import warnings

    from hessdiag import HessdiagWarning
    from loops import one_step

    def mse(model, batch):
        return (model(batch[0]) - batch[1]).pow(2).mean()

    def run(make_optimizer):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
        optimizer = make_optimizer(model.parameters())
        monitor = Monitor(model, mse, optimizer=optimizer, check_every=2, log_every=1)
        batch = (torch.randn(16, 3), torch.randn(16, 1))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(4):
                one_step(model, optimizer, mse, batch, monitor)
        return monitor, [str(w.message) for w in caught if issubclass(w.category, HessdiagWarning)]

    monitor, said = run(lambda p: torch.optim.Rprop(p, lr=1e-3))
    assert len(monitor.checks) == 2 and all(c.stability is None and c.sharpness == c.lambda_max for c in monitor.checks)
    assert len([m for m in said if "No edge-of-stability judgement" in m]) == 1
    assert "No stability threshold is known for Rprop" in next(m for m in said if "edge-of-stability" in m)
    frozen, said = run(lambda p: torch.optim.SGD(p, lr=0.0))
    assert all(c.stability is None for c in frozen.checks) and not [m for m in said if "edge-of-stability" in m]
