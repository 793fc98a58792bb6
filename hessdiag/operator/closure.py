"""The user's loss closure, evaluated alike every time, part by part.

``loss_fn(model, batch)`` on the batch, or on each micro-batch of a
:class:`~hessdiag.batches.MicroBatches` in turn (the loss is then the mean of theirs, what the
accumulated gradient descends), or on each part of a batch cut into
:class:`~hessdiag.batches.SampleParts` (each weighted by its share of the samples). Every
evaluation seeds the RNG (:func:`~hessdiag.isolation.seed_rng`)
by the part, so dropout draws the same masks for a part in every product of one estimate. A failure
inside the closure is a :class:`~hessdiag.errors.LossClosureError`; a NaN or infinite loss a
:class:`~hessdiag.errors.NonFiniteLossError`. Forwards run under
:class:`~hessdiag.operator.equivalents.TwiceDifferentiable`, which routes ops without a second
derivative (Hardsigmoid, EmbeddingBag, sparse embeddings) to exact equivalents that have one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hessdiag import _sharded
from hessdiag.batches import MicroBatches, SampleParts
from hessdiag.errors import LossClosureError, NonFiniteLossError
from hessdiag.isolation import seed_rng
from hessdiag.operator.equivalents import TwiceDifferentiable
from hessdiag.operator.finite_difference import CentralDifference
from hessdiag.operator.parameter_space import ParameterSpace

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


class PartedClosure:
    """``loss_fn(model, batch)`` at the current parameters, part by part, with fixed dropout masks.

    Args:
        model, loss_fn, batch: the (unwrapped) network, ``loss_fn(model, batch) -> scalar``, its batch
            (or a :class:`~hessdiag.batches.MicroBatches`, or a batch cut into
            :class:`~hessdiag.batches.SampleParts`).
        space: the chosen parameters and their flat vectors.
        seed: seeds the RNG before every evaluation (part j: `seed` + j).

    Attributes:
        parts: the batches evaluated one at a time: the micro-batches, or the batch itself.
        before_forward: the parameter objects whose `.grad` a plain backward writes, as they were
            before the last forward (see :meth:`evaluate`).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Any, space: ParameterSpace, seed: int) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.weights = batch.weights if isinstance(batch, SampleParts) else None  # else each part 1 / len(parts)
        self.parts: tuple[Any, ...] = tuple(batch) if isinstance(batch, MicroBatches) else (batch,)
        if not self.parts:
            raise ValueError("The MicroBatches holds no micro-batch: pass the step's micro-batches, at least one.")
        self.space = space
        self.seed = seed
        self.before_forward: list[torch.Tensor] = list(model.parameters())

    @property
    def by_parts(self) -> bool:
        """Whether the batch has several parts, each evaluated and freed before the next: double
        backward then rebuilds each part's graph for every product instead of keeping one graph."""
        return len(self.parts) > 1

    def evaluate(self, part: int = 0) -> torch.Tensor:
        """The loss of part `part` as a 0-dim tensor (with its graph), as its share of the loss (see
        :meth:`share`: the parts' values sum to the loss), RNG seeded by the part.

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
        return self.share(loss.reshape(()), part)

    def share(self, loss: torch.Tensor, part: int) -> torch.Tensor:
        """Part `part`'s loss as its share of the batch's: over the number of micro-batches, or times
        its share of the samples for a batch cut into :class:`~hessdiag.batches.SampleParts`."""
        if not self.by_parts:
            return loss
        if self.weights is not None:
            return loss * self.weights[part]
        return loss / len(self.parts)

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
                share = self.share(loss.detach().reshape(()), part)
                value = share if value is None else value + share
        assert value is not None
        return space.total(value)
