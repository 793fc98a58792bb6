"""The adaptive optimizers' stability thresholds (NAdam, RAdam, Adamax, RMSprop, Adagrad; Adam and AdamW
alongside): each rule is the real edge of the torch optimizer on a quadratic with its preconditioner
frozen, and each preconditioner is the one the optimizer divides by."""

import math
import warnings

import pytest
import torch
from loops import one_step
from torch import nn

from hessdiag import HessdiagWarning, Monitor
from hessdiag.preconditioners import adaptive_preconditioner_sqrt, preconditioner_diagonal, preconditioner_sqrt
from hessdiag.stability import stability_threshold


def scalar():
    return [nn.Parameter(torch.zeros(1, dtype=torch.float64))]


def nadam_product(beta1: float, psi: float, steps: int) -> float:
    """NAdam's mu_1 ... mu_steps."""
    return math.prod(beta1 * (1 - 0.5 * 0.96 ** (i * psi)) for i in range(1, steps + 1))


def held(make, state_values, curvature=None, target=None):
    """`make`'s optimizer on one float64 parameter after a first zero-gradient step (its state exists),
    with `state_values` written into its state; `curvature` (a matrix) sizes the parameter."""
    x = nn.Parameter(torch.zeros(1 if curvature is None else curvature.shape[0], dtype=torch.float64))
    optimizer = make([x])
    x.grad = torch.zeros_like(x)
    optimizer.step()
    for key, value in state_values.items():
        optimizer.state[x][key] = torch.as_tensor(value, dtype=torch.float64).clone()
    return optimizer, x


def diverges(make, curvature, hold, max_steps=4000):
    """Run the torch optimizer on f(x) = x^T A x / 2 from x0 = 1e-12, writing `hold` (state key ->
    value) into its state before every step, so that each step repeats the same map: True once |x|
    has grown 1000x, False once it has shrunk 1000x (or stayed below x0 for `max_steps`)."""
    optimizer, x = held(make, hold, curvature)
    x.data.fill_(1e-12)
    for _ in range(max_steps):
        for key, value in hold.items():
            optimizer.state[x][key] = torch.as_tensor(value, dtype=torch.float64).clone()
        optimizer.zero_grad()
        (0.5 * x @ curvature @ x).backward()
        optimizer.step()
        growth = float(x.detach().norm()) / 1e-12
        if growth > 1e3 or growth < 1e-3:
            return growth > 1e3
    assert growth < 1, "neither converged nor diverged: run longer"
    return False


# -- the rules in one dimension, eps = 1: the preconditioner stays at ~1 (x is ~1e-12) -------------
# (make, step held at t, the threshold at t, P the optimizer divides by at step t)
ONE_DIMENSIONAL = {
    "rmsprop": (lambda p: torch.optim.RMSprop(p, lr=0.01, eps=1.0), None, 200.0, 1.0),
    "rmsprop-momentum": (lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, eps=1.0), None, 380.0, 1.0),
    "rmsprop-centered": (lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True, eps=1.0), None, 300.0, 1.0),
    "adagrad": (lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1.0), None, 20.0, 1.0),
    "adagrad-lr-decay": (lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01, eps=1.0), 50, 29.8, 1.0),
    "adamax-step-5": (lambda p: torch.optim.Adamax(p, lr=0.01, eps=1.0), 5, 3800 * (1 - 0.9**5), 1.0),
    "nadam-step-10": (lambda p: torch.optim.NAdam(p, lr=0.01, eps=1.0), 10, None, 1.0),
    "nadam-step-3000": (lambda p: torch.optim.NAdam(p, lr=0.01, eps=1.0), 3000, None, 1.0),
    "nadam-decoupled": (lambda p: torch.optim.NAdam(p, lr=0.01, eps=1.0, weight_decay=5.0, decoupled_weight_decay=True), 40, None, 1.0),
    "nadam-beta1-0": (lambda p: torch.optim.NAdam(p, lr=0.01, betas=(0.0, 0.999), eps=1.0), 7, 200.0, 1.0),
    # Before its variance is tractable (rho_t <= 5) RAdam is SGD with averaged momentum: no P.
    "radam-sgd-phase": (lambda p: torch.optim.RAdam(p, lr=0.01, eps=1.0), 3, 3800 * (1 - 0.9**3), 1.0),
    # Rectified: r_10 = 0.049 raises the edge 20x; P = (sqrt(v) + 1) / sqrt(1 - 0.999^10) = 10.
    "radam-step-10": (lambda p: torch.optim.RAdam(p, lr=0.01, eps=1.0), 10, None, 1 / math.sqrt(1 - 0.999**10)),
    "radam-decoupled": (lambda p: torch.optim.RAdam(p, lr=0.01, eps=1.0, weight_decay=5.0, decoupled_weight_decay=True), 500, None, 1 / math.sqrt(1 - 0.999**500)),
}  # fmt: skip


def step_hold(optimizer, step):
    """The state that holds the optimizer at step `step`: its counter (and NAdam's product of momenta)."""
    if step is None:
        return {}
    hold = {"step": step - 1}
    if isinstance(optimizer, torch.optim.NAdam):
        group = optimizer.param_groups[0]
        hold["mu_product"] = nadam_product(group["betas"][0], group["momentum_decay"], step - 1)
    return hold


@pytest.mark.parametrize("case", list(ONE_DIMENSIONAL))
def test_threshold_is_the_real_edge_in_one_dimension(case):
    """3% below the threshold (in the optimizer's preconditioned curvature h / P) the torch optimizer
    converges, 3% above it diverges; where the threshold has a closed form, it is that."""
    make, step, expected, p_used = ONE_DIMENSIONAL[case]
    hold = step_hold(make(scalar()), step)
    optimizer, _ = held(make, hold)
    threshold = stability_threshold(optimizer).threshold
    if expected is not None:
        assert threshold == pytest.approx(expected, rel=1e-9)
    curvature = torch.eye(1, dtype=torch.float64) * threshold * p_used
    assert not diverges(make, 0.97 * curvature, hold)
    assert diverges(make, 1.03 * curvature, hold)


def test_radam_rectification_and_nadam_schedule_move_the_edge():
    """The step-dependent factors are not cosmetic: RAdam's edge at step 10 is 20x Adam's, and NAdam's
    at step 10 differs from its edge late in training."""
    radam, _ = held(lambda p: torch.optim.RAdam(p, lr=0.01), {"step": 9})
    adam, _ = held(lambda p: torch.optim.Adam(p, lr=0.01), {"step": 9})
    assert stability_threshold(radam).threshold / stability_threshold(adam).threshold == pytest.approx(20.4, rel=0.01)
    def nadam(p):
        return torch.optim.NAdam(p, lr=0.01)

    early, late = (stability_threshold(held(nadam, step_hold(nadam(scalar()), t))[0]).threshold for t in (10, 3000))
    assert early < 0.8 * late


# -- the threshold against lambda_max(P^-1 H), with a preconditioner far from the identity ---------
_Q = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
CURVATURE = _Q @ torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)) @ _Q.T
V = torch.tensor([0.01, 1.0, 0.09, 0.25], dtype=torch.float64)  # P^-1 spans 10x across coordinates
TARGETS = {"exp_avg_sq": V, "square_avg": V, "sum": V, "exp_inf": V.sqrt(), "grad_avg": 0.5 * V.sqrt()}

# (make, {state key: how much the optimizer's own step shrinks it before using it}, more state to hold)
FROZEN = {
    "adam": (lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-8), {"exp_avg_sq": 0.999}, {}),
    "nadam": (lambda p: torch.optim.NAdam(p, lr=0.01, eps=1e-8), {"exp_avg_sq": 0.999}, {"mu_product": 0.0}),
    "radam": (lambda p: torch.optim.RAdam(p, lr=0.01, eps=1e-8), {"exp_avg_sq": 0.999}, {}),
    "adamax": (lambda p: torch.optim.Adamax(p, lr=0.01, eps=1e-8), {"exp_inf": 0.999}, {}),
    "rmsprop": (lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, eps=1e-8), {"square_avg": 0.99}, {}),
    "rmsprop-centered": (lambda p: torch.optim.RMSprop(p, lr=0.01, centered=True, eps=1e-8), {"square_avg": 0.99, "grad_avg": 0.99}, {}),
    "adagrad": (lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1e-8), {"sum": 1.0}, {}),
}  # fmt: skip
LATE = 10**6  # bias corrections spent, RAdam's rectification ~1


@pytest.mark.parametrize("case", list(FROZEN))
def test_preconditioned_sharpness_meets_the_threshold_at_the_real_edge(case):
    """The check's comparison, end to end: with the optimizer's accumulators held (so that every step
    divides by the same P), lambda_max(d H d) with d from :func:`preconditioner_sqrt` at 0.97x the
    threshold converges and at 1.03x diverges."""
    make, shrink, extra = FROZEN[case]
    as_read = {key: TARGETS[key] for key in shrink} | extra | {"step": LATE}
    optimizer, x = held(make, as_read, CURVATURE)
    d = preconditioner_sqrt(optimizer, [x]).double()
    threshold = stability_threshold(optimizer)
    assert threshold.preconditioned
    sharpness = float(torch.linalg.eigvalsh(d[:, None] * CURVATURE * d[None, :]).max())
    hold = {key: TARGETS[key] / factor for key, factor in shrink.items()} | extra | {"step": LATE - 1}
    assert not diverges(make, 0.97 * threshold.threshold / sharpness * CURVATURE, hold)
    assert diverges(make, 1.03 * threshold.threshold / sharpness * CURVATURE, hold)


# -- the preconditioner by hand: what each optimizer divides by after three steps ------------------
def by_hand(name, grads, group):
    """P after the gradients `grads` (one tensor per step), from each optimizer's published update."""
    eps, t = group["eps"], len(grads)
    if name in ("nadam", "radam", "adamax"):
        beta2 = group["betas"][1]
        v, u = torch.zeros_like(grads[0]), torch.zeros_like(grads[0])
        for g in grads:
            v, u = beta2 * v + (1 - beta2) * g**2, torch.maximum(beta2 * u, g.abs() + eps)
        bias2 = 1 - beta2**t
        return {"nadam": (v / bias2).sqrt() + eps, "radam": (v.sqrt() + eps) / math.sqrt(bias2), "adamax": u}[name]
    if name == "adagrad":
        return (group["initial_accumulator_value"] + sum(g**2 for g in grads)).sqrt() + eps
    alpha, square, mean = group["alpha"], torch.zeros_like(grads[0]), torch.zeros_like(grads[0])
    for g in grads:
        square, mean = alpha * square + (1 - alpha) * g**2, alpha * mean + (1 - alpha) * g
    return (square - mean**2 if group["centered"] else square).sqrt() + eps


@pytest.mark.parametrize(
    ("name", "make"),
    [("nadam", lambda p: torch.optim.NAdam(p, lr=1e-2, betas=(0.9, 0.95), eps=0.1)),
     ("radam", lambda p: torch.optim.RAdam(p, lr=1e-2, betas=(0.9, 0.95), eps=0.1)),
     ("adamax", lambda p: torch.optim.Adamax(p, lr=1e-2, betas=(0.9, 0.95), eps=0.1)),
     ("adagrad", lambda p: torch.optim.Adagrad(p, lr=1e-2, eps=0.1, initial_accumulator_value=0.5)),
     ("rmsprop", lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.9, eps=0.1)),
     ("rmsprop", lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.9, eps=0.1, centered=True, momentum=0.5))],
    ids=["nadam", "radam", "adamax", "adagrad", "rmsprop", "rmsprop-centered"],
)  # fmt: skip
def test_preconditioner_by_hand_after_three_steps(name, make):
    generator = torch.Generator().manual_seed(0)
    w, frozen = nn.Parameter(torch.randn(2, 3, generator=generator)), nn.Parameter(torch.randn(3, generator=generator))
    optimizer = make([w, frozen])
    assert adaptive_preconditioner_sqrt(optimizer, [w, frozen]) is None  # before the first step
    grads = []
    for step in range(3):
        optimizer.zero_grad()
        ((w**3).sum() + (w * step).sum()).backward()
        grads.append(w.grad.clone())
        optimizer.step()
    state_before = {k: v.clone() for k, v in optimizer.state[w].items()}
    expected = torch.cat([by_hand(name, grads, optimizer.param_groups[0]).flatten().rsqrt(), torch.zeros(3)])
    torch.testing.assert_close(adaptive_preconditioner_sqrt(optimizer, [w, frozen]), expected)
    assert all(torch.equal(optimizer.state[w][k], v) for k, v in state_before.items())  # only read


# -- RAdam's two phases, per-group learning rates, what has no threshold ---------------------------
def test_radam_phase_decides_what_the_sharpness_is_compared_with():
    """Before the variance is tractable the threshold applies to H itself (no preconditioner, or the
    per-group learning rates' alone); after, to P^-1 H; parameters in both phases have none."""
    early, x = held(lambda p: torch.optim.RAdam(p, lr=0.01), {"step": 2})
    assert not stability_threshold(early).preconditioned and preconditioner_sqrt(early, [x]) is None
    assert "SGD-like phase" in stability_threshold(early).rule
    late, x = held(lambda p: torch.optim.RAdam(p, lr=0.01), {"step": 9})
    assert stability_threshold(late).preconditioned and preconditioner_sqrt(late, [x]) is not None
    a, b = scalar(), scalar()
    grouped = torch.optim.RAdam([{"params": a}, {"params": b, "lr": 0.04}], lr=0.01)
    assert stability_threshold(grouped).preconditioned
    assert preconditioner_sqrt(grouped, a + b).tolist() == pytest.approx([1.0, 2.0])
    for p in a + b:
        p.grad = torch.zeros_like(p)
    grouped.step()
    grouped.state[a[0]]["step"].fill_(2)
    grouped.state[b[0]]["step"].fill_(9)
    with pytest.raises(ValueError, match="RAdam's parameters are at step counts on both sides of its rectification"):
        stability_threshold(grouped)


@pytest.mark.parametrize(
    ("make", "match"),
    [(lambda p: torch.optim.NAdam([{"params": p[:1]}, {"params": p[1:], "betas": (0.5, 0.999)}]), r"differ in `betas\[0\]`"),
     (lambda p: torch.optim.RAdam([{"params": p[:1]}, {"params": p[1:], "betas": (0.9, 0.9)}]), r"differ in `betas\[1\]`"),
     (lambda p: torch.optim.RMSprop([{"params": p[:1]}, {"params": p[1:], "momentum": 0.5}], momentum=0.9), "differ in `momentum`"),
     (lambda p: torch.optim.Adagrad([{"params": p[:1]}, {"params": p[1:], "lr_decay": 0.1}]), "differ in `lr_decay`"),
     (lambda p: torch.optim.NAdam(p, lr=0.1, weight_decay=25.0, decoupled_weight_decay=True), "lr·weight_decay = 2.5 >= 2"),
     (lambda p: torch.optim.RMSprop(p, maximize=True), "`maximize=True`")],
    ids=["nadam-beta1", "radam-beta2", "rmsprop-momentum", "adagrad-lr-decay", "nadam-decay", "maximize"],
)  # fmt: skip
def test_hyper_parameters_without_a_single_threshold(make, match):
    with pytest.raises(ValueError, match=match):
        stability_threshold(make(scalar() + scalar()))


def test_coupled_decay_is_said_to_be_left_out():
    rule = stability_threshold(torch.optim.RMSprop(scalar(), lr=0.01, weight_decay=1e-4)).rule
    assert rule == "rmsprop: (2+2μ)/lr; coupled weight_decay not included"
    assert "not included" not in stability_threshold(torch.optim.AdamW(scalar(), weight_decay=1e-2)).rule


class SAM(torch.optim.Optimizer):
    """The usual shape of a sharpness-aware wrapper: a base optimizer stepped from a perturbed point."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)


@pytest.mark.parametrize(
    ("make", "why"),
    [(lambda p: torch.optim.LBFGS(p), "LBFGS: its step is a line search"),
     (lambda p: SAM(p, torch.optim.SGD, lr=0.1), "SAM: it steps with the gradient at a perturbed point"),
     (lambda p: torch.optim.Rprop(p), "Rprop: its update rule is not one of the known ones")],
    ids=["lbfgs", "sam", "rprop"],
)  # fmt: skip
def test_optimizers_without_a_rule_say_why(make, why):
    with pytest.raises(ValueError, match=f"No stability threshold is known for {why}.*supported: SGD"):
        stability_threshold(make(scalar()))


@pytest.mark.parametrize(
    "make",
    [lambda p: torch.optim.RMSprop(p, lr=1e-3), lambda p: torch.optim.Adagrad(p, lr=1e-2),
     lambda p: torch.optim.NAdam(p, lr=1e-3), lambda p: torch.optim.RAdam(p, lr=1e-3),
     lambda p: torch.optim.Adamax(p, lr=1e-3)],
    ids=["rmsprop", "adagrad", "nadam", "radam", "adamax"],
)  # fmt: skip
def test_the_monitor_judges_the_edge_under_each_adaptive_optimizer(make):
    """A Monitor's checks get a threshold and the preconditioned sharpness, and say nothing about a
    missing rule (RAdam's first check falls in its SGD-like phase: the raw sharpness, unpreconditioned)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = make(model.parameters())

    def mse(m, batch):
        return (m(batch[0]) - batch[1]).pow(2).mean()

    monitor = Monitor(model, mse, optimizer=optimizer, check_every=4, log_every=1)
    batch = (torch.randn(16, 3), torch.randn(16, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            one_step(model, optimizer, mse, batch, monitor)
    assert not [w for w in caught if issubclass(w.category, HessdiagWarning) and "edge-of-stability" in str(w.message)]
    assert monitor.checks and all(check.stability is not None for check in monitor.checks)
    last = monitor.checks[-1]
    assert last.stability.preconditioned and last.sharpness != pytest.approx(last.lambda_max, rel=1e-3)


@pytest.mark.parametrize("lrs", [(1e-2, 1e-2), (1e-2, 3e-2)], ids=["one-lr", "per-group-lr"])
def test_the_diagonal_piece_by_piece_multiplies_as_the_flat_vector(lrs):
    """What a tracking reading scales with, piece by piece, gives the numbers of the flat vector
    times the vector, bit for bit: zero pieces (a parameter out of the optimizer) and 0 * inf
    included, in the vector's dtype, and the same ||d||_inf."""
    generator = torch.Generator().manual_seed(0)
    w, b, frozen = (nn.Parameter(torch.randn(n, generator=generator)) for n in (70_001, 3, 5))
    optimizer = torch.optim.AdamW([{"params": [w], "lr": lrs[0]}, {"params": [b], "lr": lrs[1]}], eps=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        ((w**3).sum() + (b**2).sum() * 7).backward()
        optimizer.step()
    params = [w, frozen, b]
    flat, diagonal = preconditioner_sqrt(optimizer, params), preconditioner_diagonal(optimizer, params)
    assert diagonal is not None and torch.equal(diagonal.flat("cpu"), flat)
    for dtype in (torch.float32, torch.float64):
        vector = torch.randn(flat.numel(), generator=generator, dtype=dtype)
        vector[70_002] = math.inf  # in the zero piece: nan, as 0 * inf
        expected = flat.to(dtype) * vector
        assert expected.isnan().sum() == 1
        torch.testing.assert_close(diagonal.mul(vector), expected, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(diagonal.mul(vector, out=vector), expected, rtol=0, atol=0, equal_nan=True)
    assert diagonal.max_abs() == float(torch.linalg.vector_norm(flat, math.inf))
