"""Float64 references for the estimators: dense Hessians and finite differences.

`torch.autograd.functional.hessian` (looped double backward) is the dense reference; never
`torch.func.hessian`, whose vmap rule is wrong through LayerNorm (DESIGN.md).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _loss_of_flat(model: nn.Module, loss_fn, batch, seed: int, mode: str = "train"):
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in model.named_parameters() if p.requires_grad]
    sizes = [s.numel() for s in shapes]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        values = [piece.view(shape) for piece, shape in zip(flat.split(sizes), shapes)]
        torch.manual_seed(seed)
        return loss_fn(_Swapped(model, dict(zip(names, values))), batch)

    model.train(mode == "train")
    return loss_of


class _Swapped(nn.Module):
    """Calls `model` with its parameters replaced by `values` (functional_call), so a closure that
    takes a model can be differentiated with respect to a flat vector."""

    def __init__(self, model: nn.Module, values: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.inner = model
        self.values = values

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.inner, self.values, args, kwargs)


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def dense_hessian(model: nn.Module, loss_fn, batch, *, seed: int = 0, mode: str = "train") -> torch.Tensor:
    """The full Hessian (dim x dim) by looped double backward, on a copy of the model."""
    model = copy.deepcopy(model)
    with torch.random.fork_rng():
        hessian = torch.autograd.functional.hessian(_loss_of_flat(model, loss_fn, batch, seed, mode), flat_parameters(model))
    return hessian


def finite_difference_hvp(model: nn.Module, loss_fn, batch, vector: torch.Tensor, *, eps: float = 1e-5, seed: int = 0):
    """(g(theta + eps v) - g(theta - eps v)) / (2 eps), central differences of the gradient."""
    model = copy.deepcopy(model)
    loss_of = _loss_of_flat(model, loss_fn, batch, seed)
    theta = flat_parameters(model)

    def gradient(point: torch.Tensor) -> torch.Tensor:
        point = point.clone().requires_grad_(True)
        with torch.random.fork_rng():
            (grad,) = torch.autograd.grad(loss_of(point), point)
        return grad

    return (gradient(theta + eps * vector) - gradient(theta - eps * vector)) / (2 * eps)


def matrix_with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Q diag(eigenvalues) Q^T with a random orthogonal Q; returns (A, Q)."""
    n = eigenvalues.numel()
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q @ torch.diag(eigenvalues.to(torch.float64)) @ q.T, q
