"""Products on parts of one batch (`product_parts`): the Hessian of the whole batch's loss, with one
part's graph alive at a time; the whole batch where a layer or the loss couples the samples."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from hessdiag import HessianOperator, Monitor
from hessdiag.batches import SampleParts, split_samples
from hessdiag.settings import product_parts_on
from oracles import dense_hessian
from saved_graph import SavedGraph

METHODS = ("double_backward", "forward_over_reverse", "finite_difference", "auto")


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def summed_cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="sum")


def mean_plus_batch_spread(model: nn.Module, batch) -> torch.Tensor:
    """A mean loss plus a term that mixes the samples (the spread of the batch's outputs)."""
    x, y = batch
    outputs = model(x)
    return nn.functional.cross_entropy(outputs, y) + 0.1 * outputs.var(dim=0).sum()


def network(*middle: nn.Module, width: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, width), *middle, nn.Tanh(), nn.Linear(width, 3)).double()


def batch_of(size: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (size,), generator=generator)


def products(model, loss_fn, batch, vectors, **options):
    with HessianOperator(model, loss_fn, batch, **options) as operator:
        return [operator.matvec(vector) for vector in vectors], operator


def random_vectors(dim: int, count: int = 2) -> torch.Tensor:
    return torch.randn(count, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("method", METHODS)
def test_products_on_parts_are_the_hessian_of_the_whole_batchs_mean_loss(method):
    model, batch = network(nn.LayerNorm(6)), batch_of(10)  # parts of 4, 3 and 3 samples, each weighted by its share
    hessian = dense_hessian(model, cross_entropy, batch)
    vectors = random_vectors(hessian.shape[0])
    with HessianOperator(model, cross_entropy, batch, method=method, parts=3) as operator:
        found = [operator.matvec(vector) for vector in vectors]
        loss, gradient = operator.loss, operator.gradient()
    assert operator.num_parts == 3 and operator.loss_is_mean
    tolerance = 1e-11 if operator.method in ("double_backward", "forward_over_reverse") else 1e-6
    for product, vector in zip(found, vectors):
        exact = hessian @ vector
        assert torch.linalg.vector_norm(product - exact) <= tolerance * torch.linalg.vector_norm(exact)
    reference = cross_entropy(model, batch)
    assert loss == pytest.approx(float(reference.detach()), rel=1e-13)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(reference, list(model.parameters()))])
    assert torch.allclose(gradient, expected, rtol=0, atol=1e-13)


def peak_saved(batch, parts: int) -> int:
    """The bytes autograd graphs hold saved at their peak over an opening and two products."""
    model = network(width=256)
    vector = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with SavedGraph() as saved:
        with HessianOperator(model, cross_entropy, batch, method="double_backward", parts=parts) as operator:
            operator.matvec(vector)
            operator.matvec(vector)
    gc.collect()
    assert saved.live == 0  # every graph was freed
    return saved.peak


def test_products_on_parts_hold_one_parts_graph_at_a_time():
    batch = batch_of(256)
    quarter = peak_saved(tuple(tensor[:64] for tensor in batch), parts=1)
    assert peak_saved(batch, parts=1) > 3 * quarter  # the measure sees the graph grow with the batch
    assert peak_saved(batch, parts=4) <= 1.1 * quarter


def test_batchnorm_in_training_mode_keeps_the_whole_batch_and_its_hessian():
    model, batch = network(nn.BatchNorm1d(6)), batch_of(12)
    hessian = dense_hessian(model, cross_entropy, batch)  # batch statistics over all 12 samples
    vectors = random_vectors(hessian.shape[0])
    found, operator = products(model, cross_entropy, batch, vectors, method="double_backward", parts=4)
    assert operator.num_parts == 1 and "BatchNorm" in operator.parts_reason
    assert torch.allclose(found[0], hessian @ vectors[0], rtol=0, atol=1e-12)
    # In eval mode BatchNorm reads its running statistics: the samples are independent again.
    eval_hessian = dense_hessian(model, cross_entropy, batch, mode="eval")
    found, operator = products(model, cross_entropy, batch, vectors, method="double_backward", parts=4, mode="eval")
    assert operator.num_parts == 4
    assert torch.allclose(found[0], eval_hessian @ vectors[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_fn", [summed_cross_entropy, mean_plus_batch_spread])
def test_a_loss_that_is_not_a_mean_over_samples_keeps_the_whole_batch_and_its_hessian(loss_fn):
    model, batch = network(), batch_of(12)
    hessian = dense_hessian(model, loss_fn, batch)
    vectors = random_vectors(hessian.shape[0])
    found, operator = products(model, loss_fn, batch, vectors, method="double_backward", parts=4)
    assert operator.num_parts == 1 and operator.loss_is_mean is False
    assert "not a mean over the samples" in operator.parts_reason
    exact = hessian @ vectors[0]
    assert torch.linalg.vector_norm(found[0] - exact) <= 1e-11 * torch.linalg.vector_norm(exact)


def test_with_dropout_each_part_draws_its_own_masks_the_same_in_every_product():
    model, batch = network(nn.Dropout(0.3)), batch_of(12)

    def parts_reference(model: nn.Module, batch) -> torch.Tensor:
        """Part j of 4 (3 samples each) draws its masks from seed + j, as the operator's closure does."""
        total = 0
        for index in range(4):
            torch.manual_seed(index)
            total = total + cross_entropy(model, tuple(t[3 * index : 3 * index + 3] for t in batch)) / 4
        return total

    hessian = dense_hessian(model, parts_reference, batch)
    vectors = random_vectors(hessian.shape[0])
    with HessianOperator(model, cross_entropy, batch, method="double_backward", parts=4) as operator:
        first, second, again = (operator.matvec(v) for v in (vectors[0], vectors[1], vectors[0]))
    assert operator.num_parts == 4  # dropout is off for the loss comparison only
    assert torch.equal(first, again)
    assert torch.allclose(first, hessian @ vectors[0], rtol=0, atol=1e-12)
    assert float(vectors[1] @ first) == pytest.approx(float(vectors[0] @ second), rel=1e-12)


def test_a_batch_is_cut_into_consecutive_parts_weighted_by_their_samples():
    sequences = [torch.zeros(length) for length in range(1, 8)]  # a list of per-sample tensors
    labels = torch.arange(7)
    cut = split_samples((sequences, labels), 3)
    assert isinstance(cut, SampleParts)
    assert cut.sizes == (2, 2, 3)
    assert sum(cut.weights) == pytest.approx(1.0)
    assert [len(part[0]) for part in cut] == [2, 2, 3]
    assert torch.equal(torch.cat([part[1] for part in cut]), labels)
    assert split_samples((torch.zeros(2, 3), torch.zeros(2)), 4).sizes == (1, 1)  # at most one part per sample
    assert split_samples((torch.zeros(1, 3), torch.zeros(1)), 4) is None
    assert split_samples((torch.zeros(4, 3), torch.zeros(5)), 2) is None  # no batch dimension to tell


def test_a_batch_whose_loss_is_not_finite_leaves_the_parts_for_the_next_reading():
    from hessdiag.errors import NonFiniteLossError

    monitor = Monitor(network(), cross_entropy, check_every=1, noise_scale_parts=0, product_parts=4)
    inputs, labels = batch_of(12)
    with pytest.raises(NonFiniteLossError):
        monitor.probe.track(0, (torch.full_like(inputs, float("nan")), labels))
    assert monitor.probe.product_parts == 4  # undecided, not refused
    monitor.probe.track(1, (inputs, labels))
    assert monitor.probe.parts_reason.startswith("4 parts of 3 samples")


def test_auto_takes_four_parts_on_an_accelerator_and_the_whole_batch_on_a_cpu():
    assert product_parts_on("auto", torch.device("cuda", 0)) == 4
    assert product_parts_on("auto", torch.device("cpu")) == 1
    assert product_parts_on(2, torch.device("cpu")) == 2
    monitor = Monitor(network(), cross_entropy, check_every=1, noise_scale_parts=0)
    monitor.probe.track(0, batch_of(12))
    assert monitor.probe.parts_reason == "the whole batch (one part asked for)"


def test_parts_must_be_a_positive_count():
    with pytest.raises(ValueError, match="`parts` must be a positive int"):
        HessianOperator(network(), cross_entropy, batch_of(4), parts=0)
    for wrong in (0, 2.0, "four"):
        with pytest.raises(ValueError, match="`product_parts` must be a positive int .* or 'auto'"):
            Monitor(network(), cross_entropy, product_parts=wrong)


def test_the_monitor_compares_its_loss_once_and_reads_a_loss_that_is_not_a_mean_on_the_whole_batch():
    model, batch = network(), batch_of(12)
    calls = []

    def counted(loss_fn):
        def closure(model, batch):
            calls.append(torch.is_grad_enabled())
            return loss_fn(model, batch)

        return closure

    monitor = Monitor(model, counted(cross_entropy), check_every=1, noise_scale_parts=0, product_parts=4)
    monitor.probe.track(0, batch)
    assert calls.count(False) == 5  # the whole batch and its 4 parts, without graph
    calls.clear()
    monitor.probe.track(1, batch)
    assert False not in calls and monitor.probe.parts_reason.startswith("4 parts of 3 samples")

    top = float(torch.linalg.eigvalsh(dense_hessian(model, summed_cross_entropy, batch))[-1])
    monitor = Monitor(model, counted(summed_cross_entropy), check_every=1, noise_scale_parts=0, product_parts=4)
    monitor.probe.run(0, batch)
    assert monitor.probe.product_parts == 1 and "not a mean over the samples" in monitor.probe.parts_reason
    calls.clear()
    reading = monitor.probe.track(1, batch)
    assert False not in calls  # not compared again
    assert 0.5 * top <= reading.value <= top * (1 + 1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the allocator's peak, which a reading must keep near a step's, needs CUDA")
def test_a_tracking_reading_on_parts_stays_within_one_and_a_half_steps_memory():
    """Where activations dominate (a wide MLP with LayerNorm on a large batch, as a transformer's
    blocks), a reading on 4 parts holds at most 1.5x a training step's peak; on the whole batch
    the double-backward graph holds more."""
    from hessdiag.check.probe import CurvatureProbe
    from hessdiag.settings import DiagnosticsSettings

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 1024), nn.LayerNorm(1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 10)
    ).cuda()
    batch = (torch.randn(4096, 256, device="cuda"), torch.randint(0, 10, (4096,), device="cuda"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def peak(work) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        work()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        cross_entropy(model, batch).backward()
        optimizer.step()

    step()  # AdamW's state allocated
    resident = torch.cuda.memory_allocated()  # parameters, gradients' slots, AdamW's state, the batch
    step_peak = resident + peak(step)
    readings = {}
    for parts in (1, 4):
        probe = CurvatureProbe(model, cross_entropy, DiagnosticsSettings(product_parts=parts))
        probe.track(1, batch, optimizer)  # cold: from a random vector
        readings[parts] = resident + peak(lambda: probe.track(2, batch, optimizer))
        assert probe.parts_reason.startswith("4 parts") == (parts == 4)
    assert readings[4] <= 1.5 * step_peak
    assert readings[4] <= 0.7 * readings[1]
