"""Data parallel: the HVP is that of the global-batch loss, identical on every rank."""

import math
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from hessdiag import HessianOperator, _distributed, hessian_eigenvalues
from hessdiag.check.probe import CurvatureProbe
from hessdiag.settings import DiagnosticsSettings
from hessdiag.lanczos import lanczos
from hessdiag.vectors import VectorShard, gaussian, random_signs
from oracles import dense_hessian
from spawned import rank_group

SPLIT = (5, 11)  # unequal local batches: the ranks must be weighted by their share


def make_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(sum(SPLIT), 4, generator=generator)
    y = torch.randint(0, 3, (sum(SPLIT),), generator=generator)
    vector = torch.randn(sum(p.numel() for p in model.parameters()), generator=generator)
    return model, (x, y), vector


def loss_fn(m, batch):
    return F.cross_entropy(m(batch[0]), batch[1])


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    with rank_group(rank, world_size, init_file):
        model, (x, y), vector = make_problem()
        start = sum(SPLIT[:rank])
        local = (x[start : start + SPLIT[rank]], y[start : start + SPLIT[rank]])
        ddp = nn.parallel.DistributedDataParallel(model)
        with HessianOperator(ddp, loss_fn, local) as hessian:
            product = hessian.matvec(vector)
            loss = hessian.loss
        result = hessian_eigenvalues(ddp, loss_fn, local, tol=1e-6)
        # The training check: by default the loss DDP descends, the mean of the ranks' mean losses.
        checks = {
            weighting: CurvatureProbe(ddp, loss_fn, DiagnosticsSettings(tol=1e-8, max_iter=100, rank_weighting=weighting)).run(1, local)
            for weighting in ("equal", "samples")
        }
        # Generators that differ by rank (as a CUDA generator's stream may across GPU models): the
        # draws are still the same on every rank, rank 0's.
        generator = torch.Generator().manual_seed(rank)
        draws = [gaussian(1000, generator, torch.device("cpu"), torch.float32),
                 random_signs(1000, generator, torch.device("cpu"), torch.float64)]  # fmt: skip
        torch.save(
            {"product": product, "loss": loss, "lambda_max": result.lambda_max, "num_hvps": result.num_hvps,
             "draws": draws,
             "checks": {w: (c.lambda_max, c.loss) for w, c in checks.items()}},  # fmt: skip
            f"{out_dir}/rank{rank}.pt",
        )


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of two gloo ranks computed (one spawn for the module's tests)."""
    directory = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(directory / "init"), str(directory)), nprocs=2, join=True)
    return [torch.load(directory / f"rank{r}.pt") for r in range(2)]


def test_distributed_hvp_equals_the_hvp_of_the_union_batch(ranks):
    model, batch, vector = make_problem()
    with HessianOperator(model, loss_fn, batch) as hessian:
        expected = hessian.matvec(vector)
        expected_loss = hessian.loss
    reference = hessian_eigenvalues(model, loss_fn, batch, tol=1e-6)
    for got in ranks:
        torch.testing.assert_close(got["product"], expected, rtol=1e-5, atol=1e-6)
        assert abs(got["loss"] - expected_loss) <= 1e-6
        assert abs(got["lambda_max"] - reference.lambda_max) <= 1e-5 * reference.lambda_max
    assert torch.equal(ranks[0]["product"], ranks[1]["product"])
    assert ranks[0]["num_hvps"] == ranks[1]["num_hvps"]


def test_random_draws_are_rank_zeros_on_every_rank(ranks):
    """Under data parallelism random vectors are drawn on the device and broadcast from rank 0."""
    expected = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    torch.testing.assert_close(ranks[0]["draws"][0], expected, rtol=0, atol=0)
    for first, second in zip(ranks[0]["draws"], ranks[1]["draws"]):
        assert torch.equal(first, second)


def test_training_check_weights_ranks_as_ddp_does(ranks):
    """Unequal local batches (a custom sampler): DDP averages the ranks' gradients with equal weights,
    so the loss it descends is the mean of the per-rank mean losses; `rank_weighting="samples"` is the
    mean over the union batch. Both against the dense Hessian of that loss."""
    model, (x, y), _ = make_problem()
    model = model.double()
    shards = [(x[:SPLIT[0]].double(), y[:SPLIT[0]]), (x[SPLIT[0]:].double(), y[SPLIT[0]:])]
    per_rank_mean = lambda m, b: (loss_fn(m, b[0]) + loss_fn(m, b[1])) / 2  # noqa: E731
    union = lambda m, b: loss_fn(m, (torch.cat([b[0][0], b[1][0]]), torch.cat([b[0][1], b[1][1]])))  # noqa: E731
    for weighting, closure in (("equal", per_rank_mean), ("samples", union)):
        expected = float(torch.linalg.eigvalsh(dense_hessian(model, closure, shards))[-1])
        expected_loss = float(closure(model, shards))
        for got in ranks:
            lambda_max, loss = got["checks"][weighting]
            assert lambda_max == pytest.approx(expected, rel=1e-5), weighting
            assert loss == pytest.approx(expected_loss, rel=1e-5), weighting
    assert abs(ranks[0]["checks"]["equal"][0] - ranks[0]["checks"]["samples"][0]) > 1e-3  # the case tells them apart


def _non_finite_shard_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Lanczos over a diagonal operator whose coordinates are split across the two ranks; rank 1's
    piece of the third product is NaN. Gloo's timeout turns a hang into an error."""
    with rank_group(rank, world_size, init_file, timeout=timedelta(seconds=30)):
        diagonal = torch.linspace(0.1, 1.0, 20, dtype=torch.float64)[10 * rank : 10 * rank + 10]
        calls = []

        def matvec(v):
            calls.append(1)
            return diagonal * v * (math.nan if rank == 1 and len(calls) == 3 else 1.0)

        shard = VectorShard(size=10, sum_=lambda partial: _distributed.all_reduce_sum_(partial), index=rank)
        try:
            lanczos(matvec, 20, dtype=torch.float64, shard=shard)
            outcome = "finished"
        except FloatingPointError as error:
            outcome = str(error)
        except RuntimeError as error:  # e.g. a collective that timed out: the other rank did not take part
            outcome = f"RuntimeError: {error}"
        torch.save(outcome, f"{out_dir}/rank{rank}.pt")


def test_a_non_finite_product_on_one_rank_stops_every_rank_with_the_same_error(tmp_path):
    """With sharded vectors (FSDP2) a NaN in one process's piece must not leave the others waiting in
    a collective: every rank raises FloatingPointError at the same step."""
    mp.spawn(_non_finite_shard_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    outcomes = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for outcome in outcomes:
        assert "NaN or infinity at Lanczos step 3" in outcome, outcome
