"""A ModelCheckpoint on a value of the curvature checks saves at its own cadence, on the value of the
last check: such values exist only at checks, and the callback keeps them in
``trainer.callback_metrics`` until the next one."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from hessdiag.callbacks import HessianDiagnostics


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 10, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


@pytest.mark.parametrize("watched", ["hessdiag/lambda_max", "hessdiag/sharpness"])
def test_a_checkpoint_every_5_steps_saves_on_the_last_checks_value(tmp_path, watched):
    diagnostics = HessianDiagnostics(check_every=12)
    keeper = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=watched, mode="min", save_top_k=-1, every_n_train_steps=5)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=30, limit_val_batches=0, log_every_n_steps=1, logger=TensorBoardLogger(tmp_path),
        enable_checkpointing=True, enable_progress_bar=False, enable_model_summary=False, callbacks=[diagnostics, keeper],
    )  # fmt: skip
    trainer.fit(Classifier(), loader())
    checks = diagnostics.monitor.checks
    assert [c.step for c in checks] == [1, 12, 24]  # the watched value exists from the first step
    value = {"hessdiag/lambda_max": lambda c: c.lambda_max, "hessdiag/sharpness": lambda c: c.sharpness}[watched]
    saved = {int(path.split("step=")[1].split(".")[0]): float(score) for path, score in keeper.best_k_models.items()}
    assert sorted(saved) == [5, 10, 15, 20, 25, 30]
    for step, score in saved.items():
        last = [c for c in checks if c.step <= step][-1]
        assert score == pytest.approx(value(last), rel=1e-6), step
