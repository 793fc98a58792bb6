"""A parameter the step's backward did not reach has no gradient, even where `zero_grad(set_to_none=False)`
left a zero-filled `.grad` on it; one it reached with a gradient of exactly zero (dead units) does."""

import contextlib
import gc

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hessdiag import Monitor
from hessdiag.steps.backward_reach import BackwardReach
from hessdiag.detectors import StepRecord, VanishingGradientDetector
from hessdiag.callbacks import HessianDiagnostics
from hessdiag.steps.gradients import GradientStats
from spawned import rank_group


class WithAuxHead(nn.Module):
    """A trunk, a main head, and an auxiliary head that the loss may leave out."""

    def __init__(self, dead_trunk: bool = False, activation=torch.relu) -> None:
        super().__init__()
        self.activation = activation
        self.trunk = nn.Linear(4, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.aux = nn.Linear(8, 1)
        if dead_trunk:
            with torch.no_grad():
                self.hidden.bias.fill_(-100.0)  # every unit of `hidden` is off for every input: dead

    def forward(self, x: torch.Tensor, y: torch.Tensor, use_aux: bool) -> torch.Tensor:
        features = self.activation(self.hidden(self.activation(self.trunk(x))))
        loss = (self.head(features) - y).pow(2).mean()
        return loss + 0.1 * (self.aux(features) - y).pow(2).mean() if use_aux else loss


class SeenLayers(VanishingGradientDetector):
    """The vanishing detector, keeping the layers of each step record it judged."""

    def __init__(self) -> None:
        super().__init__()
        self.layers: list[set[str]] = []

    def observe(self, record):
        if isinstance(record, StepRecord) and record.grad_norm is not None:
            self.layers.append({name for name, _ in record.layer_grad_norms})
        return super().observe(record)


def data(n=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=generator), torch.randn(n, 1, generator=generator)


def run_loop(*, set_to_none, aux, dead_trunk=False, steps=8, micro_batches=1):
    """A hand-written loop under the Monitor, reading back every step; `aux(step, micro_batch)` says
    whether the auxiliary loss is on."""
    torch.manual_seed(0)
    model = WithAuxHead(dead_trunk)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    monitor = Monitor(model, optimizer=optimizer, check_every=0, log_every=1, detectors=[SeenLayers()])
    x, y = data()
    for step in range(steps):
        optimizer.zero_grad(set_to_none=set_to_none)
        for index, (xs, ys) in enumerate(zip(x.chunk(micro_batches), y.chunk(micro_batches))):
            (model(xs, ys, aux(step, index)) / micro_batches).backward()
        monitor.after_backward()
        optimizer.step()
        monitor.after_step(None, model(x, y, False).detach())
    monitor.flush()
    return monitor


def first_step_only(step, micro_batch):
    """The auxiliary loss on in the first step (its `.grad` then exists), off after."""
    return step == 0


@pytest.mark.parametrize("set_to_none", [True, False])
def test_an_auxiliary_head_switched_off_is_not_a_dead_layer(set_to_none):
    monitor = run_loop(set_to_none=set_to_none, aux=first_step_only)
    assert "vanishing" not in [event.name for event in monitor.events]
    seen = monitor.detectors["vanishing"].layers
    assert "aux" in seen[0] and all("aux" not in layers and "head" in layers for layers in seen[1:])


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_dead_layer_reached_by_the_backward_is_still_flagged(set_to_none):
    monitor = run_loop(set_to_none=set_to_none, aux=first_step_only, dead_trunk=True)
    (event,) = [event for event in monitor.events if event.name == "vanishing"]
    assert event.evidence["dead_layers"] >= 1 and "trunk" in event.summary
    assert "aux" not in event.summary  # the head that was switched off is not one of them


def test_reached_in_any_micro_batch_of_the_step_counts():
    monitor = run_loop(set_to_none=False, aux=lambda step, micro_batch: micro_batch == 0, micro_batches=2)
    assert all("aux" in layers for layers in monitor.detectors["vanishing"].layers)


def test_under_a_loss_scaler_an_auxiliary_head_switched_off_is_not_a_dead_layer():
    torch.manual_seed(0)
    model = WithAuxHead()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    monitor = Monitor(
        model, optimizer=optimizer, check_every=0, log_every=1, grad_scaler=scaler, detectors=[SeenLayers()]
    )
    x, y = data()
    for step in range(8):
        optimizer.zero_grad(set_to_none=False)
        scaler.scale(model(x, y, step == 0)).backward()
        scaler.unscale_(optimizer)
        monitor.after_backward()
        scaler.step(optimizer)
        scaler.update()
        monitor.after_step(None, model(x, y, False).detach())
    seen = monitor.detectors["vanishing"].layers
    assert not monitor.events and "aux" in seen[0] and all("aux" not in layers for layers in seen[1:])


def test_the_backward_passes_of_a_check_do_not_count_as_training_s():
    # Finite-difference checks run plain backward passes that reach the auxiliary head's loss too
    # when the check's loss uses it; the training steps never do.
    torch.manual_seed(0)
    model = WithAuxHead(activation=torch.tanh)  # smooth: finite differences are its curvature
    x, y = data()
    model(x, y, True).backward()  # an earlier step used the auxiliary head: its `.grad` exists
    monitor = Monitor(
        model, lambda m, b: m(*b, True), check_every=1, log_every=1, max_iter=6, hvp_method="finite_difference",
        noise_scale_parts=2, detectors=[SeenLayers()],
    )  # fmt: skip
    for _ in range(4):
        model.zero_grad(set_to_none=False)
        model(x, y, False).backward()
        monitor.after_backward()
        monitor.after_step((x, y), model(x, y, False).detach())
    assert len(monitor.checks) == 4 and not monitor.failed_checks
    assert all("aux" not in layers for layers in monitor.detectors["vanishing"].layers)


def test_a_layer_unfrozen_later_enters_the_statistics_at_its_first_gradient():
    model = WithAuxHead()
    model.aux.requires_grad_(False)
    stats = GradientStats(model.named_parameters())
    x, y = data()
    model(x, y, True).backward()
    stats.observe(1)
    model.aux.requires_grad_(True)
    for step in (2, 3):  # the first backward after unfreezing runs before its hook exists
        model.zero_grad(set_to_none=False)
        model(x, y, True).backward()
        stats.observe(step)
    readout = stats.read()
    assert [("aux" in dict(layers)) for layers in readout.layer_grad_norms] == [False, True, True]


def test_hooks_never_change_the_run_and_go_when_closed_or_dropped():
    def train(with_monitor):
        torch.manual_seed(0)
        model = WithAuxHead()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-1, momentum=0.9)
        monitor = Monitor(model, optimizer=optimizer, check_every=0, log_every=2) if with_monitor else None
        x, y = data()
        for step in range(5):
            optimizer.zero_grad(set_to_none=False)
            model(x, y, step % 2 == 0).backward()
            if monitor is not None:
                monitor.after_backward()
            optimizer.step()
            if monitor is not None:
                monitor.after_step(None, torch.zeros(()))
        return model, monitor

    plain, _ = train(False)
    watched, monitor = train(True)
    for p, q in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
    assert all(p._post_accumulate_grad_hooks for p in watched.parameters())
    monitor.close()
    monitor.close()  # idempotent
    assert not any(p._post_accumulate_grad_hooks for p in watched.parameters())
    _, dropped = train(True)
    model = dropped.model
    del dropped
    gc.collect()
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())


def test_a_replaced_layer_is_followed_and_the_old_one_unhooked():
    torch.manual_seed(0)
    model = WithAuxHead()
    monitor = Monitor(model, check_every=0, log_every=2, detectors=[SeenLayers()])
    x, y = data()
    old = model.aux
    for step in range(6):
        if step == 2:
            model.aux = nn.Linear(8, 1)
        model.zero_grad(set_to_none=False)
        model(x, y, step < 2).backward()
        monitor.after_backward()
        with pytest.warns(UserWarning, match="parameters changed") if step == 3 else contextlib.nullcontext():
            monitor.after_step(None, torch.zeros(()))
    assert not any(p._post_accumulate_grad_hooks for p in old.parameters())
    assert all(p._post_accumulate_grad_hooks for p in model.aux.parameters())
    assert monitor.detectors["vanishing"].layers[-1] == {"trunk", "hidden", "head"} and not monitor.events


def test_without_any_hook_firing_a_gradient_that_exists_counts():
    # Gradients written without a backward (assigned by hand), or a reach built after the backward:
    # nothing to tell reached from stale, so `.grad is not None` decides, as without hooks.
    model = WithAuxHead()
    reach = BackwardReach(list(model.parameters()))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    assert all(reach.take())
    reach.close()


# -- Lightning ---------------------------------------------------------------------------------
class AuxModule(pl.LightningModule):
    def __init__(self, dead_trunk=False):
        super().__init__()
        self.net = WithAuxHead(dead_trunk)

    def training_step(self, batch, batch_idx):
        # With `use_aux`, the auxiliary loss is on in the first micro-batch of every step (reached in
        # any counts); without, only in the run's first micro-batch (its `.grad` then stays, zeroed).
        first = self.trainer.global_step == 0 and batch_idx == 0
        return self.net(*batch, use_aux=batch_idx % 2 == 0 if self.use_aux else first)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("use_aux, dead_trunk", [(False, False), (True, False), (False, True)])
def test_lightning_with_set_to_none_false_and_accumulation(tmp_path, use_aux, dead_trunk):
    torch.manual_seed(0)
    module = AuxModule(dead_trunk)
    module.use_aux = use_aux
    callback = HessianDiagnostics(check_every=0, log_every=1, detectors=[SeenLayers()])
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=8, limit_val_batches=0, log_every_n_steps=1, logger=False, callbacks=[callback],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(*data(64)), batch_size=8))
    flagged = [event for event in callback.monitor.events if event.name == "vanishing"]
    seen = callback.monitor.detectors["vanishing"].layers
    assert len(seen) == 8 and all(("net.aux" in layers) == use_aux and "net.head" in layers for layers in seen[1:])
    assert bool(flagged) == dead_trunk and all("aux" not in event.summary for event in flagged)
    assert not any(p._post_accumulate_grad_hooks for p in module.parameters())  # removed at teardown


# -- two processes ------------------------------------------------------------------------------
def _parallel_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """DDP with find_unused_parameters (the auxiliary head on on rank 0 only, then on neither) and
    FSDP2 (on neither after the first step), zero_grad(set_to_none=False): the layers each rank judged."""
    from torch.distributed.fsdp import fully_shard

    with rank_group(rank, world_size, init_file):
        results = {}
        x, y = data(16, seed=rank)
        for name in ("ddp", "fsdp2"):
            torch.manual_seed(0)
            net = WithAuxHead(activation=torch.tanh)
            if name == "ddp":
                model = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
                aux = lambda step: step == 0 or (step < 4 and rank == 0)  # noqa: E731
            else:
                for layer in (net.trunk, net.hidden, net.head, net.aux):
                    fully_shard(layer)
                model = fully_shard(net)
                aux = lambda step: step == 0  # noqa: E731
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
            monitor = Monitor(model, optimizer=optimizer, check_every=0, log_every=1, detectors=[SeenLayers()])
            for step in range(6):
                optimizer.zero_grad(set_to_none=False)
                loss = model(x, y, aux(step))
                loss.backward()
                monitor.after_backward()
                optimizer.step()
                monitor.after_step(None, loss.detach())
            monitor.close()
            results[name] = monitor.detectors["vanishing"].layers
        torch.save(results, f"{out_dir}/rank{rank}.pt")


def test_data_parallel_and_fsdp2_judge_the_layers_reached_on_any_rank(tmp_path):
    mp.spawn(_parallel_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert ranks[0] == ranks[1]  # every rank judges the same layers
    every = {"trunk", "hidden", "head", "aux"}
    # DDP: reached on rank 0 only (DDP fills in rank 1's gradient) counts on both; then on neither.
    assert ranks[0]["ddp"] == [every] * 4 + [every - {"aux"}] * 2
    assert ranks[0]["fsdp2"] == [every] + [every - {"aux"}] * 5
