"""Data parallel: the HVP is that of the global-batch loss, identical on every rank."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from hessdiag import HessianOperator, hessian_eigenvalues

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
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model, (x, y), vector = make_problem()
        start = sum(SPLIT[:rank])
        local = (x[start : start + SPLIT[rank]], y[start : start + SPLIT[rank]])
        ddp = nn.parallel.DistributedDataParallel(model)
        with HessianOperator(ddp, loss_fn, local) as hessian:
            product = hessian.matvec(vector)
            loss = hessian.loss
        result = hessian_eigenvalues(ddp, loss_fn, local, tol=1e-6)
        torch.save(
            {"product": product, "loss": loss, "lambda_max": result.lambda_max, "num_hvps": result.num_hvps},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_distributed_hvp_equals_the_hvp_of_the_union_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
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
