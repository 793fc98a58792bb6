"""The quantities a curvature check adds beyond the spectrum's ends, on what the check already holds.

* where the curvature lives (:func:`module_shares`): the module shares of the top and bottom Ritz
  vectors (no product; one host read);
* what limits the step (:func:`along_gradient`): the curvature along the gradient g'Hg / ||g||^2
  and the learning-rate headroom (one product on the check's open operator);
* how much batch the run can use (:func:`noise_scale_of`): the gradient noise scale from the check's
  batch cut in parts (the parts' forwards and backwards, about one gradient of the check batch);
* the conditioning lambda_max / (trace / n) at a density check, the trace by Hutch++
  (:data:`CONDITIONING_TRACE_MATVECS` products);
* with ``module_sharpness`` > 0, lambda_max of the top modules' own diagonal blocks
  (:func:`top_module_sharpness`: a Lanczos run per module on the check's operator);
* the sharpness the optimizer's stability threshold refers to (:func:`stability_of`: for Adam a
  Lanczos run on the preconditioned D^1/2 H D^1/2);
* the quadratic model's loss change of the step's update against the observed one
  (:func:`update_prediction_at`: one product and one forward).

:class:`~hessdiag.check.probe.CurvatureProbe` calls them; each returns None (or says why) where its
quantity is undefined or cannot be measured, never a placeholder.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from hessdiag import _distributed, _sharded
from hessdiag.isolation import ModelMode, unwrap_model
from hessdiag.batches import MicroBatches, batch_size, take_sub_batch
from hessdiag.estimators.eigen import HessianEigenvalues
from hessdiag.lanczos import LanczosResult, lanczos
from hessdiag.errors import HessdiagError
from hessdiag.estimators.gradient_curvature import gradient_curvature_of
from hessdiag.estimators.module_sharpness import ModuleSharpness, module_sharpness_of
from hessdiag.noise.noise_scale import NoiseScaleEstimate, gradient_noise_scale
from hessdiag.operator import HessianOperator, LossFn
from hessdiag.estimators.spectrum import SpectralDensity, hutchpp_trace
from hessdiag.stability import NoLearningRate, StabilityThreshold, preconditioner_sqrt, stability_threshold
from hessdiag.estimators.update_prediction import UpdatePrediction, UpdateStart, predict_update

#: Modules kept per end of the spectrum in a check's layer shares (the dashboard's budget).
SHARES_KEPT = 5

#: ``((module name, share), ...)``, largest share first.
Shares = tuple[tuple[str, float], ...]


def check_noise_scale_parts(value: Any) -> int:
    """`value` if it is 0 (no noise scale) or an int >= 2; else ValueError naming `noise_scale_parts`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value == 1:
        raise ValueError(
            f"`noise_scale_parts` must be 0 (no noise scale) or an int >= 2 (two batch sizes are needed), got {value!r}."
        )
    return value


def along_gradient(
    operator: HessianOperator, stability: StabilityThreshold | None, scale: torch.Tensor | None
) -> tuple[float | None, float | None]:
    """(g'Hg / ||g||^2, headroom): along the gradient preconditioned by `scale` when the sharpness is
    (so the curvature and the threshold are in the sharpness's units); None for what is undefined
    (a zero gradient; no threshold). One product."""
    threshold = stability.threshold if stability is not None and 0 < stability.threshold < math.inf else None
    along = gradient_curvature_of(operator, threshold=threshold, scaling=scale)
    curvature = None if math.isnan(along.curvature) else along.curvature
    headroom = None if along.headroom is None or math.isnan(along.headroom) else along.headroom
    return curvature, headroom


def module_shares(result: HessianEigenvalues, skipped: dict[str, str]) -> tuple[Shares, Shares]:
    """The :data:`SHARES_KEPT` largest module shares of the top and bottom Ritz vectors."""
    if result.top_vectors is None or result.bottom_vectors is None:
        skipped["layer_shares"] = (
            "No layer shares: the Lanczos basis ran as a three-vector recurrence (it did not fit in memory), "
            "which keeps no eigenvectors."
        )
        return (), ()
    top, bottom = (tuple(result.layer_shares(end).items())[:SHARES_KEPT] for end in ("top", "bottom"))
    return top, bottom


def check_module_sharpness(value: Any) -> int:
    """`value` if it is an int in [0, :data:`SHARES_KEPT`]; else ValueError naming `module_sharpness`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SHARES_KEPT:
        raise ValueError(
            f"`module_sharpness` must be an int in [0, {SHARES_KEPT}] (0: off; n: the n modules holding most of the "
            f"top eigenvector), got {value!r}."
        )
    return value


def top_module_sharpness(
    operator: HessianOperator, result: HessianEigenvalues, shares: Shares, count: int, tol: float,
    max_iter: int | None, seed: int,
) -> tuple[ModuleSharpness, ...]:  # fmt: skip
    """lambda_max of the own diagonal blocks of the first `count` modules of `shares` (the top
    eigenvector's), each warm-started from the top Ritz vector's restriction to it; () for `count` 0
    or without shares. Each module costs its Lanczos products (:mod:`hessdiag.estimators.module_sharpness`)."""
    modules = [module for module, _ in shares[:count]]
    if not modules or result.top_vectors is None:
        return ()
    found = module_sharpness_of(operator, modules, tol=tol, max_iter=max_iter, seed=seed, v0=result.top_vectors[0])
    return tuple(ModuleSharpness.of(module, block) for module, block in found.items())


def finite_or_none(value: float) -> float | None:
    """`value`, or None where it is NaN or infinite (a running mean before its first estimate)."""
    return value if math.isfinite(value) else None


def step_batch_size(local: int | None) -> int | None:
    """Samples of the optimizer step: this rank's times the ranks (equal local batches assumed)."""
    if local is None:
        return None
    return local * torch.distributed.get_world_size() if _distributed.is_data_parallel() else local


#: Products of the Hutch++ trace behind the conditioning (a third sketch the dominant subspace, a
#: third take its exact trace, a third feed Hutchinson on the rest): exact when the Hessian's rank
#: is at most a third of it.
CONDITIONING_TRACE_MATVECS = 18


def conditioning(
    lambda_max: float, operator: HessianOperator, density: SpectralDensity | None, seed: int
) -> float | None:
    """lambda_max / (trace / n) at a density check (None elsewhere, or when the trace is <= 0).

    The trace by Hutch++ on the check's operator (:data:`CONDITIONING_TRACE_MATVECS` products): the
    Hessian's trace is dominated by its few large eigenvalues, which Hutch++ takes exactly, where
    Hutchinson's estimate (the density's mean eigenvalue) carries their variance. On an
    FSDP2-sharded model (Hutch++'s sketch would need a QR across ranks) the density's mean
    eigenvalue is used: stochastic Lanczos quadrature is exact for degree-1 polynomials, so it is
    Hutchinson's estimate with the density's probes."""
    if density is None:
        return None
    if operator.shard is not None:
        mean = density.moment(1)
    else:
        trace = hutchpp_trace(
            operator.matvec, operator.dim, num_matvecs=CONDITIONING_TRACE_MATVECS, seed=seed, device=operator.device,
            dtype=operator.dtype,
        )  # fmt: skip
        mean = trace.trace / operator.dim
    return lambda_max / mean if mean > 0 else None


def noise_scale_of(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    parts: int,
    *,
    params: Iterable[torch.Tensor] | None,
    mode: ModelMode,
    seed: int,
) -> tuple[NoiseScaleEstimate | None, str]:
    """:func:`~hessdiag.gradient_noise_scale` of `batch` cut in `parts` (its first samples, a multiple
    of `parts`; under gradient accumulation the first micro-batch's), or (None, why not): an
    FSDP2-sharded model, fewer samples than parts, a batch that cannot be cut or a part with a
    non-finite loss. The noise scale is a property of the data and the parameters, not of the batch
    it is measured on: a smaller batch gives a noisier estimate of the same number."""
    if isinstance(batch, MicroBatches):
        if not batch:
            return None, "the check batch holds no micro-batch"
        batch = batch[0]
    samples = batch_size(batch)
    if _sharded.is_sharded(list(unwrap_model(model).parameters())):
        return None, "the model is FSDP2-sharded: a gradient per part would need FSDP's backward per part"
    if samples is None or samples < parts:
        return None, f"the check batch has {samples or 0} samples, fewer than noise_scale_parts={parts}"
    try:
        estimate = gradient_noise_scale(
            model, loss_fn, take_sub_batch(batch, samples - samples % parts), num_parts=parts, params=params,
            mode=mode, seed=seed,
        )  # fmt: skip
    except (ValueError, HessdiagError) as error:  # a batch that cannot be cut, a non-finite part's loss
        return None, str(error)
    return estimate, ""


#: The escape probe steps so that the quadratic model predicts a loss drop of this fraction.
ESCAPE_PROBE_FRACTION = 0.01


def escape_probe(operator: HessianOperator, result: HessianEigenvalues) -> float | None:
    """The loss change one step along the bottom Ritz vector (the better sign), sized so that the
    quadratic model predicts a drop of :data:`ESCAPE_PROBE_FRACTION` of the loss; None unless negative
    curvature is certified. A direct check that the direction is an escape."""
    if not result.negative_curvature_certified or result.bottom_vectors is None:
        return None
    alpha = math.sqrt(2 * ESCAPE_PROBE_FRACTION * max(abs(result.loss), 1e-12) / abs(result.lambda_min))
    direction = result.bottom_vectors[0]
    return min(operator.loss_along(direction, alpha), operator.loss_along(direction, -alpha)) - result.loss


def stability_of(
    operator: HessianOperator,
    result: HessianEigenvalues,
    optimizer: torch.optim.Optimizer | None,
    *,
    tol: float,
    max_iter: int | None,
    v0: torch.Tensor | None,
    seed: int,
    skipped: dict[str, str],
) -> tuple[StabilityThreshold | None, float, torch.Tensor | None, LanczosResult | None]:
    """The optimizer's stability threshold, the sharpness compared with it, the preconditioner's square
    root d (None unless the threshold is preconditioned) under which that sharpness is lambda_max(dHd),
    and that Lanczos run (None when none ran; `v0`: its warm start). No threshold (None, the raw
    lambda_max) without an optimizer, for one without a known stability rule (why, in `skipped`; a
    learning rate of 0, as at the first step of a warm-up, passes in silence), and for Adam before its
    first step (no second-moment estimate yet)."""
    if optimizer is None:
        return None, result.lambda_max, None, None
    try:
        threshold = stability_threshold(optimizer)
    except NoLearningRate:  # a warm-up's first step: nothing to say
        return None, result.lambda_max, None, None
    except ValueError as error:  # no known stability rule: report the raw sharpness, and why
        skipped["stability"] = f"No edge-of-stability judgement (the flag stays off; sharpness is lambda_max): {error}"
        return None, result.lambda_max, None, None
    if not threshold.preconditioned:
        return threshold, result.lambda_max, None, None
    scale = preconditioner_sqrt(optimizer, operator.params)
    if scale is None:  # Adam before its first step: no second-moment estimate yet
        return None, result.lambda_max, None, None
    scale = scale.to(device=operator.device, dtype=operator.dtype)
    preconditioned = lanczos(
        lambda v: scale * operator.matvec(scale * v),
        operator.dim,
        which="top",
        tol=tol,
        max_iter=max_iter,
        v0=v0,
        seed=seed,
        device=operator.device,
        dtype=operator.dtype,
        shard=operator.shard,
    )
    return threshold, float(preconditioned.top[0]), scale, preconditioned


def update_prediction_at(
    operator: HessianOperator, start: UpdateStart | None, step: int, skipped: dict[str, str]
) -> UpdatePrediction | None:
    """The prediction of the update of optimizer step `step` from its parameter copy `start`; None
    without a copy of that step (and why, in `skipped`, when the prediction itself is impossible)."""
    if start is None or start.step != step:  # no copy, or one of a step without its check
        return None
    prediction, why = predict_update(operator, start)
    if prediction is None:
        skipped["update_prediction"] = f"No prediction of the update's loss change: {why}."
    return prediction
