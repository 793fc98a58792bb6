"""`hessdiag.callbacks.loss_closure`: which loss a check differentiates, with the user's logging muted."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn

from hessdiag.batches import take_sub_batch
from hessdiag.callbacks.loss_closure import StepBatch, loss_closure, muted_logging, training_step_loss

BATCH = (torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0, 1]))
STEP_BATCH = StepBatch(BATCH, 0)


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

    for module in (WithHook(), Manual()):
        closure = loss_closure(module, loss_fn)
        assert closure(module, STEP_BATCH) == 1.0 and closure(module, BATCH) == 1.0


def test_the_modules_hessdiag_loss_comes_next():
    module = WithHook()
    expected = 2 * F.cross_entropy(module.net(BATCH[0]), BATCH[1])
    assert torch.equal(loss_closure(module, None)(module, STEP_BATCH), expected)  # the user's batch, unwrapped


@pytest.mark.parametrize("output", ["tensor", "dict"])
def test_else_the_training_step_with_its_logging_muted(output):
    module = Classifier(output)
    logged = []
    module.log = lambda *args, **kwargs: logged.append(args)  # an instance-level `log` of the user's
    closure = loss_closure(module, None)
    assert closure is training_step_loss
    assert torch.equal(closure(module, STEP_BATCH), F.cross_entropy(module.net(BATCH[0]), BATCH[1]))
    assert logged == []  # muted during the check
    module.log("after", 1.0)
    assert logged == [("after", 1.0)]  # and given back after it


def test_a_training_step_without_a_loss_is_refused_naming_the_skip_idiom():
    with pytest.raises(MisconfigurationException, match="returned None on the check's batch .* skip a step"):
        training_step_loss(Classifier("none"), STEP_BATCH)


class TwoTasks(Classifier):
    """Picks its task from `batch_idx`, as multi-task modules do: even steps task 0, odd ones task 1."""

    def __init__(self):
        super().__init__()
        self.other = nn.Linear(3, 2)

    def training_step(self, batch, batch_idx):
        head = self.net if batch_idx % 2 == 0 else self.other
        return 10.0 ** (batch_idx % 2) * F.cross_entropy(head(batch[0]), batch[1])


@pytest.mark.parametrize("batch_idx", [0, 1, 7])
def test_the_training_step_is_re_run_with_the_steps_own_batch_idx(batch_idx):
    module = TwoTasks()
    expected = module.training_step(BATCH, batch_idx)
    assert torch.equal(training_step_loss(module, StepBatch(BATCH, batch_idx)), expected)
    cut = take_sub_batch(StepBatch(BATCH, batch_idx), 2)  # a sub-batch keeps the index
    assert cut.batch_idx == batch_idx and torch.equal(training_step_loss(module, cut), module.training_step((BATCH[0][:2], BATCH[1][:2]), batch_idx))


def test_a_batch_without_its_batch_idx_is_refused():
    with pytest.raises(MisconfigurationException, match="came without its `batch_idx`"):
        training_step_loss(TwoTasks(), BATCH)


def test_a_training_step_without_batch_idx_gets_the_batch_alone():
    class BatchOnly(Classifier):
        def training_step(self, batch):
            return F.cross_entropy(self.net(batch[0]), batch[1])

    module = BatchOnly()
    assert torch.equal(training_step_loss(module, StepBatch(BATCH, 3)), module.training_step(BATCH))


def test_manual_optimisation_needs_a_loss_of_its_own():
    with pytest.raises(MisconfigurationException, match="with manual optimisation `training_step` steps the optimizer"):
        loss_closure(Manual(), None)


def test_muted_logging_restores_the_class_methods_after_an_error():
    module = Classifier()
    with pytest.raises(RuntimeError, match="inside"), muted_logging(module):
        module.log("x", 1.0)  # silenced
        raise RuntimeError("inside")
    assert "log" not in module.__dict__ and "log_dict" not in module.__dict__
