"""Per-module sharpness: lambda_max of a module's own diagonal block of the Hessian.

For a module m (its own parameters, as :func:`~hessdiag.estimators.layer_shares` groups them), H_mm is the
Hessian of the loss as a function of m's parameters alone, the rest of the network held fixed. Its
top eigenvalue says how sharp the loss is along m by itself: "`layer4.1.conv2` alone has lambda_max
380 of the whole 412". By Cauchy interlacing it never exceeds the whole lambda_max, and it equals it
when the top eigenvector lies entirely in m; a layer share says where the top direction lies, the
block's lambda_max how much curvature the module holds without the others.

Computed by the same certified Lanczos as :func:`~hessdiag.hessian_eigenvalues`, on the block
(:class:`~hessdiag.operator.HessianBlock`): products of the whole operator with vectors zero outside
m, read back on m's coordinates. Each result carries its proven bound, `converged` and its products.

Cost per module: the Lanczos products to the top's tolerance (each a product of the whole network,
not of the module), measured 12-16 at tol 1e-3 on a small MLP; with finite-difference products, 4
more to re-measure the two ends along their Ritz vectors. :func:`module_sharpness` adds one forward
and backward (and ``"auto"``'s cross-check) for the operator; a check reuses its open one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hessdiag.isolation import ModelMode
from hessdiag.estimators.eigen import HessianEigenvalues, eigenvalues_of
from hessdiag.estimators.layer_shares import parameter_owners
from hessdiag.operator import HVP_METHODS, HessianBlock, HessianOperator, HVPMethod, LossFn
from hessdiag.lanczos import MemoryBudget


@dataclass(frozen=True)
class ModuleSharpness:
    """A check's lambda_max of one module's diagonal block (python values, for the record).

    Attributes:
        module: the module's qualified name (``""`` for the root's own parameters).
        lambda_max: the block's top Ritz value.
        error_bound: its proven bound (an eigenvalue of the block lies within it).
        converged: the bound is within the check's `tol`, relative to the value.
        num_hvps: products spent on this module.
    """

    module: str
    lambda_max: float
    error_bound: float
    converged: bool
    num_hvps: int

    @classmethod
    def of(cls, module: str, result: HessianEigenvalues) -> ModuleSharpness:
        """The record of `module`'s block from its :class:`~hessdiag.HessianEigenvalues`."""
        return cls(module, result.lambda_max, float(result.error_bounds["top"][0]), result.converged, result.num_hvps)


def module_block(operator: HessianOperator, module: str) -> HessianBlock:
    """The diagonal block of an open `operator` over `module`'s own parameters among its parameters.

    Raises:
        ValueError: no parameter of the operator belongs to `module` (naming the modules that own some).
    """
    owners = parameter_owners(operator.model, operator.params)
    own = [p for p, owner in zip(operator.params, owners) if owner == module]
    if not own:
        known = ", ".join(repr(owner) for owner in dict.fromkeys(owners))
        raise ValueError(
            f"`modules`: {module!r} owns none of the parameters the Hessian is over; the modules that do are {known}."
        )
    return HessianBlock(operator, own)


def module_sharpness_of(
    operator: HessianOperator,
    modules: Sequence[str],
    *,
    tol: float = 1e-3,
    max_iter: int | None = None,
    seed: int = 0,
    v0: torch.Tensor | None = None,
    memory_budget: MemoryBudget = None,
) -> dict[str, HessianEigenvalues]:
    """:func:`module_sharpness` on an open operator (a check's, whose graph it reuses).

    `v0`: a vector over the whole operator (the top Ritz vector, say) whose restriction to each module
    warm-starts that module's Lanczos (with its random part, see :mod:`hessdiag.lanczos.start`); None: cold.
    `memory_budget`: where each module's Lanczos basis lives (see :mod:`hessdiag.lanczos.basis`).
    """
    results = {}
    for module in _checked_modules(modules):
        block = module_block(operator, module)
        start = None if v0 is None else block.restrict(v0)
        results[module] = eigenvalues_of(
            block, which="top", tol=tol, max_iter=max_iter, v0=start, seed=seed, memory_budget=memory_budget
        )
    return results


def module_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    modules: Sequence[str],
    *,
    tol: float = 1e-3,
    max_iter: int | None = None,
    params: Iterable[torch.Tensor] | None = None,
    mode: ModelMode = "as_is",
    hvp_method: HVPMethod = "auto",
    seed: int = 0,
    batch_size: int | None = None,
) -> dict[str, HessianEigenvalues]:
    """lambda_max of each module's own diagonal block of the Hessian of ``loss_fn(model, batch)``.

    Example::

        shares = hessian_eigenvalues(model, loss_fn, batch).layer_shares("top")
        blocks = module_sharpness(model, loss_fn, batch, list(shares)[:3])
        blocks["layer4.1.conv2"].lambda_max, blocks["layer4.1.conv2"].error_bounds["top"]

    Args:
        model, loss_fn, batch, params, mode, hvp_method, seed, batch_size: as for
            :func:`~hessdiag.hessian_eigenvalues`; the block of a module is over its own parameters
            among `params`.
        modules: the owners of parameters, as :func:`~hessdiag.estimators.layer_shares` keys them
            (qualified module names; a parameter registered on the root under its own name).
        tol, max_iter: for each module's Lanczos, as for :func:`~hessdiag.hessian_eigenvalues`
            (only the top end must converge).

    Returns:
        ``{module: HessianEigenvalues}`` in the order of `modules`: each the result of the certified
        Lanczos on the module's block H_mm (``lambda_max``, ``error_bounds["top"]``, ``converged``,
        ``num_hvps``; its vectors over the module's coordinates). Cost: one forward and backward for
        the operator (plus ``"auto"``'s cross-check), then each module's products (module docstring).

    Raises:
        ValueError: `modules` is not a non-empty sequence of distinct names, or names a module that
            owns none of the parameters; the errors of :func:`~hessdiag.hessian_eigenvalues`.
    """
    modules = _checked_modules(modules)
    if hvp_method not in HVP_METHODS:
        raise ValueError(f"`hvp_method` must be one of {HVP_METHODS}, got {hvp_method!r}.")
    operator = HessianOperator(
        model, loss_fn, batch, params=params, mode=mode, method=hvp_method, seed=seed, batch_size=batch_size
    )
    with operator:
        return module_sharpness_of(operator, modules, tol=tol, max_iter=max_iter, seed=seed)


def _checked_modules(modules: Any) -> list[str]:
    """`modules` as a list of distinct names, or ValueError naming `modules`."""
    if isinstance(modules, str) or not isinstance(modules, Sequence) or not modules:
        raise ValueError(f"`modules` must be a non-empty list of module names, got {modules!r}.")
    if not all(isinstance(name, str) for name in modules):
        raise ValueError(f"`modules` must hold module names (str), got {list(modules)!r}.")
    if len(set(modules)) != len(modules):
        raise ValueError(f"`modules` names a module twice: {list(modules)!r}.")
    return list(modules)
