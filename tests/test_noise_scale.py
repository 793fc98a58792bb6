"""The gradient noise scale: closed forms, per-sample gradients, no observer effect."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessdiag import MicroBatches, NoiseScaleEstimate, RunningNoiseScale, gradient_noise_scale
from hessdiag.noise.noise_scale import noise_scale_from_norms
from hessdiag.noise.noise_scale import split_batch
from spawned import rank_group


def regression_loss(m, batch):
    x, y = batch
    return 0.5 * (m(x).squeeze(1) - y).square().mean()


def test_linear_regression_estimates_are_unbiased_against_the_closed_form():
    # y = x'w* + sigma eps, x ~ N(0, I_d); per-sample gradient g = x (x'delta - sigma eps), delta = w - w*.
    # G = delta; Sigma = (|delta|^2 + sigma^2) I + delta delta' (Isserlis), so
    # tr(Sigma) = d (|delta|^2 + sigma^2) + |delta|^2 and ||G||^2 = |delta|^2.
    d, sigma, batch_size, parts, repeats = 3, 0.5, 16, 4, 300
    generator = torch.Generator().manual_seed(0)
    w_star = torch.randn(d, generator=generator, dtype=torch.float64)
    delta = torch.tensor([0.6, -0.8, 0.0], dtype=torch.float64)  # |delta| = 1
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((w_star + delta).reshape(1, d))
    true_grad_sq = float(delta.square().sum())
    true_trace = d * (true_grad_sq + sigma**2) + true_grad_sq
    traces, grad_sqs, trace_ses, grad_sq_ses = [], [], [], []
    for _ in range(repeats):
        x = torch.randn(batch_size, d, generator=generator, dtype=torch.float64)
        y = x @ w_star + sigma * torch.randn(batch_size, generator=generator, dtype=torch.float64)
        estimate = gradient_noise_scale(model, regression_loss, (x, y), num_parts=parts)
        assert (estimate.small_batch, estimate.big_batch, estimate.num_small) == (4, 16, 4)
        traces.append(estimate.trace_covariance)
        grad_sqs.append(estimate.grad_sq_norm)
        trace_ses.append(estimate.trace_covariance_se)
        grad_sq_ses.append(estimate.grad_sq_norm_se)
    traces, grad_sqs = torch.tensor(traces), torch.tensor(grad_sqs)
    # Unbiased: the mean over independent batches is within 4 standard errors of the mean (of the
    # empirical spread: a false failure has probability ~6e-5 per quantity; the seed is fixed).
    for values, truth in ((traces, true_trace), (grad_sqs, true_grad_sq)):
        standard_error = float(values.std() / math.sqrt(repeats))
        assert abs(float(values.mean()) - truth) <= 4 * standard_error, (float(values.mean()), truth, standard_error)
        # Power: a bias of 25% (1/b for 1/b - 1/B in tr(Sigma)) or 30% (||G_B||^2 itself for ||G||^2) fails it.
        assert standard_error < 0.05 * truth
    # The jackknife standard errors are of the right size (conservative, noisy with 4 parts).
    for reported, values in ((trace_ses, traces), (grad_sq_ses, grad_sqs)):
        ratio = float(torch.tensor(reported).square().mean() / values.var())
        assert 0.7 < ratio < 2.5, ratio
    # The ratio of the means estimates B_simple = (d (1 + sigma^2) + 1) / 1 = 4.75 samples.
    running = RunningNoiseScale()
    for trace, grad_sq in zip(traces.tolist(), grad_sqs.tolist()):
        running.update(NoiseScaleEstimate(math.nan, trace, math.nan, grad_sq, math.nan, 4, 16, 4))
    assert abs(running.noise_scale - true_trace / true_grad_sq) <= 4 * running.noise_scale_se


def mlp_problem(batch_size: int = 12):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, 3, generator=generator, dtype=torch.float64)
    y = (x[:, 0] > 0).long()  # learnable labels: the gradient's signal stands above its noise at init
    return model, (x, y)


def classification_loss(m, batch):
    return F.cross_entropy(m(batch[0]), batch[1])


def per_sample_gradients(model: nn.Module, batch) -> torch.Tensor:
    """(batch, dim) by torch.func (vmap of grad; fine without LayerNorm)."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def one(values, x, y):
        return F.cross_entropy(torch.func.functional_call(model, values, (x[None],)), y[None])

    grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, *batch)
    return torch.cat([grads[name].reshape(batch[0].shape[0], -1) for name in params], dim=1)


@pytest.mark.parametrize("num_parts", [3, 4])
def test_mlp_estimates_equal_those_from_per_sample_gradients_of_the_same_partition(num_parts):
    model, batch = mlp_problem()
    samples = per_sample_gradients(model, batch)
    small = samples.shape[0] // num_parts
    parts = samples.reshape(num_parts, small, -1).mean(dim=1)  # each part's mean-loss gradient
    mean = parts.mean(dim=0)
    small_sq, big_sq, big = float(parts.square().sum(1).mean()), float(mean.square().sum()), samples.shape[0]
    expected_grad_sq = (big * big_sq - small * small_sq) / (big - small)
    expected_trace = (small_sq - big_sq) / (1 / small - 1 / big)
    estimate = gradient_noise_scale(model, classification_loss, batch, num_parts=num_parts)
    assert expected_grad_sq > 0 and expected_trace > 0 and estimate.note is None
    assert estimate.grad_sq_norm == pytest.approx(expected_grad_sq, rel=1e-10)
    assert estimate.trace_covariance == pytest.approx(expected_trace, rel=1e-10)
    assert estimate.noise_scale == pytest.approx(expected_trace / expected_grad_sq, rel=1e-10)
    assert estimate.loss == pytest.approx(float(classification_loss(model, batch).detach()), rel=1e-12)
    # The same numbers as U-statistics: mean cross inner product, and b times the parts' sample variance.
    gram = parts @ parts.T
    cross = float((gram.sum() - gram.trace()) / (num_parts * (num_parts - 1)))
    assert estimate.grad_sq_norm == pytest.approx(cross, rel=1e-10)
    assert estimate.trace_covariance == pytest.approx(small * float(parts.var(dim=0).sum()), rel=1e-10)
    # Jackknife standard errors over the parts, by hand.
    leave_one_out = []
    for i in range(num_parts):
        rest = torch.cat([parts[:i], parts[i + 1 :]])
        n = num_parts - 1
        s_sq, b_sq = float(rest.square().sum(1).mean()), float(rest.mean(0).square().sum())
        leave_one_out.append(((n * small * b_sq - small * s_sq) / (n * small - small), (s_sq - b_sq) / (1 / small - 1 / (n * small))))
    jack = torch.tensor(leave_one_out, dtype=torch.float64)
    se = (((jack - jack.mean(0)) ** 2).sum(0) * (num_parts - 1) / num_parts).sqrt()
    assert estimate.grad_sq_norm_se == pytest.approx(float(se[0]), rel=1e-9)
    assert estimate.trace_covariance_se == pytest.approx(float(se[1]), rel=1e-9)
    # From the parts' squared norms against the mean's: the same point estimates.
    from_norms = noise_scale_from_norms(parts.square().sum(1).tolist(), small, big_sq, big)
    assert from_norms.grad_sq_norm == pytest.approx(expected_grad_sq, rel=1e-10)
    assert from_norms.trace_covariance == pytest.approx(expected_trace, rel=1e-10)
    assert from_norms.loss is None


def test_two_parts_give_estimates_without_standard_errors():
    model, batch = mlp_problem()
    estimate = gradient_noise_scale(model, classification_loss, batch, num_parts=2)
    assert math.isfinite(estimate.trace_covariance) and math.isfinite(estimate.grad_sq_norm)
    assert math.isnan(estimate.trace_covariance_se) and math.isnan(estimate.grad_sq_norm_se)


def test_no_observer_effect():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Dropout(0.3), nn.Tanh(), nn.Linear(6, 2)).double()
    model[4].eval()  # a mixed-mode model: the modes are put back module by module
    generator = torch.Generator().manual_seed(1)
    batch = (torch.randn(16, 3, generator=generator, dtype=torch.float64), torch.randint(0, 2, (16,), generator=generator))
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    state = {name: t.clone() for name, t in model.state_dict().items()}
    grads = [p.grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    first = gradient_noise_scale(model, classification_loss, batch, num_parts=4)
    second = gradient_noise_scale(model, classification_loss, batch, num_parts=4)
    assert first == second  # deterministic: dropout seeded inside, nothing carried over
    assert all(torch.equal(state[name], t) for name, t in model.state_dict().items())  # parameters and buffers
    assert all(p.grad is g and torch.equal(g, torch.full_like(g, 3.0)) for p, g in zip(model.parameters(), grads))
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_bad_arguments_raise_value_errors_naming_them():
    model, batch = mlp_problem()
    with pytest.raises(ValueError, match="`num_parts` must be an int >= 2"):
        gradient_noise_scale(model, classification_loss, batch, num_parts=1)
    with pytest.raises(ValueError, match="`num_parts` must be an int >= 2"):
        gradient_noise_scale(model, classification_loss, batch, num_parts=2.0)
    with pytest.raises(ValueError, match=r"`num_parts`=5 must divide the batch size 12"):
        gradient_noise_scale(model, classification_loss, batch, num_parts=5)
    with pytest.raises(ValueError, match=r"`batch` has tensors of leading dimensions \[11, 12\]"):
        gradient_noise_scale(model, classification_loss, (batch[0][:11], batch[1]), num_parts=2)
    with pytest.raises(ValueError, match="`batch` is a MicroBatches"):
        gradient_noise_scale(model, classification_loss, MicroBatches([batch, batch]), num_parts=2)
    with pytest.raises(ValueError, match="`batch` holds no tensor"):
        gradient_noise_scale(model, classification_loss, {"x": 3}, num_parts=2)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        gradient_noise_scale(model, classification_loss, batch, mode="test")
    with pytest.raises(ValueError, match="`big_batch` must exceed `small_batch`"):
        noise_scale_from_norms([1.0, 2.0], 8, 1.0, 8)
    with pytest.raises(ValueError, match="`small_batch` must be a positive int"):
        noise_scale_from_norms([1.0], 0, 1.0, 8)
    with pytest.raises(ValueError, match="`small_sq_norms` is empty"):
        noise_scale_from_norms([], 2, 1.0, 8)
    with pytest.raises(ValueError, match="`small_sq_norms` must be finite"):
        noise_scale_from_norms([float("nan")], 2, 1.0, 8)
    with pytest.raises(ValueError, match="`big_sq_norm` must be finite"):
        noise_scale_from_norms([1.0], 2, -1.0, 8)
    with pytest.raises(ValueError, match="`decay` must be a number in"):
        RunningNoiseScale(decay=0.0)


def test_split_batch_cuts_every_tensor_and_keeps_other_leaves():
    batch = {"x": torch.arange(12).reshape(6, 2), "y": [torch.arange(6), "tag"], "scalar": torch.tensor(1.0)}
    parts = split_batch(batch, 3)
    assert [part["x"].tolist() for part in parts] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10, 11]]]
    assert [part["y"][0].tolist() for part in parts] == [[0, 1], [2, 3], [4, 5]]
    assert all(part["y"][1] == "tag" and part["scalar"] is batch["scalar"] for part in parts)


def test_signal_below_noise_gives_nan_and_a_note():
    # Small-batch norms barely above the big one's and the big one tiny: the ||G||^2 estimate is < 0.
    estimate = noise_scale_from_norms([1.0, 1.2, 0.9, 1.1], 4, 0.2, 16)
    assert estimate.grad_sq_norm < 0 and math.isnan(estimate.noise_scale)
    assert "below its noise" in estimate.note
    assert estimate.trace_covariance == pytest.approx((1.05 - 0.2) / (1 / 4 - 1 / 16))


def test_running_noise_scale_is_the_ratio_of_means_and_round_trips():
    values = [(10.0, 2.0), (14.0, 1.0), (9.0, 3.0)]

    def estimate(trace, grad_sq):
        return NoiseScaleEstimate(trace / grad_sq, trace, math.nan, grad_sq, math.nan, 4, 16, 4)

    running = RunningNoiseScale()
    assert math.isnan(running.noise_scale) and math.isnan(running.trace_covariance_se)
    for trace, grad_sq in values:
        running.update(estimate(trace, grad_sq))
    running.update(estimate(math.nan, 1.0))  # skipped
    assert running.count == 3
    assert running.noise_scale == pytest.approx(33.0 / 6.0)  # not the mean of the ratios (5.61)
    traces = torch.tensor([v[0] for v in values], dtype=torch.float64)
    assert running.trace_covariance_se == pytest.approx(float(traces.std() / math.sqrt(3)), rel=1e-12)
    assert running.noise_scale_se > 0
    restored = RunningNoiseScale()
    restored.load_state_dict(running.state_dict())
    assert restored.state_dict() == running.state_dict()
    assert all(isinstance(v, (int, float)) for v in running.state_dict().values())
    assert restored.noise_scale == running.noise_scale
    empty = RunningNoiseScale(decay=0.5)
    empty.load_state_dict({})  # an older checkpoint without the keys: defaults
    assert empty.count == 0 and empty.decay == 0.5
    # Decay: weights 0.25, 0.5, 1 for the three checks.
    decayed = RunningNoiseScale(decay=0.5)
    for trace, grad_sq in values:
        decayed.update(estimate(trace, grad_sq))
    weights = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    grad_sqs = torch.tensor([v[1] for v in values], dtype=torch.float64)
    assert decayed.noise_scale == pytest.approx(float((weights * traces).sum() / (weights * grad_sqs).sum()), rel=1e-12)
    w, w2 = float(weights.sum()), float(weights.square().sum())
    mean = float((weights * traces).sum()) / w
    sample = float((weights * (traces - mean) ** 2).sum()) / (w - w2 / w)
    assert decayed.trace_covariance_se == pytest.approx(math.sqrt(sample * w2 / w**2), rel=1e-10)


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    with rank_group(rank, world_size, init_file):
        model, (x, y) = mlp_problem()
        local = (x[rank * 6 : (rank + 1) * 6], y[rank * 6 : (rank + 1) * 6])
        ddp = nn.parallel.DistributedDataParallel(model)
        local_squares = []

        def capture(state, bucket):  # the local gradient, before the all-reduce averages it
            local_squares.append(bucket.buffer().double().square().sum())
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, capture)
        classification_loss(ddp, local).backward()
        reduced = float(sum(p.grad.double().square().sum() for p in model.parameters()))
        mine = torch.stack(local_squares).sum().reshape(1)
        everyone = [torch.zeros(1, dtype=torch.float64) for _ in range(world_size)]
        dist.all_gather(everyone, mine)
        estimate = noise_scale_from_norms([float(t) for t in everyone], 6, reduced, 6 * world_size)
        torch.save({"estimate": estimate, "mine": float(mine)}, f"{out_dir}/rank{rank}.pt")


def test_ddp_estimate_from_ranks_local_norms_equals_the_parts_estimate(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    model, batch = mlp_problem()
    by_parts = gradient_noise_scale(model, classification_loss, batch, num_parts=2)  # the ranks' halves
    for rank, result in enumerate(ranks):
        # The comm hook saw this rank's own gradient, undivided (checked by hand).
        half = (batch[0][rank * 6 : (rank + 1) * 6], batch[1][rank * 6 : (rank + 1) * 6])
        own = torch.autograd.grad(classification_loss(model, half), list(model.parameters()))
        assert result["mine"] == pytest.approx(float(sum(g.square().sum() for g in own)), rel=1e-12)
        estimate = result["estimate"]
        assert (estimate.small_batch, estimate.big_batch, estimate.num_small) == (6, 12, 2)
        assert estimate.grad_sq_norm == pytest.approx(by_parts.grad_sq_norm, rel=1e-10)
        assert estimate.trace_covariance == pytest.approx(by_parts.trace_covariance, rel=1e-10)
    assert ranks[0]["estimate"] == ranks[1]["estimate"]  # every rank decides alike


def test_docstring_example_holds():
    import doctest

    import hessdiag.noise.noise_scale

    result = doctest.testmod(hessdiag.noise.noise_scale)
    assert result.attempted >= 2 and result.failed == 0
