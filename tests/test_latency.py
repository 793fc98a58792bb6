"""Detection latency is counted in optimizer steps: a flag's onset carries the step it became true,
whatever `log_every` is, and is known at the first read-back after it."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from hessdiag import Monitor
from hessdiag.callbacks import HessianDiagnostics

DEATH_STEP = 50


def mlp():
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def kill(net):
    """Every unit of the second ReLU stops firing: the layers below it get exactly zero gradient."""
    with torch.no_grad():
        net[2].bias.fill_(-100.0)


def data(n=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=generator)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def train_loop(log_every, steps=80, diverge_at=None):
    """A hand-written loop whose network dies after step DEATH_STEP (or whose lr explodes at `diverge_at`)."""
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = Monitor(model, optimizer=optimizer, check_every=0, log_every=log_every)
    x, y = data()
    for step in range(1, steps + 1):
        if diverge_at is None and step == DEATH_STEP + 1:
            kill(model)
        if diverge_at is not None and step == diverge_at:
            optimizer.param_groups[0]["lr"] = 1e3
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        monitor.after_backward()
        optimizer.step()
        monitor.after_step(None, loss)
    monitor.flush()
    return monitor


def onsets(monitor, name):
    return [e.step for e in monitor.events if e.name == name and e.kind == "onset"]


@pytest.mark.parametrize("name, diverge_at", [("vanishing", None), ("exploding", 60)])
def test_onset_step_does_not_depend_on_log_every(name, diverge_at):
    reference = onsets(train_loop(1, diverge_at=diverge_at), name)
    assert reference, f"no {name} onset with log_every=1"
    first = reference[0]
    if name == "vanishing":  # dead from step 51; the default onset asks for 5 steps in a row
        assert first == DEATH_STEP + 5
    else:
        assert diverge_at <= first <= diverge_at + 10
    for log_every in (7, 50):
        assert onsets(train_loop(log_every, diverge_at=diverge_at), name)[:1] == [first], log_every


class DyingClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp()

    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer.global_step == DEATH_STEP:
            kill(self.net)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_network_dead_at_step_50_is_flagged_by_step_100_with_lightning_defaults(tmp_path):
    seen = []  # (event, trainer.global_step when on_flag was called)
    callback = HessianDiagnostics(check_every=1000, on_flag=lambda event, trainer, module: seen.append((event, trainer.global_step)))
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=100, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    assert trainer.log_every_n_steps == 50  # Lightning's default: one read-back per 50 steps
    trainer.fit(DyingClassifier(), loader)
    (event, known_at), *_ = [(e, at) for e, at in seen if e.name == "vanishing"]
    assert event.kind == "onset" and event.step == DEATH_STEP + 5 and event.evidence["dead_layers"] >= 1
    assert known_at == 100  # the read-back at step 100, not the end of training
    assert trainer.callback_metrics["hessdiag/flags/vanishing"] == 1.0
