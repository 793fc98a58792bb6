"""Bad input gets a clear error that says what was wrong."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessdiag import (
    HessianOperator,
    HessdiagWarning,
    LossClosureError,
    NonFiniteLossError,
    SecondDerivativeError,
    hessian_eigenvalues,
)


def mse(m, batch):
    return F.mse_loss(m(batch[0]), batch[1])


def small():
    torch.manual_seed(0)
    return nn.Linear(3, 1), (torch.randn(4, 3), torch.randn(4, 1))


def test_no_trainable_parameters():
    model, batch = small()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        hessian_eigenvalues(model, mse, batch)


def test_k_larger_than_the_dimension():
    model, batch = small()
    with pytest.raises(ValueError, match=r"`k` must be an int in \[1, 4\]"):
        hessian_eigenvalues(model, mse, batch, k=5)


def test_non_finite_loss():
    model, batch = small()
    batch = (batch[0], torch.full((4, 1), float("nan")))
    with pytest.raises(NonFiniteLossError, match="The loss is nan"):
        hessian_eigenvalues(model, mse, batch)


def test_batch_the_closure_rejects():
    model, _ = small()
    with pytest.raises(LossClosureError, match="loss_fn\\(model, batch\\) raised RuntimeError.*Check that `batch`"):
        hessian_eigenvalues(model, mse, (torch.randn(4, 7), torch.randn(4, 1)))


def test_closure_returning_a_non_scalar():
    model, batch = small()
    with pytest.raises(LossClosureError, match=r"must return a real scalar tensor, got a tensor of shape \(4, 1\)"):
        hessian_eigenvalues(model, lambda m, b: m(b[0]), batch)


def test_closure_under_no_grad():
    model, batch = small()

    def detached(m, b):
        with torch.no_grad():
            return mse(m, b)

    with pytest.raises(LossClosureError, match="does not depend on the chosen parameters"):
        hessian_eigenvalues(model, detached, batch)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "training"}, "`mode` must be one of"),
        ({"method": "finite_differences"}, "`method` must be one of .*'finite_difference'"),
        ({"params": []}, "`params` is empty"),
    ],
)
def test_bad_operator_arguments(kwargs, match):
    model, batch = small()
    with pytest.raises(ValueError, match=match):
        HessianOperator(model, mse, batch, **kwargs)


def test_foreign_parameter():
    model, batch = small()
    with pytest.raises(ValueError, match=r"`params\[0\]` is not a parameter of the model"):
        HessianOperator(model, mse, batch, params=[nn.Parameter(torch.zeros(2))])


def test_op_without_second_derivative_is_named():
    """CTC loss has no double backward in PyTorch: the error names the op and what to do."""
    torch.manual_seed(0)
    model = nn.Linear(6, 5)
    steps, batch_size, length = 12, 3, 4
    batch = (torch.randn(steps, batch_size, 6), torch.randint(1, 5, (batch_size, length)))

    def ctc(m, b):
        return F.ctc_loss(
            m(b[0]).log_softmax(-1), b[1], torch.full((batch_size,), steps), torch.full((batch_size,), length)
        )

    with pytest.raises(
        SecondDerivativeError, match="`aten::_ctc_loss_backward` cannot be differentiated twice.*hvp_method='auto'"
    ) as info:
        hessian_eigenvalues(model, ctc, batch, hvp_method="double_backward")
    assert info.value.op == "aten::_ctc_loss_backward"


def test_once_differentiable_backward_warns():
    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 3 * x**2 * grad

    model, batch = small()
    with pytest.warns(HessdiagWarning, match="does not depend on the parameters"):
        hessian_eigenvalues(model, lambda m, b: Cube.apply(m(b[0])).mean(), batch, hvp_method="double_backward")


@pytest.mark.parametrize("tol", [0, 0.0, -1e-3, 1.0, True])
def test_tol_outside_0_1_is_an_error_naming_tol(tol):
    model, batch = small()
    with pytest.raises(ValueError, match="`tol` must be a number in"):
        hessian_eigenvalues(model, mse, batch, tol=tol)


def test_a_bad_hvp_method_names_hvp_method():
    model, batch = small()
    with pytest.raises(ValueError, match="`hvp_method` must be one of"):
        hessian_eigenvalues(model, mse, batch, hvp_method="bogus")


def test_inference_mode_is_named_as_the_cause():
    model, batch = small()
    with torch.inference_mode(), pytest.raises(LossClosureError, match=r"torch.inference_mode\(\)"):
        hessian_eigenvalues(model, mse, batch)


def test_a_non_finite_gradient_behind_a_finite_loss_is_named_as_such_everywhere():
    """An infinite input through tanh: the loss is finite, the first layer's weight gradient is
    0 * inf = NaN. Every estimate says so and names the parameter, none blames kinks or noise."""
    from hessdiag.errors import NonFiniteGradientError
    from hessdiag.estimators.gradient_curvature import gradient_curvature
    from hessdiag.noise.noise_scale import gradient_noise_scale

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    x[2, 0] = float("inf")

    def mse(m, b):
        return (m(b[0]) - b[1]).pow(2).mean()

    assert torch.isfinite(mse(model, (x, y)))
    estimates = {
        f"hessian_eigenvalues({method})": lambda method=method: hessian_eigenvalues(model, mse, (x, y), hvp_method=method)
        for method in ("auto", "double_backward", "forward_over_reverse", "finite_difference")
    }
    estimates["gradient_curvature"] = lambda: gradient_curvature(model, mse, (x, y), lr=0.1)
    estimates["gradient_noise_scale"] = lambda: gradient_noise_scale(model, mse, (x, y), num_parts=4)
    for name, estimate in estimates.items():
        with pytest.raises(NonFiniteGradientError, match="gradient is not finite.*0.weight") as info:
            estimate()
        assert info.value.parameters == ["0.weight"], name
        assert "kink" not in str(info.value) and "hvp_method" not in str(info.value), name
