"""Where a check's Lanczos basis lives: on the device up to what training leaves free, then in host
memory (a spilled basis), the same on every data-parallel process; the run's own peak, learned
from the allocator's counter without resetting it."""

import contextlib
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from hessdiag.check.footprint import TrainingFootprint
from hessdiag.check.quantities.density import DENSITY_PROBES
from hessdiag.check.probe import CurvatureProbe
from hessdiag.lanczos import lanczos
from hessdiag.lanczos.basis import BLOCK_ROWS, Basis, choose_basis_storage
from hessdiag.settings import DiagnosticsSettings
from oracles import matrix_with_spectrum
from spawned import rank_group

CPU = torch.device("cpu")


def orthonormal_rows(dim: int, count: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, count, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q.T


def filled(basis: Basis, rows: torch.Tensor) -> Basis:
    for row in rows:
        basis.append(row)
    return basis


def test_a_spilled_basis_keeps_its_first_blocks_on_the_device_and_the_rest_on_the_host():
    """With room for one block, the first block goes to the device and every later one to the host,
    also when room appears again (the device blocks come first); Gram-Schmidt and the Ritz
    combinations are those of the whole matrix."""
    dim, count = 50, 2 * BLOCK_ROWS + 3
    rows = orthonormal_rows(dim, count)
    room = [float(BLOCK_ROWS * dim * 8), 0.0]  # one block of float64 rows, then none, then plenty
    basis = Basis(count, dim, "spill", CPU, torch.float64, None, memory_budget=lambda: room.pop(0) if room else 1e30)
    filled(basis, rows)
    assert basis.placed == ["device", "host", "host"] and basis.where == "device+host"
    w = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = w - rows.T @ (rows @ w)
    norm, _ = basis.orthogonalise_(w)
    assert torch.allclose(w, expected, atol=1e-12) and norm == pytest.approx(float(expected.norm()), rel=1e-10)
    coefficients = torch.randn(count, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(basis.combine(coefficients), coefficients.T @ rows, atol=1e-12)


def test_a_byte_budget_counts_the_blocks_already_on_the_device():
    dim = 10
    block_bytes = BLOCK_ROWS * dim * 4
    basis = filled(Basis(40, dim, "spill", CPU, torch.float32, None, memory_budget=2 * block_bytes), torch.eye(dim)[:1].repeat(33, 1))
    assert basis.placed == ["device", "device", "host", "host", "host"]
    assert filled(Basis(40, dim, "spill", CPU, torch.float32, None, memory_budget=10**9), torch.zeros(9, dim)).where == "device"
    assert filled(Basis(40, dim, "spill", CPU, torch.float32, None, memory_budget=0), torch.zeros(9, dim)).where == "host"


def test_spilling_does_not_change_the_answer(monkeypatch):
    """Lanczos on a basis spilled after 0, 3 or no blocks: the same steps, the same values."""
    import hessdiag.lanczos.basis as basis_module

    monkeypatch.setattr(basis_module, "choose_basis_storage", lambda *args: "spill")  # as "auto" on an accelerator
    a, _ = matrix_with_spectrum(torch.linspace(-1.0, 5.0, 120, dtype=torch.float64))
    runs = {}
    for budget, where in ((10**9, "device"), (3 * BLOCK_ROWS * 120 * 8, "device+host"), (0, "host")):
        runs[where] = lanczos(lambda v: a @ v, 120, tol=1e-8, max_iter=64, dtype=torch.float64, memory_budget=budget)
        assert runs[where].basis == where
    assert runs["device"].num_iterations > 3 * BLOCK_ROWS
    for run in runs.values():
        assert run.num_iterations == runs["device"].num_iterations
        assert torch.allclose(run.ritz_values, runs["device"].ritz_values, rtol=0, atol=1e-12)
        assert torch.allclose(run.top_vectors, runs["device"].top_vectors, atol=1e-10)


def test_auto_spills_on_an_accelerator_and_falls_back_to_the_recurrence_only_beyond_the_host(monkeypatch):
    import hessdiag.lanczos.basis as basis_module

    cuda = torch.device("cuda")
    need = 64 * 1000 * 4
    monkeypatch.setattr(basis_module, "_host_budget", lambda: 10 * need)
    assert choose_basis_storage("auto", 64, 1000, torch.float32, cuda, 0) == "spill"
    assert choose_basis_storage("auto", 64, 1000, torch.float32, cuda, lambda: -5.0 * need) == "spill"
    monkeypatch.setattr(basis_module, "_host_budget", lambda: need / 2)
    assert choose_basis_storage("auto", 64, 1000, torch.float32, cuda, need // 2) == "spill"
    assert choose_basis_storage("auto", 64, 1000, torch.float32, cuda, 0) == "recurrence"
    # on a CPU the device is the host: the whole capacity within the budget, or the recurrence
    assert choose_basis_storage("auto", 64, 1000, torch.float32, CPU, need) == "device"
    assert choose_basis_storage("auto", 64, 1000, torch.float32, CPU, need - 1) == "recurrence"


class FakeAllocator:
    """torch.cuda's counters as a test sets them."""

    def __init__(self, monkeypatch) -> None:
        self.allocated = self.peak = 0
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)


def test_the_footprint_learns_the_runs_peak_and_not_the_readings_own(monkeypatch):
    allocator = FakeAllocator(monkeypatch)
    footprint, cuda = TrainingFootprint(), torch.device("cuda")
    allocator.allocated, allocator.peak = 300, 1000  # between steps; a step reached 1000
    with footprint.reading(cuda) as room:
        assert footprint.peak == 1000 and room() == 700
        allocator.allocated, allocator.peak = 900, 5000  # the reading's own peak
        assert room() == 100
    allocator.allocated = 300
    with footprint.reading(cuda):
        assert footprint.peak == 1000  # the counter did not move: training stayed below 5000
        allocator.peak = 5200  # this reading's own
    allocator.peak = 6000  # training passed every reading
    with footprint.reading(cuda):
        assert footprint.peak == 6000
    allocator.peak = 800  # the user reset the counter; it shows the run since
    with footprint.reading(cuda):
        assert footprint.peak == 6000
    allocator.peak = 7000
    with footprint.reading(cuda) as room:
        assert footprint.peak == 7000 and room() == 6700
    with footprint.reading(CPU) as room:
        assert room is None  # no allocator counter: the solver's defaults


def test_every_lanczos_run_of_a_check_asks_for_the_room_and_tracking_readings_count_as_readings(monkeypatch):
    """A full check's runs (both ends, Adam's preconditioned sharpness, a module's, the density's) take the footprint's room as
    their budget; a tracking reading has no basis but is a reading (its peak is not training's)."""
    asked, readings = [], []

    @contextlib.contextmanager
    def reading(self, device):
        readings.append(device)
        yield lambda: asked.append(device) or 1e12

    monkeypatch.setattr(TrainingFootprint, "reading", reading)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    batch = (torch.randn(16, 6), torch.randint(0, 3, (16,)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimizer.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    optimizer.step()
    settings = DiagnosticsSettings(noise_scale_parts=0, module_sharpness=1, density_every=1)
    probe = CurvatureProbe(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), settings)
    check = probe.run(1, batch, optimizer)
    # the spectrum's run, the preconditioned one, the top module's and each of the density's probes
    assert check.sharpness is not None and check.module_sharpness and check.density is not None
    assert len(asked) == 1 + 1 + 1 + DENSITY_PROBES
    probe.track(2, batch, optimizer)
    assert readings == [CPU, CPU]


def _agreement_worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    with rank_group(rank, world_size, init_file, timeout=timedelta(seconds=60)):
        dim = 20
        # rank 0 has room for everything, rank 1 for one block: both place as rank 1 does
        budget = 10**9 if rank == 0 else BLOCK_ROWS * dim * 8
        basis = filled(Basis(40, dim, "spill", CPU, torch.float64, None, memory_budget=budget), orthonormal_rows(dim, 20))
        # the recurrence where one process's host cannot hold the basis: on every process
        a, _ = matrix_with_spectrum(torch.linspace(0.0, 1.0, 30, dtype=torch.float64))
        run = lanczos(lambda v: a @ v, 30, tol=1e-6, dtype=torch.float64, memory_budget=10**9 if rank == 0 else 8)
        torch.save({"placed": basis.placed, "basis": run.basis}, f"{out}/rank{rank}.pt")


def test_data_parallel_processes_place_their_bases_alike(tmp_path):
    mp.spawn(_agreement_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert results[0] == results[1] == {"placed": ["device", "host", "host"], "basis": "recurrence"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host and device memory are one on a CPU")
def test_on_a_gpu_a_spilled_basis_gives_the_same_eigenvalues_and_holds_its_rows_on_the_host():
    from hessdiag import hessian_eigenvalues

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10)).cuda()
    batch = (torch.randn(256, 64, device="cuda"), torch.randint(0, 10, (256,), device="cuda"))

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    vector_bytes = 4 * sum(p.numel() for p in model.parameters())
    peaks, results = {}, {}
    for name, budget in (("device", 10**12), ("spilled", BLOCK_ROWS * vector_bytes)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        results[name] = hessian_eigenvalues(model, loss_fn, batch, which="both", memory_budget=budget)
        peaks[name] = torch.cuda.max_memory_allocated() - before
    device, spilled = results["device"], results["spilled"]
    assert device.lanczos.basis == "device" and spilled.lanczos.basis == "device+host"
    assert spilled.lanczos.num_iterations > 2 * BLOCK_ROWS
    for end, value in (("top", "lambda_max"), ("bottom", "lambda_min")):  # each within its proven bound of the same eigenvalue
        gap = abs(getattr(spilled, value) - getattr(device, value))
        assert gap <= spilled.error_bounds[end][0] + device.error_bounds[end][0]
    rows_on_host = spilled.lanczos.num_iterations - BLOCK_ROWS
    assert peaks["device"] - peaks["spilled"] >= 0.8 * (rows_on_host - BLOCK_ROWS) * vector_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the allocator's peak, which a check must keep near a step's, needs CUDA")
def test_on_a_gpu_a_full_check_keeps_the_runs_peak_within_one_and_a_half_steps():
    """A cold full check (both ends, Adam's preconditioned sharpness) right after a training step,
    as in a run: its basis fills the device only up to the step's peak, so the run's peak with the
    check stays within 1.5x the peak without it; the same check whose basis may take 30% of the free
    memory (the solver's default) goes beyond."""

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.LayerNorm(1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 10)).cuda()
    batch = (torch.randn(2048, 256, device="cuda"), torch.randint(0, 10, (2048,), device="cuda"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        optimizer.step()

    step()  # AdamW's state allocated
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    step_peak = torch.cuda.max_memory_allocated()
    peaks = {}
    for placed in ("by the footprint", "by free memory"):
        probe = CurvatureProbe(model, loss_fn, DiagnosticsSettings(tol=1e-4, noise_scale_parts=0))
        if placed == "by free memory":
            probe.footprint.reading = lambda device: contextlib.nullcontext(None)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()  # the run's own peak, which the footprint reads before the check
        probe.run(3, batch, optimizer)
        torch.cuda.synchronize()
        peaks[placed] = torch.cuda.max_memory_allocated()
    assert peaks["by the footprint"] <= 1.5 * step_peak
    assert peaks["by free memory"] > peaks["by the footprint"]
