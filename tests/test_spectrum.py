"""Hutch++ trace and stochastic Lanczos quadrature against closed forms."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessdiag import hessian_spectral_density, hessian_trace
from hessdiag.estimators.spectrum import hutchpp_trace, slq_density
from oracles import dense_hessian


def symmetric(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q @ torch.diag(eigenvalues.double()) @ q.T


def test_hutchpp_is_exact_for_low_rank():
    """Rank 8 <= num_matvecs / 3: the sketch captures the range, the trace is exact."""
    eigenvalues = torch.zeros(200, dtype=torch.float64)
    eigenvalues[:8] = torch.linspace(-3, 10, 8)
    a = symmetric(eigenvalues)
    estimate = hutchpp_trace(lambda v: a @ v, 200, num_matvecs=30, dtype=torch.float64)
    assert estimate.trace == pytest.approx(float(eigenvalues.sum()), abs=1e-9)
    assert estimate.num_matvecs == 30


def test_hutchpp_beats_the_error_of_hutchinson_on_a_decaying_spectrum():
    eigenvalues = 1.0 / torch.arange(1, 301, dtype=torch.float64) ** 2
    a = symmetric(eigenvalues, seed=1)
    errors = [
        abs(hutchpp_trace(lambda v: a @ v, 300, num_matvecs=60, seed=s, dtype=torch.float64).trace - float(eigenvalues.sum()))
        for s in range(10)
    ]
    # Hutchinson with 60 probes has a standard error of ~sqrt(2 * ||A||_F^2 / 60) = 0.22 here.
    assert max(errors) < 0.01 * float(eigenvalues.sum())


def test_slq_quadrature_is_exact_for_low_degree_polynomials():
    """m Lanczos steps give Gauss quadrature: sum_i tau_i theta_i^p = v^T A^p v for p < 2m."""
    a = symmetric(torch.linspace(-2, 5, 100))
    probe_count, steps = 3, 6
    density = slq_density(lambda v: a @ v, 100, num_probes=probe_count, num_iter=steps, dtype=torch.float64)
    torch.testing.assert_close(density.weights.sum(dim=1), torch.ones(probe_count, dtype=torch.float64))
    generator = torch.Generator().manual_seed(0)
    probes = (torch.randint(0, 2, (probe_count, 100), generator=generator, dtype=torch.int8).double() * 2 - 1) / 10.0
    for power in range(2 * steps):
        exact = torch.stack([v @ torch.linalg.matrix_power(a, power) @ v for v in probes]).mean()
        assert density.moment(power) == pytest.approx(float(exact), rel=1e-8, abs=1e-8)


def test_slq_density_integrates_to_one_and_locates_the_mass():
    a = symmetric(torch.cat([torch.zeros(90), torch.full((10,), 4.0)]))
    density = slq_density(lambda v: a @ v, 100, num_probes=8, num_iter=10, dtype=torch.float64)
    grid = torch.linspace(-1, 5, 2001, dtype=torch.float64)
    values = density.density(grid, sigma=0.05)
    assert float(torch.trapezoid(values, grid)) == pytest.approx(1.0, abs=1e-3)
    near_four = grid.sub(4).abs() < 0.5
    assert float(torch.trapezoid(values[near_four], grid[near_four])) == pytest.approx(0.1, abs=0.05)


def test_hessian_wrappers_on_a_small_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    batch = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,)))

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    dense = dense_hessian(model, loss_fn, batch)
    dim = dense.shape[0]
    trace = hessian_trace(model, loss_fn, batch, num_hvps=3 * dim)
    assert trace.trace == pytest.approx(float(torch.trace(dense)), rel=1e-8)  # sketch spans everything
    density = hessian_spectral_density(model, loss_fn, batch, num_probes=2, num_iter=dim)
    assert density.moment(1) * dim == pytest.approx(float(torch.trace(dense)), rel=0.5)
    assert float(density.nodes.max()) == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-6)
