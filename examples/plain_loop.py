"""hessdiag in a hand-written PyTorch loop: `hessdiag.Monitor` with a TensorBoard SummaryWriter.

    python examples/plain_loop.py --logdir runs/plain-loop      # then: tensorboard --logdir runs
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import hessdiag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/plain-loop")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--smoke", action="store_true", help="a few steps, for the tests")
    args = parser.parse_args()
    steps, check_every = (20, 10) if args.smoke else (args.steps, 50)

    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16
    labels = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    writer = SummaryWriter(args.logdir)
    monitor = hessdiag.Monitor(model, loss_fn, optimizer=optimizer, writer=writer, check_every=check_every, log_every=10)
    for step in range(steps):
        index = torch.randint(0, len(images), (64,))
        batch = (images[index], labels[index])
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        monitor.after_backward()  # gradients are final here; nothing is read back from the device
        optimizer.step()
        for event in monitor.after_step(batch, loss):  # every 50 steps: a curvature check on this batch
            print(f"step {event.step}: {event.name} {event.kind}: {event.summary}")
    monitor.flush()
    writer.close()
    check = monitor.last_check
    print(f"last check at step {check.step}: lambda_max {check.lambda_max:.4g}, lambda_min {check.lambda_min:.4g}, "
          f"sharpness / (2+2β)/lr = {check.stability_ratio:.3f}; active flags: {monitor.active_flags or 'none'}")


if __name__ == "__main__":
    main()
