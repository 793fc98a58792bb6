"""Exceptions raised by the curvature engine.

Each one says what went wrong and what the caller can do about it; the callback and the
`Monitor` catch them at run time, turn them into a warning and a flag, and let training go on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


class HessdiagError(RuntimeError):
    """Base class of every error hessdiag raises on purpose."""


class HessdiagWarning(UserWarning):
    """A diagnostic could not be computed as asked; training is unaffected."""


class NonFiniteLossError(HessdiagError, FloatingPointError):
    """The loss closure returned NaN or infinity, so the Hessian is not defined there."""


class NonFiniteGradientError(HessdiagError, FloatingPointError):
    """The gradient holds NaN or infinity though the loss is finite, so no curvature (nor noise
    scale) is defined there.

    The usual cause is a non-finite input meeting a zero derivative: an infinite input through a
    saturated tanh or sigmoid gives a finite loss and 0 * inf = NaN in the first layer's weight
    gradient. It is not a kink, and no product method can help.

    Attributes:
        parameters: the names of the parameter tensors whose gradient is not finite.
    """

    def __init__(self, parameters: Sequence[str], where: str = "") -> None:
        self.parameters = list(parameters)
        shown = ", ".join(self.parameters[:5]) + (f" and {len(self.parameters) - 5} more" if len(self.parameters) > 5 else "")
        super().__init__(
            f"The gradient is not finite (NaN or infinite){where} in {len(self.parameters)} parameter tensor(s): {shown}, "
            "though the loss is finite: curvature and the noise scale are undefined there, and an optimizer step on this batch would write NaN "
            "into those parameters. The usual cause is a non-finite input through a saturating op (an infinite input "
            "through tanh: 0 * inf = NaN in the gradient); check the batch with torch.isfinite(x).all() and clean it "
            "before the model, or find the op whose backward overflows (torch.autograd.set_detect_anomaly(True))."
        )


class LossClosureError(HessdiagError, ValueError):
    """`loss_fn(model, batch)` raised or returned something other than a real scalar tensor."""


class SecondDerivativeError(HessdiagError):
    """An operation in the loss has no second derivative, so no exact Hessian-vector product exists.

    Attributes:
        op: the name of the operation PyTorch complained about, when it could be read from the
            message (e.g. ``aten::_scaled_dot_product_efficient_attention_backward``), else ``None``.
    """

    def __init__(self, original: BaseException, method: str) -> None:
        self.op = _op_name(str(original))
        named = f"`{self.op}`" if self.op else "an operation in the loss"
        super().__init__(
            f"{named} cannot be differentiated twice ({method} HVP failed: {original}). Use "
            "`hvp_method='auto'` (it takes central differences of ordinary gradients, which need first derivatives "
            "only, where the loss is smooth enough for them), replace the op with a twice-differentiable "
            "equivalent, or restrict `params=` to the parameters after it."
        )


class UnrecordedGradientError(HessdiagError):
    """``torch.autograd.grad`` returns no gradient for parameters that ``loss.backward()`` reaches.

    Under ``checkpoint(..., use_reentrant=True)`` with inputs made to require grad (Hugging Face's
    ``enable_input_require_grads()``, the usual recipe for adapters on a checkpointed base), the
    checkpointed blocks' parameters are not in the graph ``autograd.grad`` walks: it returns None for
    them (with ``allow_unused=True``) instead of raising, while training's ``backward()`` gives them
    their gradients when the checkpoint recomputes its forward. None is then a method failure, not a
    zero gradient, and exact products cannot be formed.

    Attributes:
        count: the number of parameter tensors concerned.
    """

    def __init__(self, count: int, method: str) -> None:
        self.count = count
        super().__init__(
            f"torch.autograd.grad returns no gradient for {count} parameter tensor(s) that loss.backward() does reach "
            f"(parameters inside checkpoint(..., use_reentrant=True) blocks: their graph is recorded only when "
            f"backward() recomputes the block), so {method} Hessian-vector products cannot be formed (they would be "
            "zero, not the curvature). Checkpoint with use_reentrant=False (e.g. "
            "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})), or use "
            "`hvp_method='auto'` (differences of the gradients backward() computes, where the loss is smooth enough)."
        )


class NonSmoothLossError(HessdiagError):
    """Finite differences of the gradient disagree with themselves: the loss is not smooth.

    Differences of gradients are a Hessian only where the gradient is differentiable; across ReLU
    kinks (units switching on and off between theta - eps v and theta + eps v) they are not.

    Args:
        relative_disagreement: ||D(eps) - D(2 eps)|| / ||D(eps)|| on the measured vector.
        threshold: the largest disagreement of a smooth loss.
        why: why finite differences were needed (a sentence, or "" when they were asked for).
        remedy: what works instead (default: ``hvp_method='auto'``, for finite differences asked for).
            When they were the last resort (``"auto"`` or a sharded model) it must advise no product
            method: each method that could run was already tried.

    Attributes:
        relative_disagreement: as given.
    """

    def __init__(self, relative_disagreement: float, threshold: float, why: str = "", remedy: str = "") -> None:
        self.relative_disagreement = relative_disagreement
        advice = remedy or (
            "Use `hvp_method='auto'` (double backward, exact almost everywhere for piecewise-linear activations and "
            "checked there for symmetry), or a smooth activation (GELU, SiLU)."
        )
        super().__init__(
            f"Finite-difference Hessian-vector products at two step sizes differ by {relative_disagreement:.2g} of "
            f"their size (at most {threshold:g} on a smooth loss): the gradient jumps (ReLU-like kinks), so "
            f"differences of gradients are not the Hessian here.{why} {advice}"
        )


class CoarseFiniteDifferenceError(HessdiagError):
    """Finite differences were needed on parameters coarser than float32 (bfloat16, float16).

    A finite-difference product shifts the parameters by eps v; stored in bfloat16 (8 bits of
    mantissa) the shifted parameters are rounded to a spacing of 0.4% of their size, so differences
    of gradients measure that rounding, not curvature (measured: the two step sizes disagree, or the
    values miss the float64 Hessian's by more than their estimated error).
    """

    def __init__(self, dtype: object, reason: str, sharded: bool) -> None:
        remedy = (
            "shard the monitored run with float32 parameters (MixedPrecisionPolicy(param_dtype=None))"
            if sharded
            else "keep float32 parameters and compute under autocast (Lightning: precision='bf16-mixed'), or let "
            "double backward run (for reentrant checkpointing: use_reentrant=False, e.g. "
            "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}))"
        )
        super().__init__(
            f"Finite-difference Hessian-vector products were needed because {reason}, but on {dtype} parameters "
            f"they measure the parameters' rounding, not curvature (a shifted parameter is rounded to {dtype}). "
            f"To check curvature, {remedy}."
        )


#: checkpoint(use_reentrant=True) refuses torch.autograd.grad (wording of torch 2.x releases).
_REENTRANT_CHECKPOINT = re.compile(r"(?:not compatible|incompatible) with \.grad\(\)")

_OP_PATTERNS = (
    r"derivative for '?([^'\s]+)'? is not implemented",
    r"function (\S+) returned an incorrect number",
    r"trying to differentiate twice a function that was marked with @once_differentiable",
    r"(\S+Backward\d*) (?:is not|does not)",
    r"forward AD (?:with|for) (\S+?)(?: |$)",
)


def _op_name(message: str) -> str | None:
    if _REENTRANT_CHECKPOINT.search(message):
        return "checkpoint(use_reentrant=True)"
    for pattern in _OP_PATTERNS:
        match = re.search(pattern, message)
        if match:
            return match.group(1) if match.groups() else "a @once_differentiable autograd.Function"
    if "setup_context" in message:
        return "an autograd.Function without setup_context"
    return None


def is_missing_second_derivative(error: BaseException) -> bool:
    """Whether a RuntimeError from autograd means "this op cannot be differentiated twice"."""
    message = str(error)
    return any(
        marker in message
        for marker in (
            "is not implemented",
            "once_differentiable",
            "forward AD",
            "ZeroTensors are immutable",  # forward_over_reverse through some GroupNorm/SiLU graphs
            "must override the setup_context staticmethod",  # an autograd.Function under torch.func
        )
    ) or bool(_REENTRANT_CHECKPOINT.search(message))


def refuses_autograd_grad(error: RuntimeError) -> bool:
    """Whether `error` is reentrant checkpointing refusing `torch.autograd.grad` (gradients are then
    taken by a plain ``loss.backward()``)."""
    return bool(_REENTRANT_CHECKPOINT.search(str(error)))
