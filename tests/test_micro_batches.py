"""`hessdiag.callbacks.micro_batches`: the batches and the mean loss of one optimizer step."""

import torch

from hessdiag import MicroBatches
from hessdiag.callbacks.settings import MAX_MICRO_BATCHES
from hessdiag.callbacks.loss_closure import StepBatch
from hessdiag.callbacks.micro_batches import LoggedLoss, StepMicroBatches


def test_a_step_of_one_batch_checks_that_batch():
    step = StepMicroBatches()
    assert not step.keep("a", 7)
    assert step.finish("last", 8) == (StepBatch("a", 7), None, None)


def test_micro_batches_are_kept_in_order_up_to_the_budget():
    step = StepMicroBatches()
    dropped = [step.keep(f"batch {index}", index) for index in range(MAX_MICRO_BATCHES + 2)]
    assert dropped == [False] * MAX_MICRO_BATCHES + [True, True]
    batch, _, _ = step.finish("last", MAX_MICRO_BATCHES + 2)
    assert isinstance(batch, MicroBatches)
    assert list(batch) == [StepBatch(f"batch {index}", index) for index in range(2, MAX_MICRO_BATCHES + 2)]


def test_without_kept_batches_the_steps_last_batch_is_checked():
    assert StepMicroBatches().finish("last", 3) == (StepBatch("last", 3), None, None)


def test_the_step_loss_is_the_sum_of_the_micro_batch_losses_and_a_copy():
    step = StepMicroBatches()
    first = torch.tensor(0.25)
    step.add_loss(first)
    step.add_loss({"loss": torch.tensor([0.5]), "logits": torch.zeros(3)})
    step.add_loss(None)  # a training step may return nothing: no loss is added
    step.add_loss({"logits": torch.zeros(3)})
    first += 100  # the user reuses its buffer
    _, loss, _ = step.finish("last", 0)
    assert torch.equal(loss, torch.tensor([0.75]))


def test_finishing_a_step_starts_the_next_afresh():
    step = StepMicroBatches()
    step.keep("a", 0)
    step.add_loss(torch.tensor(1.0))
    step.finish("last", 0)
    assert step.finish("next", 1) == (StepBatch("next", 1), None, None)


def test_the_steps_samples_are_counted_over_its_micro_batches():
    step = StepMicroBatches()
    step.count((torch.zeros(4, 3), torch.zeros(4)))
    step.count({"x": torch.zeros(6, 2)})
    assert step.finish("last", 1)[2] == 10
    step.count(torch.zeros(5))
    step.count("no tensor")  # a micro-batch without a size: the step's samples are unknown
    step.count(torch.zeros(5))
    assert step.finish("last", 2)[2] is None
    assert step.finish("last", 3)[2] is None  # no micro-batch counted


def test_a_logged_loss_counts_only_when_logged_in_this_step():
    logged = LoggedLoss()
    epoch_mean, accuracy = torch.tensor(0.9), torch.tensor(0.5)
    logged.before_step({"loss": epoch_mean, "accuracy": accuracy})
    # Unchanged tensors are older values (an epoch mean, another step's): not this step's loss.
    assert logged.after_step({"loss": epoch_mean, "accuracy": torch.tensor(0.6)}) is None
    fresh = torch.tensor(0.4)
    logged.before_step({"loss": epoch_mean})
    assert logged.after_step({"loss": epoch_mean, "train_loss": fresh, "train_loss_step": fresh}) is fresh


def test_among_several_logged_losses_only_loss_itself_is_taken():
    logged = LoggedLoss()
    d_loss, g_loss, total = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)
    assert logged.after_step({"d_loss": d_loss, "g_loss": g_loss, "hessdiag/grad_norm": total}) is None
    assert logged.ambiguous == ("d_loss", "g_loss")
    assert "logged several (d_loss, g_loss)" in logged.advice()
    assert logged.after_step({"d_loss": d_loss, "g_loss": g_loss, "loss": total}) is total
    assert logged.after_step({"hessdiag/loss": total, "losses": torch.ones(3)}) is None  # ours; not a scalar
    assert "logged none with `self.log`" in logged.advice()


def test_under_manual_optimisation_the_step_loss_is_the_mean_of_its_batches():
    step = StepMicroBatches(manual=True)
    step.add_loss(torch.tensor(1.0))
    step.logged.before_step({})
    step.add_loss(None, {"train_loss": torch.tensor(3.0)})
    assert step.finish("last", 1)[1] == 2.0
    step.add_loss({"accuracy": torch.tensor(0.5)}, {})
    assert step.finish("last", 2)[1] is None
