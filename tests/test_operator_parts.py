"""A batch in parts (`MicroBatches`): the operator is the Hessian of the micro-batches' mean loss,
and it evaluates one micro-batch at a time, so an estimate holds one micro-batch's graph."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import hessdiag
from hessdiag import HessianOperator, MicroBatches
from hessdiag.errors import NonFiniteGradientError
from oracles import dense_hessian
from saved_graph import SavedGraph

METHODS = ("double_backward", "forward_over_reverse", "finite_difference", "auto")


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def network(dropout: float = 0.0, width: int = 7) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Dropout(dropout), nn.Linear(width, 3)).double()


def micro_batches(sizes: tuple[int, ...]) -> MicroBatches:
    generator = torch.Generator().manual_seed(1)
    return MicroBatches(
        (torch.randn(size, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (size,), generator=generator))
        for size in sizes
    )


def mean_loss(model: nn.Module, micro: MicroBatches, seed: int = 0) -> torch.Tensor:
    """The reference: the mean of the micro-batches' losses, micro-batch j's dropout drawn from seed + j."""
    losses = []
    for index, batch in enumerate(micro):
        torch.manual_seed(seed + index)
        losses.append(cross_entropy(model, batch))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("method", METHODS)
def test_products_loss_and_gradient_on_micro_batches_are_those_of_their_mean_loss(method):
    model, micro = network(), micro_batches((6, 9, 4))  # unequal micro-batches, each weighted alike
    hessian = dense_hessian(model, mean_loss, micro)
    vector = torch.randn(hessian.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with HessianOperator(model, cross_entropy, micro, method=method) as operator:
        product = operator.matvec(vector)
        loss, gradient = operator.loss, operator.gradient()
    exact = hessian @ vector
    tolerance = 1e-11 if operator.method in ("double_backward", "forward_over_reverse") else 1e-6
    assert torch.linalg.vector_norm(product - exact) <= tolerance * torch.linalg.vector_norm(exact)
    reference = mean_loss(model, micro)
    assert loss == pytest.approx(float(reference.detach()), rel=1e-14)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(reference, list(model.parameters()))])
    assert torch.allclose(gradient, expected, rtol=0, atol=1e-14)


def test_each_micro_batch_draws_its_own_dropout_masks_the_same_at_every_evaluation():
    model, micro = network(dropout=0.3), micro_batches((8, 8))
    hessian = dense_hessian(model, mean_loss, micro)  # micro-batch j's masks from seed + j, as the operator's
    vectors = torch.randn(2, hessian.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with HessianOperator(model, cross_entropy, micro, method="double_backward") as operator:
        first, second = operator.matvec(vectors[0]), operator.matvec(vectors[1])
        again = operator.matvec(vectors[0])
        along = operator.loss_along(vectors[0], 0.0)  # the functional path draws the same masks
        loss = operator.loss
    assert torch.equal(first, again)
    assert torch.allclose(first, hessian @ vectors[0], rtol=0, atol=1e-12)
    assert float(vectors[1] @ first) == pytest.approx(float(vectors[0] @ second), rel=1e-12)
    assert along == pytest.approx(loss, rel=1e-14)


def peak_saved(batch, method: str) -> int:
    """The saved bytes at their peak over one estimate's opening and two products."""
    model = network(width=256)
    vector = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with SavedGraph() as saved:
        with HessianOperator(model, cross_entropy, batch, method=method) as operator:
            operator.matvec(vector)
            operator.matvec(vector)
    gc.collect()
    assert saved.live == 0  # every graph was freed
    return saved.peak


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])  # torch.func refuses saved-tensor hooks
def test_an_estimate_on_micro_batches_holds_one_micro_batchs_graph_at_a_time(method):
    micro = micro_batches((64, 64, 64, 64))
    one = peak_saved(micro[0], method)
    together = peak_saved(tuple(torch.cat(tensors) for tensors in zip(*micro)), method)
    assert together > 3 * one  # the measure sees the graphs grow with the batch
    assert peak_saved(micro, method) <= 1.1 * one


def test_an_empty_micro_batches_is_refused_with_what_to_pass():
    with pytest.raises(ValueError, match="holds no micro-batch"):
        with HessianOperator(network(), cross_entropy, MicroBatches([])):
            pass


def test_hessian_eigenvalues_take_micro_batches():
    model, micro = network(), micro_batches((6, 6))
    top = float(torch.linalg.eigvalsh(dense_hessian(model, mean_loss, micro))[-1])
    result = hessdiag.hessian_eigenvalues(model, cross_entropy, micro, which="top", hvp_method="double_backward")
    assert abs(result.lambda_max - top) <= result.error_bounds["top"][0] + 1e-12


def test_a_micro_batch_whose_gradient_is_not_finite_is_refused_by_name():
    """Only the first micro-batch's gradient is built on opening; a later one's is checked when a
    product rebuilds it."""
    model = nn.Linear(5, 1, bias=False).double()
    inputs = torch.randn(4, 5, dtype=torch.float64)
    micro = MicroBatches([(inputs, None), (torch.zeros(4, 5, dtype=torch.float64), None)])  # sqrt'(0): NaN

    def root_loss(model: nn.Module, batch) -> torch.Tensor:
        return model(batch[0]).abs().sqrt().mean()

    with pytest.raises(NonFiniteGradientError, match="weight"):
        with HessianOperator(model, root_loss, micro, method="double_backward") as operator:
            operator.matvec(torch.ones(5, dtype=torch.float64))
