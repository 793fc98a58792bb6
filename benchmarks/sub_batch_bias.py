"""How much a sub-batch overstates the sharpness: lambda_max of the parts of a batch against the whole.

lambda_max is convex in the Hessian, so E lambda_max(H_part) >= lambda_max(H_batch): a curvature
check on a sub-batch reads the edge-of-stability ratio high. This is why checks use the whole
training batch by default. Model: an MLP on scikit-learn's digits after 200 SGD steps.

    python benchmarks/sub_batch_bias.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import hessdiag


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def main() -> None:
    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(200):
        index = torch.randint(0, len(x), (128,))
        optimizer.zero_grad()
        cross_entropy(model, (x[index], y[index])).backward()
        optimizer.step()
    batch = torch.randperm(len(x))[:128]
    whole = hessdiag.hessian_eigenvalues(model, cross_entropy, (x[batch], y[batch]), tol=1e-6).lambda_max
    print(f"lambda_max of the batch of 128: {whole:.4f}")
    for size in (64, 32, 16):
        parts = [batch[start : start + size] for start in range(0, len(batch), size)]
        values = [hessdiag.hessian_eigenvalues(model, cross_entropy, (x[p], y[p]), tol=1e-6).lambda_max for p in parts]
        print(f"  mean over its {len(parts)} parts of {size:3d}: {sum(values) / len(values) / whole:.3f}x")


if __name__ == "__main__":
    main()
