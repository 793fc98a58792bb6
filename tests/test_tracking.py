"""Tracking readings against known answers: Rayleigh-Ritz on a small Krylov space proves a lower
bound on lambda_max (of H, or of d H d under a preconditioner) and an eigenvalue within its residual,
against float64 dense Hessians, exact and finite-difference products; the probe's reading (a cold one
before any check, one Krylov space after, its cost, no observer effect, Adam's preconditioned
sharpness); the Monitor's readings and what each logs; the edge-of-stability flag raised by lower
bounds and never cleared by them; the bottom end measured where a detector can use it."""

from __future__ import annotations

import copy
import gc
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessdiag import Monitor
from hessdiag.check.probe import CurvatureProbe
from hessdiag.check.schedule import CheckSchedule
from hessdiag.detectors import CheckRecord, EdgeOfStabilityDetector, TrackingRecord
from hessdiag.check.tracking import COLD_KRYLOV_STEPS, EDGE_KRYLOV_STEPS, KRYLOV_STEPS, NEAR_EDGE, ritz_bound
from hessdiag.preconditioners import Diagonal
from hessdiag.operator import HessianOperator
from hessdiag.reporting import tags
from hessdiag.settings import DiagnosticsSettings
from hessdiag.preconditioners import preconditioner_sqrt
from hessdiag.stability import stability_threshold
from loops import one_step
from oracles import dense_hessian


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def tanh_mlp(seed=0, n=32, dtype=torch.float64):
    """A tanh MLP of 180 parameters on a classification batch: a Hessian with both signs."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)
    generator = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(n, 6, generator=generator, dtype=dtype)
    y = torch.randint(0, 4, (n,), generator=generator)
    return model, (x, y)


@functools.lru_cache(maxsize=None)
def problem(seed):
    """A tanh MLP, its batch and its dense float64 Hessian (computed once per seed)."""
    model, batch = tanh_mlp(seed)
    return model, batch, dense_hessian(model, cross_entropy, batch)


def assert_ritz_bound_holds(bound, eigenvalues):
    """The two claims of a :class:`RitzBound` against the true spectrum (float64)."""
    top = float(eigenvalues[-1])
    assert bound.lower_bound <= top + 1e-12 * abs(top), (bound, top)
    nearest = float((eigenvalues - bound.value).abs().min())
    assert nearest <= bound.residual, (bound, nearest)
    assert float(bound.next_vector.double().norm()) == pytest.approx(1.0, abs=1e-6)


def starts(eigenvectors, dim, seed, randoms=8):
    """Start vectors a reading meets: the top eigenvector itself (an invariant Krylov space), near it
    (the tracked vector after a small turn), further off, the bottom one, a mix, and `randoms` random
    ones."""
    generator = torch.Generator().manual_seed(seed)
    top, bottom = eigenvectors[:, -1], eigenvectors[:, 0]
    noise = torch.randn(dim, generator=generator, dtype=torch.float64)
    return [
        top.clone(),
        top + 1e-3 * noise / noise.norm(),
        top + 0.3 * noise / noise.norm(),
        bottom.clone(),
        top + bottom,
        *(torch.randn(dim, generator=generator, dtype=torch.float64) for _ in range(randoms)),
    ]


SEEDS = range(4)


@pytest.mark.parametrize("seed", SEEDS)
def test_ritz_bound_is_a_lower_bound_with_an_eigenvalue_within_its_residual(seed):
    model, batch, hessian = problem(seed)
    eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
    with HessianOperator(model, cross_entropy, batch, method="double_backward") as operator:
        for vector in starts(eigenvectors, operator.dim, seed):
            for steps in (1, KRYLOV_STEPS, 4):
                bound = ritz_bound(operator, vector, steps=steps)
                assert_ritz_bound_holds(bound, eigenvalues)
                unit = vector / vector.norm()
                # The Krylov space holds the start vector: its top Ritz value is at least v'Hv.
                assert bound.value >= float(unit @ hessian @ unit) - 1e-12 * float(eigenvalues.abs().max())
        near_top = ritz_bound(operator, starts(eigenvectors, operator.dim, seed)[1])
        cold = ritz_bound(operator, starts(eigenvectors, operator.dim, seed)[-1])
    top = float(eigenvalues[-1])
    # Near the top eigenvector the reading is tight; from a random vector it is a lower bound, far off.
    assert top - near_top.lower_bound <= 1e-6 * top and near_top.residual <= 1e-3 * top
    assert top - cold.lower_bound > 0.1 * top


@pytest.mark.parametrize("seed", SEEDS)
def test_ritz_bound_under_a_preconditioner_bounds_the_top_of_d_h_d(seed):
    model, batch, hessian = problem(seed)
    generator = torch.Generator().manual_seed(seed + 7)
    d = torch.exp(torch.randn(hessian.shape[0], generator=generator, dtype=torch.float64))  # 0.05 .. 20
    scaled = torch.diag(d) @ hessian @ torch.diag(d)
    eigenvalues, eigenvectors = torch.linalg.eigh(scaled)
    with HessianOperator(model, cross_entropy, batch, method="double_backward") as operator:
        for vector in starts(eigenvectors, operator.dim, seed):
            bound = ritz_bound(operator, vector, scale=Diagonal.whole(d))
            assert_ritz_bound_holds(bound, eigenvalues)
            unit = vector / vector.norm()
            assert bound.value >= float(unit @ scaled @ unit) - 1e-12 * float(eigenvalues.abs().max())
        # The top of H is not what it reads: from d H d's top vector it reads d H d's top, far above.
        tracked = ritz_bound(operator, eigenvectors[:, -1], scale=Diagonal.whole(d))
    assert tracked.value == pytest.approx(float(eigenvalues[-1]), rel=1e-12)
    assert float(eigenvalues[-1]) > 2 * float(torch.linalg.eigvalsh(hessian)[-1])


def test_ritz_bound_works_in_place_on_its_own_vectors_only():
    """The reading combines its basis and products in place: the tracked vector, the scale and the
    operator's gradient are left as they were, and a second reading reads the same."""
    model, batch, hessian = problem(0)
    d = torch.exp(torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    with HessianOperator(model, cross_entropy, batch, method="double_backward") as operator:
        gradient = operator.gradient()
        for vector in starts(torch.linalg.eigh(hessian)[1], operator.dim, 0, randoms=1):
            for scale in (None, Diagonal.whole(d)):
                for steps in (1, KRYLOV_STEPS, 4):
                    kept_vector, kept_scale = vector.clone(), d.clone()
                    first = ritz_bound(operator, vector, scale=scale, steps=steps)
                    assert torch.equal(vector, kept_vector) and torch.equal(d, kept_scale)
                    again = ritz_bound(operator, vector, scale=scale, steps=steps)
                    assert (again.value, again.residual) == (first.value, first.residual)
                    assert torch.equal(again.next_vector, first.next_vector)
        assert torch.equal(operator.gradient(), gradient)


@pytest.mark.parametrize("seed", SEEDS)
def test_finite_difference_readings_in_float32_bound_the_float64_truth(seed):
    """The products' error (measured along each basis vector) and float32 rounding are in the bounds:
    without them, readings from the top eigenvector land above lambda_max (measured: by up to 1e-5 of it)."""
    model, batch, hessian = problem(seed)
    # The float64 problem's eigenvectors start the readings; the truth is the float64 Hessian at the
    # float32 point (parameters and inputs rounded, so both models compute the same function).
    _, eigenvectors = torch.linalg.eigh(hessian)
    generator = torch.Generator().manual_seed(seed + 7)
    d = torch.exp(torch.randn(hessian.shape[0], generator=generator, dtype=torch.float64)).float()
    _, scaled_vectors = torch.linalg.eigh(torch.diag(d.double()) @ hessian @ torch.diag(d.double()))
    single, single_batch = copy.deepcopy(model).float(), (batch[0].float(), batch[1])
    truth = dense_hessian(copy.deepcopy(single).double(), cross_entropy, (single_batch[0].double(), batch[1]))
    eigenvalues = torch.linalg.eigvalsh(truth)
    scaled_values = torch.linalg.eigvalsh(torch.diag(d.double()) @ truth @ torch.diag(d.double()))
    with HessianOperator(single, cross_entropy, single_batch, method="finite_difference") as operator:
        for vector in starts(eigenvectors, operator.dim, seed, randoms=2):
            assert_ritz_bound_holds(ritz_bound(operator, vector.float()), eigenvalues)
        for vector in starts(scaled_vectors, operator.dim, seed, randoms=2):
            assert_ritz_bound_holds(ritz_bound(operator, vector.float(), scale=Diagonal.whole(d)), scaled_values)


# -- the probe's reading ------------------------------------------------------------------------------
def sgd_steps(model, optimizer, batch, steps, loss_fn=cross_entropy):
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()


def assert_proven(reading, eigenvalues):
    """A reading's two claims against the true spectrum: a lower bound, an eigenvalue within its residual."""
    top = float(eigenvalues[-1])
    assert reading.lambda_max_lower_bound <= top + 1e-12 * abs(top), (reading, top)
    assert float((eigenvalues - reading.value).abs().min()) <= reading.residual + 1e-12, reading


@pytest.mark.parametrize("seed", SEEDS)
def test_a_reading_before_any_check_starts_cold_and_is_still_a_proven_lower_bound(seed):
    model, batch = tanh_mlp(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sgd_steps(model, optimizer, batch, 5)
    eigenvalues = torch.linalg.eigvalsh(dense_hessian(model, cross_entropy, batch))
    probe = CurvatureProbe(model, cross_entropy, DiagnosticsSettings(hvp_method="double_backward"))
    reading = probe.track(5, batch, optimizer)  # nothing tracked yet: a random start
    assert reading.step == 5 and reading.num_hvps == COLD_KRYLOV_STEPS
    assert_proven(reading, eigenvalues)
    assert reading.lambda_max_lower_bound > 0  # six products from a random vector see positive curvature
    assert probe.starts.method == "double_backward" and probe.starts.tracked is not None
    # The next one tracks the cold reading's Ritz vector: one Krylov space of at most KRYLOV_STEPS.
    following = probe.track(6, batch, optimizer)
    assert 1 <= following.num_hvps <= KRYLOV_STEPS and following.value >= reading.value - 1e-12
    assert_proven(following, eigenvalues)
    # "auto" settles the product method at the first cold reading (cross-checked) for those after it.
    auto = CurvatureProbe(model, cross_entropy, DiagnosticsSettings(hvp_method="auto"))
    assert auto.track(5, batch, optimizer).num_hvps >= COLD_KRYLOV_STEPS
    assert auto.starts.method == "double_backward"


def test_after_a_check_a_reading_follows_the_top_with_one_krylov_space():
    model, batch = tanh_mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sgd_steps(model, optimizer, batch, 40)  # past the first steps, where the top eigenvector is overtaken
    probe = CurvatureProbe(model, cross_entropy, DiagnosticsSettings(hvp_method="auto", tol=1e-6))
    check = probe.run(40, batch, optimizer)
    assert check.hvp_method == "double_backward"
    for step in range(43, 60, 3):  # the parameters move; each reading follows the top from the last one
        sgd_steps(model, optimizer, batch, 3)
        tracked = probe.starts.tracked.double()
        hessian = dense_hessian(model, cross_entropy, batch)
        eigenvalues = torch.linalg.eigvalsh(hessian)
        top = float(eigenvalues[-1])
        reading = probe.track(step, batch, optimizer)
        # The first reading after a check spans the full Krylov space; later ones at most that (one
        # product once the tracked vector is close to an eigenvector).
        assert reading.step == step and 1 <= reading.num_hvps <= KRYLOV_STEPS
        assert step > 43 or reading.num_hvps == KRYLOV_STEPS
        assert_proven(reading, eigenvalues)
        # One Krylov step improves on the tracked vector: the bound is at least its Rayleigh quotient,
        # and it follows the top (measured within 1% of it here, 3 steps apart).
        assert reading.lambda_max_lower_bound >= float(tracked @ hessian @ tracked) - 1e-12 * top
        assert reading.lambda_max_lower_bound >= 0.99 * top
        # SGD's threshold is 2/lr on lambda_max itself: the sharpness bound is the same number.
        assert reading.sharpness_lower_bound == reading.lambda_max_lower_bound and reading.stability_threshold == 4.0
        with torch.no_grad():
            assert reading.loss == pytest.approx(float(cross_entropy(model, batch)), rel=1e-12)
    # Other trainable parameters: the tracked vector does not fit, the reading starts cold over them.
    model[0].weight.requires_grad_(False)
    eigenvalues = torch.linalg.eigvalsh(dense_hessian(model, cross_entropy, batch))  # over the trainable ones
    assert eigenvalues.numel() == 180 - model[0].weight.numel()
    reading = probe.track(60, batch, optimizer)
    assert reading.num_hvps == COLD_KRYLOV_STEPS
    assert_proven(reading, eigenvalues)


@pytest.mark.parametrize("near_edge", [False, True])
def test_near_the_edge_of_stability_a_reading_spans_one_krylov_step_more(near_edge):
    """Where the last curvature point put the sharpness at NEAR_EDGE of its threshold or beyond, a
    reading from a vector that is not yet close to an eigenvector spans EDGE_KRYLOV_STEPS products:
    a proven lower bound still, and never below the two-step reading from the same vector (its
    Krylov space contains that one); elsewhere it spans KRYLOV_STEPS."""
    model, batch = tanh_mlp(1)
    top = float(torch.linalg.eigvalsh(dense_hessian(model, cross_entropy, batch))[-1])
    # plain SGD: the threshold is 2/lr, so lr sets the ratio (0.8 near the edge, 0.05 far from it)
    optimizer = torch.optim.SGD(model.parameters(), lr=(0.8 if near_edge else 0.05) * 2 / top)
    probe = CurvatureProbe(model, cross_entropy, DiagnosticsSettings(tol=1e-8, noise_scale_parts=0))
    check = probe.run(0, batch, optimizer)
    assert (check.stability_ratio >= NEAR_EDGE) == near_edge
    # a tracked vector far from the top (the check's top Ritz vector and as much noise), as after many steps
    noise = torch.randn(probe.starts.tracked.numel(), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mixed = probe.starts.tracked + noise / noise.norm()
    probe.starts.tracked = mixed / mixed.norm()
    with HessianOperator(model, cross_entropy, batch) as operator:
        two_steps = ritz_bound(operator, probe.starts.tracked, steps=KRYLOV_STEPS)
    hessian = dense_hessian(model, cross_entropy, batch)
    reading = probe.track(1, batch, optimizer)
    assert reading.num_hvps == (EDGE_KRYLOV_STEPS if near_edge else KRYLOV_STEPS)
    assert_proven(reading, torch.linalg.eigvalsh(hessian))
    assert reading.lambda_max_lower_bound >= two_steps.lower_bound - 1e-10 * top
    if near_edge:
        assert reading.lambda_max_lower_bound > two_steps.lower_bound + 1e-6 * top
    # the reading's own ratio decides the next one (a lower bound's, after a tracking reading)
    assert probe.starts.tracked_ratio == pytest.approx(reading.stability_ratio_lower_bound)


def snapshot(model, optimizer):
    """Everything a reading must leave as it was, copied."""
    return {
        "parameters": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "modes": [m.training for m in model.modules()],
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "rng": torch.get_rng_state(),
    }


def assert_same(before, after):
    for key in ("parameters", "grads", "buffers"):
        assert len(before[key]) == len(after[key])
        for a, b in zip(before[key], after[key]):
            assert (a is None and b is None) or torch.equal(a, b), key
    assert before["modes"] == after["modes"]
    assert torch.equal(before["rng"], after["rng"])
    for state_before, state_after in zip(before["optimizer"]["state"].values(), after["optimizer"]["state"].values()):
        assert state_before.keys() == state_after.keys()
        assert all(torch.equal(torch.as_tensor(state_before[k]), torch.as_tensor(state_after[k])) for k in state_before)
    assert before["optimizer"]["param_groups"] == after["optimizer"]["param_groups"]


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.Adam])
def test_a_reading_leaves_the_run_bit_for_bit_as_it_was(optimizer_class):
    """Dropout and BatchNorm in train mode, the optimizer's state, the RNG and the gradients of the
    last backward: a reading changes none of them, so training goes on as without it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 4))
    batch = (torch.randn(32, 6), torch.randint(0, 4, (32,)))
    kwargs = {"lr": 0.1, "momentum": 0.9} if optimizer_class is torch.optim.SGD else {"lr": 0.01}
    optimizer = optimizer_class(model.parameters(), **kwargs)
    probe = CurvatureProbe(model, cross_entropy, DiagnosticsSettings(tol=1e-4))
    sgd_steps(model, optimizer, batch, 3)
    probe.run(3, batch, optimizer)
    sgd_steps(model, optimizer, batch, 2)
    optimizer.zero_grad()
    cross_entropy(model, batch).backward()  # gradients the loop has not stepped on yet
    before = snapshot(model, optimizer)
    reading = probe.track(5, batch, optimizer)
    assert reading is not None and reading.num_hvps == KRYLOV_STEPS
    assert_same(before, snapshot(model, optimizer))


def test_under_adam_a_reading_bounds_the_preconditioned_sharpness():
    """Adam's threshold refers to lambda_max(P^-1 H) = lambda_max(D H D), D = P^-1/2 from the
    optimizer's state at the reading: the reading bounds that from below, not lambda_max(H)."""
    model, batch = tanh_mlp(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    sgd_steps(model, optimizer, batch, 20)
    probe = CurvatureProbe(model, cross_entropy, DiagnosticsSettings(hvp_method="double_backward", tol=1e-6))
    probe.run(20, batch, optimizer)
    for step in (23, 26, 29):
        sgd_steps(model, optimizer, batch, 3)
        reading = probe.track(step, batch, optimizer)
        d = preconditioner_sqrt(optimizer, list(model.parameters())).double()
        hessian = dense_hessian(model, cross_entropy, batch)
        sharpness = float(torch.linalg.eigvalsh(torch.diag(d) @ hessian @ torch.diag(d))[-1])
        assert reading.lambda_max_lower_bound is None  # only the preconditioned operator is read
        assert reading.stability_threshold == pytest.approx(stability_threshold(optimizer).threshold, rel=1e-12)
        assert reading.sharpness_lower_bound <= sharpness * (1 + 1e-12)
        assert reading.sharpness_lower_bound >= 0.95 * sharpness  # it tracks the preconditioned top
        # lambda_max(H) is far below: a reading of the raw Hessian could not be this bound.
        assert float(torch.linalg.eigvalsh(hessian)[-1]) < 0.5 * reading.sharpness_lower_bound


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerator memory, which training uses between readings, needs CUDA")
@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.Adam])
def test_the_vectors_kept_between_readings_take_no_accelerator_memory(optimizer_class):
    """Between readings the accelerator's memory is training's: what a check or a reading keeps for
    the next (warm starts, the tracked vectors, Adam's preconditioned ones) is in host memory, so
    the memory allocated after each reading is what it was before it (not one vector more)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.Tanh(), nn.Linear(1024, 10)).cuda()
    batch = (torch.randn(64, 256, device="cuda"), torch.randint(0, 10, (64,), device="cuda"))
    optimizer = optimizer_class(model.parameters(), lr=0.01)
    sgd_steps(model, optimizer, batch, 3)
    probe = CurvatureProbe(model, cross_entropy, DiagnosticsSettings(tol=1e-4))
    vector_bytes = 4 * sum(p.numel() for p in model.parameters())
    for read in (lambda: probe.run(3, batch, optimizer), lambda: probe.track(4, batch, optimizer), lambda: probe.track(5, batch, optimizer)):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        read()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - before < vector_bytes / 2
    kept = [v for v in probe.starts.state_dict().values() if isinstance(v, torch.Tensor)]
    assert len(kept) == (4 if optimizer_class is torch.optim.Adam else 2)
    assert all(v.device.type == "cpu" for v in kept)


# -- the Monitor's readings ---------------------------------------------------------------------------
class Capture:
    """A writer that keeps every scalar by step (the union of what each step's calls wrote)."""

    def __init__(self):
        self.by_step: dict[int, dict[str, float]] = {}

    def scalars(self, step, values, layers):
        self.by_step.setdefault(step, {}).update(values)

    def events(self, step, events): ...

    def density(self, step, density): ...

    def text(self, step, tag, message): ...

    def flush(self): ...

    def steps_with(self, tag):
        return {step for step, values in self.by_step.items() if tag in values}


def mse(model, batch):
    return (model(batch[0]) - batch[1]).pow(2).mean()


def linear_regression(n=64, features=5, seed=0):
    """Least squares on a fixed batch: the Hessian is 2 [X 1]'[X 1] / n at every point (float64)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator) * torch.linspace(0.5, 3.0, features)
    y = x @ torch.randn(features, 1, generator=generator) + 0.1 * torch.randn(n, 1, generator=generator)
    design = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    return (x, y), torch.linalg.eigvalsh(2 * design.T @ design / n)


class LossUnseen:
    """A Monitor as a loop that passes it no loss drives it."""

    def __init__(self, monitor):
        self.monitor = monitor

    def after_backward(self):
        self.monitor.after_backward()

    def after_step(self, batch, loss):
        return self.monitor.after_step(batch)


def train_linear_regression(monitor_kwargs, lr_times_top, steps, seed=0, pass_loss=True):
    """SGD on :func:`linear_regression` at lr = `lr_times_top` / lambda_max, observed by a Monitor at
    its defaults but for `monitor_kwargs` (given each step's loss unless `pass_loss` is False);
    returns the monitor, its capture writer and the spectrum."""
    batch, eigenvalues = linear_regression(seed=seed)
    top = float(eigenvalues[-1])
    torch.manual_seed(seed)
    model = nn.Linear(batch[0].shape[1], 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr_times_top / top)
    capture = Capture()
    monitor = Monitor(model, mse, optimizer=optimizer, writer=capture, **monitor_kwargs)
    for _ in range(steps):
        one_step(model, optimizer, mse, batch, monitor if pass_loss else LossUnseen(monitor))
    monitor.flush()
    return monitor, capture, eigenvalues


@pytest.mark.parametrize("pass_loss", [True, False])
def test_a_monitor_at_its_defaults_reads_curvature_all_through_the_run_and_logs_lower_bounds_as_such(pass_loss):
    """A run whose losses fall starts with tracking readings; a loop that passes no loss gives the
    saddle rule nothing to judge its pace by, so its first reading is a full check. Either way the
    curvature is read from step 10 on, and a lower bound is never logged as lambda_max."""
    monitor, capture, eigenvalues = train_linear_regression({}, lr_times_top=0.5, steps=400, pass_loss=pass_loss)
    top = float(eigenvalues[-1])
    check_steps = {check.step for check in monitor.checks}
    reading_steps = {reading.step for reading in monitor.readings}
    assert not check_steps & reading_steps
    assert sorted(check_steps | reading_steps)[:3] == [10, 40, 160]
    first = 10 in check_steps
    assert first != pass_loss and {40, 160} <= reading_steps
    # lambda_max (a converged value) only where a full check measured it; the lower bound everywhere.
    assert capture.steps_with(tags.LAMBDA_MAX) == check_steps
    assert capture.steps_with(tags.LAMBDA_MAX_LOWER) == check_steps | reading_steps
    assert capture.steps_with(tags.TRACKING_RESIDUAL) == reading_steps
    for step in check_steps | reading_steps:
        lower = capture.by_step[step][tags.LAMBDA_MAX_LOWER]
        assert lower <= top * (1 + 1e-12), (step, lower, top)
        assert lower >= (1 - 2e-3) * top  # the Hessian is constant: every reading finds its top
    for reading in monitor.readings:
        assert capture.by_step[reading.step][tags.LAMBDA_MAX_LOWER] == reading.lambda_max_lower_bound
        assert capture.by_step[reading.step][tags.SHARPNESS_LOWER] == reading.sharpness_lower_bound
        threshold = 2 / (0.5 / top)  # SGD's 2 / lr
        assert capture.by_step[reading.step][tags.RATIO_LOWER] == pytest.approx(reading.sharpness_lower_bound / threshold)
        # A cold reading (nothing tracked before it) spans COLD_KRYLOV_STEPS; the later ones track.
        cold = reading is monitor.readings[0] and not first
        assert reading.num_hvps == COLD_KRYLOV_STEPS if cold else 1 <= reading.num_hvps <= KRYLOV_STEPS


# -- the edge-of-stability flag from lower bounds -----------------------------------------------------
def test_the_edge_of_stability_flag_rises_from_tracking_readings_without_a_full_check():
    """lr lambda_max = 2.1 > 2: the readings at steps 10 and 40 prove the ratio (a lower bound above
    the trigger, two in a row) and raise the flag; no full check needed."""
    monitor, capture, _ = train_linear_regression({}, lr_times_top=2.1, steps=45)
    assert monitor.checks == [] and [reading.step for reading in monitor.readings] == [10, 40]
    (onset,) = [event for event in monitor.events if event.name == "edge_of_stability"]
    assert onset.kind == "onset" and onset.step == 40
    assert "proven lower bound" in onset.summary and onset.severity == "warning"
    assert 1 < onset.evidence["ratio"] <= 1.05 * (1 + 1e-12)  # a lower bound on lr lambda_max / 2 = 1.05
    assert capture.by_step[onset.step][tags.flag_tag("edge_of_stability")] == 1.0
    assert "edge_of_stability" in monitor.active_flags


def tracking(step, ratio, threshold=10.0):
    return TrackingRecord(step, ratio * threshold, ratio * threshold, threshold)


def check_at(step, ratio, threshold=10.0):
    return CheckRecord(
        step=step, loss=1.0, grad_norm=1.0, lambda_max=ratio * threshold, lambda_min=0.0,
        negative_curvature_certified=False, loss_change_along_bottom=None, sharpness=ratio * threshold,
        stability_threshold=threshold,
    )  # fmt: skip


def kinds(detector, records):
    return [(event.kind, event.step) for record in records for event in detector.observe(record)]


def test_a_lower_bound_at_the_trigger_raises_the_flag_and_one_below_never_clears_it():
    detector = EdgeOfStabilityDetector()  # trigger 0.9, clear below 0.8, two in a row each
    assert kinds(detector, [tracking(1, 0.9), tracking(2, 0.95)]) == [("onset", 2)]
    # Lower bounds far below the threshold prove nothing about the sharpness: the flag stays up.
    assert kinds(detector, [tracking(step, 0.01) for step in range(3, 40)]) == [] and detector.active
    # Only full checks clear it; a lower bound between them neither clears nor resets their count.
    assert kinds(detector, [check_at(40, 0.5), tracking(41, 0.1), check_at(42, 0.5)]) == [("cleared", 42)]
    # Nor does a lower bound below the trigger break a run of triggering checks.
    assert kinds(detector, [check_at(50, 0.95), tracking(51, 0.3), check_at(52, 0.95)]) == [("onset", 52)]
    # On an active flag a lower bound above clear_ratio proves it should stay: it breaks the clearing run.
    assert kinds(detector, [check_at(60, 0.5), tracking(61, 0.85), check_at(62, 0.5)]) == []
    assert detector.active
    # Without a threshold a reading says nothing.
    assert kinds(EdgeOfStabilityDetector(), [TrackingRecord(1, 50.0, None, None)] * 3) == []


# -- the bottom end where a detector can use it -------------------------------------------------------
def test_auto_checks_measure_the_bottom_end_only_where_the_saddle_rule_could_use_it(monkeypatch):
    # A run whose loss falls: its first full check (here the third reading, as if the budget paid for
    # it there, whatever the wall clock of this machine says) is top-only.
    decide = CheckSchedule.kind
    monkeypatch.setattr(
        CheckSchedule, "kind", lambda self, device, verdict=False: "check" if self.checks_done >= 2 else decide(self, device, verdict)
    )
    progressing, capture, _ = train_linear_regression({}, lr_times_top=0.5, steps=200)
    monkeypatch.undo()
    assert progressing.checks
    check = progressing.checks[0]
    assert check.step > 10 and not check.bottom and check.lambda_max > 0
    assert tags.LAMBDA_MAX in capture.by_step[check.step] and tags.LAMBDA_MIN not in capture.by_step[check.step]
    # A stalled run (lr 0: the loss stands still): its first reading is a full check with both ends,
    # the saddle rule needs lambda_min.
    stalled, capture, eigenvalues = train_linear_regression({}, lr_times_top=0.0, steps=12)
    (check,) = stalled.checks
    assert check.step == 10 and check.bottom and tags.LAMBDA_MIN in capture.by_step[10]
    bottom, top = float(eigenvalues[0]), float(eigenvalues[-1])
    assert bottom - 1e-6 * top <= check.lambda_min <= bottom + 1e-2 * top  # interlacing, and tol 1e-3
    # With a fixed cadence every check measures both ends.
    fixed, capture, _ = train_linear_regression({"check_every": 4}, lr_times_top=0.5, steps=12)
    assert [check.bottom for check in fixed.checks] == [True] * 3
    assert capture.steps_with(tags.LAMBDA_MIN) == {4, 8, 12}


def test_the_last_direction_is_not_held_through_its_product():
    """Under a scale the last basis vector is dropped during its product (recomputed after, bit for
    bit): at the second product of a two-step reading only the first basis vector, the first
    product and the operand are the reading's own parameter-sized vectors (the first basis vector too,
    held through it, made it fail)."""
    model, batch, hessian = problem(0)
    d = torch.exp(torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    vector = torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with HessianOperator(model, cross_entropy, batch, method="double_backward") as operator:

        def sized_storages():
            gc.collect()
            sized = [t for t in gc.get_objects() if type(t) is torch.Tensor and t.shape == (operator.dim,)]
            return {t.untyped_storage().data_ptr() for t in sized}

        # everything parameter-sized before the reading (the operator's own gradient included), all
        # held alive through it, so that no address is reused by the reading's vectors
        outside = sized_storages()
        matvec, alive = operator.matvec, []

        def counted(v, *, out=None):
            alive.append(len(sized_storages() - outside))
            return matvec(v, out=out)

        operator.matvec = counted
        ritz_bound(operator, vector, scale=Diagonal.whole(d), steps=2)
    assert alive[1] <= 3, alive
