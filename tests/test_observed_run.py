"""The run as the optimizer sees it, from the user's side: the check measures the optimizer step's
loss (accumulation, frozen modules in eval, sub-batches, data parallelism), one record per optimizer
step (LBFGS, a GAN), missing gradients are not zero, the parameter set may change, arguments are
validated at construction, and the run is the same with or without the diagnostics."""

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

import hessdiag
from hessdiag import MicroBatches, Monitor
from hessdiag.batches import take_sub_batch
from hessdiag.callbacks import HessianDiagnostics
from oracles import dense_hessian


def extreme_eigenvalues(hessian):
    eigenvalues = torch.linalg.eigvalsh(hessian)
    return float(eigenvalues[-1]), float(eigenvalues[0])


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def data(n=64, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator, dtype=dtype)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return x, y


def fit(tmp_path, module, callbacks, max_steps, loader, **kwargs):
    options = dict(
        accelerator="cpu", max_steps=max_steps, limit_val_batches=0, log_every_n_steps=2,
        logger=TensorBoardLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer = pl.Trainer(**(options | kwargs))
    trainer.fit(module, loader)
    return trainer


def loader(n=64, batch_size=8, shuffle=False, dtype=torch.float32):
    x, y = data(n, dtype=dtype)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


class Net(pl.LightningModule):
    def __init__(self, dropout=0.0, optimizer="sgd"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3))
        self.optimizer = optimizer
        self.losses = []

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.losses.append(loss.detach().clone())
        return loss

    def configure_optimizers(self):
        if self.optimizer == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), max_iter=4, line_search_fn="strong_wolfe")
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


class SaveCheckState(pl.Callback):
    """After each check (run by the callback listed before this one): the parameters it saw."""

    def __init__(self, diagnostics):
        self.diagnostics, self.states = diagnostics, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        check = self.diagnostics.monitor.last_check
        if check is not None and check.step not in self.states:
            self.states[check.step] = {k: v.clone() for k, v in pl_module.state_dict().items()}


# -- 1. the check's loss is the optimizer step's loss ------------------------------------------


def test_accumulated_step_is_checked_on_all_its_micro_batches(tmp_path):
    torch.manual_seed(0)
    module = Net().double()
    diagnostics = HessianDiagnostics(check_every=3, log_every=1, tol=1e-8, max_iter=100)
    saver = SaveCheckState(diagnostics)
    fit(tmp_path, module, [diagnostics, saver], 3, loader(dtype=torch.float64), accumulate_grad_batches=4,
        precision="64-true")  # fmt: skip
    check = diagnostics.monitor.last_check
    assert check.step == 3 and check.batch_size == 32
    x, y = data(dtype=torch.float64)
    micro = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]  # step 3: the first 4 batches of epoch 2
    reference = Net().double()
    reference.load_state_dict(saver.states[3])

    def step_loss(model, batch):
        return sum(cross_entropy(model, b) for b in batch) / len(batch)

    top, bottom = extreme_eigenvalues(dense_hessian(reference.net, step_loss, micro))
    assert check.lambda_max == pytest.approx(top, rel=1e-6)
    # the logged loss is the step's mean loss, not the last micro-batch's divided by 4
    step_losses = torch.stack(module.losses[8:12]).mean()
    assert diagnostics.monitor.detectors["exploding"].losses[-1] == pytest.approx(float(step_losses), rel=1e-6)  # kept in float32


def test_micro_batches_in_a_plain_loop_match_the_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = data(dtype=torch.float64)
    micro = MicroBatches([(x[:8], y[:8]), (x[8:24], y[8:24])])  # unequal sizes: equal weights, as accumulation
    monitor = Monitor(model, cross_entropy, check_every=0, tol=1e-9, max_iter=100)
    monitor.check_curvature(micro)
    check = monitor.last_check
    mean = lambda m, b: (cross_entropy(m, b[0]) + cross_entropy(m, b[1])) / 2  # noqa: E731
    top, bottom = extreme_eigenvalues(dense_hessian(model, mean, list(micro)))
    assert check.lambda_max == pytest.approx(top, rel=1e-6)
    assert check.lambda_min_limit <= bottom and top <= check.lambda_max_limit  # the probable limits hold


def test_a_backbone_frozen_in_eval_stays_in_eval():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh()).double()
    backbone(torch.randn(32, 6, dtype=torch.float64) * 3)  # running statistics away from the batch's
    backbone.requires_grad_(False).eval()
    model = nn.Sequential(backbone, nn.Linear(8, 3).double())
    x, y = data(dtype=torch.float64)
    monitor = Monitor(model, cross_entropy, check_every=0, tol=1e-9, max_iter=100)
    monitor.check_curvature((x[:16], y[:16]))
    check = monitor.last_check
    assert not backbone.training and model[1].training

    def as_trained(m, b):  # the loss the optimizer saw: the backbone on its running statistics
        m.inner[0].eval()
        return cross_entropy(m, b)

    expected = extreme_eigenvalues(dense_hessian(model, as_trained, (x[:16], y[:16])))[0]
    batch_statistics = extreme_eigenvalues(dense_hessian(model, cross_entropy, (x[:16], y[:16])))[0]
    assert check.lambda_max == pytest.approx(expected, rel=1e-6)
    assert abs(batch_statistics - expected) > 1e-3 * expected  # the case tells the two apart
    in_train_mode = Monitor(model, cross_entropy, check_every=0, mode="train", tol=1e-9, max_iter=100)
    in_train_mode.check_curvature((x[:16], y[:16]))
    assert in_train_mode.last_check.lambda_max == pytest.approx(batch_statistics, rel=1e-6)


def test_sub_batch_cuts_every_tensor_or_refuses():
    x, y = data()
    batch = {"x": x, "target": {"y": y, "weight": torch.ones(64)}, "scale": torch.tensor(2.0), "name": "digits"}
    cut = take_sub_batch(batch, 4)
    assert torch.equal(cut["x"], x[:4]) and torch.equal(cut["target"]["y"], y[:4]) and cut["target"]["weight"].shape == (4,)
    assert cut["scale"].shape == () and cut["name"] == "digits"
    sequences = [torch.randn(7), torch.randn(3), torch.randn(5), torch.randn(9), torch.randn(2)]
    with pytest.raises(ValueError, match="`sub_batch` cannot tell the batch dimension"):
        take_sub_batch(sequences, 4)
    model = nn.EmbeddingBag(10, 3)
    monitor = Monitor(model, lambda m, b: sum(m(s.long().abs() % 10).sum() for s in b), check_every=0, sub_batch=4)
    with pytest.warns(hessdiag.HessdiagWarning, match="sub_batch"):
        assert monitor.check_curvature(sequences) == []


def test_a_loss_in_a_reused_buffer_is_copied():
    model = nn.Linear(6, 3)
    monitor = Monitor(model, check_every=0, log_every=5)
    buffer = torch.zeros(())
    x, y = data(dtype=torch.float32)
    expected = []
    for step in range(5):
        loss = cross_entropy(model, (x[step * 8 : step * 8 + 8], y[step * 8 : step * 8 + 8]))
        loss.backward()
        monitor.after_backward()
        buffer.copy_(loss.detach())  # the loop reuses one buffer
        expected.append(float(loss))
        monitor.after_step(loss=buffer)
        model.zero_grad()
    assert list(monitor.detectors["exploding"].losses) == pytest.approx(expected)


# -- 2, 3. one record per optimizer step; no gradient is not a zero gradient --------------------


class GAN(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 6))
        self.discriminator = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))

    def losses(self, real):
        noise = torch.randn(real.shape[0], 2, generator=torch.Generator().manual_seed(0))
        fake = self.generator(noise)
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        d_loss = F.binary_cross_entropy_with_logits(self.discriminator(real), ones) + F.binary_cross_entropy_with_logits(
            self.discriminator(fake.detach()), zeros
        )
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
        return d_loss, g_loss

    def training_step(self, batch, batch_idx):
        d_opt, g_opt = self.optimizers()
        d_loss, _ = self.losses(batch[0])
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        _, g_loss = self.losses(batch[0])
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()

    def hessdiag_loss(self, batch):
        d_loss, g_loss = self.losses(batch[0])
        return d_loss + g_loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.discriminator.parameters(), 1e-3), torch.optim.Adam(self.generator.parameters(), 1e-3)


def test_gan_with_manual_optimisation_raises_no_flag(tmp_path):
    torch.manual_seed(0)
    diagnostics = HessianDiagnostics(check_every=10, log_every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", hessdiag.HessdiagWarning)
        fit(tmp_path, GAN(), [diagnostics], 40, loader())
    # training_step returns no loss: said once, in Lightning's terms; the gradient statistics are still judged
    notes = [str(w.message) for w in caught if issubclass(w.category, hessdiag.HessdiagWarning)]
    assert len(notes) == 1 and "`training_step` returned no loss" in notes[0]
    monitor = diagnostics.monitor
    # max_steps counts both optimizers' steps: 40 is 20 training steps, one record each
    assert monitor.step == 20 and len(monitor.checks) == 2
    assert monitor.events == [] and monitor.checks and monitor.optimizer is None  # two optimizers: no threshold
    assert all(math.isfinite(c.lambda_max) for c in monitor.checks)


def test_lbfgs_closures_make_one_record_per_step_and_no_flag(tmp_path):
    torch.manual_seed(0)
    diagnostics = HessianDiagnostics(check_every=5, log_every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, Net(optimizer="lbfgs"), [diagnostics], 15, loader())
    notes = [str(w.message) for w in caught if issubclass(w.category, hessdiag.HessdiagWarning)]
    assert len(notes) == 1 and "No stability threshold is known for LBFGS" in notes[0]  # said once, nothing else
    monitor = diagnostics.monitor
    assert monitor.events == [] and len(monitor.checks) == 3
    assert len(monitor.detectors["exploding"].losses) == 15  # one judged record per optimizer step


def test_an_unused_head_is_not_a_vanishing_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    model.add_module("auxiliary_head", nn.Linear(16, 4))  # registered, never called
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, check_every=0, log_every=5)
    x, y = data(dtype=torch.float32)
    for step in range(60):
        optimizer.zero_grad()
        loss = F.cross_entropy(model[2](model[1](model[0](x))), y)
        loss.backward()
        monitor.after_backward()
        optimizer.step()
        monitor.after_step(loss=loss)
    monitor.flush()
    assert "vanishing" not in {e.name for e in monitor.events}


def test_unfreezing_mid_run_is_still_checked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1)
    records = []

    class Record:
        def scalars(self, step, values, layers):
            records.append((step, {family: dict(by_layer) for family, by_layer in layers.items()}))

        events = density = text = flush = lambda self, *args: None

    monitor = Monitor(model, cross_entropy, optimizer=optimizer, writer=Record(), check_every=10, log_every=5, tol=1e-8,
                      max_iter=100)  # fmt: skip
    x, y = data(dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hessdiag.HessdiagWarning)
        for step in range(1, 41):
            if step == 15:  # unfreeze the first layer, as a fine-tuning schedule does
                model[0].requires_grad_(True)
                optimizer.add_param_group({"params": model[0].parameters()})
            optimizer.zero_grad()
            loss = cross_entropy(model, (x, y))
            loss.backward()
            monitor.after_backward()
            optimizer.step()
            monitor.after_step((x, y), loss)
    assert [c.step for c in monitor.checks] == [10, 20, 30, 40]
    assert monitor.checks[1].cold  # the dimension changed: the warm start was dropped
    assert monitor.checks[-1].lambda_max == pytest.approx(extreme_eigenvalues(dense_hessian(model, cross_entropy, (x, y)))[0], rel=1e-6)
    logged = {module for step, layers in records if step > 15 for module in layers.get("layer_grad_norm", {})}
    assert "0" in logged
    assert "0" not in {module for step, layers in records if step <= 10 for module in layers.get("layer_grad_norm", {})}


# -- 4. zero observer effect, from construction on ------------------------------------------------


def test_construction_draws_no_random_number():
    model = nn.Linear(2, 2)
    state = torch.get_rng_state()
    HessianDiagnostics(check_every=10, detectors=["plateau", "saddle"])
    Monitor(model, cross_entropy, detectors=["exploding"])
    assert torch.equal(torch.get_rng_state(), state)


def _run(tmp_path, order, shuffle):
    """One seeded fit; `order` says where the callback is built (None: no callback)."""
    callbacks = []
    if order == "callback, seed, model":
        callbacks = [HessianDiagnostics(check_every=3, log_every=2)]
    pl.seed_everything(0)
    if order == "seed, callback, model":
        callbacks = [HessianDiagnostics(check_every=3, log_every=2)]
    module = Net(dropout=0.3)
    if order == "seed, model, callback":
        callbacks = [HessianDiagnostics(check_every=3, log_every=2)]
    trainer = fit(tmp_path, module, callbacks, 18, loader(n=48, shuffle=shuffle), max_epochs=-1)
    return module.state_dict(), trainer.optimizers[0].state_dict()["state"], torch.get_rng_state()


@pytest.mark.parametrize("shuffle", [False, True], ids=["in_order", "shuffled_across_epochs"])
def test_the_run_is_bit_for_bit_the_same_in_every_script_order(tmp_path, shuffle):
    plain = _run(tmp_path / "plain", None, shuffle)
    for order in ("seed, model, callback", "seed, callback, model", "callback, seed, model"):
        watched = _run(tmp_path / order.replace(", ", "-"), order, shuffle)
        assert torch.equal(watched[2], plain[2]), order
        for name, value in plain[0].items():
            assert torch.equal(watched[0][name], value), (order, name)
        for index, state in plain[1].items():
            assert all(torch.equal(watched[1][index][k], v) for k, v in state.items()), order


class Student(pl.LightningModule):
    """A training step that updates state: an EMA teacher, a counter, a reassigned buffer."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.teacher = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).requires_grad_(False)
        self.register_buffer("running_loss", torch.zeros(()))
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.net.parameters()):
                t.mul_(0.9).add_(s, alpha=0.1)
        logits = self.net(batch[0])
        loss = F.cross_entropy(logits, batch[1]) + 0.1 * F.mse_loss(logits, self.teacher(batch[0]))
        self.running_loss = 0.9 * self.running_loss + 0.1 * loss.detach()  # reassigned, not in place
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


def test_a_training_step_that_updates_state_is_undone(tmp_path):
    def run(callbacks, directory):
        pl.seed_everything(0)
        module = Student()
        fit(directory, module, callbacks, 12, loader())
        return module

    plain = run([], tmp_path / "plain")
    watched = run([HessianDiagnostics(check_every=3, log_every=2)], tmp_path / "watched")
    assert watched.calls == plain.calls == 12
    for (name, value), other in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(value, other), name


class ReadBackCounter(pl.Callback):
    """Counts ``Tensor.item`` / ``tolist`` / ``cpu`` calls made while the trainer is at each step."""

    def __init__(self, monkeypatch):
        self.calls, self.step = {}, None
        for name in ("item", "tolist", "cpu"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                if self.step is not None:
                    self.calls[self.step] = self.calls.get(self.step, 0) + 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step + 1  # the optimizer step under way

    def on_train_end(self, trainer, pl_module):
        self.step = None


def test_no_read_back_in_the_steps_between_read_backs_and_checks_with_the_progress_bar_on(tmp_path, monkeypatch):
    """After the first check, 20 steps without a read-back or a check: no ``item``/``tolist``/``cpu``
    call, whatever the progress bar shows (it gets host numbers, not tensors to read back)."""
    counter = ReadBackCounter(monkeypatch)
    diagnostics = HessianDiagnostics(check_every=10, log_every=10)
    trainer = fit(
        tmp_path, Net(), [counter, diagnostics], 30, loader(n=256), enable_progress_bar=True, log_every_n_steps=50
    )
    assert [check.step for check in diagnostics.monitor.checks] == [10, 20, 30]
    quiet_steps = [step for step in range(11, 31) if step % 10]
    assert {step: counter.calls.get(step, 0) for step in quiet_steps} == dict.fromkeys(quiet_steps, 0)
    shown = trainer.progress_bar_metrics
    assert shown["λmax"] == diagnostics.monitor.last_check.lambda_max and isinstance(shown["flags"], int)


# -- 5. arguments are validated at construction --------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "bogus"}, r"`mode` must be one of"),
        ({"hvp_method": "bogus"}, r"`hvp_method` must be one of"),
        ({"max_iter": 0}, r"`max_iter` must be a positive int or None, got 0"),
        ({"detectors": ["bogus"]}, r"`detectors`: unknown flag name 'bogus'"),
        ({"detectors": "plateau"}, r"`detectors` must be a list"),
        ({"detectors": [object()]}, r"`detectors` must hold flag names"),
        ({"detectors": ["plateau", "plateau"]}, r"names a flag twice"),
        ({"rank_weighting": "bogus"}, r"`rank_weighting` must be 'equal' or 'samples'"),
        ({"cold_every": -1}, r"`cold_every` must be an int >= 0"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HessianDiagnostics(**kwargs)
    with pytest.raises(ValueError, match=match):
        Monitor(nn.Linear(2, 2), cross_entropy, **kwargs)


def test_detectors_by_name():
    monitor = Monitor(nn.Linear(2, 2), cross_entropy, detectors=["plateau", "saddle"])
    assert sorted(monitor.detectors) == ["plateau", "saddle"]


def test_after_step_without_after_backward_warns_and_still_judges_the_loss():
    monitor = Monitor(nn.Linear(2, 2), check_every=0, log_every=2)
    monitor.after_step(loss=torch.tensor(1.0))
    with pytest.warns(hessdiag.HessdiagWarning, match="without `after_backward`"):
        monitor.after_step(loss=torch.tensor(float("nan")))
    assert [e.name for e in monitor.events] == ["exploding"]


# -- 6. checkpoints ----------------------------------------------------------------------------


def test_state_survives_a_changed_check_every():
    model = nn.Linear(6, 3)
    first = Monitor(model, cross_entropy, check_every=10)
    first.after_step(step=25)  # the step adopted from a trainer
    first.schedule.check_finished(20, 0.1, torch.device("cpu"))  # last check at 20, next at 30
    state = first.state_dict()
    second = Monitor(model, cross_entropy, check_every=4)
    with pytest.warns(hessdiag.HessdiagWarning, match="check_every=10"):
        second.load_state_dict(state)
    assert second.step == 25 and second.schedule.interval == 4 and second.schedule.next_check == 24


def test_a_fresh_fit_after_a_resumed_one_starts_fresh(tmp_path):
    diagnostics = HessianDiagnostics(check_every=3, log_every=2)
    fit(tmp_path / "first", Net(), [diagnostics], 9, loader())
    state = diagnostics.state_dict()
    assert state["step"] == 9
    resumed = HessianDiagnostics(check_every=3, log_every=2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[resumed])  # fmt: skip
    trainer.fit(Net(), loader())
    resumed.load_state_dict(state)  # as a checkpoint restore does, while the monitor exists
    assert resumed.monitor.step == 9
    fit(tmp_path / "fresh", Net(), [resumed], 4, loader())
    assert resumed.monitor.step == 4 and [c.step for c in resumed.monitor.checks] == [3]


@pytest.mark.parametrize(("frozen_size", "undone"), [(4, True), (400, False)])  # budget: 8 x 21 checked parameters
def test_a_closure_that_changes_parameters_outside_the_check_is_undone_or_refused(frozen_size, undone):
    """Within the snapshot budget the change is undone bit for bit; beyond it (a large frozen base)
    the check is refused with a message that says to define `hessdiag_loss`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3), nn.Linear(frozen_size, 1))
    model[1].requires_grad_(False)
    before = model[1].weight.detach().clone()

    def drifting_loss(m, batch):
        with torch.no_grad():
            m[1].weight.add_(1.0)  # an EMA-like update outside the Hessian's parameters
        return cross_entropy(m[0], batch)

    monitor = Monitor(model, drifting_loss, check_every=0, params=list(model[0].parameters()), strict=True)
    x, y = data(dtype=torch.float32)
    if undone:
        monitor.check_curvature((x, y))
        assert torch.equal(model[1].weight, before)
    else:
        with pytest.raises(hessdiag.LossClosureError, match="hessdiag_loss"):
            monitor.check_curvature((x, y))
