"""The Hessian of a user loss closure as a linear operator on flat vectors.

`HessianOperator` turns ``loss_fn(model, batch) -> scalar`` into the symmetric linear operator
v -> H v on flat vectors over the chosen parameters (:class:`~hessdiag.operator.parameter_space.ParameterSpace`).
It only dispatches products to the method in use:

* ``"double_backward"`` (:mod:`~hessdiag.operator.double_backward`): one backward-of-backward
  through the gradient graph, built once. Exact, but only where every op's backward is differentiable.
* ``"forward_over_reverse"`` (:mod:`~hessdiag.operator.forward_over_reverse`): ``torch.func.jvp`` of
  ``torch.func.grad``, for ops whose backward is not itself differentiable but has a forward-mode rule.
* ``"finite_difference"`` (:mod:`~hessdiag.operator.finite_difference`): central differences of
  ordinary gradients: two gradients per product, no graph kept, fused kernels as they are; its error
  is measured, and a non-smooth loss is refused.
* ``"auto"`` (default, :mod:`~hessdiag.operator.auto`): double backward, cross-checked once per
  operator against finite differences on a random vector; finite differences where double backward
  fails or disagrees (a backward that is not differentiable: autograd drops its second-order term
  without a word).

FSDP2-sharded models (``fully_shard``; see :mod:`hessdiag._sharded`): vectors are this rank's
pieces (``size`` coordinates of ``dim``), products are finite differences of the gradient FSDP
computes ("auto" picks them; the exact methods are refused), and `shard` carries the all-reduced
inner products that :func:`~hessdiag.lanczos.lanczos` needs.

The operator is the loss the optimizer sees and leaves no trace (see :mod:`hessdiag.isolation`):
open it with ``with``; on exit the graph is freed and modes, buffers and RNG are put back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from hessdiag import _sharded
from hessdiag.batches import SampleParts
from hessdiag.isolation import MODEL_MODES, ModelMode, isolation, unwrap_model
from hessdiag.errors import SecondDerivativeError, is_missing_second_derivative
from hessdiag.operator.entering import EXACT_METHODS, Products, ProductsBuilder
from hessdiag.operator.double_backward import DoubleBackward, PartByPart
from hessdiag.operator.finite_difference import AlongVector, CentralDifference, Richardson
from hessdiag.operator.closure import LossFn
from hessdiag.operator.loss import BatchLoss, enabled_attention_backends
from hessdiag.operator.rounding import ProductRounding
from hessdiag.operator.sample_parts import cut_for_products
from hessdiag.operator.parameter_space import ParameterSpace, refuse_coarse_compute

HVPMethod = Literal["auto", "double_backward", "forward_over_reverse", "finite_difference"]
HVP_METHODS: tuple[str, ...] = ("auto", "double_backward", "forward_over_reverse", "finite_difference")


class HessianOperator:
    """The Hessian of ``loss_fn(model, batch)`` as a linear operator on flat vectors.

    Use it as a context manager; products are only valid inside::

        with HessianOperator(model, loss_fn, batch) as H:
            hv = H.matvec(v)        # v, hv: shape (H.dim,), H.dtype, on H.device

    `H.dtype` is the parameters' dtype (`H.parameter_dtype`), widened to float32 for a bfloat16 or
    float16 model (whose products are taken in its own dtype).

    Args:
        model: the network (a DDP wrapper is unwrapped).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the training loss on `batch`.
        batch: whatever `loss_fn` takes.
        params: parameters to differentiate (default: all with ``requires_grad``).
        mode: ``"as_is"`` (default: each module keeps its current mode, so the loss is the one the
            optimizer sees, frozen eval-mode parts included, as the callback and the Monitor take
            it), ``"train"`` (every module in train mode: dropout on, BatchNorm on batch statistics)
            or ``"eval"``.
        method: ``"auto"`` (default), ``"double_backward"``, ``"forward_over_reverse"`` or
            ``"finite_difference"`` (see the module docstring).
        seed: seeds dropout inside the estimate, so every product uses the same masks.
        batch_size: this rank's number of samples, to weight ranks under data parallelism
            (default: the leading dimension of the first tensor in `batch`).
        distributed: average over the process group when one is initialised (default True).
            Sharded models are always averaged as FSDP averages them: the mean over ranks of the
            per-rank losses (`batch_size` is ignored there).
        parts: take each product on this many parts of the batch, one part's graph alive at a time,
            where that leaves the Hessian unchanged (see :mod:`~hessdiag.operator.sample_parts`:
            no BatchNorm in training mode, the loss a mean over samples); 1 (default): the whole
            batch. Not on FSDP2-sharded models. `compare_parts` False skips the comparison of the
            whole batch's loss with its parts' (made already on this model and loss).

    Raises:
        ValueError: bad arguments (see :func:`~hessdiag.operator.parameter_space.trainable_parameters`), or an
            exact `method` on an FSDP2-sharded model.
        LossClosureError: `loss_fn` raised on `batch` or did not return a scalar tensor that
            depends on the parameters.
        NonFiniteLossError: the loss is NaN or infinite.
        SecondDerivativeError: an op of the loss cannot be differentiated twice (exact methods).
        NonSmoothLossError: finite differences were needed (asked for, or double backward failed)
            and the loss is not smooth enough for them.

    Attributes set on entering (for logging):
        method: the method the products use: `method` as asked, or what ``"auto"`` chose.
        method_reason: why (``"asked for"`` or what the cross-check found).
        num_parts: the parts of the batch each product takes (1: the whole batch); `parts_reason`:
            why, in words; `loss_is_mean`: whether the whole batch's loss was found to be the
            sample-weighted sum of its parts' (None: not compared).
        product_error: the error of one product, ``||computed H v - H v||`` for a unit v, that
            Lanczos adds to its bounds; it reads back what is set. 0 for the exact methods (a bound,
            given their preconditions hold; ``"auto"`` checks them on one vector). For finite
            differences an *estimate*, not a bound: ||D(eps) - D(2 eps)|| measured on one random unit
            vector (see :class:`~hessdiag.operator.finite_difference.Measurement`) of the
            extrapolated products R(eps) the solver uses; products along directions of larger third
            derivative can be worse, so the values reported are re-measured along their own vectors
            (:meth:`along`). For a bfloat16 or float16 model each product adds to it the growth of
            its own rounding (:class:`~hessdiag.operator.rounding.ProductRounding`), so the bounds
            stay true there and a `tol` below about eps is not reached.
        precision_floor: the smallest relative tolerance the bounds can prove: ``PRECISION_FLOOR``
            eps of a dtype coarser than float32, 0 otherwise. Estimates raise `tol` to it
            (:func:`~hessdiag.estimators.eigen.eigenvalues_of`) rather than run to `max_iter` for a tolerance
            they cannot reach.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        *,
        params: Iterable[torch.Tensor] | None = None,
        mode: ModelMode = "as_is",
        method: HVPMethod = "auto",
        seed: int = 0,
        batch_size: int | None = None,
        distributed: bool = True,
        parts: int = 1,
        compare_parts: bool = True,
    ) -> None:
        if not callable(loss_fn):
            raise ValueError(f"`loss_fn` must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}.")
        if mode not in MODEL_MODES:
            raise ValueError(f"`mode` must be one of {MODEL_MODES}, got {mode!r}.")
        if method not in HVP_METHODS:
            raise ValueError(f"`method` must be one of {HVP_METHODS}, got {method!r}.")
        if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
            raise ValueError(f"`parts` must be a positive int (1: the whole batch), got {parts!r}.")
        self.model = unwrap_model(model)
        _sharded.refuse_fsdp1(self.model)
        self.space = ParameterSpace(self.model, params, distributed=distributed)
        if self.space.shard is not None:
            _refuse_on_shards(self.model, method, self.space.dtype)
        self.params, self.device = self.space.params, self.space.device
        # Flat vectors in at least float32: a bfloat16 or float16 model's products are taken in its
        # dtype and handed back widened, so that the solvers' inner products neither overflow
        # (float16 squares past 65504) nor add bfloat16's rounding to the products' own.
        self.dtype: torch.dtype = torch.promote_types(self.space.dtype, torch.float32)
        self.parameter_dtype: torch.dtype = self.space.dtype
        self.dim, self.size, self.shard = self.space.dim, self.space.size, self.space.shard
        self.loss_fn, self.batch, self.mode, self.seed = loss_fn, batch, mode, int(seed)
        self.requested_method: HVPMethod = method
        self.method: HVPMethod = method
        self.method_reason: str = "asked for"
        self.product_error: float = 0.0
        self.num_hvps: int = 0
        # Products in a dtype coarser than float32 carry its rounding (see `product_error`).
        self._rounding = ProductRounding(self.space.dtype)
        self.precision_floor: float = self._rounding.floor
        self._batch_size = batch_size
        self._parts, self._compare_parts = int(parts), compare_parts
        self.num_parts: int = 1
        self.parts_reason: str = "the whole batch"
        self.loss_is_mean: bool | None = None
        self._stack: contextlib.ExitStack | None = None
        self._loss: BatchLoss | None = None
        self._products: Products | None = None
        self._central: CentralDifference | None = None

    # -- lifetime -------------------------------------------------------------------------
    def __enter__(self) -> HessianOperator:
        # Read before `isolation` forces the math kernels: gradients without graph use the user's.
        attention = enabled_attention_backends()
        stack = contextlib.ExitStack()
        stack.enter_context(isolation(self.model, self.mode, self.device))
        try:
            self.space.weigh_batch(self.batch, self._batch_size)
            batch = self.batch
            if self.shard is None:
                cut = cut_for_products(
                    self.model, self.loss_fn, batch, self._parts, self.space, self.seed, compare=self._compare_parts
                )
                batch, self.parts_reason, self.loss_is_mean = cut
                self.num_parts = len(batch) if isinstance(batch, SampleParts) else 1
            self._loss = BatchLoss(self.model, self.loss_fn, batch, self.space, self.seed, attention)
            built = ProductsBuilder(self._loss, self.space, self.requested_method, self.seed).build()
            assert built.choice is not None
            self._products, self._central, choice = built.products, built.central, built.choice
            self.method, self.method_reason, self.product_error = choice.method, choice.reason, choice.error  # type: ignore[assignment]
        except BaseException:
            self._release()
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._release()
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def _release(self) -> None:
        if self._loss is not None:
            self._loss.release()
        self._loss = self._products = self._central = None
        if self.shard is not None:
            # The last forward left groups that keep their gathered parameters (the root's) with those
            # registered on the modules: leave every group sharded, as after training's backward, so
            # that a caller restoring the modules' parameter slots (the Monitor's preserved_state) and
            # FSDP2's own state agree; else the next training forward finds the root "already gathered"
            # with its sharded parameters registered (measured: Lightning's next step failed).
            _sharded.reshard(self.model)

    # -- the loss and its gradient ---------------------------------------------------------
    @property
    def loss(self) -> float:
        """The loss at the current parameters (global batch under data parallelism; the mean
        over ranks on a sharded model)."""
        return self._open().total()

    def gradient(self) -> torch.Tensor:
        """The flat gradient on this batch (global batch under data parallelism; this rank's
        piece on a sharded model), in the operator's `dtype`."""
        return self._open().gradient().to(self.dtype)

    def loss_along(self, direction: torch.Tensor, step: float) -> float:
        """The loss at theta + step * direction (flat `direction`), same batch and dropout masks;
        the parameters are left as they were (:meth:`~hessdiag.operator.closure.PartedClosure.along`)."""
        return self._open().closure.along(direction, step, self._central)

    # -- products --------------------------------------------------------------------------
    def matvec(self, vector: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """H v for a flat `vector` of shape ``(size,)``: a new tensor of the same shape, or written
        into `out` (same shape and dtype), which may be `vector` itself: a caller whose `vector` is a
        temporary then holds one parameter-sized vector less during the product (double backward
        writes the product there once its backward is done with `vector`)."""
        self._open()
        if vector.shape != (self.size,):
            raise ValueError(f"Expected a vector of shape ({self.size},), got {tuple(vector.shape)}.")
        assert self._products is not None
        # Read before `out` may overwrite `vector`: one norm per product, for low-precision models only.
        vector_norm = self.norm(vector) if self._rounding.eps else 0.0
        flat = vector.to(device=self.device, dtype=self.space.dtype)
        try:
            if isinstance(self._products, (DoubleBackward, PartByPart)):
                # The flat vector whole (one flat gradient output), the product straight into `out`
                # where the dtypes agree.
                direct = out if out is not None and out.dtype == flat.dtype else None
                product = self._products.product(flat, out=direct)
            else:
                product = self._products.product(self.space.split(flat))
        except RuntimeError as error:
            if is_missing_second_derivative(error):
                raise SecondDerivativeError(error, self.method) from error
            raise
        self.num_hvps += 1
        product = self.space.finish(product.to(vector.dtype))
        if out is not None and product is not out:
            product = out.copy_(product)
        if self._rounding.eps:
            self.product_error = self._rounding.raised(self.product_error, vector_norm, self.norm(product))
        return product

    def along(self, vector: torch.Tensor) -> AlongVector:
        """The finite-difference product of a flat `vector` (unit, shape ``(size,)``) with its error
        measured along that vector itself (:meth:`~hessdiag.operator.finite_difference.Richardson.along`):
        what a value computed from `vector` can be bounded by. Three central differences.

        Raises:
            RuntimeError: the products are not finite differences (exact products need no such check).
        """
        self._open()
        if not isinstance(self._products, Richardson):
            raise RuntimeError(f"`along` measures finite-difference products; this operator uses {self.method}.")
        pieces = self.space.split(vector.to(device=self.device, dtype=self.space.dtype))
        measured = self._products.along(pieces, self.space.finish)
        self.num_hvps += 2  # six gradients: one and a half extrapolated products, counted as two
        return AlongVector(measured.product.to(vector.dtype), measured.error)

    def norm(self, flat: torch.Tensor) -> float:
        """The norm of a flat vector (of the whole vector, when `flat` is this rank's piece)."""
        return self.space.norm(flat)

    def _open(self) -> BatchLoss:
        if self._loss is None or self._loss.value is None:
            raise RuntimeError("The HessianOperator is closed: use it inside `with HessianOperator(...) as H:`.")
        return self._loss


def _refuse_on_shards(model: nn.Module, method: str, dtype: torch.dtype) -> None:
    """What FSDP2-sharded parameters cannot give: exact products, or curvature from gradients that
    were computed in a coarser dtype than the parameters'.

    Raises:
        ValueError: an exact `method`.
        HessdiagError: see :func:`~hessdiag.operator.parameter_space.refuse_coarse_compute`.
    """
    if method in EXACT_METHODS:
        raise ValueError(
            f"`method`={method!r} cannot run on FSDP2-sharded parameters: double backward through "
            "fully_shard fails and forward-mode derivatives of its collectives do not exist; use 'auto' or "
            "'finite_difference' (products from the sharded gradients)."
        )
    refuse_coarse_compute(model, dtype)


def hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    vector: Sequence[torch.Tensor] | torch.Tensor,
    **options: Any,
) -> list[torch.Tensor]:
    """One Hessian-vector product, shaped like the parameters.

    Args:
        vector: a flat tensor of shape ``(dim,)`` or one tensor per parameter.
        **options: as for :class:`HessianOperator`.

    Returns:
        H v as one tensor per parameter (same order as `params` or ``model.parameters()``).
    """
    with HessianOperator(model, loss_fn, batch, **options) as operator:
        flat = vector if isinstance(vector, torch.Tensor) else torch.cat([t.reshape(-1) for t in vector])
        return [t.clone() for t in operator.space.split(operator.matvec(flat))]
