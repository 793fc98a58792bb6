"""The curvature along the gradient, against the dense Hessian."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessdiag import HessianOperator, gradient_curvature
from hessdiag.estimators.gradient_curvature import gradient_curvature_of
from oracles import dense_hessian, flat_parameters


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(24, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=generator)
    return model, (x, y)


def loss_fn(m, batch):
    return F.cross_entropy(m(batch[0]), batch[1])


def dense_gradient(model, batch) -> torch.Tensor:
    grads = torch.autograd.grad(loss_fn(model, batch), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("hvp_method", ["double_backward", "auto"])
def test_curvature_along_the_gradient_matches_the_dense_hessian(hvp_method):
    model, batch = problem()
    hessian = dense_hessian(model, loss_fn, batch)
    torch.testing.assert_close(hessian, hessian.T)
    g = dense_gradient(model, batch)
    expected = float(g @ hessian @ g / (g @ g))
    result = gradient_curvature(model, loss_fn, batch, lr=0.5, hvp_method=hvp_method)
    rel = 1e-10 if hvp_method == "double_backward" else 1e-6
    assert result.curvature == pytest.approx(expected, rel=rel)
    assert result.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)
    assert result.loss == pytest.approx(float(loss_fn(model, batch).detach()), rel=1e-12)
    assert result.num_hvps == 1
    assert result.threshold == pytest.approx(2 / 0.5)
    assert result.headroom == pytest.approx(2 / (0.5 * expected), rel=rel)
    assert result.lr_curvature == pytest.approx(0.5 * expected, rel=rel)
    # A Rayleigh quotient: between the extreme eigenvalues.
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert float(eigenvalues[0]) <= result.curvature <= float(eigenvalues[-1])
    assert result.alignment(float(eigenvalues[-1])) == pytest.approx(expected / float(eigenvalues[-1]), rel=rel)


def test_quadratic_known_answer_and_overshoot():
    # loss = 0.5 w'Aw - b'w: gradient Aw - b, curvature along it (Aw-b)'A(Aw-b) / |Aw-b|^2.
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -1.0], dtype=torch.float64)
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, 2.0]]))

    def quadratic(m, batch):
        w = m.weight.reshape(-1)
        return 0.5 * w @ a @ w - b @ w

    g = a @ model.weight.detach().reshape(-1) - b
    expected = float(g @ a @ g / (g @ g))
    lr = 2.5 / expected  # beyond the edge along the gradient
    result = gradient_curvature(model, quadratic, None, lr=lr, hvp_method="double_backward")
    assert result.curvature == pytest.approx(expected, rel=1e-12)
    assert result.headroom == pytest.approx(2 / 2.5, rel=1e-12) and result.headroom < 1
    # The quadratic model's prediction holds: the step raises the loss.
    with torch.no_grad():
        before = float(quadratic(model, None))
        model.weight -= lr * g.reshape(1, 2)
        assert float(quadratic(model, None)) > before
    # Preconditioned: d = (1, 2), u = d*g, curvature u'(dAd)u / u'u.
    d = torch.tensor([1.0, 2.0], dtype=torch.float64)
    model.weight.data.copy_(torch.tensor([[0.5, 2.0]]))
    u = d * g
    scaled = torch.diag(d) @ a @ torch.diag(d)
    pre = gradient_curvature(model, quadratic, None, threshold=3.0, scaling=d, hvp_method="double_backward")
    assert pre.preconditioned
    assert pre.curvature == pytest.approx(float(u @ scaled @ u / (u @ u)), rel=1e-12)
    assert pre.headroom == pytest.approx(3.0 / pre.curvature, rel=1e-12)
    assert pre.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)


def test_zero_gradient_gives_nan_and_a_note():
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()

    def bowl(m, batch):
        return (m.weight**2).sum()

    result = gradient_curvature(model, bowl, None, lr=0.1, hvp_method="double_backward")
    assert math.isnan(result.curvature) and math.isnan(result.headroom)
    assert result.grad_norm == 0.0 and result.num_hvps == 0
    assert "gradient is zero" in result.note


def test_on_an_open_operator_it_costs_one_product_and_leaves_no_trace():
    model, batch = problem()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = flat_parameters(model).clone()
    rng = torch.get_rng_state()
    model.eval()
    with HessianOperator(model, loss_fn, batch, method="double_backward") as operator:
        spent = operator.num_hvps
        result = gradient_curvature_of(operator)
        assert operator.num_hvps == spent + 1
    assert result.threshold is None and result.headroom is None and result.lr_curvature is None
    assert torch.equal(flat_parameters(model), before)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training


def test_bad_arguments_name_the_argument():
    model, batch = problem()
    with pytest.raises(ValueError, match="`lr` must be a positive finite number"):
        gradient_curvature(model, loss_fn, batch, lr=0.0)
    with pytest.raises(ValueError, match="`threshold` must be a positive finite number"):
        gradient_curvature(model, loss_fn, batch, threshold=-1.0)
    with pytest.raises(ValueError, match="Pass `lr`"):
        gradient_curvature(model, loss_fn, batch, lr=0.1, threshold=20.0)
    with pytest.raises(ValueError, match=r"`scaling` must be a flat tensor of shape \(63,\)"):
        gradient_curvature(model, loss_fn, batch, scaling=torch.ones(3, dtype=torch.float64), hvp_method="double_backward")


def test_adam_preconditioned_curvature_with_the_stability_modules_scaling_and_threshold():
    from hessdiag.preconditioners import adam_preconditioner_sqrt
    from hessdiag.stability import stability_threshold

    model, batch = problem()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn(model, batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    params = list(model.parameters())
    d = adam_preconditioner_sqrt(optimizer, params).double()
    threshold = stability_threshold(optimizer).threshold
    result = gradient_curvature(model, loss_fn, batch, threshold=threshold, scaling=d, hvp_method="double_backward")
    hessian = dense_hessian(model, loss_fn, batch)
    u = d * dense_gradient(model, batch)
    expected = float(u @ (torch.diag(d) @ hessian @ torch.diag(d)) @ u / (u @ u))
    assert result.preconditioned and result.curvature == pytest.approx(expected, rel=1e-9)
    assert result.headroom == pytest.approx(threshold / expected, rel=1e-9)
    assert all(p.grad is None for p in params)  # the gradient was taken without touching .grad
