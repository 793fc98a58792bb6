"""Each product method against the dense float64 Hessian (`torch.autograd.functional.hessian`,
looped double backward: `torch.func.hessian` is wrong through LayerNorm), on a model with LayerNorm."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessdiag.operator import (
    BatchLoss,
    CentralDifference,
    DoubleBackward,
    ForwardOverReverse,
    HessianOperator,
    ParameterSpace,
    enabled_attention_backends,
)
from oracles import dense_hessian


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    batch = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
    hessian = dense_hessian(model, cross_entropy, batch)
    assert torch.allclose(hessian, hessian.T, atol=1e-12)  # a reference worth the name is symmetric
    vector = torch.randn(hessian.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, batch, hessian, vector


def batch_loss(model, batch):
    space = ParameterSpace(model, None, distributed=False)
    return BatchLoss(model, cross_entropy, batch, space, seed=0, attention=enabled_attention_backends())


def test_double_backward_matches_the_dense_hessian(problem):
    model, batch, hessian, vector = problem
    loss = batch_loss(model, batch)
    loss.build_graph("double_backward")
    product = DoubleBackward(loss.grads, loss.space).product(vector)
    torch.testing.assert_close(product, hessian @ vector, rtol=1e-10, atol=1e-12)


class _PartlyLinear(nn.Module):
    """A loss with a used parameter, an unused one (gradient None) and one it is linear in (a
    gradient that does not require grad): the flat double backward must handle all three."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 2)
        self.unused = nn.Parameter(torch.randn(4))
        self.shift = nn.Parameter(torch.randn(2))

    def forward(self, x):
        return torch.tanh(self.inner(x)).pow(2).sum() + (self.shift * x[:, :2].sum(0)).sum()


def test_double_backward_gives_bit_for_bit_the_per_parameter_products():
    """One flat gradient output gives the same numbers as one output per parameter, with an unused
    parameter and a constant gradient among them, and zero rows for both."""
    torch.manual_seed(0)
    model = _PartlyLinear().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    space = ParameterSpace(model, None, distributed=False)
    loss = BatchLoss(model, lambda m, b: m(b), x, space, seed=0, attention=enabled_attention_backends())
    loss.build_graph("double_backward")
    vector = torch.randn(space.dim, dtype=torch.float64)
    live = [(g, v) for g, v in zip(loss.grads, space.split(vector)) if g is not None and g.requires_grad]
    per_parameter = torch.autograd.grad([g for g, _ in live], space.params, [v for _, v in live], retain_graph=True, allow_unused=True)
    assert torch.equal(DoubleBackward(loss.grads, space).product(vector), space.flatten(per_parameter))
    hessian = dense_hessian(model, lambda m, b: m(b), x)
    torch.testing.assert_close(DoubleBackward(loss.grads, space).product(vector), hessian @ vector, rtol=1e-10, atol=1e-12)


def test_a_product_written_over_its_operand_is_the_same_and_leaves_the_gradient(problem):
    """matvec(v, out=v) gives bit for bit matvec(v), and the gradient the operator reports (views of
    double backward's flat output, not a copy of it) is neither the vector written nor changed by it."""
    model, batch, hessian, vector = problem
    with HessianOperator(model, cross_entropy, batch, method="double_backward") as operator:
        gradient = operator.gradient()
        fresh = operator.matvec(vector)
        operand = vector.clone()
        written = operator.matvec(operand, out=operand)
        assert written is operand and torch.equal(written, fresh)
        assert torch.equal(operator.gradient(), gradient)
        torch.testing.assert_close(fresh, hessian @ vector, rtol=1e-10, atol=1e-12)


def test_forward_over_reverse_matches_the_dense_hessian(problem):
    model, batch, hessian, vector = problem
    loss = batch_loss(model, batch)
    product = ForwardOverReverse(loss.closure).product(loss.space.split(vector))
    torch.testing.assert_close(product, hessian @ vector, rtol=1e-10, atol=1e-12)


def test_central_differences_match_the_dense_hessian_and_restore_the_parameters(problem):
    model, batch, hessian, vector = problem
    before = [p.detach().clone() for p in model.parameters()]
    loss = batch_loss(model, batch)
    central = CentralDifference(loss.space.local_params, loss.gradient_without_graph)
    product = central.product(loss.space.split(vector))
    torch.testing.assert_close(product, hessian @ vector, rtol=1e-7, atol=1e-8)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # bit-for-bit


@pytest.mark.parametrize("method", ["auto", "double_backward", "forward_over_reverse", "finite_difference"])
def test_the_operator_dispatches_to_each_method(problem, method):
    model, batch, hessian, vector = problem
    with HessianOperator(model, cross_entropy, batch, method=method) as operator:
        product = operator.matvec(vector)
        gradient = operator.gradient()
        assert operator.num_hvps == 1
    expected_method = "double_backward" if method == "auto" else method
    assert operator.method == expected_method
    exact = method != "finite_difference"
    torch.testing.assert_close(product, hessian @ vector, rtol=1e-10 if exact else 1e-7, atol=1e-12 if exact else 1e-8)
    params = list(model.parameters())
    reference = torch.autograd.grad(cross_entropy(model, batch), params)
    torch.testing.assert_close(gradient, torch.cat([g.reshape(-1) for g in reference]))
    with pytest.raises(RuntimeError, match="closed"):
        operator.matvec(vector)
