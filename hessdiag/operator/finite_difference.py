"""Hessian-vector products as central differences of ordinary gradients.

    H v ~ D(eps) = (g(theta + eps v) - g(theta - eps v)) / (2 eps)

Only first derivatives are taken, so this works wherever a training step works: fused attention
kernels, ``@once_differentiable`` backwards, ``checkpoint(use_reentrant=True)``, EmbeddingBag. No
graph is kept between products: the memory of a training step, two gradients per product.

The error of D(eps) has two parts: truncation, c eps^2 with c set by the third derivative along v,
and rounding, about u ||g|| / eps (u the unit roundoff). The step balancing them is of the order of
u^(1/3); :func:`step_size` scales it by the parameters' and the vector's norms, so that the shift
stays above the rounding of theta itself. The truncation term can be large along some directions
only (GPT-2's top eigenvector lies on residual-stream biases, where c eps^2 is 2.5 against 1.3e-4 on
a random direction), so the products are Richardson-extrapolated,

    R(eps) = (4 D(eps) - D(2 eps)) / 3,

whose truncation is O(eps^4) (the eps^2 terms cancel) for the same rounding order: four gradients per
product. The error is *measured*, never assumed: ||R(eps) v - R(2 eps) v|| is about 15 times R(eps)'s
truncation along v plus rounding of the same order (:class:`Measurement` on a random vector for the
solver's stopping rule; :meth:`Richardson.along` on each vector the answer comes from, for its
bound). Where gradients jump (ReLU kinks switching units) D(eps) and D(2 eps) disagree by the size of
the product, and differences of gradients are not a Hessian there
(:class:`~hessdiag.errors.NonSmoothLossError`).

The parameters are written in place (so the sharded parameters of FSDP2 and reentrant
checkpointing, which recomputes the forward during backward, see the shifted values) and
restored bit-for-bit from a saved copy, never by subtracting the shift again. With a `shard`
(FSDP2) the parameters are this rank's local shards and the norms are those of the whole vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from hessdiag.vectors import VectorShard, vector_norm

#: D(eps) and D(2 eps) differing by more than this fraction of ||D(eps)|| means the gradient is not
#: differentiable along v (measured, CPU float32: smooth networks 1e-4..1e-3, ReLU networks 0.2..2.6).
NON_SMOOTH_DISAGREEMENT = 0.05

#: ||D(2 eps) v - D(4 eps) v|| / ||D(eps) v - D(2 eps) v|| is 4 where the eps^2 term dominates (0.5
#: where rounding does); within this range the differences are taken as truncation.
TRUNCATION_RATIO = (3.0, 5.0)
#: The share of ||R(eps) v - R(2 eps) v|| taken as R(eps)'s error where truncation dominates: the
#: difference is -15 c eps^4 against R(eps)'s c eps^4, so 1/5 keeps a factor of 3 in hand.
TRUNCATION_SHARE = 0.2

T = TypeVar("T")


def step_size(params: Sequence[torch.Tensor], dtype: torch.dtype, shard: VectorShard | None = None) -> float:
    """The central-difference step eps for a unit vector, in parameter units.

    u^(1/3) balances truncation (~eps^2) against rounding (~u / eps); the factor (1 + ||theta|| /
    sqrt(dim)) keeps the shift eps * v_i above the rounding of each coordinate theta_i when the
    parameters are large (a unit v has coordinates of about 1 / sqrt(dim)). float32: 4.9e-3 for
    parameters of unit scale or less; float64: 6.1e-6. With a `shard`, `params` are this rank's
    pieces and norm and dim are the whole model's (the same step on every rank).
    """
    unit_roundoff = torch.finfo(dtype).eps
    with torch.no_grad():
        norm = float(_norm_of(params, shard))
    dim = sum(p.numel() for p in params)
    if shard is not None:
        dim = int(shard.sum_(torch.tensor([float(dim)], dtype=torch.float64, device=params[0].device)))
    return unit_roundoff ** (1 / 3) * (1.0 + norm / dim**0.5)


def _norm_of(pieces: Sequence[torch.Tensor], shard: VectorShard | None) -> torch.Tensor:
    """The norm of the whole vector given as pieces (and, with a shard, across processes)."""
    return vector_norm(torch.stack([torch.linalg.vector_norm(v.float()) for v in pieces]), shard)


def extrapolate(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """R = (4 D(eps) - D(2 eps)) / 3 from `fine` = D(eps) and `coarse` = D(2 eps) (a new tensor)."""
    return (4 * fine - coarse) / 3


@dataclass
class Measurement:
    """What three step sizes on one random unit vector showed.

    Attributes:
        eps: the step D(eps) was taken with (parameter units, for a unit vector).
        error: ||R(eps) - R(2 eps)|| for the unit v, the estimated error of one (extrapolated) product.
            An *estimate* along one random vector, used by the solver's stopping rule only; the
            bounds of the values reported are measured along their own vectors
            (:meth:`Richardson.along`).
        relative: ``||D(eps) - D(2 eps)|| / ||D(eps)||``; above :data:`NON_SMOOTH_DISAGREEMENT` the
            loss is not smooth along v.
    """

    eps: float
    error: float
    relative: float

    @classmethod
    def of(
        cls, fine: torch.Tensor, coarse: torch.Tensor, coarsest: torch.Tensor, eps: float, shard: VectorShard | None = None
    ) -> Measurement:
        """From D(eps), D(2 eps) and D(4 eps) of one unit vector (this rank's pieces, with a `shard`)."""
        error = float(vector_norm(extrapolate(fine, coarse) - extrapolate(coarse, coarsest), shard))
        disagreement = float(vector_norm(fine - coarse, shard))
        size = float(vector_norm(fine, shard))
        relative = disagreement / size if size > 0 else (0.0 if disagreement == 0 else float("inf"))
        return cls(eps=eps, error=error, relative=relative)

    @property
    def smooth(self) -> bool:
        return self.relative <= NON_SMOOTH_DISAGREEMENT


class CentralDifference:
    """Central differences of ``gradient()`` over `params`, moved in place and restored.

    Holds one copy of the parameters (taken at construction) to restore them from.

    Args:
        params: the parameters to shift (leaf tensors); restored bit-for-bit after each gradient.
        gradient: computes the flat gradient at the parameters' current values (same batch, same
            dropout masks every call, no graph kept).
        eps: the step for a unit vector (default: :func:`step_size`).
        shard: `params` are this rank's shards of parameters split across processes (FSDP2), and
            `gradient` returns this rank's piece of the gradient.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        gradient: Callable[[], torch.Tensor],
        eps: float | None = None,
        shard: VectorShard | None = None,
    ) -> None:
        self.params = list(params)
        self.gradient = gradient
        self.shard = shard
        self.eps = step_size(self.params, self.params[0].dtype, shard) if eps is None else float(eps)
        self._saved = [p.detach().clone() for p in self.params]

    def product(self, pieces: Sequence[torch.Tensor], eps: float | None = None) -> torch.Tensor:
        """D(eps) for the vector given as one piece per parameter (flat result).

        The step is ``eps / ||v||``, so that the shift has norm `eps` whatever the vector's scale.
        """
        eps = self.eps if eps is None else eps
        norm = float(_norm_of(pieces, self.shard))
        if norm == 0.0:
            return torch.zeros_like(self.gradient())
        step = eps / norm
        forward = self._gradient_at(pieces, step)
        backward = self._gradient_at(pieces, -step)
        return forward.sub_(backward).div_(2 * step)

    def _gradient_at(self, pieces: Sequence[torch.Tensor], step: float) -> torch.Tensor:
        return self.evaluate_at(pieces, step, self.gradient)

    def evaluate_at(self, pieces: Sequence[torch.Tensor], step: float, function: Callable[[], T]) -> T:
        """``function()`` with the parameters moved by ``step * v`` (v given as pieces), then
        restored bit-for-bit from the saved copy."""
        try:
            with torch.no_grad():
                for p, v in zip(self.params, pieces):
                    p.add_(v, alpha=step)
            return function()
        finally:
            with torch.no_grad():
                for p, original in zip(self.params, self._saved):
                    p.copy_(original)


@dataclass(frozen=True)
class AlongVector:
    """What extrapolated products showed along one vector y (unit, whole-vector norms).

    Attributes:
        product: R(eps) y (this rank's piece; finished over data-parallel ranks).
        error: the estimated error of `product`: ||R(eps) y - R(2 eps) y|| (about 15 times R(eps)'s
            truncation, or its rounding), a fifth of it where the three differences show the eps^2
            term dominating (:data:`TRUNCATION_RATIO`, :data:`TRUNCATION_SHARE`).
    """

    product: torch.Tensor
    error: float


class Richardson:
    """Extrapolated central differences R(eps) v = (4 D(eps) v - D(2 eps) v) / 3 (module docstring).

    Args:
        central: the central differences (parameters, gradient and step) to combine.
    """

    def __init__(self, central: CentralDifference) -> None:
        self.central = central

    def product(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """R(eps) v for v given as one piece per parameter (flat, this rank's): four gradients."""
        eps = self.central.eps
        return extrapolate(self.central.product(pieces, eps), self.central.product(pieces, 2 * eps))

    def along(self, pieces: Sequence[torch.Tensor], finish: Callable[[torch.Tensor], torch.Tensor]) -> AlongVector:
        """R(eps) y and its measured error along y itself: six gradients (D at eps, 2 eps, 4 eps).

        `finish` turns this rank's product into the global batch's (data parallelism).
        """
        eps, shard = self.central.eps, self.central.shard
        fine, coarse, coarsest = (finish(self.central.product(pieces, scale * eps)) for scale in (1, 2, 4))
        product = extrapolate(fine, coarse)
        difference = float(vector_norm(product - extrapolate(coarse, coarsest), shard))
        # Truncation-dominated (the eps^2 term of D shows as a ratio of 4 between the two differences):
        # the difference is about 15 times R(eps)'s error, a fifth of it keeps a factor of 3 in hand.
        # Otherwise (rounding, or steps outside the asymptotic range) the whole difference.
        near, far = float(vector_norm(fine - coarse, shard)), float(vector_norm(coarse - coarsest, shard))
        asymptotic = TRUNCATION_RATIO[0] * near <= far <= TRUNCATION_RATIO[1] * near
        return AlongVector(product, difference * (TRUNCATION_SHARE if asymptotic else 1.0))
