"""A Lightning fit with ModelParallelStrategy + `fully_shard` on two CPU processes (gloo), with
HessianDiagnostics. Run as a script by tests/test_fsdp.py: Lightning's launcher re-runs this file
for the second rank, which pytest cannot host.

The usual FSDP2 recipe for a language model: each block sharded, then the whole module, so that the
embeddings, the final norm and the head sit in the root's group.

Usage: python fsdp_lightning_run.py LOGDIR [self|submodule] (see `Trainee`).
"""

import sys

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

from hessdiag.callbacks import HessianDiagnostics

VOCAB, WIDTH, LENGTH = 7, 4, 3


class LanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH), nn.GELU()) for _ in range(2))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        hidden = self.embedding(tokens)
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return self.head(self.norm(hidden))


class Trainee(pl.LightningModule):
    """`call` "self": blocks sharded, embedding, norm and head in the root's group, the training
    step through ``self(...)``; "submodule": the language model sharded as a whole inside the root
    (which owns no parameter), the training step calling ``self.lm(...)``, bypassing the root."""

    def __init__(self, call: str) -> None:
        super().__init__()
        self.call = call
        self.lm = LanguageModel()

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for block in self.lm.blocks:
            fully_shard(block, mesh=mesh)
        if self.call == "submodule":
            fully_shard(self.lm, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, tokens):
        return self.lm(tokens)

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        logits = self(tokens) if self.call == "self" else self.lm(tokens)
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(logdir: str, call: str) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (64, LENGTH), generator=generator)
    data = torch.utils.data.TensorDataset(tokens, torch.randint(0, VOCAB, (64, LENGTH), generator=generator))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=6, limit_val_batches=0, log_every_n_steps=1, logger=TensorBoardLogger(logdir, name="", version=""),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[HessianDiagnostics(check_every=3, strict=True)],
    )  # fmt: skip
    trainer.fit(Trainee(call), torch.utils.data.DataLoader(data, batch_size=8))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "self")
