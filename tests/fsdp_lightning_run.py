"""A Lightning fit with ModelParallelStrategy + `fully_shard` on two CPU processes (gloo), with
HessianDiagnostics. Run as a script by tests/test_fsdp.py: Lightning's launcher re-runs this file
for the second rank, which pytest cannot host. Usage: python fsdp_lightning_run.py LOGDIR"""

import sys

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

from hessdiag.callbacks import HessianDiagnostics


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3))

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)  # through the root's forward: FSDP2 then completes the gradient

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(logdir: str) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=generator), torch.randint(0, 3, (64,), generator=generator))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=6, limit_val_batches=0, log_every_n_steps=1, logger=TensorBoardLogger(logdir, name="", version=""),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[HessianDiagnostics(check_every=3, strict=True)],
    )  # fmt: skip
    trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=8))


if __name__ == "__main__":
    main(sys.argv[1])
