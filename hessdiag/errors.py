"""Exceptions raised by the curvature engine.

Each one says what went wrong and what the caller can do about it; the callback and the
`Monitor` catch them at run time, turn them into a warning and a flag, and let training go on.
"""

from __future__ import annotations

import re


class HessdiagError(RuntimeError):
    """Base class of every error hessdiag raises on purpose."""


class HessdiagWarning(UserWarning):
    """A diagnostic could not be computed as asked; training is unaffected."""


class NonFiniteLossError(HessdiagError, FloatingPointError):
    """The loss closure returned NaN or infinity, so the Hessian is not defined there."""


class LossClosureError(HessdiagError, ValueError):
    """`loss_fn(model, batch)` raised or returned something other than a real scalar tensor."""


class SecondDerivativeError(HessdiagError):
    """An operation in the loss has no second derivative, so no Hessian-vector product exists.

    Attributes:
        op: the name of the operation PyTorch complained about, when it could be read from the
            message (e.g. ``aten::_scaled_dot_product_efficient_attention_backward``), else ``None``.
    """

    def __init__(self, original: BaseException, method: str) -> None:
        self.op = _op_name(str(original))
        named = f"`{self.op}`" if self.op else "an operation in the loss"
        other = "forward_over_reverse" if method == "double_backward" else "double_backward"
        super().__init__(
            f"{named} has no second derivative ({method} HVP failed: {original}). Replace it with a "
            f"twice-differentiable equivalent (e.g. a math implementation), restrict `params=` to the "
            f"parameters after it, or try `hvp_method='{other}'`."
        )


_OP_PATTERNS = (
    r"derivative for (\S+) is not implemented",
    r"function (\S+) returned an incorrect number",
    r"trying to differentiate twice a function that was marked with @once_differentiable",
    r"(\S+Backward\d*) (?:is not|does not)",
)


def _op_name(message: str) -> str | None:
    for pattern in _OP_PATTERNS:
        match = re.search(pattern, message)
        if match:
            return match.group(1) if match.groups() else "a @once_differentiable autograd.Function"
    return None


def is_missing_second_derivative(error: BaseException) -> bool:
    """Whether a RuntimeError from autograd means "this op cannot be differentiated twice"."""
    message = str(error)
    return any(
        marker in message
        for marker in (
            "is not implemented",
            "once_differentiable",
            "not supported for forward AD",
            "Trying to use forward AD",
        )
    )
