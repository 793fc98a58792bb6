"""Where a direction in parameter space lives: the share of its squared norm in each module.

For a flat vector v over the Hessian's parameters (a Ritz vector of :func:`hessian_eigenvalues`,
say), ``layer_shares(model, v)`` gives, per module, sum over the module's own parameters of
||v_p||^2 divided by ||v||^2: dimensionless, non-negative, summing to 1. For a unit eigenvector of
the Hessian it is the fraction of that direction that moves m's parameters, which is what "the
sharpest direction lies 71% in ``layer4.1.conv2``" means (not a share of the eigenvalue: the
cross terms between modules are not split). Exact for the vector given (rounding aside, float64 sums);
how well it describes the true eigenvector depends on the vector's own accuracy (a Ritz vector with
residual r and gap g to the next eigenvalue is within about r/g of it in angle).

Cost: one pass over the vector (a squared-norm per parameter tensor, float64) and one host read; under
FSDP2 one all-reduce of one float64 per module. No Hessian-vector product, no forward or backward.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hessdiag import _sharded
from hessdiag.isolation import unwrap_model
from hessdiag.operator import trainable_parameters
from hessdiag.steps.gradients import module_name

#: Modules kept per end of the spectrum in a check's layer shares (the dashboard's budget).
SHARES_KEPT = 5


def module_label(name: str) -> str:
    """The name to show for an owner `name`; ``"(root)"`` for the empty name, under which checkpoints
    of earlier versions kept the root's own parameters (see :func:`parameter_owners`)."""
    return name if name else "(root)"


def parameter_owners(model: nn.Module, params: Iterable[torch.Tensor]) -> list[str]:
    """The owner of each of `params`, in order: the qualified name of the module it is registered on
    (``"layer1.0.conv1"``), or, for a parameter registered on the root itself, its own name
    (``"pos_embed"``): the rule of the per-layer gradient statistics
    (:func:`hessdiag.steps.gradients.module_name`), so the layer shares and the per-layer charts name
    the same groups, and two root parameters (a position embedding, a class token) are told apart.

    A tied parameter (one tensor registered on several modules) belongs to the first of them in
    ``model.named_parameters()`` order, the name under which ``model.parameters()`` yields it once.
    """
    owner_of: dict[int, str] = {}
    for name, p in unwrap_model(model).named_parameters():  # remove_duplicate=True: first name of a tied tensor
        owner_of[id(p)] = module_name(name)
    return [owner_of[id(p)] for p in params]


def layer_shares(
    model: nn.Module, vector: torch.Tensor, params: Iterable[torch.Tensor] | None = None
) -> dict[str, float]:
    """The share of `vector`'s squared norm in each module, most first.

    Args:
        model: the network (DDP, DataParallel and ``torch.compile`` wrappers are unwrapped).
        vector: a flat vector over the parameters in the order :func:`hessian_eigenvalues` uses:
            `params`, or every trainable parameter of the model in ``model.parameters()`` order
            (tied tensors once); e.g. ``result.top_vectors[0]``. On an FSDP2-sharded model this
            rank's pieces (the concatenated local shards, as the Ritz vectors are there); under DDP
            the whole vector, the same on every rank.
        params: the parameters the vector is over (default: all trainable ones), as passed to
            :func:`hessian_eigenvalues`.

    Returns:
        ``{module_name: share}``: one entry per module that owns at least one of the parameters,
        keyed by its owner (:func:`parameter_owners`: ``"layer4.1.conv2"``; a parameter on the root
        module under its own name), shares >= 0 summing to 1
        (up to rounding), sorted by share, largest first (ties in module order). Only a module's
        own parameters count toward it, not its children's. The same on every rank.

    Raises:
        ValueError: bad `params` (see :func:`hessdiag.operator.trainable_parameters`); `vector` is not
            1-D of this rank's number of coordinates; `vector` is zero or not finite.
    """
    model = unwrap_model(model)
    params = None if params is None else list(params)
    if params is not None and _sharded.is_sharded(params):
        # After a forward, an FSDP2 group that keeps its gathered parameters (the root's) has them
        # registered in place of the sharded ones the vector is over: free them, as a backward does.
        _sharded.reshard(model)
    chosen = trainable_parameters(model, params)
    pieces = [_sharded.local(p) for p in chosen]
    size = sum(p.numel() for p in pieces)
    if not isinstance(vector, torch.Tensor) or vector.dim() != 1 or vector.numel() != size:
        shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
        raise ValueError(
            f"`vector` must be a flat tensor of shape ({size},) over the chosen parameters (this rank's pieces on "
            f"an FSDP2-sharded model), got {shape}; pass one Ritz vector, e.g. `result.top_vectors[0]`."
        )
    owners = parameter_owners(model, chosen)
    names = list(dict.fromkeys(owners))  # module order of first appearance
    index = torch.tensor([names.index(owner) for owner in owners], device=vector.device)
    squares = torch.stack([piece.double().square().sum() for piece in vector.split([p.numel() for p in pieces])])
    per_module = torch.zeros(len(names), dtype=torch.float64, device=vector.device).index_add_(0, index, squares)
    if _sharded.is_sharded(chosen):
        # Each rank holds its own rows of every parameter: the whole squares are the sums over ranks.
        per_module = _sharded.vector_shard(chosen).sum_(per_module)
    values = per_module.tolist()  # the one host read
    total = sum(values)
    if not (total > 0 and total < float("inf")):
        raise ValueError(f"`vector` must be non-zero and finite to have shares; its squared norm is {total}.")
    order = sorted(range(len(names)), key=lambda i: -values[i])  # stable: ties keep module order
    return {names[i]: values[i] / total for i in order}
