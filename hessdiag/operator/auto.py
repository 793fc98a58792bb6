"""The ``"auto"`` choice of product method: double backward, checked once against finite differences.

Double backward is exact where every op's backward is differentiable; where one is not
(``@once_differentiable``, ``.detach()`` inside a backward) autograd drops its second-order term
without a word. So ``"auto"`` cross-checks double backward once per operator against central
differences on a random unit vector, and takes finite differences where double backward fails or
disagrees beyond their own (measured) error. On a loss that is not smooth, finite differences cannot
check anything: double backward is kept if it is at least symmetric on two random vectors. Nor can
they on parameters coarser than float32 (bfloat16, float16), where they measure the parameters'
rounding: there double backward is checked for symmetry alone, and a method failure that leaves only
finite differences is refused (:class:`~hessdiag.errors.CoarseFiniteDifferenceError`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hessdiag.errors import (
    CoarseFiniteDifferenceError,
    HessdiagError,
    NonSmoothLossError,
    SecondDerivativeError,
    UnrecordedGradientError,
    is_missing_second_derivative,
)
from hessdiag.operator.finite_difference import NON_SMOOTH_DISAGREEMENT, Measurement
from hessdiag.operator.rounding import is_coarse


@dataclass(frozen=True)
class MethodChoice:
    """The product method chosen and why.

    Attributes:
        method: ``"double_backward"`` or ``"finite_difference"``.
        reason: why, in words (for logs).
        error: the measured error of one product beyond rounding: finite differences' estimate
            (:class:`~hessdiag.operator.finite_difference.Measurement`), 0 for double backward.
    """

    method: str
    reason: str
    error: float


#: What works when finite differences were the last resort and the loss is not smooth: never a product
#: method (each that could run was tried), so that following the advice cannot lead back here.
SHARDED_REMEDY = "Use a smooth activation (GELU, SiLU): exact products cannot run on this model."
UNRECORDED_REMEDY = (
    "Checkpoint with use_reentrant=False (e.g. gradient_checkpointing_enable(gradient_checkpointing_kwargs="
    "{'use_reentrant': False})), so that double backward can run, or use a smooth activation (GELU, SiLU)."
)
OVERFLOW_REMEDY = (
    "Check curvature on a float64 copy of the model (copy.deepcopy(model).double(), the batch in float64 too), "
    "where the second-order terms fit, or find the overflowing activations."
)


def op_remedy(op: str | None) -> str:
    """What works when `op` (a name, or None) cannot be differentiated twice and the loss is not smooth."""
    named = f"`{op}`" if op else "the op that cannot be differentiated twice"
    return (
        f"Replace {named} with a twice-differentiable equivalent (e.g. hardsigmoid(x) = relu6(x + 3) / 6), restrict "
        "`params=` to the parameters after it (their gradients do not pass through it), or use smooth activations "
        "(GELU, SiLU), where finite differences apply."
    )


def finite_differences(
    measured: Measurement, reason: str, *, sharded: bool, dtype: torch.dtype, remedy: str = ""
) -> MethodChoice:
    """Finite differences, for `reason`, on parameters of `dtype`, if the loss is smooth enough for them;
    `remedy` is what to advise otherwise (see :class:`~hessdiag.errors.NonSmoothLossError`).

    Raises:
        CoarseFiniteDifferenceError: `dtype` is coarser than float32.
        NonSmoothLossError: the two step sizes disagree (the gradient jumps along the probe).
    """
    if is_coarse(dtype):
        raise CoarseFiniteDifferenceError(dtype, reason, sharded)
    if not measured.smooth:
        why = "" if reason == "asked for" else f" Finite differences were needed because {reason}, so no method works here."
        raise NonSmoothLossError(measured.relative, NON_SMOOTH_DISAGREEMENT, why, SHARDED_REMEDY if sharded else remedy)
    return MethodChoice("finite_difference", reason, measured.error)


def choose_method(
    measured: Measurement,
    probe: torch.Tensor,
    fine: torch.Tensor,
    exact_product: Callable[[torch.Tensor], torch.Tensor],
    second_probe: Callable[[], torch.Tensor],
    *,
    dtype: torch.dtype,
    build_failure: HessdiagError | None = None,
) -> MethodChoice:
    """What ``"auto"`` takes on an unsharded model.

    Args:
        measured: finite differences at two step sizes on `probe` (global products).
        probe: the random unit vector; `fine` its extrapolated finite-difference product (global).
        exact_product: the double-backward product of a flat vector (global); not called when
            `build_failure` says the gradient graph could not be built.
        second_probe: a second random unit vector, for the symmetry check on a non-smooth loss.
        dtype: the parameters' dtype.
        build_failure: why building the gradient graph failed, if it did (a
            :class:`~hessdiag.errors.SecondDerivativeError` or an
            :class:`~hessdiag.errors.UnrecordedGradientError`).

    Raises:
        NonSmoothLossError: no method works (finite differences needed on a loss that is not smooth,
            or double backward asymmetric there).
        CoarseFiniteDifferenceError: only finite differences could work, on bfloat16/float16 parameters.
    """
    exact = None
    failure = build_failure
    if failure is None:
        try:
            exact = exact_product(probe)
        except RuntimeError as error:
            if not is_missing_second_derivative(error):
                raise
            failure = SecondDerivativeError(error, "double_backward")
    if isinstance(failure, UnrecordedGradientError):
        reason = (
            f"torch.autograd.grad returns no gradient for {failure.count} parameter tensor(s) that backward() reaches "
            "(reentrant checkpointing)"
        )
        return finite_differences(measured, reason, sharded=False, dtype=dtype, remedy=UNRECORDED_REMEDY)
    if isinstance(failure, SecondDerivativeError):
        reason = f"double backward failed: {failure.op or 'an op of the loss'} cannot be differentiated twice"
        return finite_differences(measured, reason, sharded=False, dtype=dtype, remedy=op_remedy(failure.op))
    assert exact is not None
    if not bool(torch.isfinite(exact).all()):
        reason = f"double backward's product is not finite (in {dtype}: an overflow in its second-order terms)"
        return finite_differences(measured, reason, sharded=False, dtype=dtype, remedy=OVERFLOW_REMEDY)
    if not measured.smooth or is_coarse(dtype):
        _require_symmetry(probe, exact, second_probe(), exact_product, measured)
        why = f"on {dtype} parameters they measure rounding" if is_coarse(dtype) else "the loss is not smooth"
        return MethodChoice("double_backward", f"{why}, finite differences cannot check double backward; it is symmetric", 0.0)
    disagreement = float(torch.linalg.vector_norm(exact - fine))
    size = float(torch.linalg.vector_norm(fine))
    # Within the finite differences' own error (x4: it is an estimate) or their rounding floor.
    tolerance = 4 * measured.error + torch.finfo(fine.dtype).eps ** 0.5 * size
    # Relative to the product's size; a zero product (a Hessian that is zero along the probe) divides nothing.
    relative = disagreement / size if size > 0 else (0.0 if disagreement == 0 else math.inf)
    if disagreement <= tolerance:
        return MethodChoice("double_backward", f"double backward agrees with finite differences ({relative:.1e} of a product)", 0.0)
    return finite_differences(
        measured,
        f"double backward is incomplete: it differs from finite differences by {relative:.2g} of a "
        "product (a backward that is not differentiable, e.g. @once_differentiable or .detach() inside it)",
        sharded=False,
        dtype=dtype,
    )


def _require_symmetry(
    probe: torch.Tensor,
    product: torch.Tensor,
    other: torch.Tensor,
    exact_product: Callable[[torch.Tensor], torch.Tensor],
    measured: Measurement,
) -> None:
    """u.Hw = w.Hu for exact products; a dropped second-order term breaks it. Needs one more
    product (of the second random vector w, `other`)."""
    other_product = exact_product(other)
    defect = abs(float(probe @ other_product - other @ product))
    scale = float(torch.linalg.vector_norm(product) + torch.linalg.vector_norm(other_product))
    if not defect <= torch.finfo(product.dtype).eps ** 0.5 * scale:  # a NaN defect fails too
        raise NonSmoothLossError(
            measured.relative,
            NON_SMOOTH_DISAGREEMENT,
            f" Double backward is incomplete too: u.Hw - w.Hu = {defect:.2g} (of {scale:.2g}) on two random vectors "
            "(a backward that is not differentiable, e.g. @once_differentiable or .detach() inside it), so no "
            "method works here.",
            "Make that backward differentiable, restrict `params=` to the parameters after it, or use smooth "
            "activations (GELU, SiLU), where finite differences apply.",
        )
