"""`hessdiag.callbacks.loss_closure`: which loss a check differentiates, with the user's logging muted."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn

from hessdiag.callbacks.loss_closure import loss_closure, muted_logging, training_step_loss

BATCH = (torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0, 1]))


class Classifier(pl.LightningModule):
    def __init__(self, output="tensor"):
        super().__init__()
        self.net = nn.Linear(3, 2)
        self.output = output

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("loss", loss)
        return {"tensor": loss, "dict": {"loss": loss}, "none": None}[self.output]


class WithHook(Classifier):
    def hessdiag_loss(self, batch):
        return 2 * F.cross_entropy(self.net(batch[0]), batch[1])


class Manual(Classifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


def test_the_users_loss_fn_comes_first():
    def loss_fn(module, batch):
        return torch.tensor(1.0)

    assert loss_closure(WithHook(), loss_fn) is loss_fn
    assert loss_closure(Manual(), loss_fn) is loss_fn


def test_the_modules_hessdiag_loss_comes_next():
    module = WithHook()
    expected = 2 * F.cross_entropy(module.net(BATCH[0]), BATCH[1])
    assert torch.equal(loss_closure(module, None)(module, BATCH), expected)


@pytest.mark.parametrize("output", ["tensor", "dict"])
def test_else_the_training_step_with_its_logging_muted(output):
    module = Classifier(output)
    logged = []
    module.log = lambda *args, **kwargs: logged.append(args)  # an instance-level `log` of the user's
    closure = loss_closure(module, None)
    assert closure is training_step_loss
    assert torch.equal(closure(module, BATCH), F.cross_entropy(module.net(BATCH[0]), BATCH[1]))
    assert logged == []  # muted during the check
    module.log("after", 1.0)
    assert logged == [("after", 1.0)]  # and given back after it


def test_a_training_step_without_a_loss_is_refused():
    with pytest.raises(MisconfigurationException, match="`training_step` returned NoneType"):
        training_step_loss(Classifier("none"), BATCH)


def test_manual_optimisation_needs_a_loss_of_its_own():
    with pytest.raises(MisconfigurationException, match="with manual optimisation `training_step` steps the optimizer"):
        loss_closure(Manual(), None)


def test_muted_logging_restores_the_class_methods_after_an_error():
    module = Classifier()
    with pytest.raises(RuntimeError, match="inside"), muted_logging(module):
        module.log("x", 1.0)  # silenced
        raise RuntimeError("inside")
    assert "log" not in module.__dict__ and "log_dict" not in module.__dict__
