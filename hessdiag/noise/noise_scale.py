"""How much batch the run can use: the simple gradient noise scale B_simple = tr(Sigma) / ||G||^2.

McCandlish et al., 2018, "An Empirical Model of Large-Batch Training" (appendix A). G is the true
gradient (the expectation over samples of the per-sample gradient) and Sigma the per-sample gradient
covariance, so a mini-batch gradient of b samples has E||G_b||^2 = ||G||^2 + tr(Sigma) / b. From
squared norms at two batch sizes b < B, both unbiased:

    ||G||^2   ~ (B ||G_B||^2 - b ||G_b||^2) / (B - b)
    tr(Sigma) ~ (||G_b||^2 - ||G_B||^2) / (1/b - 1/B)

B_simple is in samples: around it, doubling the batch stops halving the number of steps needed
(batches well below it are noise-dominated, well above it waste samples). Units: ||G||^2 in squared
loss per parameter unit, tr(Sigma) the same per sample.

Here (:func:`gradient_noise_scale`) the check's batch of B samples is cut into n equal parts of b = B/n:
the parts' gradients g_i are the small batches (||G_b||^2 the mean of their squared norms) and their
mean the big one. With the Gram matrix M_ij = g_i . g_j the estimates are the U-statistics
||G||^2 = sum_{i != j} M_ij / (n (n - 1)) and tr(Sigma) = b * (sample variance of the g_i, summed over
coordinates); both are exactly unbiased for i.i.d. samples and a loss that is the mean over them.
Their standard errors are the jackknife's over the parts (leave one part out; n >= 3, NaN for n = 2):
estimates, and conservative ones. The ratio B_simple of one check is biased (a ratio of noisy
estimates): :class:`~hessdiag.noise.running.RunningNoiseScale` takes the ratio of the running means over checks instead.

:func:`noise_scale_from_norms` applies the same formulas to squared norms measured elsewhere: the
micro-batches' gradients under accumulation against the accumulated one, or each rank's local gradient
under DDP against the all-reduced one (no extra backward at all).

Cost of :func:`gradient_noise_scale`: n forwards and backwards of B/n samples each (about one gradient
of the whole batch, no graph kept beyond a part), n flat gradients held at once in float64 (2n x a
float32 model's parameter memory, for exact differences of nearly equal norms) and n(n+1)/2 inner
products. No Hessian-vector product. A parameter the loss does not reach (``autograd.grad`` gives None)
counts as a zero gradient, as the optimizer sees it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hessdiag import _sharded
from hessdiag.isolation import ModelMode, MODEL_MODES, isolation, preserved_state, seed_rng, unwrap_model
from hessdiag.batches import MicroBatches, cut_samples, leading_sizes
from hessdiag.errors import LossClosureError, NonFiniteLossError
from hessdiag.operator import LossFn, gradient_by_backward, trainable_parameters
from hessdiag.operator.parameter_space import dense, refuse_non_finite_gradient


@dataclass(frozen=True)
class NoiseScaleEstimate:
    """The simple noise scale and its two ingredients, from gradients at two batch sizes.

    Attributes:
        noise_scale: B_simple = trace_covariance / grad_sq_norm, in samples; NaN when the
            ||G||^2 estimate is <= 0 (see `note`). Biased as a ratio: average the ingredients over
            checks (:class:`~hessdiag.noise.running.RunningNoiseScale`) for a reported value.
        trace_covariance: unbiased estimate of tr(Sigma), the per-sample gradient covariance's trace.
        trace_covariance_se: its standard error (NaN where it cannot be estimated).
        grad_sq_norm: unbiased estimate of ||G||^2, the true gradient's squared norm.
        grad_sq_norm_se: its standard error.
        small_batch: b, the samples of a small batch (a part, a micro-batch, a rank's batch).
        big_batch: B, the samples of the big batch.
        num_small: the number of small-batch gradients.
        loss: the big batch's loss (the mean of the parts'), None when estimated from norms.
        note: why a value is NaN or hard to read, else None.
    """

    noise_scale: float
    trace_covariance: float
    trace_covariance_se: float
    grad_sq_norm: float
    grad_sq_norm_se: float
    small_batch: int
    big_batch: int
    num_small: int
    loss: float | None = None
    note: str | None = None


def _two_sizes(small_sq: float, small: int, big_sq: float, big: int) -> tuple[float, float]:
    """(||G||^2, tr(Sigma)) from the squared norms at batch sizes small < big (McCandlish, app. A)."""
    grad_sq = (big * big_sq - small * small_sq) / (big - small)
    trace = (small_sq - big_sq) / (1.0 / small - 1.0 / big)
    return grad_sq, trace


def _estimate(
    trace: float,
    trace_se: float,
    grad_sq: float,
    grad_sq_se: float,
    small: int,
    big: int,
    count: int,
    loss: float | None,
) -> NoiseScaleEstimate:
    note = None
    if not grad_sq > 0:
        scale = math.nan
        note = (
            f"The ||G||^2 estimate is {grad_sq:.3g} <= 0: at {big} samples the gradient's signal is below its noise, "
            "so the noise scale is far above the batch; average over checks (RunningNoiseScale)."
        )
    else:
        scale = trace / grad_sq
        if trace < 0:
            note = (
                f"The tr(Sigma) estimate is {trace:.3g} < 0: the noise is below what {count} batches of {small} "
                "samples resolve."
            )
    return NoiseScaleEstimate(scale, trace, trace_se, grad_sq, grad_sq_se, small, big, count, loss, note)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return value


def noise_scale_from_norms(
    small_sq_norms: Sequence[float], small_batch: int, big_sq_norm: float, big_batch: int
) -> NoiseScaleEstimate:
    """The two-size estimates from squared gradient norms already measured.

    Args:
        small_sq_norms: ||g_i||^2 of each small-batch gradient (a micro-batch's, a rank's local one
            before the all-reduce), each the mean-loss gradient of `small_batch` samples (equal
            small batches: ranks with unequal local batches are outside these formulas). Under DDP
            the local gradient is the bucket's buffer on entry to a comm hook (undivided: tested on
            two gloo processes, torch 2.14), gathered from every rank with one all-gather.
        small_batch: samples per small batch (b).
        big_sq_norm: ||G_B||^2 of the big batch's gradient (the accumulated or all-reduced mean).
        big_batch: its samples (B > b); e.g. b times the number of micro-batches or ranks.

    Returns:
        A :class:`NoiseScaleEstimate`: the means over i of the per-small-batch estimates (the
        formulas with ||G_b||^2 = ||g_i||^2). When the big batch is the union of the small ones these
        equal :func:`gradient_noise_scale`'s. The standard errors are the spread of the per-small-batch
        estimates over sqrt(count) (NaN for a single one); they leave out the big batch's own
        variation, so they understate the ||G||^2 error where the signal dominates.

    Raises:
        ValueError: an argument is out of range (named in the message).

    Example (||G_b||^2 = 6 at b = 2, ||G_B||^2 = 4 at B = 4: ||G||^2 = (16 - 12) / 2, tr(Sigma) =
    2 / (1/2 - 1/4))::

        >>> estimate = noise_scale_from_norms([5.0, 7.0], 2, 4.0, 4)
        >>> estimate.grad_sq_norm, estimate.trace_covariance, estimate.noise_scale
        (2.0, 8.0, 4.0)
    """
    small = _positive_int("small_batch", small_batch)
    big = _positive_int("big_batch", big_batch)
    if big <= small:
        raise ValueError(f"`big_batch` must exceed `small_batch`, got {big} <= {small}.")
    norms = [float(value) for value in small_sq_norms]
    if not norms:
        raise ValueError("`small_sq_norms` is empty: pass at least one small-batch squared norm.")
    if not all(math.isfinite(value) and value >= 0 for value in norms):
        raise ValueError(f"`small_sq_norms` must be finite and >= 0, got {norms}.")
    big_sq = float(big_sq_norm)
    if not (math.isfinite(big_sq) and big_sq >= 0):
        raise ValueError(f"`big_sq_norm` must be finite and >= 0, got {big_sq_norm!r}.")
    pairs = [_two_sizes(value, small, big_sq, big) for value in norms]
    grad_sqs = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    traces = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    count = len(norms)

    def standard_error(values: torch.Tensor) -> float:
        return float(values.std() / math.sqrt(count)) if count > 1 else math.nan

    trace, grad_sq = float(traces.mean()), float(grad_sqs.mean())
    return _estimate(trace, standard_error(traces), grad_sq, standard_error(grad_sqs), small, big, count, None)


def estimate_from_gram(gram: torch.Tensor, small_batch: int, loss: float | None = None) -> NoiseScaleEstimate:
    """The estimates from the Gram matrix ``gram[i, j] = g_i . g_j`` of n >= 2 equal parts' gradients
    (each of `small_batch` samples; the big batch is their union), with jackknife standard errors
    (NaN for n = 2)."""
    gram = gram.double().cpu()
    count = gram.shape[0]

    def of(matrix: torch.Tensor) -> tuple[float, float]:
        n = matrix.shape[0]
        return _two_sizes(float(matrix.diagonal().mean()), small_batch, float(matrix.sum()) / n**2, n * small_batch)

    grad_sq, trace = of(gram)
    grad_sq_se = trace_se = math.nan
    if count >= 3:
        keep = [[j for j in range(count) if j != i] for i in range(count)]
        leave_one_out = torch.tensor([of(gram[rows][:, rows]) for rows in keep], dtype=torch.float64)
        spread = ((leave_one_out - leave_one_out.mean(0)) ** 2).sum(0) * (count - 1) / count
        grad_sq_se, trace_se = (float(value) for value in spread.sqrt())
    return _estimate(trace, trace_se, grad_sq, grad_sq_se, small_batch, count * small_batch, count, loss)


def split_batch(batch: Any, num_parts: int) -> list[Any]:
    """`batch` cut into `num_parts` equal consecutive parts: every tensor (in nested tuples, lists,
    dicts, named tuples) along its leading dimension, which must be the same for all; other leaves
    are kept in every part.

    Raises:
        ValueError: `num_parts` is not an int >= 2; `batch` is a MicroBatches, has no tensor with a
            batch dimension, or tensors of different leading sizes; the batch size is not a multiple
            of `num_parts`.
    """
    if isinstance(num_parts, bool) or not isinstance(num_parts, int) or num_parts < 2:
        raise ValueError(f"`num_parts` must be an int >= 2 (two batch sizes are needed), got {num_parts!r}.")
    if isinstance(batch, MicroBatches):
        raise ValueError(
            "`batch` is a MicroBatches: pass one batch, or use noise_scale_from_norms with the micro-batches' "
            "gradient norms against the accumulated gradient's."
        )
    sizes = leading_sizes(batch, set())
    if not sizes:
        raise ValueError("`batch` holds no tensor with a batch dimension to split.")
    if len(sizes) > 1:
        raise ValueError(
            f"`batch` has tensors of leading dimensions {sorted(sizes)}: the batch dimension cannot be told apart; "
            "collate it so that every tensor's first dimension is the batch."
        )
    size = sizes.pop()
    if size % num_parts != 0 or size < num_parts:
        raise ValueError(f"`num_parts`={num_parts} must divide the batch size {size} (equal parts).")
    part = size // num_parts
    return [cut_samples(batch, i * part, (i + 1) * part) for i in range(num_parts)]


def gradient_noise_scale(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    num_parts: int = 4,
    params: Iterable[torch.Tensor] | None = None,
    mode: ModelMode = "as_is",
    seed: int = 0,
) -> NoiseScaleEstimate:
    """The simple gradient noise scale of ``loss_fn`` at the current parameters, from `batch`.

    The batch is cut into `num_parts` equal parts, one gradient is taken per part, and the
    two-size estimates of the module docstring are formed from their Gram matrix.

    Example::

        estimate = gradient_noise_scale(model, loss_fn, batch, num_parts=4)
        estimate.noise_scale, estimate.trace_covariance, estimate.grad_sq_norm_se

    Args:
        model: the network (a DDP wrapper is unwrapped: under data parallelism this is this rank's
            batch alone, no communication; ranks' estimates differ). Its parameters, buffers,
            modes, ``.grad`` and the RNG are left as found.
        loss_fn: ``loss_fn(model, batch) -> scalar``, the *mean* over the batch's samples of their
            losses (the estimates count samples; a summed loss would scale them by the batch size).
        batch: what `loss_fn` takes; every tensor's first dimension is the batch.
        num_parts: the number n of small batches (>= 2; standard errors need >= 3). More parts:
            smaller small batches, a better-resolved tr(Sigma), n gradients held in memory.
        params: parameters whose gradient counts (default: all trainable ones).
        mode: ``"as_is"`` (default: each module keeps its mode of the training step, as in
            :func:`~hessdiag.hessian_eigenvalues`), ``"train"`` or ``"eval"``.
        seed: seeds dropout in every part's forward.

    Returns:
        A :class:`NoiseScaleEstimate`; `small_batch` = B / n, `big_batch` = B.

    Raises:
        ValueError: bad `num_parts`, `batch`, `params` or `mode` (named in the message); an
            FSDP2-sharded model (use :func:`noise_scale_from_norms`).
        LossClosureError: `loss_fn` raised or did not return a scalar depending on the parameters.
        NonFiniteLossError: a part's loss is NaN or infinite.
        NonFiniteGradientError: a part's gradient is NaN or infinite (naming the parameters).

    Note:
        The parts must be independent samples for the estimates to be unbiased: with BatchNorm in
        train mode each part's statistics are its own, so the per-sample losses of a part are not
        independent, and the estimates describe the run at the part's size.
    """
    if mode not in MODEL_MODES:
        raise ValueError(f"`mode` must be one of {MODEL_MODES}, got {mode!r}.")
    parts = split_batch(batch, num_parts)
    model = unwrap_model(model)
    _sharded.refuse_fsdp1(model)
    chosen = trainable_parameters(model, params)
    if _sharded.is_sharded(chosen):
        raise ValueError(
            "`model` is FSDP2-sharded: the per-part gradients would need FSDP's backward per part; use "
            "noise_scale_from_norms with the micro-batches' or ranks' gradient norms instead."
        )
    device = chosen[0].device
    with isolation(model, mode, device), preserved_state(model, chosen):
        gradients, losses = zip(*(_part_gradient(model, loss_fn, part, chosen, seed) for part in parts))
    stacked = torch.stack(gradients)
    gram = (stacked @ stacked.T).cpu()  # one transfer for all the parts' inner products
    (part_size,) = leading_sizes(parts[0], set())
    return estimate_from_gram(gram, part_size, float(torch.stack(losses).mean()))


def _part_gradient(
    model: nn.Module, loss_fn: LossFn, part: Any, chosen: list[torch.Tensor], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One part's flat float64 gradient over `chosen` and its loss, by a plain ``backward()`` as in
    training (``.grad`` left as found): ``autograd.grad`` is refused under reentrant checkpointing, and
    returns None, silently, for parameters behind it when the inputs were made to require grad. Sparse
gradients (``nn.Embedding(sparse=True)``) are taken as dense."""
    every = list(model.parameters())
    loss = _part_loss(model, loss_fn, part, seed, chosen[0].device)
    grads = gradient_by_backward(loss, chosen, every)
    refuse_non_finite_gradient(model, chosen, grads, " on a part of the batch")
    flat = torch.cat([torch.zeros_like(p).reshape(-1) if g is None else dense(g).reshape(-1) for g, p in zip(grads, chosen)])
    return flat.double(), loss.detach().double()


def _part_loss(model: nn.Module, loss_fn: LossFn, part: Any, seed: int, device: torch.device) -> torch.Tensor:
    seed_rng(seed, device)
    try:
        loss = loss_fn(model, part)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # the user's closure
        raise LossClosureError(f"loss_fn(model, part of batch) raised {type(error).__name__}: {error}.") from error
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.dtype.is_floating_point:
        raise LossClosureError("loss_fn(model, batch) must return a real scalar tensor.")
    if not loss.requires_grad:
        raise LossClosureError("The loss does not depend on the chosen parameters (computed under torch.no_grad()?).")
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"The loss is {loss.item()} on a part of the batch; no noise scale there.")
    return loss.reshape(())
