"""Lanczos on explicit symmetric matrices with prescribed spectra (float64 oracles)."""

import importlib

import pytest
import torch

from hessdiag import _distributed
from hessdiag.lanczos import lanczos, start_vector
from hessdiag.vectors import VectorShard, random_generator, random_signs
from oracles import matrix_with_spectrum


def indefinite_spectrum(n: int = 300) -> torch.Tensor:
    values = torch.linspace(-0.5, 1.0, n, dtype=torch.float64)
    values[-3:] = torch.tensor([3.0, 4.0, 6.0], dtype=torch.float64)
    values[:2] = torch.tensor([-2.0, -1.2], dtype=torch.float64)
    return values


def test_both_ends_float64_to_1e6():
    eigenvalues = indefinite_spectrum()
    a, _ = matrix_with_spectrum(eigenvalues)
    result = lanczos(lambda v: a @ v, a.shape[0], k=2, tol=1e-9, max_iter=120, dtype=torch.float64)
    assert result.converged
    torch.testing.assert_close(result.top, torch.tensor([6.0, 4.0], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(result.bottom, torch.tensor([-2.0, -1.2], dtype=torch.float64), atol=1e-6, rtol=0)
    assert result.negative_curvature_certified


def test_both_ends_float32_to_1e4():
    eigenvalues = indefinite_spectrum()
    a, _ = matrix_with_spectrum(eigenvalues)
    a32 = a.float()
    result = lanczos(lambda v: a32 @ v, a.shape[0], tol=1e-6, max_iter=120, dtype=torch.float32)
    assert abs(float(result.top[0]) - 6.0) < 1e-4 * 6.0
    assert abs(float(result.bottom[0]) + 2.0) < 1e-4 * 6.0


def test_reported_accuracy_is_honest_at_default_tolerance():
    """At tol=1e-3 the answer is within 1e-3 (relative), and the run stops long before exhaustion."""
    eigenvalues = indefinite_spectrum()
    a, _ = matrix_with_spectrum(eigenvalues)
    result = lanczos(lambda v: a @ v, a.shape[0], dtype=torch.float64)
    assert result.converged
    assert abs(float(result.top[0]) - 6.0) <= 1e-3 * 6.0
    assert abs(float(result.bottom[0]) + 2.0) <= 1e-3 * 6.0
    assert result.num_iterations < 40
    # The residual bound is rigorous: an eigenvalue lies within it of each Ritz value.
    for value, bound in ((result.top[0], result.top_residuals[0]), (result.bottom[0], result.bottom_residuals[0])):
        assert float((eigenvalues - value).abs().min()) <= float(bound) + 1e-12


def test_ritz_vectors_are_eigenvectors():
    eigenvalues = indefinite_spectrum()
    a, q = matrix_with_spectrum(eigenvalues)
    result = lanczos(lambda v: a @ v, a.shape[0], tol=1e-10, max_iter=150, dtype=torch.float64)
    top = result.top_vectors[0]
    assert torch.linalg.vector_norm(top) == pytest.approx(1.0, abs=1e-12)
    assert abs(float(torch.dot(top, q[:, -1]))) == pytest.approx(1.0, abs=1e-8)
    assert abs(float(torch.dot(result.bottom_vectors[0], q[:, 0]))) == pytest.approx(1.0, abs=1e-8)


def test_no_ghost_eigenvalues_with_full_reorthogonalisation():
    """Run far past convergence of the extremes: without reorthogonalisation copies of 6.0 appear."""
    eigenvalues = indefinite_spectrum(200)
    a, _ = matrix_with_spectrum(eigenvalues)
    result = lanczos(lambda v: a @ v, a.shape[0], k=3, tol=0.0, max_iter=120, dtype=torch.float64)
    assert int((result.ritz_values - 6.0).abs().lt(1e-6).sum()) == 1
    torch.testing.assert_close(result.top, torch.tensor([6.0, 4.0, 3.0], dtype=torch.float64), atol=1e-8, rtol=0)


def test_invariant_subspace_restart_finds_every_eigenvalue():
    """A start vector inside an invariant subspace breaks down early; the run restarts and finds the rest."""
    a = torch.diag(torch.tensor([-3.0, -1.0, 0.5, 2.0, 5.0], dtype=torch.float64))
    start = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)  # spans eigenvalues -1 and 0.5 only
    result = lanczos(lambda v: a @ v, 5, tol=1e-10, v0=start, warm_random=0.0, dtype=torch.float64)
    assert float(result.top[0]) == pytest.approx(5.0, abs=1e-10)
    assert float(result.bottom[0]) == pytest.approx(-3.0, abs=1e-10)


def test_warm_start_from_a_stale_eigenvector_still_finds_the_top():
    """The top eigenvector turned: the previous top vector is now the second one (0.95 vs 1.0).

    The random component must let Lanczos find the new top instead of certifying the old one."""
    eigenvalues = torch.linspace(0.0, 0.5, 400, dtype=torch.float64)
    eigenvalues[-2:] = torch.tensor([0.95, 1.0], dtype=torch.float64)
    a, q = matrix_with_spectrum(eigenvalues, seed=3)
    stale = q[:, -2]
    result = lanczos(lambda v: a @ v, 400, which="top", tol=1e-3, v0=stale, dtype=torch.float64)
    assert abs(float(result.top[0]) - 1.0) <= 1e-3


def test_warm_start_after_a_small_change_converges_to_the_new_top():
    """A warm start runs `warm_steps` products beyond `min_iter` (the price of finding an overtaking
    eigenvalue, tests/test_certified.py), so it is no cheaper than a cold one here; it must be right."""
    eigenvalues = indefinite_spectrum()
    a, _ = matrix_with_spectrum(eigenvalues)
    cold = lanczos(lambda v: a @ v, a.shape[0], which="top", dtype=torch.float64)
    perturbation = 1e-3 * matrix_with_spectrum(torch.randn(300, generator=torch.Generator().manual_seed(1)), seed=2)[0]
    b = a + perturbation
    warm = lanczos(lambda v: b @ v, a.shape[0], which="top", v0=cold.top_vectors, dtype=torch.float64)
    assert warm.converged
    assert warm.num_iterations >= 3 + 8
    exact = float(torch.linalg.eigvalsh(b)[-1])
    assert abs(float(warm.top[0]) - exact) <= 1e-3 * exact


@pytest.mark.parametrize("basis", ["device", "host", "recurrence"])
def test_basis_storages_agree(basis):
    eigenvalues = indefinite_spectrum()
    a, _ = matrix_with_spectrum(eigenvalues)
    result = lanczos(lambda v: a @ v, a.shape[0], tol=1e-8, max_iter=100, basis=basis, dtype=torch.float64)
    assert result.basis == basis
    assert float(result.top[0]) == pytest.approx(6.0, abs=1e-6)
    assert float(result.bottom[0]) == pytest.approx(-2.0, abs=1e-6)
    assert (result.top_vectors is None) == (basis == "recurrence")


def test_memory_budget_falls_back_to_the_recurrence():
    a, _ = matrix_with_spectrum(indefinite_spectrum())
    result = lanczos(lambda v: a @ v, a.shape[0], tol=1e-6, memory_budget=1000, dtype=torch.float64)
    assert result.basis == "recurrence"
    assert float(result.top[0]) == pytest.approx(6.0, abs=1e-5)


def test_not_converged_is_reported():
    a, _ = matrix_with_spectrum(indefinite_spectrum())
    result = lanczos(lambda v: a @ v, a.shape[0], tol=1e-12, max_iter=5, dtype=torch.float64)
    assert not result.converged
    assert result.num_iterations == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "`k` must be a positive int"),
        ({"k": 11}, r"`k` must be at most the dimension \(10\)"),
        ({"which": "largest"}, "`which` must be one of"),
        ({"tol": -1.0}, r"`tol` must be a number in \[0, 1\)"),
        ({"max_iter": 0}, "`max_iter` must be a positive int"),
        ({"warm_random": 2.0}, r"`warm_random` must be in \[0, 1\]"),
        ({"basis": "gpu"}, "`basis` must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lanczos(lambda v: v, 10, **kwargs)


def test_random_vectors_are_drawn_on_the_device_also_under_data_parallelism(monkeypatch):
    """Drawn where they are used (no host vector of millions of coordinates per check), under data
    parallelism too (rank 0's draw is broadcast there: see tests/test_distributed.py). Sharded vectors
    are drawn per process."""
    assert random_generator(0, None, "cpu").device.type == "cpu"
    monkeypatch.setattr(_distributed, "is_data_parallel", lambda: True)
    pieces = [
        torch.randn(4, generator=random_generator(0, VectorShard(size=4, sum_=lambda partial: partial, index=rank)))
        for rank in (0, 1)
    ]
    assert not torch.equal(pieces[0], pieces[1])  # each process draws its own coordinates


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA generators exist only with CUDA")
def test_on_cuda_the_start_is_drawn_on_the_device_and_the_bounds_hold(monkeypatch):
    assert random_generator(0, None, "cuda").device.type == "cuda"
    with monkeypatch.context() as patched:
        patched.setattr(_distributed, "is_data_parallel", lambda: True)
        assert random_generator(0, None, "cuda").device.type == "cuda"  # was forced onto the host before
    generator = torch.Generator().manual_seed(0)
    d = torch.cat([torch.tensor([1.0, -0.3], dtype=torch.float64), 0.5 * torch.rand(3000, generator=generator, dtype=torch.float64)])
    diagonal = d.cuda()
    for dtype in (torch.float64, torch.float32):
        result = lanczos(lambda v: diagonal.to(dtype) * v, d.numel(), which="both", max_iter=100, device="cuda", dtype=dtype)
        assert result.converged and result.top_vectors.device.type == "cuda"
        assert abs(float(result.top[0]) - 1.0) <= float(result.top_error_bounds[0])
        assert abs(float(result.bottom[0]) + 0.3) <= float(result.bottom_error_bounds[0])


def test_host_draws_in_chunks_give_the_numbers_of_one_draw(monkeypatch):
    """Random vectors drawn on the host are made a chunk at a time (a billion float64 coordinates
    would be 8 GB on every rank of a node); the chunks must not change a single number."""

    def draws():
        start = start_vector(1000, None, warm_random=0.0, device=torch.device("cpu"), dtype=torch.float32, generator=random_generator(3))
        signs = random_signs(1000, random_generator(4), torch.device("cpu"), torch.float64)
        return start, signs

    whole = draws()
    monkeypatch.setattr(importlib.import_module("hessdiag.vectors"), "HOST_DRAW_CHUNK", 48)
    chunked = draws()
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    expected = torch.randn(1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(whole[0], (expected / expected.norm()).float())
    bits = torch.randint(0, 2, (1000,), generator=torch.Generator().manual_seed(4), dtype=torch.int8)
    assert torch.equal(whole[1], bits.double() * 2 - 1)


def test_steps_that_cannot_stop_skip_the_tridiagonal_eigendecomposition_and_decide_alike(monkeypatch):
    """A warm start may not stop during its first min_iter + warm_steps products: those steps need no
    eigenpairs of T (Gershgorin's bound settles the breakdown test), and the run takes the same steps
    and returns the same values as one that decomposes T at every step."""
    recurrence = importlib.import_module("hessdiag.lanczos.recurrence")
    a = torch.diag(torch.linspace(-1.0, 2.0, 300, dtype=torch.float64))
    v0 = torch.randn(300, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    calls = []
    decompose = recurrence._tridiagonal_eigh

    def counted(alphas, betas):
        calls.append(len(alphas))
        return decompose(alphas, betas)

    monkeypatch.setattr(recurrence, "_tridiagonal_eigh", counted)
    warm = lanczos(lambda v: a @ v, 300, which="top", v0=v0, dtype=torch.float64)
    assert min(calls) == 3 + 8  # min_iter + warm_steps: the first step that may stop
    assert calls == list(range(11, warm.num_iterations + 1))
    # Every step decomposed (an infinite bound: the breakdown test always asks for the eigenpairs).
    monkeypatch.setattr(recurrence, "_gershgorin", lambda alphas, betas: float("inf"))
    calls.clear()
    every = lanczos(lambda v: a @ v, 300, which="top", v0=v0, dtype=torch.float64)
    assert calls == list(range(1, every.num_iterations + 1))
    assert every.num_iterations == warm.num_iterations
    assert torch.equal(every.ritz_values, warm.ritz_values) and torch.equal(every.top_error_bounds, warm.top_error_bounds)


def test_the_basis_is_allocated_in_blocks_as_lanczos_runs_and_keeps_every_vector():
    """Blocks of BLOCK_ROWS rows are allocated as the basis fills, never beyond the capacity and never
    copied; the Gram-Schmidt and the combinations across blocks are those of the whole matrix."""
    from hessdiag.lanczos.basis import BLOCK_ROWS, Basis

    dim, capacity = 40, 20
    basis = Basis(capacity, dim, "device", torch.device("cpu"), torch.float64, None)
    q, _ = torch.linalg.qr(torch.randn(dim, capacity, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    allocated = []
    for i in range(capacity):
        basis.append(q[:, i])
        allocated.append(sum(len(block) for block in basis.blocks))
    assert allocated[:BLOCK_ROWS] == [BLOCK_ROWS] * BLOCK_ROWS and allocated[-1] == capacity
    assert torch.equal(torch.cat(basis.blocks), q.T)
    w = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = w - q @ (q.T @ w)
    norm, _ = basis.orthogonalise_(w)
    assert torch.allclose(w, expected, atol=1e-12) and norm == pytest.approx(float(expected.norm()), rel=1e-10)
    coefficients = torch.randn(capacity, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(basis.combine(coefficients), coefficients.T @ q.T, atol=1e-12)
