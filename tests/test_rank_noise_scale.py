"""The noise scale under DDP from the ranks' local gradients (two gloo processes): the estimate against
the same computed by hand, the trained parameters bit-for-bit those of a run without the Monitor."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessdiag import Monitor
from hessdiag.reporting import tags
from hessdiag.noise.noise_scale import noise_scale_from_norms
from hessdiag.noise.ranks import RankNoiseScale
from hessdiag.noise.running import RunningNoiseScale
from spawned import rank_group

STEPS, LOCAL = 6, 5


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def data(step, rank):
    generator = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(LOCAL, 3, generator=generator)
    return x, (x[:, 0] + 0.3 * torch.randn(LOCAL, generator=generator) > 0).long()


def train(rank, watched):
    """STEPS of SGD under DDP; with `watched`, a Monitor (checks every 3 steps, read-backs every 2).
    Returns the parameters, the monitor and, per step, ||local gradient||^2 and ||all-reduced||^2 by hand."""
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9)
    monitor = Monitor(ddp, loss_fn, optimizer=optimizer, check_every=3, log_every=2, max_iter=8) if watched else None
    by_hand = []
    for step in range(1, STEPS + 1):
        batch = data(step, rank)
        own = torch.autograd.grad(loss_fn(model, batch), list(model.parameters()))  # this rank's gradient, by hand
        optimizer.zero_grad()
        loss = loss_fn(ddp, batch)
        loss.backward()
        reduced = sum(p.grad.double().square().sum() for p in model.parameters())
        by_hand.append((float(sum(g.double().square().sum() for g in own)), float(reduced)))
        if monitor is not None:
            monitor.after_backward()
        optimizer.step()
        if monitor is not None:
            monitor.after_step(batch, loss)
    if monitor is not None:
        monitor.flush()
    return [p.detach().clone() for p in model.parameters()], monitor, by_hand


def _worker(rank, world_size, init_file, out_dir):
    import torch.distributed as dist

    with rank_group(rank, world_size, init_file):
        plain, _, _ = train(rank, watched=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            params, monitor, by_hand = train(rank, watched=True)
        # A DDP with the user's own hook keeps it; the checks' split stays, said once.
        hooked = nn.parallel.DistributedDataParallel(make_model())
        hooked.register_comm_hook(None, lambda state, bucket: dist.all_reduce(bucket.buffer().div_(2), async_op=True).get_future().then(lambda f: f.value()[0]))
        with warnings.catch_warnings(record=True) as hooked_warnings:
            warnings.simplefilter("always")
            other = Monitor(hooked, loss_fn, check_every=0)
        locals_ = torch.tensor([h[0] for h in by_hand], dtype=torch.float64)
        everyone = [torch.zeros_like(locals_) for _ in range(world_size)]
        dist.all_gather(everyone, locals_)
        torch.save(
            {
                "same": all(torch.equal(a, b) for a, b in zip(plain, params)),
                "running": monitor.noise.ranks.running.state_dict(),
                "latest": monitor.latest,
                "check_noise": [c.noise for c in monitor.checks],
                "check_skipped": [c.skipped for c in monitor.checks],
                "locals": torch.stack(everyone),
                "reduced": [h[1] for h in by_hand],
                "warnings": [str(w.message) for w in caught],
                "hooked_active": other.noise.from_ranks,
                "hooked_parts": other.probe.quantity("noise_scale").parts,
                "hooked_warnings": [str(w.message) for w in hooked_warnings],
                "state": monitor.state_dict()["rank_noise_scale"],
            },
            f"{out_dir}/rank{rank}.pt",
        )


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    directory = tmp_path_factory.mktemp("rank_noise")
    mp.spawn(_worker, args=(2, str(directory / "init"), str(directory)), nprocs=2, join=True)
    return [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_the_trained_parameters_are_bit_for_bit_those_without_the_monitor(ranks):
    assert all(result["same"] for result in ranks)


def test_the_estimate_is_the_two_size_formula_on_the_norms_computed_by_hand(ranks):
    expected = RunningNoiseScale()
    mean_local = ranks[0]["locals"].mean(0)  # per step, the mean over ranks of ||g_local||^2
    for step in range(STEPS):
        global_sq = ranks[0]["reduced"][step]
        assert ranks[1]["reduced"][step] == pytest.approx(global_sq, rel=1e-12)  # one all-reduced gradient
        # E||g_local||^2 = |G|^2 + S/b, E||g_global||^2 = |G|^2 + S/(2b): solved by hand.
        grad_sq = 2 * global_sq - float(mean_local[step])
        trace = LOCAL * 2 * (float(mean_local[step]) - global_sq)
        estimate = noise_scale_from_norms([float(mean_local[step])], LOCAL, global_sq, 2 * LOCAL)
        assert (estimate.grad_sq_norm, estimate.trace_covariance) == pytest.approx((grad_sq, trace), rel=1e-12)
        expected.update(estimate)
    for result in ranks:
        running = RunningNoiseScale()
        running.load_state_dict(result["running"])
        assert running.count == STEPS
        assert running.grad_sq_norm == pytest.approx(expected.grad_sq_norm, rel=1e-5)
        assert running.trace_covariance == pytest.approx(expected.trace_covariance, rel=1e-5)
        assert result["latest"][tags.NOISE_SCALE] == pytest.approx(expected.noise_scale, rel=1e-4)
        assert result["latest"][tags.NOISE_SCALE_SE] == pytest.approx(expected.noise_scale_se, rel=1e-3)
        assert result["state"] == result["running"]
    assert ranks[0]["running"] == ranks[1]["running"]  # every rank decides alike


def test_the_checks_cut_no_batch_under_ddp(ranks):
    for result in ranks:
        assert len(result["check_noise"]) == 2 and result["check_noise"] == [None, None]
        assert all("noise_scale" not in skipped for skipped in result["check_skipped"])
        assert not any("rank noise" in message for message in result["warnings"])


def test_a_user_communication_hook_is_kept_and_the_checks_split_stays(ranks):
    for result in ranks:
        assert not result["hooked_active"] and result["hooked_parts"] == 4
        assert any("already has a communication hook" in message for message in result["hooked_warnings"])


def test_attach_refuses_what_is_not_ddp():
    with pytest.raises(ValueError, match="`ddp` must be a DistributedDataParallel"):
        RankNoiseScale().attach(nn.Linear(2, 2))
    estimator = RankNoiseScale()
    estimator.close_step(4)  # no all-reduce happened: nothing filed, nothing read
    assert estimator.read() is None and math.isnan(estimator.running.noise_scale)
