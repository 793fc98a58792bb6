"""The loss the optimizer sees, on one batch, and its gradient.

The closure is evaluated by :class:`~hessdiag.operator.closure.PartedClosure` (seeded dropout, part
by part for micro-batches, a bad loss refused). The gradient is built once per estimate: with its graph
(``create_graph=True``) for double backward, without one for finite differences, under the attention
kernels the user has enabled (fused ones included: only first derivatives are taken), and by a plain
``loss.backward()`` where ``torch.autograd.grad`` is refused (reentrant checkpointing) or returns
None for sharded parameters (FSDP2). Forward and backward passes run under
:class:`~hessdiag.operator.equivalents.TwiceDifferentiable`, which routes ops without a second
derivative (Hardsigmoid, EmbeddingBag, sparse embeddings) to exact equivalents that have one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hessdiag.errors import (
    HessdiagWarning,
    NonFiniteLossError,
    SecondDerivativeError,
    UnrecordedGradientError,
    is_missing_second_derivative,
    refuses_autograd_grad,
)
from hessdiag.operator.closure import LossFn, PartedClosure
from hessdiag.operator.equivalents import TwiceDifferentiable
from hessdiag.operator.parameter_space import ParameterSpace, refuse_non_finite_gradient


def gradient_by_backward(
    loss: torch.Tensor, params: Sequence[torch.Tensor], every_parameter: Sequence[torch.Tensor]
) -> list[torch.Tensor | None]:
    """The gradient of `loss` by a plain ``loss.backward()``, `.grad` left as found.

    For reentrant checkpointing, which refuses `torch.autograd.grad`: each parameter's ``.grad``
    is swapped out and the very same tensor object put back. Parameters outside `params` that
    the backward reaches accumulate into their ``.grad`` too, so all of `every_parameter` (the
    model's) are swapped.
    """
    saved = [(p, p.grad) for p in every_parameter]
    try:
        for p, _ in saved:
            p.grad = None
        loss.backward()
        return [p.grad for p in params]
    finally:
        for p, grad in saved:
            p.grad = grad


def enabled_attention_backends() -> list[SDPBackend]:
    """The scaled-dot-product attention backends the user has enabled (math at least)."""
    enabled = [
        backend
        for backend, on in (
            (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled()),
            (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled()),
            (SDPBackend.CUDNN_ATTENTION, torch.backends.cuda.cudnn_sdp_enabled()),
            (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled()),
        )
        if on
    ]
    return enabled or [SDPBackend.MATH]


class BatchLoss:
    """``loss_fn(model, batch)`` at the current parameters, with fixed dropout masks, and the
    gradient kept for the products.

    A :class:`~hessdiag.batches.MicroBatches` of several micro-batches is evaluated part by part:
    the loss is the mean of the micro-batches' losses (what the accumulated gradient descends), and
    every forward, gradient and product runs over one micro-batch at a time, its graph freed before
    the next, so that an estimate holds one micro-batch's graph, as a training step under gradient
    accumulation does, not all of them at once (:class:`~hessdiag.operator.double_backward.PartByPart`).
    A batch cut into :class:`~hessdiag.batches.SampleParts` is evaluated the same way, each part
    weighted by its share of the samples.

    Args:
        model, loss_fn, batch, space, seed: see :class:`~hessdiag.operator.closure.PartedClosure`.
        attention: the attention backends gradients without graph run under (the user's, read
            before :func:`~hessdiag.isolation.isolation` forces the math one).

    Attributes:
        closure: the loss closure, evaluated part by part.
        value: the loss on this rank (detached), once a gradient is built; None before.
        grads: the gradient, one entry per parameter (None where unused): with its graph after
            :meth:`build_graph` for double backward (until :meth:`view_flat` hands the graph to the
            flat gradient), detached otherwise; on a loss in parts empty until :meth:`gradient`.
        constant: indices of the entries of a gradient built with its graph that do not depend on
            the parameters (see :meth:`warn_constant_gradients`).
        first_graph: on a loss in parts, part 0's gradient with its graph from :meth:`build_graph`
            for double backward, until the first product takes it (:meth:`part_graph`).
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, batch: Any, space: ParameterSpace, seed: int, attention: list[SDPBackend]
    ) -> None:
        self.model = model
        self.closure = PartedClosure(model, loss_fn, batch, space, seed)
        self.space = space
        self.attention = attention
        self.value: torch.Tensor | None = None
        self.grads: tuple[torch.Tensor | None, ...] = ()
        self.constant: list[int] = []
        self.first_graph: tuple[torch.Tensor | None, ...] | None = None
        # Reentrant checkpointing and FSDP2 (whose autograd.grad returns None for sharded
        # parameters): gradients by loss.backward() only.
        self.plain_backward = space.shard is not None
        #: Parameters whose autograd.grad is None though backward() reaches them (reentrant
        #: checkpointing on inputs made to require grad); compared once, at the first None.
        self.unrecorded = 0
        self._compared = False

    # -- the gradient ----------------------------------------------------------------------
    def build_graph(self, method: str) -> None:
        """The gradient for an exact `method`: with its graph for ``"double_backward"``. On a loss in
        parts, only the first part's gradient is built, for what it tells (an op without a second
        derivative, gradients autograd does not record, constant gradient rows), and with its graph
        kept for the first product (double backward then builds each part's per product, see
        :meth:`part_graph`); the other parts' losses are checked first, their graphs freed at once;
        the gradient is summed when asked for (:meth:`gradient`).

        Raises:
            SecondDerivativeError: an op of the loss cannot be differentiated twice.
            UnrecordedGradientError: autograd.grad returns None for parameters backward() reaches.
            NonFiniteGradientError: the gradient holds NaN or infinity.
        """
        create_graph = method == "double_backward"
        if self.closure.by_parts:  # the later parts first, so that part 0's graph is the only one alive
            later = [self.closure.checked(part).detach() for part in range(1, len(self.closure.parts))]
        loss = self.closure.checked(0)
        grads = self._gradient(0, loss, method, create_graph)
        self.constant = [i for i, g in enumerate(grads) if create_graph and g is not None and not g.requires_grad]
        if self.closure.by_parts:
            self.value, self.grads = sum(later, loss.detach()), ()
            self.first_graph = grads if create_graph else None
        else:
            self.value = loss.detach()
            self.grads = grads if create_graph else tuple(None if g is None else g.detach() for g in grads)

    def part_graph(self, part: int) -> tuple[torch.Tensor | None, ...]:
        """Part `part`'s gradient with its graph (double backward part by part): the one
        :meth:`build_graph` left for part 0 the first time it is asked for, else evaluated afresh.

        Raises:
            SecondDerivativeError, UnrecordedGradientError, NonFiniteGradientError: as :meth:`build_graph`.
        """
        if part == 0 and self.first_graph is not None:
            grads, self.first_graph = self.first_graph, None
            return grads
        return self._gradient(part, self.closure.evaluate(part), "double_backward", create_graph=True)

    def _gradient(self, part: int, loss: torch.Tensor, method: str, create_graph: bool) -> tuple[torch.Tensor | None, ...]:
        """The gradient of `loss`, part `part`'s evaluation, by autograd.grad, checked; with its
        graph where `create_graph`."""
        try:
            with TwiceDifferentiable():  # a checkpoint recomputing its forward here must route as the forward did
                grads = torch.autograd.grad(loss, self.space.params, create_graph=create_graph, allow_unused=True)
        except RuntimeError as error:
            if is_missing_second_derivative(error):
                raise SecondDerivativeError(error, method) from error
            raise
        self._compare_with_backward(grads, part)
        if self.unrecorded:
            raise UnrecordedGradientError(self.unrecorded, method)
        refuse_non_finite_gradient(self.model, self.space.params, grads)
        return grads

    def build_without_graph(self) -> None:
        """The loss and the gradient with no graph kept (finite differences); on a loss in parts, the
        loss only, the gradient summed when asked for (:meth:`gradient`).

        Raises:
            NonFiniteGradientError: the gradient holds NaN or infinity.
        """
        if self.closure.by_parts:
            later = [self.closure.checked(part).detach() for part in range(1, len(self.closure.parts))]
            self.value, self.grads = sum(later, self.closure.checked(0).detach()), ()
            return
        loss = self.closure.checked(0)
        grads = tuple(self.space.split(self._part_gradient_flat(0, loss)))
        refuse_non_finite_gradient(self.model, self.space.params, grads)
        self.value, self.grads = loss.detach(), grads

    def drop_graph(self) -> None:
        """Keep the gradient's values, free its graph (products by finite differences from here)."""
        self.grads = tuple(None if g is None else g.detach() for g in self.grads)
        self.first_graph = None

    def view_flat(self, flat: torch.Tensor) -> None:
        """Hold the gradient's values as views of `flat`, the same pieces concatenated (double
        backward's flat output, :class:`~hessdiag.operator.double_backward.DoubleBackward`): the
        pieces with their graph are then held by `flat` alone, not twice (a parameter-sized vector
        less for the operator's lifetime). Entries that were None stay None."""
        views = self.space.split(flat.detach())
        self.grads = tuple(None if g is None else view for g, view in zip(self.grads, views))

    def release(self) -> None:
        self.value = None
        self.grads = ()
        self.first_graph = None

    def gradient_without_graph(self) -> torch.Tensor:
        """The flat local gradient at the parameters' current values, part by part, with the
        attention kernels the user has enabled (fused ones included: only first derivatives are
        taken)."""
        flat = None
        for part in range(len(self.closure.parts)):
            with sdpa_kernel(self.attention):
                loss = self.closure.evaluate(part)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"The loss is {loss.item()} at a finite-difference step from the parameters: it is not "
                    "finite close to the current point (a log of a probability near 0, an overflow). Keep the "
                    "loss finite near the parameters (clamp a log's argument, compute the loss in float32); "
                    "exact products take no step (`hvp_method='double_backward'`, where every op of the model "
                    "has a second derivative)."
                )
            piece = self._part_gradient_flat(part, loss)
            flat = piece if flat is None else flat.add_(piece)
            del loss, piece
        assert flat is not None
        return flat

    def _part_gradient_flat(self, part: int, loss: torch.Tensor) -> torch.Tensor:
        """The flat local gradient of `loss`, part `part`'s evaluation, without graph."""
        with sdpa_kernel(self.attention):
            if not self.plain_backward:
                try:
                    with TwiceDifferentiable():
                        grads = torch.autograd.grad(loss, self.space.params, allow_unused=True)
                except RuntimeError as error:
                    if not refuses_autograd_grad(error):
                        raise
                    self.plain_backward = True
                    loss = self.closure.evaluate(part)  # the refused backward freed part of the graph
                else:
                    backward = self._compare_with_backward(grads, part)
                    if backward is None:
                        return self.space.flatten(grads)
                    self.plain_backward = True
                    return self.space.flatten(backward)
            with TwiceDifferentiable():
                return self.space.flatten(gradient_by_backward(loss, self.space.params, self.closure.before_forward))

    def _compare_with_backward(self, grads: Sequence[torch.Tensor | None], part: int) -> list[torch.Tensor | None] | None:
        """Whether a None in `grads` (from ``autograd.grad`` on part `part`) is a zero gradient or a
        graph never recorded: compared once with what training's ``loss.backward()`` gives (one more
        forward and backward, only when some entry is None). Sets `unrecorded`; returns backward()'s
        gradient when it reaches a parameter autograd.grad left None, else None."""
        missing = [i for i, g in enumerate(grads) if g is None]
        if not missing or self._compared:
            return None
        self._compared = True
        loss = self.closure.evaluate(part)
        with TwiceDifferentiable():
            backward = gradient_by_backward(loss, self.space.params, self.closure.before_forward)
        self.unrecorded = sum(backward[i] is not None for i in missing)
        return backward if self.unrecorded else None

    def warn_constant_gradients(self) -> None:
        """A gradient with no graph is constant in the parameters: its Hessian rows are zero. That
        is right for a loss linear in them, and silently wrong behind a backward that is not
        differentiable (``@once_differentiable``), which autograd does not report."""
        constant = self.constant
        if constant:
            warnings.warn(
                f"The gradient of {len(constant)} parameter tensor(s) (indices {constant[:5]}) does not depend on "
                "the parameters; their Hessian rows are taken as zero. This is exact if the loss is linear in "
                "them, wrong if an op's backward is not differentiable (e.g. @once_differentiable).",
                HessdiagWarning,
                stacklevel=3,
            )

    # -- what the operator reports ---------------------------------------------------------
    def total(self) -> float:
        """The loss at the current parameters (global batch under data parallelism; the mean
        over ranks on a sharded model)."""
        assert self.value is not None
        return self.space.total(self.value)

    def gradient(self) -> torch.Tensor:
        """The flat gradient on this batch (global batch under data parallelism; this rank's
        piece on a sharded model); on a loss in parts summed part by part at the first call.

        Raises:
            NonFiniteGradientError: the gradient holds NaN or infinity.
        """
        if self.closure.by_parts and not self.grads:
            grads = tuple(self.space.split(self.gradient_without_graph()))
            refuse_non_finite_gradient(self.model, self.space.params, grads)
            self.grads = grads
        return self.space.finish(self.space.flatten([None if g is None else g.detach() for g in self.grads]))

