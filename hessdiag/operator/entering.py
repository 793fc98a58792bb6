"""Entering a :class:`~hessdiag.operator.hessian.HessianOperator`: the gradient, and the product method.

Exact methods keep the gradient graph of one forward for all products. Finite differences and
``"auto"`` first take three central differences on a random probe vector (they move the parameters
in place, so they come before any graph that saved them), then the gradient: with its graph for
``"auto"``, which tries double backward and cross-checks it against the differences
(:func:`~hessdiag.operator.auto.choose_method`). Under data parallelism or sharding, every rank
agrees that its build worked before the first all-reduce.
"""

from __future__ import annotations

import torch

from hessdiag import _distributed
from hessdiag.errors import HessdiagError, SecondDerivativeError, UnrecordedGradientError
from hessdiag.operator.auto import MethodChoice, choose_method, finite_differences
from hessdiag.operator.double_backward import DoubleBackward, PartByPart
from hessdiag.operator.finite_difference import CentralDifference, Measurement, Richardson, extrapolate
from hessdiag.operator.forward_over_reverse import ForwardOverReverse
from hessdiag.operator.loss import BatchLoss
from hessdiag.operator.parameter_space import ParameterSpace

EXACT_METHODS: tuple[str, ...] = ("double_backward", "forward_over_reverse")
Products = DoubleBackward | PartByPart | ForwardOverReverse | Richardson
_Probe = tuple[torch.Tensor, tuple[torch.Tensor, ...], HessdiagError | None]


class ProductsBuilder:
    """Builds the products of `method` on an opened `loss` over `space` (`seed`: the probe vector's).

    After :meth:`build`: `choice` (the method taken, why, its measured error), `products`, and
    `central` (the central differences, kept for finite differences and for the loss along a
    direction; None for exact products).
    """

    def __init__(self, loss: BatchLoss, space: ParameterSpace, method: str, seed: int) -> None:
        self.loss, self.space, self.method, self.seed = loss, space, method, seed
        self.choice: MethodChoice | None = None
        self.products: Products | None = None
        self.central: CentralDifference | None = None

    def build(self) -> ProductsBuilder:
        """Build the gradient, then settle the method on every rank alike; returns itself."""
        if not self.space.distributed and self.space.shard is None:
            probe = self._build_here()
        else:
            probe = _distributed.agreed(self._build_here, self.space.device)
        if probe is not None:
            self._settle(*probe)
        return self

    def _build_here(self) -> _Probe | None:
        """This rank's part: everything that needs no collective. Returns, for finite differences and
        "auto", the probe vector, its local D(eps), D(2 eps), D(4 eps), and why the graph could not be
        built (if so); None for the exact methods, which are built."""
        loss, space = self.loss, self.space
        if self.method in EXACT_METHODS:
            loss.build_graph(self.method)
            if self.method == "double_backward":
                self.products = self._double_backward()
                loss.warn_constant_gradients()
            else:
                self.products = ForwardOverReverse(loss.closure)
            self.choice = MethodChoice(self.method, "asked for", 0.0)
            return None
        graph_free = self.method == "finite_difference" or space.shard is not None
        if graph_free:
            loss.build_without_graph()
        else:
            loss.closure.check()  # refuse a bad loss before the finite differences move the parameters
        self.central = CentralDifference(space.local_params, loss.gradient_without_graph, shard=space.shard)
        probe = space.random_unit_vector(self.seed)
        pieces = space.split(probe)
        steps = tuple(self.central.product(pieces, scale * self.central.eps) for scale in (1, 2, 4))
        if graph_free:
            return probe, steps, None
        # "auto": the finite differences moved the parameters in place, so the graph comes after them.
        try:
            loss.build_graph("double_backward")
        except (SecondDerivativeError, UnrecordedGradientError) as error:
            loss.build_without_graph()  # the failed double backward may have freed part of the graph
            return probe, steps, error
        return probe, steps, None

    def _settle(self, probe: torch.Tensor, steps: tuple[torch.Tensor, ...], failure: HessdiagError | None) -> None:
        """Measure finite differences on the probe vector and, for "auto", choose the method. Runs on
        every rank on global (all-reduced) products, so all ranks decide alike."""
        assert self.central is not None
        space, dtype = self.space, self.space.dtype
        fine, coarse, coarsest = (space.finish(product) for product in steps)
        measured = Measurement.of(fine, coarse, coarsest, self.central.eps, space.shard)
        if self.method == "finite_difference":
            choice = finite_differences(measured, "asked for", sharded=space.shard is not None, dtype=dtype)
        elif space.shard is not None:
            reason = "the model is FSDP2-sharded: double backward cannot run through it"
            choice = finite_differences(measured, reason, sharded=True, dtype=dtype)
        else:
            exact = self._double_backward()
            choice = choose_method(
                measured, probe, extrapolate(fine, coarse), lambda v: space.finish(exact.product(v)),
                lambda: space.random_unit_vector(self.seed + 1), dtype=dtype, build_failure=failure,
            )  # fmt: skip
        self.choice = choice
        if choice.method == "finite_difference":
            self.loss.drop_graph()
            self.products = Richardson(self.central)
        else:
            self.products, self.central = exact, None
            self.loss.warn_constant_gradients()

    def _double_backward(self) -> DoubleBackward | PartByPart:
        """Double backward's products on the gradient built with its graph; the loss then holds the
        gradient's values as views of its flat output (not the pieces a second time). On a loss in
        parts, the products part by part (one part's graph alive at a time)."""
        if self.loss.closure.by_parts:
            return PartByPart(self.loss)
        products = DoubleBackward(self.loss.grads, self.space)
        if products.gradient is not None:
            self.loss.view_flat(products.gradient)
        return products
