"""Multi-GPU data parallel with the Lightning callback.

Under DDP each rank computes the Hessian-vector product of its shard and one all-reduce (weighted by
the local batch sizes) makes it the product of the global-batch loss: every rank gets the same
eigenvalues and decides the same flags; only rank 0 logs.

    python examples/ddp.py --devices 4                  # Lightning starts the processes
    torchrun --nproc_per_node 4 examples/ddp.py --devices 4   # or let torchrun start them

On a machine without GPUs `--accelerator cpu --devices 2` runs the same code with the gloo backend.
For a hand-written DDP loop, `hessdiag.Monitor` does the same (call it on every rank; give the writer
on rank 0 only).
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from hessdiag.callbacks import HessianDiagnostics


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=torch.cuda.device_count() or 2)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--logdir", default="runs/ddp")
    parser.add_argument("--smoke", action="store_true", help="a few steps, for the tests")
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = torch.utils.data.TensorDataset(torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target))
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    steps = 6 if args.smoke else args.steps
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=args.devices, strategy="ddp", max_steps=steps,
        logger=TensorBoardLogger(args.logdir), log_every_n_steps=min(10, steps), enable_checkpointing=False,
        enable_progress_bar=not args.smoke, callbacks=[HessianDiagnostics(check_every=3 if args.smoke else 100)],
    )  # fmt: skip
    trainer.fit(Classifier(), loader)
    if trainer.is_global_zero:
        print(f"rank 0 done: {len(trainer.callbacks[0].monitor.checks)} curvature checks")  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
