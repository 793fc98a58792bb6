"""What the Monitor is built from: its arguments checked, and its curvature probe from the settings."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from hessdiag.curvature import CurvatureProbe
from hessdiag.operator import LossFn
from hessdiag.settings import DiagnosticsSettings


def check_arguments(
    model: Any, loss_fn: Any, optimizer: Any, grad_scaler: Any, *, checks: bool
) -> None:
    """ValueError naming the first argument that is not what the Monitor needs."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if checks and loss_fn is None:
        raise ValueError("`loss_fn` is required for curvature checks (or set `check_every=0`).")
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"`loss_fn` must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}.")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    if grad_scaler is not None and not callable(getattr(grad_scaler, "is_enabled", None)):
        raise ValueError(f"`grad_scaler` must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}.")


def probe_from_settings(
    model: nn.Module, loss_fn: LossFn, settings: DiagnosticsSettings, params: Iterable[torch.Tensor] | None
) -> CurvatureProbe:
    """The curvature probe that `settings` describe, over `params` (default: all trainable ones)."""
    return CurvatureProbe(
        model, loss_fn, k=settings.k, tol=settings.tol, max_iter=settings.max_iter, cold_every=settings.cold_every,
        sub_batch=settings.sub_batch, mode=settings.mode, hvp_method=settings.hvp_method, params=params,
        rank_weighting=settings.rank_weighting, density_every=settings.density_every,
        noise_scale_parts=settings.noise_scale_parts, module_sharpness=settings.module_sharpness,
    )  # fmt: skip
