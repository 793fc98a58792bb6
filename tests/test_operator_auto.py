"""The "auto" choice of product method (a function of what was measured) and `product_error`."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessdiag import CoarseFiniteDifferenceError, NonSmoothLossError, SecondDerivativeError, hessian_eigenvalues
from hessdiag.operator import (
    LOW_PRECISION_ROUNDING,
    NON_SMOOTH_DISAGREEMENT,
    HessianOperator,
    Measurement,
    choose_method,
    finite_differences,
)

DIM = 12
F64 = torch.float64


def symmetric(seed: int) -> torch.Tensor:
    a = torch.randn(DIM, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return a + a.T


def unit(seed: int) -> torch.Tensor:
    v = torch.randn(DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def measured_on(fine, coarse):
    """What D(eps) = `fine`, D(2 eps) = `coarse` and D(4 eps) continuing their trend show."""
    return Measurement.of(fine, coarse, 2 * coarse - fine, eps=1e-3)


def test_auto_takes_double_backward_when_finite_differences_agree():
    a, probe = symmetric(0), unit(1)
    fine = a @ probe + 1e-9 * unit(2)
    measured = measured_on(fine, fine + 1e-8 * unit(3))
    choice = choose_method(measured, probe, fine, lambda v: a @ v, lambda: unit(4), dtype=F64)
    assert choice.method == "double_backward" and choice.error == 0.0
    assert choice.reason.startswith("double backward agrees with finite differences")


def test_auto_takes_finite_differences_when_double_backward_is_incomplete():
    a, probe = symmetric(0), unit(1)
    fine = a @ probe
    measured = measured_on(fine, fine + 1e-8 * unit(3))
    dropped = a.clone()
    dropped[0] = 0.0  # a second-order term autograd dropped without a word
    choice = choose_method(measured, probe, fine, lambda v: dropped @ v, lambda: unit(4), dtype=F64)
    assert choice.method == "finite_difference" and choice.error == measured.error > 0
    assert choice.reason.startswith("double backward is incomplete")


def test_auto_takes_finite_differences_when_double_backward_fails():
    a, probe = symmetric(0), unit(1)
    fine = a @ probe
    measured = measured_on(fine, fine + 1e-8 * unit(3))

    def refused(v):
        raise RuntimeError("derivative for aten::_efficient_attention_backward is not implemented")

    choice = choose_method(measured, probe, fine, refused, lambda: unit(4), dtype=F64)
    assert choice.method == "finite_difference"
    assert choice.reason.startswith("double backward failed: aten::_efficient_attention_backward")
    failure = SecondDerivativeError(RuntimeError("derivative for aten::foo is not implemented"), "double_backward")
    built_without = choose_method(measured, probe, fine, refused, lambda: unit(4), dtype=F64, build_failure=failure)
    assert built_without.method == "finite_difference" and "aten::foo" in built_without.reason


def test_on_a_non_smooth_loss_auto_keeps_double_backward_only_if_it_is_symmetric():
    a, probe = symmetric(0), unit(1)
    fine = a @ probe
    jumping = measured_on(fine, fine + 10 * NON_SMOOTH_DISAGREEMENT * fine)
    assert not jumping.smooth
    choice = choose_method(jumping, probe, fine, lambda v: a @ v, lambda: unit(4), dtype=F64)
    assert choice.method == "double_backward" and "it is symmetric" in choice.reason
    skewed = a + torch.triu(torch.ones(DIM, DIM, dtype=torch.float64), 1)
    with pytest.raises(NonSmoothLossError, match="Double backward is incomplete too"):
        choose_method(jumping, probe, skewed @ probe, lambda v: skewed @ v, lambda: unit(4), dtype=F64)


def test_finite_differences_are_refused_on_a_non_smooth_loss():
    fine = unit(1)
    smooth, jumping = measured_on(fine, fine + 1e-6 * unit(2)), measured_on(fine, -fine)
    assert finite_differences(smooth, "asked for", sharded=False, dtype=F64).error == smooth.error
    with pytest.raises(NonSmoothLossError):
        finite_differences(jumping, "asked for", sharded=False, dtype=F64)


def test_a_product_that_is_not_finite_is_a_failure_not_a_disagreement():
    a, probe = symmetric(0), unit(1)
    fine = a @ probe
    measured = measured_on(fine, fine + 1e-8 * unit(3))
    choice = choose_method(measured, probe, fine, lambda v: a @ v * float("inf"), lambda: unit(4), dtype=F64)
    assert choice.method == "finite_difference" and choice.reason.startswith("double backward's product is not finite")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_on_coarse_parameters_finite_differences_neither_check_nor_replace_double_backward(dtype):
    """They measure the parameters' rounding there: double backward is checked for symmetry only
    (even where they disagree with it), and a failure that leaves only them is refused, with what to do."""
    a, probe = symmetric(0), unit(1)
    fine = a @ probe
    disagreeing = measured_on(fine + 0.1 * unit(2), fine + 0.1 * unit(2))
    choice = choose_method(disagreeing, probe, fine + 0.1 * unit(2), lambda v: a @ v, lambda: unit(4), dtype=dtype)
    assert choice.method == "double_backward" and choice.reason.startswith(f"on {dtype} parameters they measure rounding")
    skewed = a + torch.triu(torch.ones(DIM, DIM, dtype=torch.float64), 1)
    with pytest.raises(NonSmoothLossError, match="Double backward is incomplete too"):
        choose_method(disagreeing, probe, fine, lambda v: skewed @ v, lambda: unit(4), dtype=dtype)
    for failing in (lambda v: a @ v * float("nan"), None):
        failure = None if failing else SecondDerivativeError(RuntimeError("derivative for aten::foo is not implemented"), "x")
        with pytest.raises(CoarseFiniteDifferenceError, match=f"on {dtype} parameters.*use_reentrant=False"):
            exact = failing or (lambda v: a @ v)
            choose_method(disagreeing, probe, fine, exact, lambda: unit(4), dtype=dtype, build_failure=failure)
    with pytest.raises(CoarseFiniteDifferenceError, match=r"param_dtype=None"):
        finite_differences(measured_on(fine, fine), "the model is FSDP2-sharded", sharded=True, dtype=dtype)


def test_a_checkpointed_bfloat16_model_is_refused_with_what_to_do():
    """Reentrant checkpointing leaves only finite differences, which bfloat16 parameters defeat."""
    from transformer_models import LoRANet, next_token_loss, token_batch

    torch.manual_seed(0)
    model = LoRANet(zero_b=False).to(torch.bfloat16)
    with pytest.raises(CoarseFiniteDifferenceError, match="reentrant checkpointing.*use_reentrant=False"):
        hessian_eigenvalues(model, next_token_loss, token_batch(vocab=11))


def mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def test_product_error_reads_back_what_is_set():
    torch.manual_seed(0)
    model = nn.Linear(5, 1).double()
    batch = (torch.randn(20, 5, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64))
    with HessianOperator(model, mse, batch) as operator:
        assert operator.method == "double_backward" and operator.product_error == 0.0
        operator.product_error = 0.05
        assert operator.product_error == 0.05
        operator.matvec(torch.ones(operator.dim, dtype=torch.float64))
        assert operator.product_error == 0.05  # float64 products add no rounding of their own
    with HessianOperator(model, mse, batch, method="finite_difference") as operator:
        assert operator.method_reason == "asked for" and 0 < operator.product_error < 1e-6


def test_low_precision_products_add_their_rounding_to_what_is_set():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(torch.bfloat16)
    batch = (torch.randn(20, 5).to(torch.bfloat16), torch.randn(20, 1).to(torch.bfloat16))
    with HessianOperator(model, mse, batch, method="double_backward") as operator:
        operator.product_error = 0.25
        vector = torch.ones(operator.dim, dtype=torch.bfloat16)
        product = operator.matvec(vector)
        growth = LOW_PRECISION_ROUNDING * torch.finfo(torch.bfloat16).eps * operator.norm(product) / operator.norm(vector)
        assert operator.product_error == pytest.approx(0.25 + growth)
        first = operator.product_error
        operator.matvec(vector)  # the same product: no larger ||H v||, nothing added
        assert operator.product_error == first


@pytest.mark.parametrize("exact_scale", [0.0, 1.0])
def test_a_zero_product_divides_nothing(exact_scale):
    """A Hessian that is zero along the probe (a loss linear in the parameters, or gradients that
    vanished): no ZeroDivisionError, and double backward is kept only where it agrees."""
    probe, zero = unit(1), torch.zeros(DIM, dtype=torch.float64)
    measured = measured_on(zero, zero)
    choice = choose_method(measured, probe, zero, lambda v: exact_scale * symmetric(0) @ v, lambda: unit(4), dtype=F64)
    assert choice.method == ("double_backward" if exact_scale == 0 else "finite_difference")


def test_a_loss_linear_in_the_parameters_has_a_zero_spectrum_under_auto():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    result = hessian_eigenvalues(model, lambda m, x: m(x).sum(), torch.randn(4, 3))
    assert result.lambda_max == result.lambda_min == 0.0
