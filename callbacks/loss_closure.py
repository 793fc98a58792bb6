"""The loss a curvature check differentiates, chosen from what the LightningModule offers.

In this order: the user's ``loss_fn(pl_module, batch)``; the module's ``hessdiag_loss(batch)``; else
``training_step(batch, 0)`` re-run with ``self.log`` muted, so that a check adds nothing to the
user's metrics. Manual optimisation needs one of the first two: its ``training_step`` steps the
optimizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException

LossHook = Callable[[pl.LightningModule, Any], torch.Tensor]


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
    """The loss of ``module.training_step(batch, 0)``: its tensor output, or ``output["loss"]``.

    Raises:
        MisconfigurationException: the training step returned no loss tensor.
    """
    with muted_logging(module):
        output = module.training_step(batch, 0)
    loss = output["loss"] if isinstance(output, Mapping) else output
    if not isinstance(loss, torch.Tensor):
        raise MisconfigurationException(
            "HessianDiagnostics needs the training loss: `training_step` returned "
            f"{type(output).__name__}. Return the loss (or {{'loss': loss}}), define "
            "`hessdiag_loss(self, batch)` on the LightningModule, or pass `loss_fn=`."
        )
    return loss


def hessdiag_loss(module: pl.LightningModule, batch: Any) -> torch.Tensor:
    """The module's own ``hessdiag_loss(batch)``."""
    return module.hessdiag_loss(batch)


def loss_closure(pl_module: pl.LightningModule, loss_fn: LossHook | None) -> LossHook:
    """The closure ``(pl_module, batch) -> loss`` of the checks (see the module docstring).

    Raises:
        MisconfigurationException: manual optimisation with neither `loss_fn` nor ``hessdiag_loss``.
    """
    if loss_fn is not None:
        return loss_fn
    if callable(getattr(pl_module, "hessdiag_loss", None)):
        return hessdiag_loss
    if not pl_module.automatic_optimization:
        raise MisconfigurationException(
            "HessianDiagnostics: with manual optimisation `training_step` steps the optimizer, so it cannot "
            "serve as the loss. Define `hessdiag_loss(self, batch)` on the LightningModule or pass `loss_fn=`."
        )
    return training_step_loss
