"""Batches of variable-length sequences: a list of one tensor per sample beside tensors of one entry
per sample (``([seq_1, ..., seq_n], labels)``) has a batch dimension, the list's length; it is cut by
element, counted right, and gets the noise scale, with no word about settings the user did not set."""

import random
import warnings
from collections import namedtuple

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import hessdiag
from hessdiag import Monitor
from hessdiag.batches import MicroBatches, batch_size, cut_samples, first_samples, leading_sizes, take_sub_batch
from hessdiag.callbacks import HessianDiagnostics

Pair = namedtuple("Pair", ["sequences", "labels"])


def sequences(lengths, features=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(length, features, generator=generator) for length in lengths]


def layouts(samples, lengths):
    """The same samples in the forms a collate function gives: (list, labels), a dict, a named tuple,
    a tuple of sequences, with per-sample weights as a list of 0-d tensors."""
    seqs, labels = sequences(lengths), torch.arange(samples) % 2
    return {
        "list and labels": (seqs, labels),
        "dict": {"sequences": seqs, "target": {"labels": labels, "weight": torch.ones(samples)}, "name": "text"},
        "named tuple": Pair(seqs, labels),
        "tuple of sequences": (tuple(seqs), labels),
        "0-d weights": (seqs, labels, [torch.tensor(float(i)) for i in range(samples)]),
    }


def flat(batch):
    """Every tensor of `batch`, in order (to compare two batches)."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    return [tensor for value in values for tensor in flat(value)]


@pytest.mark.parametrize("seed", range(12))
def test_a_list_of_samples_is_cut_by_element_and_counted_by_its_length(seed):
    rng = random.Random(seed)
    samples = rng.randint(2, 12)
    lengths = [rng.randint(1, 15) for _ in range(samples)]
    if seed % 3 == 0:  # equal lengths that differ from the batch size: still one tensor per sample
        lengths = [samples + 3] * samples
    size = rng.randint(1, samples)
    for name, batch in layouts(samples, lengths).items():
        assert batch_size(batch) == samples, name
        assert leading_sizes(batch, set()) == {samples}, name
        expected = flat(layouts(size, lengths[:size])[name])
        for cut in (take_sub_batch(batch, size), first_samples(batch, size), cut_samples(batch, 0, size)):
            got = flat(cut)
            assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected)), name
        assert type(take_sub_batch(batch, size)) is type(batch)


def test_collated_batches_keep_their_reading():
    x, y = torch.randn(4, 4), torch.arange(4)
    fields = [x, y]  # default_collate's list: each tensor's first dimension is the batch (4 == its length too)
    assert batch_size(fields) == 4
    cut = take_sub_batch(fields, 2)
    assert torch.equal(cut[0], x[:2]) and torch.equal(cut[1], y[:2])
    constants = {"x": x, "y": y, "scales": [torch.tensor(1.0), torch.tensor(2.0)]}  # not per sample
    cut = take_sub_batch(constants, 2)
    assert len(cut["scales"]) == 2 and torch.equal(cut["x"], x[:2])
    assert batch_size(MicroBatches([(sequences([2, 5]), torch.zeros(2)), (x, y)])) == 6


def test_a_batch_whose_dimension_cannot_be_told_is_refused_with_the_forms_that_work():
    unmatched = (sequences([3, 5, 7]), torch.zeros(4))  # three sequences, four labels
    bare = sequences([3, 5, 7])  # several loaders' batches look the same: not guessed
    for batch in (unmatched, bare):
        forms = r"the batch dimension cannot be told apart: .*\(\[seq_1, \.\.\., seq_n\], labels\)"
        with pytest.raises(ValueError, match=forms):
            first_samples(batch, 2)
        with pytest.raises(ValueError, match="`sub_batch` cannot tell the batch dimension: .*Use `sub_batch=None`"):
            take_sub_batch(batch, 2)


class SequenceClassifier(nn.Module):
    """Mean-pools each sequence of a list: takes the list of sequences or a stacked tensor."""

    def __init__(self):
        super().__init__()
        self.encoder, self.head = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, sequences):
        return torch.stack([self.head(torch.tanh(self.encoder(s)).mean(0)) for s in sequences])


def classification_loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def train(batch, steps=3, **settings):
    """A few SGD steps on `batch` with a Monitor checking every step; its last check and the warnings."""
    torch.manual_seed(0)
    model = SequenceClassifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, classification_loss, check_every=1, optimizer=optimizer, **settings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            optimizer.zero_grad()
            loss = classification_loss(model, batch)
            loss.backward()
            monitor.after_backward()
            optimizer.step()
            monitor.after_step(batch, loss)
    return monitor.last_check, [str(w.message) for w in caught if issubclass(w.category, hessdiag.HessdiagWarning)]


SETTINGS = ("sub_batch", "noise_scale_parts", "check_every", "module_sharpness")


def test_a_ragged_batch_gets_the_noise_scale_without_a_word_about_unset_settings():
    batch = (sequences([5, 9, 3, 7, 4, 6, 8, 2]), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1]))
    check, warned = train(batch)
    assert check.batch_size == 8 and "noise_scale" not in check.skipped
    assert (check.noise.big_batch, check.noise.small_batch) == (8, 2)  # the batch cut into 4 parts of 2 sequences
    assert not [message for message in warned if any(setting in message for setting in SETTINGS)], warned


def test_a_list_of_equal_sequences_gets_the_noise_scale_of_the_stacked_batch():
    seqs, labels = sequences([6] * 8), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    as_list, _ = train((seqs, labels), steps=1)
    stacked, _ = train((torch.stack(seqs), labels), steps=1)
    assert as_list.noise.trace_covariance == pytest.approx(stacked.noise.trace_covariance, rel=1e-5)
    assert as_list.noise.grad_sq_norm == pytest.approx(stacked.noise.grad_sq_norm, rel=1e-5, abs=1e-9)
    assert as_list.lambda_max == pytest.approx(stacked.lambda_max, rel=1e-5)


def test_a_set_sub_batch_cuts_a_ragged_batch_by_sample():
    batch = (sequences([5, 9, 3, 7, 4, 6, 8, 2]), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1]))
    check, warned = train(batch, steps=1, sub_batch=4)
    assert check.batch_size == 4 and not warned


def test_a_batch_without_a_batch_dimension_is_told_so_without_naming_unset_settings():
    bare = sequences([5, 9, 3, 7, 4, 6, 8, 2])
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    loss_fn = lambda m, b: torch.stack([m(s).mean() ** 2 for s in b]).mean()  # noqa: E731
    monitor = Monitor(model, loss_fn, check_every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = loss_fn(model, bare)
        loss.backward()
        monitor.after_backward()
        monitor.after_step(bare, loss)
    warned = [str(w.message) for w in caught if issubclass(w.category, hessdiag.HessdiagWarning)]
    (message,) = [m for m in warned if "noise scale" in m]
    assert "the batch dimension cannot be told apart" in message
    assert not any(setting in message for setting in SETTINGS)


def test_a_lightning_run_on_ragged_batches_gets_the_noise_scale(tmp_path):
    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = SequenceClassifier()

        def training_step(self, batch, batch_idx):
            return classification_loss(self.model, batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 12, (32,), generator=generator).tolist()
    data = list(zip(sequences(lengths), (torch.arange(32) % 2).tolist()))
    collate = lambda items: ([s for s, _ in items], torch.tensor([y for _, y in items]))  # noqa: E731
    loader = torch.utils.data.DataLoader(data, batch_size=8, collate_fn=collate)
    pl.seed_everything(0)
    callback = HessianDiagnostics(check_every=2, log_every=1)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=4, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Module(), loader)
    warned = [str(w.message) for w in caught if issubclass(w.category, hessdiag.HessdiagWarning)]
    assert not [message for message in warned if any(setting in message for setting in SETTINGS)], warned
    assert [c.step for c in callback.monitor.checks] == [2, 4]
    assert all(c.batch_size == 8 and c.noise.big_batch == 8 for c in callback.monitor.checks)
