"""Tracking readings: the curvature between full checks, from the last check's top Ritz vectors.

A full check (:class:`~hessdiag.check.probe.CurvatureProbe.run`) costs a Lanczos run of both ends
and every due quantity: tens of products. Between full checks a tracking reading spends two products
per reading (three near the edge of stability, one once the tracked vector is close to an
eigenvector: :data:`EDGE_KRYLOV_STEPS`, :data:`ONE_STEP_RESIDUAL`): from a unit vector v (the last check's top Ritz vector, moved by each reading since;
for a preconditioned stability rule such as Adam's, the preconditioned operator's, which is the
sharpness the edge-of-stability rule compares), Rayleigh-Ritz on span{v, Hv}
on the current batch and parameters gives a top Ritz value theta and its Ritz vector y:

* theta is a *proven lower bound* on lambda_max (Courant-Fischer: no Ritz value of a subspace
  exceeds lambda_max), less the products' error and the rounding of the inner products;
* the residual ``r = ||Hy - theta y||`` proves *an* eigenvalue within r of theta (plus the same
  errors). It does not prove that nothing larger exists: a top that overtook the tracked one is only
  found by the next full check;
* y is the vector the next reading tracks, so the readings follow a top eigenvector that turns.

So a reading is logged as what it is (a lower bound, under tags of its own, which full checks log
too: their top Ritz value less its error bound), never as a converged lambda_max; a lower bound above the stability threshold proves the edge-of-stability onset, while a
flag's clearance, or any "below" claim, waits for a full check. The same batch, dropout masks and
isolation as a full check (the training run is left bit-for-bit as it was).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from hessdiag.operator import HessianOperator
from hessdiag.preconditioners import Diagonal
from hessdiag.reporting.tags import (
    LAMBDA_MAX_LOWER,
    RATIO_LOWER,
    SHARPNESS_LOWER,
    TRACKING_NUM_HVPS,
    TRACKING_RESIDUAL,
    TRACKING_SECONDS,
)
from hessdiag.vectors import VectorShard, dot


#: Products per reading: a two-step Krylov space from the tracked vector (Rayleigh-Ritz on
#: span{v, Hv}), whose top Ritz vector follows a top eigenvector that turns far better than v itself;
#: one step (the Rayleigh quotient, and a shifted power step for the next vector) once the last
#: reading's residual was below :data:`ONE_STEP_RESIDUAL` of its value: v is then close to an
#: eigenvector, and the Rayleigh quotient's error is quadratic in that residual.
KRYLOV_STEPS = 2
ONE_STEP_RESIDUAL = 0.05

#: Products per reading near the edge of stability: where the last curvature point put the sharpness
#: at :data:`NEAR_EDGE` of its stability threshold or beyond, a three-step Krylov space. One product
#: more buys the bound a verdict needs there: on the CNN of ``benchmarks/tracking.py`` (a 2-core CPU,
#: ``--trackers 2 --same-start 3``), from the same vectors, two steps showed a median 78% of the converged sharpness (54-95%)
#: and three steps 98% (80-100%), so a lower bound proves the edge-of-stability onset when it
#: happens rather than readings later. Far from the edge the readings keep two products.
EDGE_KRYLOV_STEPS = 3
NEAR_EDGE = 0.5

#: Products of a reading with nothing to track yet (before the first full check, or after the
#: trainable parameters changed): a Krylov space of this size from a random vector, whose top Ritz
#: value is a proven lower bound however far it is from lambda_max.
COLD_KRYLOV_STEPS = 6


@dataclass(frozen=True)
class RitzBound:
    """What Rayleigh-Ritz on a small Krylov space proves: ``lower_bound`` <= lambda_max, and an
    eigenvalue lies within ``residual`` of ``value`` (the top Ritz value); both include the products'
    error and the rounding of the inner products. ``next_vector``: the top Ritz vector (unit), the
    vector to track at the next reading."""

    value: float
    lower_bound: float
    residual: float
    next_vector: torch.Tensor


def ritz_bound(
    operator: HessianOperator, vector: torch.Tensor, scale: Diagonal | None = None, steps: int = KRYLOV_STEPS
) -> RitzBound:
    """Rayleigh-Ritz on the `steps`-dimensional Krylov space of `vector` (normalised here) on the open
    `operator`, or on the symmetric ``d H d`` for a preconditioner square root ``d`` = `scale`: one
    product per step (finite differences: measured along each basis vector, two products' worth).

    Proof of the bounds: with V the orthonormal basis (reorthogonalised twice) and the computed
    products ``A V = H V + F``, ``||F||_2 <= sqrt(m) e`` (e: a unit product's error, times
    ||d||_inf^2 under a scale). ``T = V'AV`` (symmetrised) differs from ``V'HV`` by at most
    ``sqrt(m) e`` in norm, and the top eigenvalue of ``V'HV`` is at most lambda_max
    (Courant-Fischer), so ``theta - sqrt(m) e`` is a lower bound. For the Ritz vector ``y = V s``,
    ``||H y - theta y|| <= ||A V s - theta y|| + sqrt(m) e`` (no more product: ``A y = (A V) s``),
    and an eigenvalue of a symmetric matrix lies within that residual of theta. Rounding of the
    inner products in the operator's dtype adds ``(10 + log2 n) eps ||A V||``.
    """
    shard = operator.shard
    basis: list[torch.Tensor] = []
    products: list[torch.Tensor] = []
    errors: list[float] = []
    start = vector.to(device=operator.device, dtype=operator.dtype)
    for step in range(steps):
        v = _direction(start, basis, products, shard)
        if v is None:
            break  # the Krylov space is invariant: nothing new to add
        last = step == steps - 1
        # The last direction is not held through its product (one vector fewer at the reading's
        # peak): its product is written over it, or over the temporary d v, and it is recomputed
        # after, bit for bit, from what is kept (the start, the basis and the products before it).
        operand = v if scale is None else scale.mul(v)
        if last:
            del v
        product, error = _product(operator, operand, scale, writable=last or scale is not None)
        del operand
        if last:
            v = _direction(start, basis, products, shard)
            assert v is not None  # the same numbers as before the product
        basis.append(v)
        products.append(product)
        errors.append(error)
        if step == 0:
            start = None  # read again only by the last step's recomputation, past the first step
        del v, product  # held in the lists, which the combinations below empty as they go
    m = len(basis)
    if m == 0:
        raise ValueError("the tracked vector is zero or not finite: nothing to track (the next full check starts afresh)")
    gram = torch.tensor([[dot(basis[i], products[j], shard) for j in range(m)] for i in range(m)], dtype=torch.float64)
    values, vectors = torch.linalg.eigh((gram + gram.T) / 2)
    theta, s = float(values[-1]), [float(x) for x in vectors[:, -1]]
    error = math.sqrt(m) * max(errors)
    size = max(math.sqrt(dot(p, p, shard)) for p in products)
    rounding = (10 + math.log2(max(operator.dim, 2))) * torch.finfo(operator.dtype).eps * size * m
    # The combinations in place, over the products and the basis past the first (nothing reads them
    # after): at most four parameter-sized vectors here instead of nine. basis[0] is kept for a
    # combination that is not finite.
    image = _accumulated(products[0].mul_(s[0]), s[1:], products[1:])
    products.clear()
    ritz = _accumulated(basis[0] * s[0], s[1:], basis[1:])
    del basis[1:]
    gap = ritz * theta
    gap = torch.sub(image, gap, out=gap)  # image - theta ritz, into the temporary theta ritz
    residual = math.sqrt(max(dot(gap, gap, shard), 0.0))
    del gap
    if m == 1:  # no second direction: a shifted power step (the top end the largest in magnitude
        # unless lambda_min < -(lambda_max + 2|theta|); a poorer vector loosens a bound, never breaks it)
        ritz = image.add_(abs(theta) * ritz)
    del image
    norm = math.sqrt(max(dot(ritz, ritz, shard), 0.0))
    ritz = ritz.div_(norm) if norm > 0 and math.isfinite(norm) else basis[0]
    return RitzBound(theta, theta - error - rounding, residual + error + rounding, ritz)


def _direction(
    start: torch.Tensor | None, basis: list[torch.Tensor], products: list[torch.Tensor], shard: VectorShard | None
) -> torch.Tensor | None:
    """The next unit vector of the Krylov basis: `start` normalised while the basis is empty, else
    the last product orthogonalised against the basis and normalised; None where the space is
    invariant (nothing new to add). A new vector: its inputs are left as they are, so a second call
    gives the same numbers."""
    w = start if not basis else _orthogonalised(products[-1], basis, shard)
    assert w is not None
    norm = math.sqrt(max(dot(w, w, shard), 0.0))
    if not norm > 1e-8 * (1 + sum(math.sqrt(dot(p, p, shard)) for p in products[:1])):
        return None
    return w / norm if w is start else w.div_(norm)


#: Entries per piece of :func:`_less_multiple` (at least): a temporary of 256 KB (float32) instead of
#: a parameter-sized one; a larger vector is cut into at most :data:`PIECES` pieces, so the number of
#: kernel launches stays bounded on a large model.
CHUNK = 1 << 16
PIECES = 16


def _orthogonalised(v: torch.Tensor, basis: list[torch.Tensor], shard: VectorShard | None) -> torch.Tensor:
    """`v` less its components along the orthonormal `basis`, removed twice (full
    reorthogonalisation): `v` itself when the basis is empty, else a new vector (`v` is left as it
    is: it is a product, which the Ritz combination reads)."""
    w = v
    for _pass in range(2):
        for q in basis:
            w = _less_multiple(w, dot(q, w, shard), q, keep=w is v)
    return w


def _less_multiple(w: torch.Tensor, weight: float, q: torch.Tensor, keep: bool) -> torch.Tensor:
    """``w - weight * q``, into a new vector where `keep`, else in place in `w`: piece by piece (see
    :data:`CHUNK`), so no parameter-sized ``weight * q`` is held; the same numbers, each entry rounded
    as ``w - weight * q`` rounds it."""
    out = torch.empty_like(w) if keep else w
    piece = max(CHUNK, -(-w.numel() // PIECES))
    for source, along, target in zip(w.split(piece), q.split(piece), out.split(piece)):
        torch.sub(source, along * weight, out=target)
    return out


def _accumulated(total: torch.Tensor, weights: list[float], vectors: list[torch.Tensor]) -> torch.Tensor:
    """`total` + sum_i weights_i vectors_i, in place in `total`, each vector scaled in place (the
    caller reads none of them after): the same roundings as ``total + w_0 v_0 + w_1 v_1 + ...`` left
    to right, without a temporary."""
    for weight, vector in zip(weights, vectors):
        total.add_(vector.mul_(weight))
    return total


def _product(
    operator: HessianOperator, operand: torch.Tensor, scale: Diagonal | None, writable: bool
) -> tuple[torch.Tensor, float]:
    """(A v, a bound on its error) for unit v from its `operand` (v, or d v under a scale), A = H or
    d H d. A `writable` operand (a temporary, or a direction recomputed after) holds the product
    (one vector less while double backward's pieces are concatenated), scaled in place."""
    size = math.sqrt(dot(operand, operand, operator.shard))
    if operator.method == "finite_difference":
        measured = operator.along(operand / size)
        product, error = measured.product * size, measured.error * size
    else:
        product = operator.matvec(operand, out=operand if writable else None)
        error = operator.product_error * size
    if scale is not None:
        product, error = scale.mul(product, out=product), error * scale.max_abs()
    return product, error


@dataclass(frozen=True)
class TrackingReading:
    """What one tracking reading proves (python floats).

    Attributes:
        step: the training step.
        lambda_max_lower_bound: a proven lower bound on lambda_max (the top Ritz value of the tracked
            vector's Krylov space, less its errors); None under a preconditioned stability rule,
            whose readings track the preconditioned operator instead.
        residual: an eigenvalue of the operator read (the Hessian, or the preconditioned one) lies
            within this distance of its top Ritz value.
        value: that top Ritz value (before its errors are taken off).
        sharpness_lower_bound: a proven lower bound on the sharpness the stability threshold refers
            to (lambda_max, or for a preconditioned rule lambda_max(P^-1 H) from the last
            preconditioned top vector); None without a threshold.
        stability_threshold: the optimizer's stability threshold in the sharpness's units, or None.
        num_hvps: products spent (all of the reading's: "auto"'s cross-check included).
        seconds: wall time of the reading (the gradient graph and the preconditioner included).
        loss: the loss on the reading's batch.
    """

    step: int
    lambda_max_lower_bound: float | None
    residual: float
    value: float
    sharpness_lower_bound: float | None
    stability_threshold: float | None
    num_hvps: int
    seconds: float
    loss: float

    @property
    def stability_ratio_lower_bound(self) -> float | None:
        """sharpness_lower_bound / threshold: >= 1 proves the steepest direction beyond the edge."""
        if self.sharpness_lower_bound is None or not self.stability_threshold:
            return None
        return self.sharpness_lower_bound / self.stability_threshold

    def scalars(self) -> dict[str, float]:
        """The scalars the reading logs, by tag (tags of their own: lower bounds, not values)."""
        found = {
            LAMBDA_MAX_LOWER: self.lambda_max_lower_bound,
            TRACKING_RESIDUAL: self.residual,
            SHARPNESS_LOWER: self.sharpness_lower_bound,
            RATIO_LOWER: self.stability_ratio_lower_bound,
            TRACKING_NUM_HVPS: float(self.num_hvps),
            TRACKING_SECONDS: self.seconds,
        }
        return {tag: value for tag, value in found.items() if value is not None and math.isfinite(value)}


def track(
    operator: HessianOperator,
    step: int,
    vector: torch.Tensor,
    *,
    threshold: float | None,
    scale: Diagonal | None,
    steps: int = KRYLOV_STEPS,
) -> tuple[TrackingReading, torch.Tensor]:
    """A tracking reading on the open `operator` from the tracked top `vector`: a lower bound on
    lambda_max and (with a stability `threshold`) on the sharpness; for a preconditioned rule (a
    preconditioner square root `scale`) on the preconditioned operator only, the sharpness the
    threshold refers to, the one a flag needs, at the price of one Krylov space of `steps` products.
    Returns the reading and the vector to track next."""
    start = time.perf_counter()
    before = operator.num_hvps
    bound = ritz_bound(operator, vector, scale, steps=steps)
    lambda_max = bound.lower_bound if scale is None else None
    sharpness = bound.lower_bound if threshold is not None else None
    reading = TrackingReading(
        step=step, lambda_max_lower_bound=lambda_max, residual=bound.residual, value=bound.value,
        sharpness_lower_bound=sharpness, stability_threshold=threshold, num_hvps=operator.num_hvps - before,
        seconds=time.perf_counter() - start, loss=operator.loss,
    )  # fmt: skip
    return reading, bound.next_vector
