"""The loss a curvature check differentiates, chosen from what the LightningModule offers.

In this order: the user's ``loss_fn(pl_module, batch)``; the module's ``hessdiag_loss(batch)``; else
``training_step(batch, batch_idx)`` re-run with the step's own `batch_idx` and ``self.log`` muted, so
that a check measures the loss the step trained on (a module may pick its task from `batch_idx`) and
adds nothing to the user's metrics. Manual optimisation needs one of the first two: its
``training_step`` steps the optimizer.

The callback hands the closure each micro-batch as a :class:`StepBatch`, which carries its
`batch_idx` (a named tuple: a sub-batch cuts the batch and keeps the index). Lightning's training
loop passes no ``dataloader_idx`` to ``training_step`` (several training loaders are combined into one
batch), so none is kept.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException

LossHook = Callable[[pl.LightningModule, Any], torch.Tensor]


class StepBatch(NamedTuple):
    """A micro-batch of the step and the `batch_idx` Lightning gave ``training_step`` for it."""

    batch: Any
    batch_idx: int


def user_batch(batch: Any) -> Any:
    """The batch as the user's code sees it (a :class:`StepBatch` unwrapped)."""
    return batch.batch if isinstance(batch, StepBatch) else batch


@contextlib.contextmanager
def muted_logging(module: pl.LightningModule) -> Iterator[None]:
    """Silence ``module.log`` / ``module.log_dict`` inside the block; restore them after, also on error."""
    saved = module.__dict__.get("log"), module.__dict__.get("log_dict")
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, value in zip(("log", "log_dict"), saved):
            if value is None:
                del module.__dict__[name]
            else:
                setattr(module, name, value)


def training_step_loss(module: pl.LightningModule, batch: Any) -> torch.Tensor:
    """The loss of ``module.training_step(batch, batch_idx)`` with the step's own `batch_idx`: its
    tensor output, or ``output["loss"]``.

    Raises:
        MisconfigurationException: the batch came without its `batch_idx` (not from the callback), or
            the training step returned no loss tensor (the NaN skip idiom, returning None, is named).
    """
    if not isinstance(batch, StepBatch):
        raise MisconfigurationException(
            "HessianDiagnostics re-runs `training_step(batch, batch_idx)` for a check, but this batch came without "
            "its `batch_idx`, so the step's own loss cannot be known. Define `hessdiag_loss(self, batch)` on the "
            "LightningModule or pass `loss_fn=`."
        )
    with muted_logging(module):
        if _takes_batch_idx(module.training_step):
            output = module.training_step(batch.batch, batch.batch_idx)
        else:
            output = module.training_step(batch.batch)
    loss = output["loss"] if isinstance(output, Mapping) else output
    if isinstance(loss, torch.Tensor):
        return loss
    if output is None:
        raise MisconfigurationException(
            f"HessianDiagnostics: `training_step` returned None on the check's batch (batch_idx {batch.batch_idx}), "
            "Lightning's way to skip a step, e.g. on a non-finite loss: there is no loss to measure. If the loss was "
            "NaN or inf, the run itself is diverging; otherwise define `hessdiag_loss(self, batch)` or pass `loss_fn=`."
        )
    raise MisconfigurationException(
        "HessianDiagnostics needs the training loss: `training_step` returned "
        f"{type(output).__name__}. Return the loss (or {{'loss': loss}}), define "
        "`hessdiag_loss(self, batch)` on the LightningModule, or pass `loss_fn=`."
    )


def _takes_batch_idx(training_step: Callable[..., Any]) -> bool:
    """Whether ``training_step`` takes a second argument, as Lightning decides whether to pass `batch_idx`."""
    parameters = inspect.signature(training_step).parameters.values()
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


def hessdiag_loss(module: pl.LightningModule, batch: Any) -> torch.Tensor:
    """The module's own ``hessdiag_loss(batch)``."""
    return module.hessdiag_loss(user_batch(batch))


def loss_closure(pl_module: pl.LightningModule, loss_fn: LossHook | None) -> LossHook:
    """The closure ``(pl_module, batch) -> loss`` of the checks (see the module docstring).

    Raises:
        MisconfigurationException: manual optimisation with neither `loss_fn` nor ``hessdiag_loss``.
    """
    if loss_fn is not None:
        user_loss_fn = loss_fn
        return lambda module, batch: user_loss_fn(module, user_batch(batch))
    if callable(getattr(pl_module, "hessdiag_loss", None)):
        return hessdiag_loss
    if not pl_module.automatic_optimization:
        raise MisconfigurationException(
            "HessianDiagnostics: with manual optimisation `training_step` steps the optimizer, so it cannot "
            "serve as the loss. Define `hessdiag_loss(self, batch)` on the LightningModule or pass `loss_fn=`."
        )
    return training_step_loss
