"""The Hessian of a loss closure as a linear operator (curvlinops' shape: one module per job).

* :mod:`~hessdiag.operator.parameter_space`: the chosen parameters and their flat vectors (split, flatten,
  norms, shards, the data-parallel batch share).
* :mod:`~hessdiag.operator.closure`: the user's loss closure, evaluated alike every time, part by part.
* :mod:`~hessdiag.operator.loss`: the loss on one batch and its gradient.
* One module per product method: :mod:`~hessdiag.operator.double_backward`,
  :mod:`~hessdiag.operator.forward_over_reverse`, :mod:`~hessdiag.operator.finite_difference`.
* :mod:`~hessdiag.operator.auto`: the ``"auto"`` choice of method, with its reason and error.
* :mod:`~hessdiag.operator.hessian`: :class:`HessianOperator`, which dispatches products.
* :mod:`~hessdiag.operator.block`: :class:`HessianBlock`, a diagonal block of it (some parameters only).

Nothing here imports the solver (:mod:`hessdiag.lanczos`); the vector plumbing both use lives in
:mod:`hessdiag.vectors`.
"""

from hessdiag.operator.block import HessianBlock
from hessdiag.operator.auto import MethodChoice, choose_method, finite_differences
from hessdiag.operator.double_backward import DoubleBackward
from hessdiag.operator.finite_difference import NON_SMOOTH_DISAGREEMENT, CentralDifference, Measurement, step_size
from hessdiag.operator.forward_over_reverse import ForwardOverReverse
from hessdiag.operator.hessian import EXACT_METHODS, HVP_METHODS, HessianOperator, HVPMethod, hessian_vector_product
from hessdiag.operator.rounding import LOW_PRECISION_ROUNDING, PRECISION_FLOOR, ProductRounding, is_coarse
from hessdiag.operator.closure import LossFn, LossModule
from hessdiag.operator.loss import BatchLoss, enabled_attention_backends, gradient_by_backward
from hessdiag.operator.parameter_space import ParameterSpace, refuse_coarse_compute, trainable_parameters

__all__ = [
    # the operator
    "HessianOperator",
    "hessian_vector_product",
    "HessianBlock",
    "HVPMethod",
    "HVP_METHODS",
    "EXACT_METHODS",
    "LOW_PRECISION_ROUNDING",
    "PRECISION_FLOOR",
    "ProductRounding",
    "is_coarse",
    # the parameter space
    "ParameterSpace",
    "trainable_parameters",
    "refuse_coarse_compute",
    # the loss
    "LossFn",
    "BatchLoss",
    "LossModule",
    "gradient_by_backward",
    "enabled_attention_backends",
    # product methods
    "DoubleBackward",
    "ForwardOverReverse",
    "CentralDifference",
    "Measurement",
    "NON_SMOOTH_DISAGREEMENT",
    "step_size",
    # the "auto" choice
    "choose_method",
    "finite_differences",
    "MethodChoice",
]
