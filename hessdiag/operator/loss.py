"""The loss the optimizer sees, on one batch, and its gradient: evaluated alike every time.

Every evaluation seeds the RNG (:func:`~hessdiag.isolation.seed_rng`), so dropout draws the same
masks in every product of one estimate. A failure inside the user's closure is a
:class:`~hessdiag.errors.LossClosureError`; a NaN or infinite loss a
:class:`~hessdiag.errors.NonFiniteLossError`. The gradient is built once per estimate: with its graph
(``create_graph=True``) for double backward, without one for finite differences, under the attention
kernels the user has enabled (fused ones included: only first derivatives are taken), and by a plain
``loss.backward()`` where ``torch.autograd.grad`` is refused (reentrant checkpointing) or returns
None for sharded parameters (FSDP2). Forward and backward passes run under
:class:`~hessdiag.operator.equivalents.TwiceDifferentiable`, which routes ops without a second
derivative (Hardsigmoid, EmbeddingBag, sparse embeddings) to exact equivalents that have one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hessdiag import _sharded
from hessdiag.batches import MicroBatches
from hessdiag.isolation import seed_rng
from hessdiag.errors import (
    HessdiagWarning,
    LossClosureError,
    NonFiniteLossError,
    SecondDerivativeError,
    UnrecordedGradientError,
    is_missing_second_derivative,
    refuses_autograd_grad,
)
from hessdiag.operator.equivalents import TwiceDifferentiable
from hessdiag.operator.finite_difference import CentralDifference
from hessdiag.operator.parameter_space import ParameterSpace, refuse_non_finite_gradient

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a module, so `torch.func.functional_call` can swap the
    model's parameters by name (public API, no private reparametrisation)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Any) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn
        self._batch = batch

    def forward(self) -> torch.Tensor:
        return self._loss_fn(self.model, self._batch)


def functional_names(model: nn.Module, params: Sequence[torch.Tensor]) -> list[str]:
    """The names of `params` inside a :class:`LossModule` of `model` (for `functional_call`)."""
    by_id = {id(p): f"model.{name}" for name, p in model.named_parameters(remove_duplicate=False)}
    return [by_id[id(p)] for p in params]


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
    Each part draws its own dropout masks (the RNG seeded by `seed` plus its index), the same ones
    at every evaluation.

    Args:
        model, loss_fn, batch: the (unwrapped) network, ``loss_fn(model, batch) -> scalar``, its batch
            (or a :class:`~hessdiag.batches.MicroBatches`).
        space: the chosen parameters and their flat vectors.
        seed: seeds the RNG before every evaluation (the same dropout masks each time).
        attention: the attention backends gradients without graph run under (the user's, read
            before :func:`~hessdiag.isolation.isolation` forces the math one).

    Attributes:
        parts: the batches evaluated one at a time: the micro-batches, or the batch itself.
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
        self.loss_fn = loss_fn
        self.batch = batch
        self.parts: tuple[Any, ...] = tuple(batch) if isinstance(batch, MicroBatches) else (batch,)
        if not self.parts:
            raise ValueError("The MicroBatches holds no micro-batch: pass the step's micro-batches, at least one.")
        self.space = space
        self.seed = seed
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
        # The parameter objects whose `.grad` a plain backward writes, as they are before a forward
        # (see `evaluate`).
        self.before_forward: list[torch.Tensor] = list(model.parameters())

    @property
    def by_parts(self) -> bool:
        """Whether the batch has several parts, each evaluated and freed before the next: double
        backward then rebuilds each part's graph for every product instead of keeping one graph."""
        return len(self.parts) > 1

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, part: int = 0) -> torch.Tensor:
        """The loss of part `part` as a 0-dim tensor (with its graph), divided by the number of
        parts (so that the parts' values sum to the loss), RNG seeded by the part.

        Raises:
            LossClosureError: the closure raised (other than out of memory), or returned no real scalar.
        """
        if self.space.shard is not None:
            _sharded.reshard(self.model)  # so that the forward gathers the shards as they are now
        # After the forward an FSDP2 group that keeps its gathered parameters (the root's, or any with
        # reshard_after_forward=False) has them registered on its modules in place of the sharded
        # ones, while its reduce-scatter accumulates into the sharded parameters' `.grad`: those are
        # the ones a plain backward must swap out.
        self.before_forward = list(self.model.parameters())
        seed_rng(self.seed + part, self.space.device)
        try:
            with TwiceDifferentiable():
                loss = self.loss_fn(self.model, self.parts[part])
        except torch.OutOfMemoryError:
            raise  # not the closure's fault: the caller may retry on a smaller batch
        except Exception as error:  # the user's closure: any other failure is a bad batch or closure
            raise LossClosureError(
                f"loss_fn(model, batch) raised {type(error).__name__}: {error}. Check that `batch` is what "
                "the closure expects (the curvature check calls it outside the training step)."
            ) from error
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.dtype.is_floating_point:
            got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise LossClosureError(f"loss_fn(model, batch) must return a real scalar tensor, got {got}.")
        return self.share(loss.reshape(()))

    def share(self, loss: torch.Tensor) -> torch.Tensor:
        """A part's loss as its share of the batch's: over the number of parts."""
        return loss if not self.by_parts else loss / len(self.parts)

    def checked(self, part: int = 0) -> torch.Tensor:
        """:meth:`evaluate`, refusing a loss without graph or a non-finite one (on any rank of a
        sharded model: decided together)."""
        loss = self.evaluate(part)
        if not loss.requires_grad and torch.is_inference_mode_enabled():
            raise LossClosureError(
                "The loss was computed under torch.inference_mode(), which records no graph (torch.enable_grad() "
                "cannot lift it): run the curvature check outside inference mode (for a check from validation or "
                "prediction in Lightning, `Trainer(inference_mode=False)`)."
            )
        if not loss.requires_grad:
            raise LossClosureError(
                "The loss does not depend on the chosen parameters: was it computed under torch.no_grad(), or "
                "through checkpoint(..., use_reentrant=True) on inputs that do not require grad (whose output has "
                "no graph: training gets no gradients there either; use use_reentrant=False)?"
            )
        finite = bool(torch.isfinite(loss))
        shard = self.space.shard
        if shard is not None:  # decided together: a rank that stops here would leave FSDP's backward waiting
            finite = float(shard.sum_(torch.tensor([float(not finite)], dtype=torch.float64, device=self.space.device))) == 0
        if not finite:
            raise NonFiniteLossError(f"The loss is {loss.item()} on this batch (or another rank's); the Hessian is undefined there.")
        return loss

    def check(self) -> None:
        """Refuse a bad loss (see :meth:`checked`) on every part, keeping no graph."""
        for part in range(len(self.parts)):
            self.checked(part)

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
        if self.by_parts:  # the later parts first, so that part 0's graph is the only one alive
            later = [self.checked(part).detach() for part in range(1, len(self.parts))]
        loss = self.checked(0)
        grads = self._gradient(0, loss, method, create_graph)
        self.constant = [i for i, g in enumerate(grads) if create_graph and g is not None and not g.requires_grad]
        if self.by_parts:
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
        return self._gradient(part, self.evaluate(part), "double_backward", create_graph=True)

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
        if self.by_parts:
            later = [self.checked(part).detach() for part in range(1, len(self.parts))]
            self.value, self.grads = sum(later, self.checked(0).detach()), ()
            return
        loss = self.checked(0)
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
        for part in range(len(self.parts)):
            with sdpa_kernel(self.attention):
                loss = self.evaluate(part)
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
                    loss = self.evaluate(part)  # the refused backward freed part of the graph
                else:
                    backward = self._compare_with_backward(grads, part)
                    if backward is None:
                        return self.space.flatten(grads)
                    self.plain_backward = True
                    return self.space.flatten(backward)
            with TwiceDifferentiable():
                return self.space.flatten(gradient_by_backward(loss, self.space.params, self.before_forward))

    def _compare_with_backward(self, grads: Sequence[torch.Tensor | None], part: int) -> list[torch.Tensor | None] | None:
        """Whether a None in `grads` (from ``autograd.grad`` on part `part`) is a zero gradient or a
        graph never recorded: compared once with what training's ``loss.backward()`` gives (one more
        forward and backward, only when some entry is None). Sets `unrecorded`; returns backward()'s
        gradient when it reaches a parameter autograd.grad left None, else None."""
        missing = [i for i, g in enumerate(grads) if g is None]
        if not missing or self._compared:
            return None
        self._compared = True
        loss = self.evaluate(part)
        with TwiceDifferentiable():
            backward = gradient_by_backward(loss, self.space.params, self.before_forward)
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
        if self.by_parts and not self.grads:
            grads = tuple(self.space.split(self.gradient_without_graph()))
            refuse_non_finite_gradient(self.model, self.space.params, grads)
            self.grads = grads
        return self.space.finish(self.space.flatten([None if g is None else g.detach() for g in self.grads]))

    def along(self, direction: torch.Tensor, step: float, shifter: CentralDifference | None) -> float:
        """The loss at theta + step * direction (flat `direction`), same batch and dropout masks.

        Evaluated functionally: the parameters themselves are never written (on a sharded model
        the local shards are shifted in place by `shifter` and restored from a copy, bit-for-bit).
        """
        space = self.space
        offsets = space.split(direction.to(device=space.device, dtype=space.dtype))
        if space.shard is not None:
            assert shifter is not None
            with torch.no_grad():
                value = shifter.evaluate_at(offsets, step, lambda: sum(self.evaluate(part).detach() for part in range(len(self.parts))))
            return space.total(value)
        names = functional_names(self.model, space.params)
        value = None
        with torch.no_grad(), TwiceDifferentiable():
            moved = {name: p + step * o for name, p, o in zip(names, space.params, offsets)}
            for part, batch in enumerate(self.parts):
                seed_rng(self.seed + part, space.device)
                loss = torch.func.functional_call(LossModule(self.model, self.loss_fn, batch), moved, ())
                share = self.share(loss.detach().reshape(()))
                value = share if value is None else value + share
        assert value is not None
        return space.total(value)
