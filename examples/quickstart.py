"""Quick start: the top and bottom Hessian eigenvalues of a small CNN while it trains on real data.

Trains a small convolutional network on scikit-learn's handwritten digits (8x8 images, shipped with
the package, no download) and every 25 steps asks hessdiag for lambda_max and lambda_min of the
training loss on the current batch, warm-starting each check from the previous Ritz vectors.

    python examples/quickstart.py [--steps 150] [--every 25]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import hessdiag


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:  # the demo extra is not installed
        raise SystemExit("This example needs scikit-learn: pip install 'hessdiag[demo]'") from error
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Dropout(0.1), nn.Linear(128, 10),
    )  # fmt: skip


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=25)
    args = parser.parse_args()

    torch.manual_seed(0)
    images, labels = load_digits()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    print(f"CNN with {sum(p.numel() for p in model.parameters())} parameters on {len(images)} digits")
    print(f"{'step':>5} {'loss':>7} {'lambda_max':>11} {'lambda_min':>11} {'HVPs':>5} {'seconds':>8}  negative curvature")
    previous = None
    for step in range(args.steps + 1):
        index = torch.randint(0, len(images), (128,))
        batch = (images[index], labels[index])
        if step % args.every == 0:
            start = time.perf_counter()
            result = hessdiag.hessian_eigenvalues(model, loss_fn, batch, v0=previous)
            seconds = time.perf_counter() - start
            certified = "certified" if result.negative_curvature_certified else "not certified"
            print(
                f"{step:5d} {result.loss:7.4f} {result.lambda_max:11.4f} {result.lambda_min:11.4f} "
                f"{result.num_hvps:5d} {seconds:8.3f}  {certified}"
            )
            previous = result
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()


if __name__ == "__main__":
    main()
