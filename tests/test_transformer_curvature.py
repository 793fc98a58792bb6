"""Curvature of models built the way transformer and adapter libraries build them, against dense
float64 Hessians: finite-difference bounds that hold along the answer (reentrant checkpointing forces
finite differences), and adapters whose `autograd.grad` vanishes under checkpointing."""

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformer_models import LoRANet, TinyGPT, next_token_loss, token_batch

from hessdiag import UnrecordedGradientError, hessian_eigenvalues
from hessdiag.estimators.eigen import eigenvalues_of
from hessdiag.operator import HessianOperator
from oracles import dense_hessian


def spectrum_of(model, batch):
    """Eigenvalues of the dense float64 Hessian over the trainable parameters (math attention: the
    fused CPU kernel has no double backward)."""
    reference = copy.deepcopy(model).double()
    with sdpa_kernel(SDPBackend.MATH):
        hessian = dense_hessian(reference, next_token_loss, batch)
    assert torch.allclose(hessian, hessian.T, atol=1e-10)
    return torch.linalg.eigvalsh(hessian)


def assert_bounds_hold(result, exact, tol):
    scale = float(exact.abs().max())
    top, bottom = float(result.error_bounds["top"][0]), float(result.error_bounds["bottom"][0])
    # An eigenvalue lies within each bound; at the ends Ritz values interlace, so the extreme one does.
    assert abs(result.lambda_max - float(exact[-1])) <= top, (result.lambda_max, float(exact[-1]), top)
    assert abs(result.lambda_min - float(exact[0])) <= bottom, (result.lambda_min, float(exact[0]), bottom)
    if result.converged:
        assert top <= tol * abs(result.lambda_max) and bottom <= tol * scale


@pytest.mark.parametrize(("bias_gain", "method"), [(1.0, "finite_difference"), (3.0, "auto"), (5.0, "auto")])
def test_finite_difference_bounds_hold_along_the_answer_on_a_checkpointed_gpt(bias_gain, method):
    """With bias_gain 3 and 5 the top eigenvector lies on the residual-stream bias, where the
    difference quotient's eps^2 error is far above a random direction's: the old scheme claimed
    converged=True with a bound 11-53x smaller than its true error."""
    torch.manual_seed(0)
    model, batch = TinyGPT(bias_gain=bias_gain, reentrant=True), token_batch()
    plain = TinyGPT(bias_gain=bias_gain)
    plain.load_state_dict(model.state_dict())
    exact = spectrum_of(plain, batch)
    result = hessian_eigenvalues(model, next_token_loss, batch, hvp_method=method)
    assert result.converged  # tight enough to be useful at the default tol
    assert_bounds_hold(result, exact, 1e-3)


def test_the_top_direction_lies_on_the_residual_bias_where_the_old_error_was_measured_wrongly():
    torch.manual_seed(0)
    model, batch = TinyGPT(bias_gain=3.0, reentrant=True), token_batch()
    with HessianOperator(model, next_token_loss, batch) as operator:
        assert operator.method == "finite_difference"
        result = eigenvalues_of(operator)
        top = result.top_vectors[0] / result.top_vectors[0].norm()
        along = operator.along(top)
        names = [name for name, _ in model.named_parameters()]
        share = float(operator.space.split(top)[names.index("residual_bias")].pow(2).sum())
    assert share > 0.3
    # The error measured along the answer is far above the one measured on a random direction.
    assert along.error > 5 * operator.product_error


def lora(zero_b):
    torch.manual_seed(0)
    model = LoRANet(zero_b=zero_b)
    plain = LoRANet(zero_b=zero_b, checkpointing=False)
    plain.load_state_dict(model.state_dict())
    return model, plain, token_batch()


@pytest.mark.parametrize("zero_b", [True, False])
@pytest.mark.parametrize("method", ["auto", "finite_difference"])
def test_adapters_under_reentrant_checkpointing_match_the_dense_hessian(zero_b, method):
    model, plain, batch = lora(zero_b)
    exact = spectrum_of(plain, batch)
    result = hessian_eigenvalues(model, next_token_loss, batch, hvp_method=method)
    assert result.lambda_max > 0.1 * float(exact[-1]) > 0  # never the zero of a lost gradient
    assert_bounds_hold(result, exact, 1e-3)
    assert result.converged


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_exact_products_on_adapters_under_reentrant_checkpointing_are_a_clear_error(method):
    model, _, batch = lora(zero_b=False)
    with pytest.raises(UnrecordedGradientError, match="use_reentrant=False") as caught:
        hessian_eigenvalues(model, next_token_loss, batch, hvp_method=method)
    assert caught.value.count == 8 and "hvp_method='auto'" in str(caught.value)


def test_auto_says_why_it_took_finite_differences_on_adapters():
    model, _, batch = lora(zero_b=True)
    with HessianOperator(model, next_token_loss, batch) as operator:
        assert operator.method == "finite_difference"
        assert "no gradient for 8 parameter tensor(s)" in operator.method_reason
