"""Hessian-vector products of a user loss closure.

`HessianOperator` turns ``loss_fn(model, batch) -> scalar`` into the symmetric linear operator
v -> H v on flat vectors over the chosen parameters. Methods:

* ``"double_backward"``: the gradient graph is built once (``create_graph=True``) and every
  product is one backward-of-backward through it. Measured on an H100 (ResNet-18, batch 128):
  3.9x a gradient, 1.4 GB peak. Exact, but only where every op's backward is differentiable.
* ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad``; one forward and backward
  per product (8.3x a gradient, 2.6 GB on the same model), for ops whose backward is not itself
  differentiable but has a forward-mode rule.
* ``"finite_difference"``: central differences of ordinary gradients (see
  :mod:`hessdiag.finite_difference`): two gradients per product, no graph kept, fused kernels as
  they are; its error is measured, and a non-smooth loss is refused.
* ``"auto"`` (default): double backward, cross-checked once per operator against finite
  differences on a random vector; finite differences where double backward fails or disagrees
  (a backward that is not differentiable: autograd drops its second-order term without a word).

FSDP2-sharded models (``fully_shard``; see :mod:`hessdiag._sharded`): vectors are this rank's
pieces (``size`` coordinates of ``dim``), products are finite differences of the gradient FSDP
computes ("auto" picks them; the exact methods are refused), and `shard` carries the all-reduced
inner products that :func:`~hessdiag.lanczos.lanczos` needs.

The operator is the loss the optimizer sees and leaves no trace (see :mod:`hessdiag._isolation`):
open it with ``with``; on exit the graph is freed and modes, buffers and RNG are put back.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hessdiag import _distributed, _sharded
from hessdiag._isolation import MODEL_MODES, ModelMode, isolation, seed_rng, unwrap_model
from hessdiag.errors import (
    HessdiagError,
    HessdiagWarning,
    LossClosureError,
    NonFiniteLossError,
    NonSmoothLossError,
    SecondDerivativeError,
    is_missing_second_derivative,
)
from hessdiag.finite_difference import (
    NON_SMOOTH_DISAGREEMENT,
    CentralDifference,
    Measurement,
    gradient_by_backward,
    refuses_autograd_grad,
)
from hessdiag.lanczos import VectorShard, random_generator, start_vector, vector_norm

LossFn = Callable[[nn.Module, Any], torch.Tensor]
HVPMethod = Literal["auto", "double_backward", "forward_over_reverse", "finite_difference"]
HVP_METHODS: tuple[str, ...] = ("auto", "double_backward", "forward_over_reverse", "finite_difference")
_EXACT_METHODS = ("double_backward", "forward_over_reverse")
#: Rounding of one product of a bfloat16/float16 model, in units of its dtype's eps times ||H||:
#: measured up to 0.34 (double backward, small MLP, GELU/LayerNorm MLP and CNN, both dtypes, against
#: float64 Hessians at the same parameters) plus up to 0.5 from rounding the input vector to the dtype.
LOW_PRECISION_ROUNDING = 2.0


def trainable_parameters(model: nn.Module, params: Iterable[torch.Tensor] | None) -> list[torch.Tensor]:
    """The parameters the Hessian is taken over: `params`, or every trainable one of `model`.

    Raises:
        ValueError: none is trainable, a given tensor does not require grad or is not a
            parameter of `model`, or they span several devices or dtypes.
    """
    model = unwrap_model(model)
    owned = {id(p) for p in model.parameters()}
    if params is None:
        chosen = [p for p in model.parameters() if p.requires_grad]
        if not chosen:
            raise ValueError("The model has no trainable parameters (none has requires_grad=True).")
    else:
        chosen = list(params)
        if not chosen:
            raise ValueError("`params` is empty: pass at least one parameter, or None for all trainable ones.")
        for index, p in enumerate(chosen):
            if id(p) not in owned:
                raise ValueError(f"`params[{index}]` is not a parameter of the model.")
            if not p.requires_grad:
                raise ValueError(f"`params[{index}]` does not require grad, so its Hessian block is undefined.")
    if len({id(p) for p in chosen}) != len(chosen):
        raise ValueError("`params` lists the same parameter twice.")
    devices = {p.device for p in chosen}
    dtypes = {p.dtype for p in chosen}
    if len(devices) > 1 or len(dtypes) > 1:
        raise ValueError(
            f"The parameters span devices {sorted(map(str, devices))} and dtypes {sorted(map(str, dtypes))}; "
            "pass `params=` with parameters of one device and dtype."
        )
    if not chosen[0].dtype.is_floating_point:
        raise ValueError(f"Parameters must be floating point, got {chosen[0].dtype}.")
    return chosen


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a module, so `torch.func.functional_call` can swap the
    model's parameters by name (public API, no private reparametrisation)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Any) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn
        self._batch = batch

    def forward(self) -> torch.Tensor:
        return self._loss_fn(self.model, self._batch)


class HessianOperator:
    """The Hessian of ``loss_fn(model, batch)`` as a linear operator on flat vectors.

    Use it as a context manager; products are only valid inside::

        with HessianOperator(model, loss_fn, batch) as H:
            hv = H.matvec(v)        # v, hv: shape (H.dim,), H.dtype, on H.device

    Args:
        model: the network (a DDP wrapper is unwrapped).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the training loss on `batch`.
        batch: whatever `loss_fn` takes.
        params: parameters to differentiate (default: all with ``requires_grad``).
        mode: ``"train"`` (default: dropout on, BatchNorm on batch statistics, as the optimizer
            sees it), ``"eval"``, or ``"as_is"`` (keep each module's current mode).
        method: ``"auto"`` (default), ``"double_backward"``, ``"forward_over_reverse"`` or
            ``"finite_difference"`` (see the module docstring).
        seed: seeds dropout inside the estimate, so every product uses the same masks.
        batch_size: this rank's number of samples, to weight ranks under data parallelism
            (default: the leading dimension of the first tensor in `batch`).
        distributed: average over the process group when one is initialised (default True).
            Sharded models are always averaged as FSDP averages them: the mean over ranks of the
            per-rank losses (`batch_size` is ignored there).

    Raises:
        ValueError: bad arguments (see :func:`trainable_parameters`), or an exact `method` on an
            FSDP2-sharded model.
        LossClosureError: `loss_fn` raised on `batch` or did not return a scalar tensor that
            depends on the parameters.
        NonFiniteLossError: the loss is NaN or infinite.
        SecondDerivativeError: an op of the loss cannot be differentiated twice (exact methods).
        NonSmoothLossError: finite differences were needed (asked for, or double backward failed)
            and the loss is not smooth enough for them.

    Attributes set on entering (for logging):
        method: the method the products use: `method` as asked, or what ``"auto"`` chose.
        method_reason: why (``"asked for"`` or what the cross-check found).
        product_error: the error of one product, ``||computed H v - H v||`` for a unit v beyond
            floating-point rounding, that Lanczos adds to its bounds. 0 for the exact methods (a
            bound, given their preconditions hold; ``"auto"`` checks them on one vector). For finite
            differences an *estimate*, not a bound: ||D(eps) - D(2 eps)|| measured on one random
            unit vector (see :class:`hessdiag.finite_difference.Measurement`); products along
            directions of larger third derivative can be worse. Plus, for parameters in a dtype
            coarser than float32 (a bfloat16 or float16 model), the products' own rounding: modelled
            as ``LOW_PRECISION_ROUNDING`` eps of that dtype times the largest ||H v|| seen (a lower
            bound of ||H||, as Lanczos' own rounding model uses max |theta|), so the bounds stay
            true there and a `tol` below about eps is not reached (measured below).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        *,
        params: Iterable[torch.Tensor] | None = None,
        mode: ModelMode = "train",
        method: HVPMethod = "auto",
        seed: int = 0,
        batch_size: int | None = None,
        distributed: bool = True,
    ) -> None:
        if not callable(loss_fn):
            raise ValueError(f"`loss_fn` must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}.")
        if mode not in MODEL_MODES:
            raise ValueError(f"`mode` must be one of {MODEL_MODES}, got {mode!r}.")
        if method not in HVP_METHODS:
            raise ValueError(f"`method` must be one of {HVP_METHODS}, got {method!r}.")
        self.model = unwrap_model(model)
        _sharded.refuse_fsdp1(self.model)
        self.params: list[torch.Tensor] = trainable_parameters(self.model, params)
        self.loss_fn = loss_fn
        self.batch = batch
        self.mode: ModelMode = mode
        self.requested_method: HVPMethod = method
        self.method: HVPMethod = method
        self.method_reason: str = "asked for"
        self.seed = int(seed)
        self.device: torch.device = self.params[0].device
        self.dtype: torch.dtype = self.params[0].dtype
        self.dim: int = sum(p.numel() for p in self.params)
        self.shard: VectorShard | None = None
        if _sharded.is_sharded(self.params):
            self.shard = _sharded.vector_shard(self.params)
            if method in _EXACT_METHODS:
                raise ValueError(
                    f"`method`={method!r} cannot run on FSDP2-sharded parameters: double backward through "
                    "fully_shard fails and forward-mode derivatives of its collectives do not exist; use 'auto' or "
                    "'finite_difference' (products from the sharded gradients)."
                )
            compute = _sharded.coarse_compute_dtype(self.model, self.dtype)
            if compute is not None:
                raise HessdiagError(
                    f"FSDP2 gathers these {self.dtype} parameters in {compute} for compute (MixedPrecisionPolicy("
                    f"param_dtype={compute})), so every gradient carries {compute} rounding ({torch.finfo(compute).eps:.1g} "
                    "relative). Finite differences of gradients, the only Hessian-vector products FSDP2 allows, are then "
                    "rounding, not curvature (measured: the two step sizes disagreed by 0.76 of a product on a small "
                    "MLP). Curvature checks need the parameters' own precision in the fully_shard calls of the "
                    "monitored run (param_dtype=None); the other diagnostics do not."
                )
        #: This process's number of coordinates of the flat vectors (`dim` unless sharded).
        self.size: int = self.dim if self.shard is None else self.shard.size
        self._local_params = [_sharded.local(p) for p in self.params]
        self.num_hvps: int = 0
        self._measured_error = 0.0
        # Products in a dtype coarser than float32 carry its rounding (see `product_error`).
        coarse = torch.finfo(self.dtype).eps > torch.finfo(torch.float32).eps
        self._rounding_eps = torch.finfo(self.dtype).eps if coarse else 0.0
        self._largest_product = 0.0
        self._share = 1.0
        # FSDP's gradient already averages the ranks: no product all-reduce on sharded models.
        self._distributed = distributed and self.shard is None and _distributed.is_data_parallel()
        self._batch_size = batch_size
        self._stack: contextlib.ExitStack | None = None
        self._grads: tuple[torch.Tensor | None, ...] = ()
        self._loss: torch.Tensor | None = None
        self._central: CentralDifference | None = None
        # Local D(eps), D(2 eps) on the probe vector, finished (all-reduced) once every rank has built.
        self._probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._exact_failure: SecondDerivativeError | None = None
        self._attention: list[SDPBackend] = []
        # Reentrant checkpointing and FSDP2 (whose autograd.grad returns None for sharded
        # parameters): gradients by loss.backward() only.
        self._plain_backward = self.shard is not None

    # -- lifetime -------------------------------------------------------------------------
    def __enter__(self) -> HessianOperator:
        self._attention = _enabled_attention_backends()
        stack = contextlib.ExitStack()
        stack.enter_context(isolation(self.model, self.mode, self.device))
        try:
            if self._distributed:
                size = self._batch_size or _distributed.infer_batch_size(self.batch)
                if size is None:
                    raise ValueError("Cannot infer the batch size for data-parallel weighting: pass `batch_size=`.")
                self._share = _distributed.batch_share(size, self.device)
            self._build_on_every_rank()
            if self.requested_method not in _EXACT_METHODS:
                self._settle_method()
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
        self._grads = ()
        self._loss = None
        self._central = None
        self._probe = None

    def _build_on_every_rank(self) -> None:
        """Build the graph; under data parallelism, all ranks agree that it worked before any
        product's all-reduce, so a rank that failed (a NaN on its shard) cannot leave the others
        waiting forever."""
        if not self._distributed and self.shard is None:
            self._build()
            return
        failure: BaseException | None = None
        try:
            self._build()
        except Exception as error:  # re-raised below, after the other ranks know
            failure = error
        everyone_ok = torch.tensor([0.0 if failure else 1.0], device=self.device)
        _distributed.all_reduce_min_(everyone_ok)
        if failure is not None:
            raise failure
        if everyone_ok.item() < 1:
            raise HessdiagError("Another rank could not build its part of the curvature check; skipped on every rank.")

    # -- the loss and its gradient ---------------------------------------------------------
    def _evaluate_loss(self, model: nn.Module) -> torch.Tensor:
        if self.shard is not None:
            _sharded.reshard(model)  # so that the forward gathers the shards as they are now
        seed_rng(self.seed, self.device)
        try:
            loss = self.loss_fn(model, self.batch)
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
        return loss.reshape(())

    def _checked_loss(self) -> torch.Tensor:
        loss = self._evaluate_loss(self.model)
        if not loss.requires_grad:
            raise LossClosureError(
                "The loss does not depend on the chosen parameters: was it computed under torch.no_grad(), or "
                "through checkpoint(..., use_reentrant=True) on inputs that do not require grad (whose output has "
                "no graph: training gets no gradients there either; use use_reentrant=False)?"
            )
        finite = bool(torch.isfinite(loss))
        if self.shard is not None:  # decided together: a rank that stops here would leave FSDP's backward waiting
            finite = float(self.shard.sum_(torch.tensor([float(not finite)], dtype=torch.float64, device=self.device))) == 0
        if not finite:
            raise NonFiniteLossError(f"The loss is {loss.item()} on this batch (or another rank's); the Hessian is undefined there.")
        return loss

    def _build(self) -> None:
        """This rank's part of entering: everything that needs no collective.

        Exact methods: forward once and keep the gradient graph for all products. Finite
        differences and "auto": the two central differences on the probe vector (they move the
        parameters in place, so they come before any graph that saved them), then the gradient:
        with its graph for "auto", which tries double backward first.
        """
        if self.requested_method in _EXACT_METHODS:
            self._build_exact(self._checked_loss())
            if self.method == "double_backward":
                self._warn_constant_gradients()
            return
        loss = self._checked_loss()
        if self.requested_method == "finite_difference" or self.shard is not None:
            self._loss = loss.detach()
            self._grads = tuple(self._split(self._gradient_without_graph(loss)))
        del loss  # free its graph before the finite differences: they move the parameters it saved
        if self.shard is not None:
            self._check_gradient_repeats()
        self._central = CentralDifference(self._local_params, self._gradient_without_graph, shard=self.shard)
        probe = self._probe_vector(self.seed)
        pieces = self._split(probe)
        self._probe = (probe, self._central.product(pieces), self._central.product(pieces, 2 * self._central.eps))
        if self.requested_method == "finite_difference" or self.shard is not None:
            return
        # "auto": the finite differences moved the parameters in place, so the graph comes after them.
        loss = self._checked_loss()
        try:
            self._build_exact(loss, method="double_backward")
        except SecondDerivativeError as error:
            self._exact_failure = error
            loss = self._checked_loss()  # the failed double backward may have freed part of the graph
            self._loss = loss.detach()
            self._grads = tuple(self._split(self._gradient_without_graph(loss)))

    def _build_exact(self, loss: torch.Tensor, method: str | None = None) -> None:
        method = method or self.method
        create_graph = method == "double_backward"
        try:
            grads = torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True)
        except RuntimeError as error:
            if is_missing_second_derivative(error):
                raise SecondDerivativeError(error, method) from error
            raise
        self._loss = loss.detach()
        self._grads = grads if create_graph else tuple(None if g is None else g.detach() for g in grads)

    def _gradient_without_graph(self, loss: torch.Tensor | None = None) -> torch.Tensor:
        """The flat local gradient at the parameters' current values (of `loss` when given), with
        the attention kernels the user has enabled (fused ones included: only first derivatives
        are taken)."""
        with sdpa_kernel(self._attention):
            if loss is None:
                loss = self._evaluate_loss(self.model)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"The loss is {loss.item()} at a finite-difference step from the parameters; "
                        "use `hvp_method='double_backward'`."
                    )
            if not self._plain_backward:
                try:
                    return self._flatten(torch.autograd.grad(loss, self.params, allow_unused=True))
                except RuntimeError as error:
                    if not refuses_autograd_grad(error):
                        raise
                    self._plain_backward = True
                    loss = self._evaluate_loss(self.model)  # the refused backward freed part of the graph
            return self._flatten(gradient_by_backward(loss, self.params, list(self.model.parameters())))

    def _check_gradient_repeats(self) -> None:
        """Two gradients at the same parameters must agree. On FSDP2 they do not when the loss
        closure bypasses the root module's forward (e.g. Lightning's ``training_step`` calling
        ``self.net(x)``): each submodule then acts as a root and part of the gradient reduction lands
        after the backward returns (measured: 5-15% of the gradient, CPU/gloo, torch 2.14).
        Costs one gradient; all ranks decide alike (the difference is summed over them)."""
        first = self._flatten([None if g is None else g.detach() for g in self._grads])
        difference = float(vector_norm(self._gradient_without_graph() - first, self.shard))
        size = float(vector_norm(first, self.shard))
        if difference > torch.finfo(self.dtype).eps ** 0.5 * size:
            raise HessdiagError(
                f"FSDP2: two gradients at the same parameters differ by {difference / max(size, 1e-30):.2g} of their "
                "size, so no Hessian-vector product can be formed. The loss closure must call the root module "
                "(the one `fully_shard` was applied to last) through its forward, `model(...)`, not a submodule: FSDP2 "
                "finishes the gradient reduction only then. In Lightning, define `forward` and call `self(...)` in "
                "`training_step` (or pass `loss_fn=` that does)."
            )

    def _probe_vector(self, seed: int) -> torch.Tensor:
        """A random unit vector, the same on every rank (seeded by `seed`); on a sharded model
        this rank's piece of one."""
        generator = random_generator(seed, self.shard, self.device)
        return start_vector(
            self.size, None, warm_random=0.0, device=self.device, dtype=self.dtype, generator=generator, shard=self.shard
        )

    def _settle_method(self) -> None:
        """Measure finite differences on the probe vector and, for "auto", cross-check double
        backward against them; set `method`, `method_reason` and `product_error`. Runs on every
        rank on global (all-reduced) products, so all ranks decide alike."""
        assert self._probe is not None and self._central is not None
        probe, fine, coarse = self._probe
        self._probe = None
        fine, coarse = self._finish(fine), self._finish(coarse)
        measured = Measurement.of(fine, coarse, self._central.eps, self.shard)
        if self.requested_method == "finite_difference":
            self._use_finite_difference(measured, "asked for")
            return
        if self.shard is not None:
            self._use_finite_difference(measured, "the model is FSDP2-sharded: double backward cannot run through it")
            return
        exact = None
        failure = self._exact_failure
        if failure is None:
            try:
                exact = self._finish(self._double_backward(self._split(probe)))
            except RuntimeError as error:
                if not is_missing_second_derivative(error):
                    raise
                failure = SecondDerivativeError(error, "double_backward")
        if failure is not None:
            self._exact_failure = None
            self._grads = tuple(None if g is None else g.detach() for g in self._grads)
            reason = f"double backward failed: {failure.op or 'an op of the loss'} cannot be differentiated twice"
            self._use_finite_difference(measured, reason)
            return
        if not measured.smooth:
            self._check_symmetry(probe, exact, measured)
            self._use_double_backward("the loss is not smooth, finite differences cannot check double backward; it is symmetric")
            return
        disagreement = float(torch.linalg.vector_norm(exact - fine))
        size = float(torch.linalg.vector_norm(fine))
        # Within the finite differences' own error (x4: it is an estimate) or their rounding floor.
        tolerance = 4 * measured.error + torch.finfo(self.dtype).eps ** 0.5 * size
        if disagreement <= tolerance:
            self._use_double_backward(f"double backward agrees with finite differences ({disagreement / size:.1e} of a product)")
            return
        self._grads = tuple(None if g is None else g.detach() for g in self._grads)
        self._use_finite_difference(
            measured,
            f"double backward is incomplete: it differs from finite differences by {disagreement / size:.2g} of a "
            "product (a backward that is not differentiable, e.g. @once_differentiable or .detach() inside it)",
        )

    def _check_symmetry(self, probe: torch.Tensor, product: torch.Tensor, measured: Measurement) -> None:
        """u.Hw = w.Hu for exact products; a dropped second-order term breaks it. Needs one more
        product (of a second random vector w)."""
        other = self._probe_vector(self.seed + 1)
        other_product = self._finish(self._double_backward(self._split(other)))
        defect = abs(float(probe @ other_product - other @ product))
        scale = float(torch.linalg.vector_norm(product) + torch.linalg.vector_norm(other_product))
        if defect > torch.finfo(self.dtype).eps ** 0.5 * scale:
            raise NonSmoothLossError(
                measured.relative,
                NON_SMOOTH_DISAGREEMENT,
                f" Double backward is incomplete too: u.Hw - w.Hu = {defect:.2g} (of {scale:.2g}) on two random vectors "
                "(a backward that is not differentiable, e.g. @once_differentiable or .detach() inside it), so no "
                "method works here: make that backward differentiable.",
            )

    def _use_double_backward(self, reason: str) -> None:
        self.method = "double_backward"
        self.method_reason = reason
        self._central = None
        self._warn_constant_gradients()

    def _use_finite_difference(self, measured: Measurement, reason: str) -> None:
        if not measured.smooth:
            why = "" if reason == "asked for" else f" Finite differences were needed because {reason}, so no method works here."
            raise NonSmoothLossError(measured.relative, NON_SMOOTH_DISAGREEMENT, why, exact_possible=self.shard is None)
        self.method = "finite_difference"
        self.method_reason = reason
        self.product_error = measured.error

    @property
    def product_error(self) -> float:
        """See the class docstring: the measured error of finite differences (0 for exact products)
        plus the rounding of products in a dtype coarser than float32."""
        return self._measured_error + LOW_PRECISION_ROUNDING * self._rounding_eps * self._largest_product

    @product_error.setter
    def product_error(self, value: float) -> None:
        self._measured_error = float(value)

    def _warn_constant_gradients(self) -> None:
        """A gradient with no graph is constant in the parameters: its Hessian rows are zero. That
        is right for a loss linear in them, and silently wrong behind a backward that is not
        differentiable (``@once_differentiable``), which autograd does not report."""
        constant = [i for i, g in enumerate(self._grads) if g is not None and not g.requires_grad]
        if constant:
            warnings.warn(
                f"The gradient of {len(constant)} parameter tensor(s) (indices {constant[:5]}) does not depend on "
                "the parameters; their Hessian rows are taken as zero. This is exact if the loss is linear in "
                "them, wrong if an op's backward is not differentiable (e.g. @once_differentiable).",
                HessdiagWarning,
                stacklevel=3,
            )

    @property
    def loss(self) -> float:
        """The loss at the current parameters (global batch under data parallelism; the mean
        over ranks on a sharded model)."""
        if self.shard is not None:
            return float(_sharded.mean_over_ranks(self._require_open(self._loss), self.shard))
        value = self._require_open(self._loss) * self._share
        if self._distributed:
            _distributed.all_reduce_sum_(value)
        return float(value.item())

    def gradient(self) -> torch.Tensor:
        """The flat gradient on this batch (global batch under data parallelism; this rank's
        piece on a sharded model)."""
        self._require_open(self._loss)
        flat = self._flatten([None if g is None else g.detach() for g in self._grads])
        return self._finish(flat)

    def loss_along(self, direction: torch.Tensor, step: float) -> float:
        """The loss at theta + step * direction (flat `direction`), same batch and dropout masks.

        Evaluated functionally: the parameters themselves are never written (on a sharded model
        the local shards are shifted in place and restored from a copy, bit-for-bit).
        """
        self._require_open(self._loss)
        offsets = self._split(direction.to(device=self.device, dtype=self.dtype))
        if self.shard is not None:
            assert self._central is not None
            with torch.no_grad():
                value = self._central.evaluate_at(offsets, step, lambda: self._evaluate_loss(self.model).detach())
            return float(_sharded.mean_over_ranks(value, self.shard))
        names = self._parameter_names()
        wrapper = _LossModule(self.model, self.loss_fn, self.batch)
        seed_rng(self.seed, self.device)
        with torch.no_grad():
            moved = {name: p + step * o for name, p, o in zip(names, self.params, offsets)}
            value = torch.func.functional_call(wrapper, moved, ()).detach().reshape(()) * self._share
        if self._distributed:
            _distributed.all_reduce_sum_(value)
        return float(value.item())

    # -- products --------------------------------------------------------------------------
    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """H v for a flat `vector` of shape ``(dim,)``; returns a new tensor of the same shape."""
        self._require_open(self._loss)
        if vector.shape != (self.size,):
            raise ValueError(f"Expected a vector of shape ({self.size},), got {tuple(vector.shape)}.")
        pieces = self._split(vector.to(device=self.device, dtype=self.dtype))
        try:
            if self.method == "double_backward":
                product = self._double_backward(pieces)
            elif self.method == "forward_over_reverse":
                product = self._forward_over_reverse(pieces)
            else:
                assert self._central is not None
                product = self._central.product(pieces)
        except RuntimeError as error:
            if is_missing_second_derivative(error):
                raise SecondDerivativeError(error, self.method) from error
            raise
        self.num_hvps += 1
        product = self._finish(product.to(vector.dtype))
        if self._rounding_eps:  # one norm per product, for low-precision models only
            size = self.norm(vector)
            if size > 0:
                self._largest_product = max(self._largest_product, self.norm(product) / size)
        return product

    def _double_backward(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        outputs, grad_outputs = [], []
        for grad, piece in zip(self._grads, pieces):
            # A gradient that does not require grad is constant in the parameters: zero Hessian rows.
            if grad is not None and grad.requires_grad:
                outputs.append(grad)
                grad_outputs.append(piece)
        if not outputs:
            return torch.zeros(self.dim, device=self.device, dtype=self.dtype)
        products = torch.autograd.grad(
            outputs, self.params, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True
        )
        return self._flatten(products)

    def _forward_over_reverse(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        names = self._parameter_names()
        wrapper = _LossModule(self.model, self.loss_fn, self.batch)

        buffers = {f"model.{name}": b for name, b in self.model.named_buffers(remove_duplicate=False)}

        def loss_of(*values: torch.Tensor) -> torch.Tensor:
            seed_rng(self.seed, self.device)
            # Buffers mutated in the forward (BatchNorm statistics) must be created inside the
            # transform: torch.func refuses to mutate captured tensors.
            state = {name: b.clone() for name, b in buffers.items()} | dict(zip(names, values))
            return torch.func.functional_call(wrapper, state, ())

        gradient = torch.func.grad(loss_of, argnums=tuple(range(len(names))))
        _, products = torch.func.jvp(gradient, tuple(p.detach() for p in self.params), tuple(pieces))
        return self._flatten(products)

    def _parameter_names(self) -> list[str]:
        by_id = {id(p): f"model.{name}" for name, p in self.model.named_parameters(remove_duplicate=False)}
        return [by_id[id(p)] for p in self.params]

    # -- flat <-> per-parameter ------------------------------------------------------------
    def norm(self, flat: torch.Tensor) -> float:
        """The norm of a flat vector (of the whole vector, when `flat` is this rank's piece)."""
        return float(vector_norm(flat, self.shard))

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        pieces = flat.split([p.numel() for p in self._local_params])
        return [piece.view_as(p) for piece, p in zip(pieces, self._local_params)]

    def _flatten(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        return torch.cat(
            [
                torch.zeros(p.numel(), device=self.device, dtype=self.dtype)
                if t is None
                else _dense(_sharded.local(t)).reshape(-1)
                for t, p in zip(tensors, self._local_params)
            ]
        )

    def _finish(self, local: torch.Tensor) -> torch.Tensor:
        if not self._distributed:
            return local
        return _distributed.all_reduce_sum_(local.mul_(self._share))

    def _require_open(self, value: torch.Tensor | None) -> torch.Tensor:
        if value is None:
            raise RuntimeError("The HessianOperator is closed: use it inside `with HessianOperator(...) as H:`.")
        return value


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
        return [t.clone() for t in operator._split(operator.matvec(flat))]


def _enabled_attention_backends() -> list[SDPBackend]:
    """The scaled-dot-product attention backends the user has enabled (math at least)."""
    enabled = [
        backend
        for backend, on in (
            (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled()),
            (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled()),
            (SDPBackend.CUDNN_ATTENTION, torch.backends.cuda.cudnn_sdp_enabled()),
            (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled()),
        )
        if on
    ]
    return enabled or [SDPBackend.MATH]


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """Sparse gradients (``nn.Embedding(sparse=True)``) as dense tensors, for the flat vectors."""
    return tensor.to_dense() if tensor.is_sparse else tensor
