"""The Lightning callback under manual optimisation (``automatic_optimization = False``): the step's
loss is read where Lightning has it (what ``training_step`` returns, else what it logged this step),
and a run without one is told what to return, in Lightning's terms, once."""

import glob
import os
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from hessdiag.callbacks import HessianDiagnostics


def loader(n=96, batch_size=16):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=generator)
    y = (x[:, 0] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def fit(tmp_path, module, max_steps, **settings):
    """Fit on the CPU with the callback reading back every step; returns the callback and the
    hessdiag warnings."""
    pl.seed_everything(0)
    callback = HessianDiagnostics(check_every=0, log_every=1, **settings)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, limit_val_batches=0, log_every_n_steps=1,
        logger=TensorBoardLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader())
    return callback, [str(w.message) for w in caught if str(w.message).startswith("hessdiag:")]


def logged_losses(log_dir):
    """The `hessdiag/loss` scalars by step."""
    (directory,) = {os.path.dirname(f) for f in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True)}
    accumulator = EventAccumulator(directory, size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    if "hessdiag/loss" not in tags:
        return {}
    return {event.step: event.value for event in accumulator.Scalars("hessdiag/loss")}


class Manual(pl.LightningModule):
    """One optimizer stepped by hand; `give` says how the step hands its loss to Lightning."""

    def __init__(self, give, accumulate=1):
        super().__init__()
        self.automatic_optimization = False
        self.give, self.accumulate = give, accumulate
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
        self.losses = []  # every batch's loss, in order

    def hessdiag_loss(self, batch):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = self.hessdiag_loss(batch)
        self.manual_backward(loss)
        if (batch_idx + 1) % self.accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
        self.losses.append(loss.item())
        if self.give == "tensor":
            return loss
        if self.give == "dict":
            return {"loss": loss, "accuracy": torch.tensor(0.5)}
        if self.give == "log":
            self.log("train_loss", loss)
            self.log("accuracy", 0.5)
        if self.give == "log_each_epoch":  # only an epoch mean: no step's own loss
            self.log("loss", loss, on_step=False, on_epoch=True)
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("give", ["tensor", "dict", "log"])
def test_the_step_loss_is_read_where_lightning_has_it(tmp_path, give):
    module = Manual(give)
    callback, warned = fit(tmp_path, module, max_steps=8)
    assert not [w for w in warned if "no loss" in w], warned
    assert callback.monitor.step == 8
    logged = logged_losses(tmp_path)
    assert sorted(logged) == list(range(1, 9))
    assert [logged[step] for step in range(1, 9)] == pytest.approx(module.losses, rel=1e-6)


def test_the_loss_of_a_step_over_several_batches_is_their_mean(tmp_path):
    module = Manual("log", accumulate=2)
    callback, warned = fit(tmp_path, module, max_steps=3)
    assert not [w for w in warned if "no loss" in w], warned
    logged = logged_losses(tmp_path)
    means = [(a + b) / 2 for a, b in zip(module.losses[::2], module.losses[1::2])]
    assert [logged[step] for step in (1, 2, 3)] == pytest.approx(means, rel=1e-6)


@pytest.mark.parametrize("give", [None, "log_each_epoch"])
def test_a_step_without_its_own_loss_is_told_what_to_return_once(tmp_path, give):
    # 12 steps of 6 batches: the second epoch's steps find the first epoch's mean under "loss", and
    # must not take it for their own loss.
    callback, warned = fit(tmp_path, Manual(give), max_steps=12)
    assert logged_losses(tmp_path) == {}
    (message,) = [w for w in warned if "no loss" in w]
    assert "`training_step` returned no loss and logged none with `self.log`" in message
    assert "return {'loss': loss" in message and "self.log('loss', loss)" in message
    assert "after_step" not in message  # the hand-written loop's call, which a Lightning user never writes


class GAN(pl.LightningModule):
    """A generator and a discriminator, each with its optimizer, stepped by hand in one training step."""

    def __init__(self, give):
        super().__init__()
        self.automatic_optimization = False
        self.give = give
        self.generator, self.discriminator = nn.Linear(4, 6), nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
        self.d_losses = []

    def discriminator_loss(self, real):
        fake = self.generator(torch.randn(len(real), 4)).detach()
        return F.softplus(-self.discriminator(real)).mean() + F.softplus(self.discriminator(fake)).mean()

    def hessdiag_loss(self, batch):
        return self.discriminator_loss(batch[0])

    def training_step(self, batch, batch_idx):
        g_optimizer, d_optimizer = self.optimizers()
        d_loss = self.discriminator_loss(batch[0])
        d_optimizer.zero_grad()
        self.manual_backward(d_loss)
        d_optimizer.step()
        g_loss = F.softplus(-self.discriminator(self.generator(torch.randn(len(batch[0]), 4)))).mean()
        g_optimizer.zero_grad()
        self.manual_backward(g_loss)
        g_optimizer.step()
        self.d_losses.append(d_loss.item())
        self.log_dict({"d_loss": d_loss, "g_loss": g_loss})
        return {"loss": d_loss} if self.give == "dict" else None

    def configure_optimizers(self):
        generator, discriminator = self.generator.parameters(), self.discriminator.parameters()
        return torch.optim.Adam(generator, 1e-3), torch.optim.Adam(discriminator, 1e-3)


def test_a_gan_returning_its_loss_has_it_at_every_training_step(tmp_path):
    module = GAN("dict")
    # Lightning's global_step counts both optimizers' steps: 8 is four training steps, four records.
    callback, warned = fit(tmp_path, module, max_steps=8)
    assert not [w for w in warned if "no loss" in w], warned
    assert callback.monitor.step == 4
    logged = logged_losses(tmp_path)
    assert sorted(logged) == [1, 2, 3, 4]
    assert [logged[step] for step in (1, 2, 3, 4)] == pytest.approx(module.d_losses, rel=1e-6)


def test_a_gan_logging_two_losses_is_asked_which_one_to_watch(tmp_path):
    callback, warned = fit(tmp_path, GAN(None), max_steps=8)
    assert logged_losses(tmp_path) == {}  # neither is guessed
    (message,) = [w for w in warned if "no loss" in w]
    assert "logged several (d_loss, g_loss)" in message and "return {'loss': loss" in message
    assert "after_step" not in message
