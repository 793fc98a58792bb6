"""`hessdiag.callbacks.micro_batches`: the batches and the mean loss of one optimizer step."""

import torch

from hessdiag import MicroBatches
from hessdiag.batches import MAX_MICRO_BATCHES
from hessdiag.callbacks.loss_closure import StepBatch
from hessdiag.callbacks.micro_batches import StepMicroBatches


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
