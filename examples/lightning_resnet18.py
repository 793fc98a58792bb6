"""Lightning + ResNet-18 (torchvision, 3x3 stem, no max-pool) on 32x32 images with HessianDiagnostics.

The images are `torchvision.datasets.FakeData` (no download); swap in CIFAR-10 for a real run. The
curvature check uses the first `--sub-batch` samples of the batch: a check costs about 4x a
gradient per Hessian-vector product, so a sub-batch keeps it cheap at a cadence of hundreds of steps.

    python examples/lightning_resnet18.py --steps 2000 --check-every 200
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from models import resnet18_cifar
from pytorch_lightning.loggers import TensorBoardLogger

from hessdiag.callbacks import HessianDiagnostics


class ImageClassifier(pl.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.model = resnet18_cifar()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self.model(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss  # HessianDiagnostics re-runs training_step (logging muted) as its loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--check-every", type=int, default=200)
    parser.add_argument("--sub-batch", type=int, default=64)
    parser.add_argument("--logdir", default="runs/resnet18")
    parser.add_argument("--smoke", action="store_true", help="a few tiny steps, for the tests")
    args = parser.parse_args()
    max_iter = None  # Lanczos' default
    if args.smoke:
        args.steps, args.batch_size, args.check_every, args.sub_batch, max_iter = 2, 8, 2, 4, 6

    transform = torchvision.transforms.ToTensor()
    data = torchvision.datasets.FakeData(size=args.batch_size * 8, image_size=(3, 32, 32), num_classes=10, transform=transform)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True)
    trainer = pl.Trainer(
        max_steps=args.steps, precision="bf16-mixed" if torch.cuda.is_available() else "32-true",
        logger=TensorBoardLogger(args.logdir), log_every_n_steps=min(50, args.steps), enable_checkpointing=False,
        callbacks=[HessianDiagnostics(check_every=args.check_every, sub_batch=args.sub_batch, max_iter=max_iter)],
    )  # fmt: skip
    trainer.fit(ImageClassifier(), loader)


if __name__ == "__main__":
    main()
