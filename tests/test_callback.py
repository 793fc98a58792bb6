"""The Lightning callback end to end on the CPU: logs, dashboard, DDP, AMP, accumulation, manual
optimisation, resume, injected faults, and zero observer effect."""

import glob
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins import MixedPrecision
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import hessdiag
from hessdiag.callbacks import HessianDiagnostics
from spawned import fit_spawned


def dataset(n=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.TensorDataset(x, y)


def loader(n=256, batch_size=32):
    return torch.utils.data.DataLoader(dataset(n), batch_size=batch_size, shuffle=False)


class Classifier(pl.LightningModule):
    def __init__(self, dropout=0.0, lr=0.1):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 3))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def trainer(tmp_path, callbacks, max_steps=40, **kwargs):
    options = dict(
        accelerator="cpu", max_steps=max_steps, limit_val_batches=0, log_every_n_steps=5,
        logger=TensorBoardLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    return pl.Trainer(**(options | kwargs))


def scalars(log_dir):
    files = glob.glob(os.path.join(str(log_dir), "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no event files under {log_dir}"
    values = {}
    for directory in sorted({os.path.dirname(f) for f in files}):
        accumulator = EventAccumulator(directory, size_guidance={"scalars": 0, "tensors": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: sorted(v) for tag, v in values.items()}


class RecordCheckBatches(pl.Callback):
    """Runs an independent, tightly converged Lanczos on each check batch, right after the check."""

    def __init__(self, every):
        self.every, self.reference = every, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            loss = lambda m, b: F.cross_entropy(m.net(b[0]), b[1])  # noqa: E731
            result = hessdiag.hessian_eigenvalues(pl_module, loss, batch, tol=1e-8, max_iter=200)
            self.reference[trainer.global_step] = (result.lambda_max, result.lambda_min)


def test_end_to_end_with_tensorboard(tmp_path):
    pl.seed_everything(0)
    reference = RecordCheckBatches(every=10)
    trainer(tmp_path, [HessianDiagnostics(check_every=10, density_every=2), reference]).fit(Classifier(), loader())
    logged = scalars(tmp_path)
    for tag in ["hessdiag/lambda_max", "hessdiag/lambda_min", "hessdiag/grad_norm", "hessdiag/stability_threshold",
                "hessdiag/num_hvps", "hessdiag/check_seconds", "hessdiag/layers/grad_norm/max"] + [
                f"hessdiag/flags/{name}" for name in hessdiag.flags.FLAG_NAMES]:  # fmt: skip
        assert tag in logged, tag
        assert all(math.isfinite(v) for _, v in logged[tag]), tag
    assert [s for s, _ in logged["hessdiag/lambda_max"]] == [10, 20, 30, 40]
    for step, value in logged["hessdiag/lambda_max"]:
        assert value == pytest.approx(reference.reference[step][0], rel=2e-3)
    assert logged["hessdiag/stability_threshold"][0][1] == pytest.approx(38.0)  # (2 + 2 * 0.9) / 0.1
    assert "train_loss" in logged  # the user's own logging is intact
    event_directory = glob.glob(str(tmp_path / "**" / "events.out.*"), recursive=True)[0].rsplit("/", 1)[0]
    accumulator = EventAccumulator(event_directory, size_guidance={"histograms": 0})
    accumulator.Reload()
    assert {"hessdiag/layer_grad_norms", "hessdiag/spectral_density"} <= set(accumulator.Tags()["histograms"])
    assert [event.step for event in accumulator.Histograms("hessdiag/spectral_density")] == [20, 40]  # 2nd, 4th check


def test_the_unified_lightning_package_gets_the_whole_dashboard(tmp_path):
    """`lightning.pytorch` has its own Trainer, Callback and TensorBoardLogger classes: the callback
    must be accepted there and recognise that logger (layout, histograms, text events)."""
    lightning = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import TensorBoardLogger as UnifiedTensorBoardLogger

    class UnifiedClassifier(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = HessianDiagnostics(check_every=10)
    lightning.Trainer(
        accelerator="cpu", max_steps=20, log_every_n_steps=5, logger=UnifiedTensorBoardLogger(tmp_path),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    ).fit(UnifiedClassifier(), loader())  # fmt: skip
    assert [check.step for check in callback.monitor.checks] == [10, 20]
    assert [s for s, _ in scalars(tmp_path)["hessdiag/lambda_max"]] == [10, 20]
    accumulator = EventAccumulator(glob.glob(str(tmp_path / "**" / "events.out.*"), recursive=True)[0].rsplit("/", 1)[0])
    accumulator.Reload()
    assert "hessdiag/layer_grad_norms" in accumulator.Tags()["histograms"]


def test_scalars_reach_every_logger(tmp_path):
    pl.seed_everything(0)
    csv = CSVLogger(tmp_path / "csv")
    trainer(tmp_path, [HessianDiagnostics(check_every=10)], logger=[TensorBoardLogger(tmp_path / "tb"), csv]).fit(
        Classifier(), loader()
    )
    header = open(glob.glob(str(tmp_path / "csv" / "**" / "metrics.csv"), recursive=True)[0]).readline()
    assert "hessdiag/lambda_max" in header and "hessdiag/flags/saddle" in header


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_server_serves_scalars_and_the_layout(tmp_path):
    pl.seed_everything(0)
    trainer(tmp_path, [HessianDiagnostics(check_every=10)], max_steps=20).fit(Classifier(), loader())
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}/data/plugin"
        deadline = time.time() + 60
        while True:
            try:
                tags = json.load(urllib.request.urlopen(f"{base}/scalars/tags", timeout=5))
                if tags:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "TensorBoard did not come up"
            time.sleep(0.5)
        run = next(iter(tags))
        assert "hessdiag/lambda_max" in tags[run]
        layout = json.load(urllib.request.urlopen(f"{base}/custom_scalars/layout", timeout=5))
        charts = [chart["multiline"]["tag"] for category in layout["category"] for chart in category["chart"]]
        # Each chart's patterns are anchored: they draw exactly the series they name; the sharpness and
        # its threshold have a chart each (Adam's threshold would flatten the sharpness onto 0).
        assert ["^hessdiag/sharpness$"] in charts and ["^hessdiag/stability_threshold$"] in charts
    finally:
        server.terminate()
        server.wait(timeout=30)


class RankReport(pl.Callback):
    """Under ddp_spawn the parent's callback is not updated: each rank writes what it decided."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        monitor = next(c for c in trainer.callbacks if isinstance(c, HessianDiagnostics)).monitor
        report = {
            "lambda_max": [c.lambda_max for c in monitor.checks],
            "flags": [(e.name, e.kind, e.step) for e in monitor.events],
            "steps": monitor.step,
            "check_noise": [c.noise for c in monitor.checks],
            "rank_noise_scale": monitor.noise.ranks.running.state_dict(),
            "verdict": monitor.noise.verdict(),
        }
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(report, f)


def test_ddp_two_cpu_processes(tmp_path):
    pl.seed_everything(0)
    run = trainer(
        tmp_path, [HessianDiagnostics(check_every=5), RankReport(str(tmp_path))], max_steps=15,
        strategy="ddp_spawn", devices=2,
    )  # fmt: skip
    fit_spawned(run, Classifier(), loader(n=128, batch_size=16), finished=[str(tmp_path / f"rank{r}.json") for r in range(2)])
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert ranks[0] == ranks[1]  # identical curvature and identical flag decisions
    assert len(ranks[0]["lambda_max"]) == 3
    # The noise scale from the ranks' local gradients at every step, not the checks' split.
    assert ranks[0]["check_noise"] == [None] * 3 and ranks[0]["rank_noise_scale"]["count"] == 15
    assert "vs batch 32" in ranks[0]["verdict"]  # 16 samples on each of 2 ranks
    logged = scalars(tmp_path)
    assert "hessdiag/noise_scale" in logged
    assert [s for s, _ in logged["hessdiag/lambda_max"]] == [5, 10, 15]  # rank 0 alone logged once per check
    for (_, value), expected in zip(logged["hessdiag/lambda_max"], ranks[0]["lambda_max"]):
        assert value == pytest.approx(expected, rel=1e-6)


def test_bf16_autocast_checks_run_in_float32(tmp_path):
    pl.seed_everything(0)
    reference = RecordCheckBatches(every=10)
    trainer(tmp_path, [HessianDiagnostics(check_every=10), reference], max_steps=20, precision="bf16-mixed").fit(
        Classifier(), loader()
    )
    logged = scalars(tmp_path)
    for step, value in logged["hessdiag/lambda_max"]:
        assert value == pytest.approx(reference.reference[step][0], rel=2e-3)


class FineTuned(pl.LightningModule):
    """A backbone that Lightning's BackboneFinetuning freezes, then unfreezes into a new param group
    with its own (growing) learning rate."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.Tanh())
        self.head = nn.Linear(32, 3)

    def net(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1, momentum=0.9)


def test_backbone_finetuning_brings_the_unfrozen_backbone_into_the_checks(tmp_path):
    """Checks before the unfreezing cover the head, after it the whole model (a cold start), each
    equal to an independent Lanczos on the trainable parameters of that moment; the threshold reads
    the two param groups' learning rates."""
    from pytorch_lightning.callbacks import BackboneFinetuning

    reference = RecordCheckBatches(every=10)
    diagnostics = HessianDiagnostics(check_every=10)
    unfreeze = BackboneFinetuning(unfreeze_backbone_at_epoch=2)  # 8 batches an epoch: from step 16 on
    trainer(tmp_path, [unfreeze, diagnostics, reference], max_steps=40).fit(FineTuned(), loader())
    checks = diagnostics.monitor.checks
    assert [c.step for c in checks] == [10, 20, 30, 40]
    assert [c.cold for c in checks[:2]] == [True, True]  # the dimension grew: no warm start across it
    for check in checks:
        assert check.lambda_max == pytest.approx(reference.reference[check.step][0], rel=2e-3)
    assert checks[-1].stability is not None and math.isfinite(checks[-1].stability_ratio)
    assert "hessdiag/layer_grad_norm" not in str(scalars(tmp_path))  # per-layer values stay summarised


def test_bf16_true_precision_checks_stop_at_the_precision_floor(tmp_path):
    """"bf16-true" converts the model after the callback's setup: the first check notices the bfloat16
    parameters, whose rounding the bounds include, says that `tol` is raised to their floor, and
    stops there instead of running to `max_iter`."""
    diagnostics = HessianDiagnostics(check_every=5, max_iter=40)
    with pytest.warns(hessdiag.HessdiagWarning, match="torch.bfloat16.*`tol`=0.001 cannot be proven"):
        trainer(tmp_path, [diagnostics], max_steps=5, precision="bf16-true").fit(Classifier(), loader())
    (check,) = diagnostics.monitor.checks
    assert check.converged and check.tol == 8 * torch.finfo(torch.bfloat16).eps and check.product_error > 0
    assert check.num_hvps < 40


class OverflowsAt(Classifier):
    """Puts an inf into a gradient after the backward at the given steps, as an fp16 overflow would."""

    def __init__(self, steps):
        super().__init__()
        self.overflow_steps = steps

    def on_after_backward(self):
        if self.trainer.global_step in self.overflow_steps:
            self.net[0].weight.grad[0, 0] = float("inf")


def test_fp16_loss_scaler_skips_are_counted_not_flagged(tmp_path):
    pl.seed_everything(0)
    callback = HessianDiagnostics(check_every=10)
    trainer(tmp_path, [callback], max_steps=30, plugins=[MixedPrecision("16-mixed", "cpu")]).fit(
        OverflowsAt({2, 3, 11}), loader()
    )
    assert callback.monitor.grad_scaler is not None and callback.monitor.overflow_skips == 3
    assert not any(event.name == "exploding" for event in callback.monitor.events)
    logged = scalars(tmp_path)
    assert logged["hessdiag/overflow_skips"][-1][1] == 3
    assert [s for s, _ in logged["hessdiag/lambda_max"]] == [10, 20, 30]


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    pl.seed_everything(0)
    callback = HessianDiagnostics(check_every=5, log_every=5)
    trainer(tmp_path, [callback], max_steps=15, accumulate_grad_batches=3).fit(Classifier(), loader(n=512))
    assert callback.monitor.step == 15
    assert [c.step for c in callback.monitor.checks] == [5, 10, 15]
    # The noise scale from the step's three micro-batches' gradients, not from cutting the first.
    assert all((c.noise.small_batch, c.noise.num_small, c.noise.big_batch) == (32, 3, 96) for c in callback.monitor.checks)
    logged = scalars(tmp_path)
    assert [s for s, _ in logged["hessdiag/grad_norm"]] == [5, 10, 15]


class ManualWithoutHook(Classifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.manual_backward(loss)
        optimizer.step()
        return loss


class ManualWithHook(ManualWithoutHook):
    def hessdiag_loss(self, batch):
        return F.cross_entropy(self.net(batch[0]), batch[1])


def test_manual_optimisation_uses_the_hessdiag_loss_hook(tmp_path):
    pl.seed_everything(0)
    callback = HessianDiagnostics(check_every=10)
    trainer(tmp_path, [callback], max_steps=20).fit(ManualWithHook(), loader())
    assert [c.step for c in callback.monitor.checks] == [10, 20]
    assert callback.monitor.step == 20


def test_manual_optimisation_without_a_loss_is_a_clear_error(tmp_path):
    with pytest.raises(MisconfigurationException, match="with manual optimisation `training_step` steps the optimizer"):
        trainer(tmp_path, [HessianDiagnostics(check_every=10)], max_steps=5).fit(ManualWithoutHook(), loader())


def test_resume_continues_the_curves(tmp_path):
    pl.seed_everything(0)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=20)
    first = HessianDiagnostics(check_every=10)
    trainer(tmp_path / "a", [first, checkpoint], max_steps=20, enable_checkpointing=True).fit(Classifier(), loader())
    saved = first.monitor.state_dict()
    second = HessianDiagnostics(check_every=10)
    trainer(tmp_path / "b", [second], max_steps=40).fit(Classifier(), loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [c.step for c in second.monitor.checks] == [30, 40]
    assert second.monitor.probe.num_checks == 4  # warm starts continued from the checkpoint
    assert not second.monitor.checks[0].cold
    assert second.monitor.detectors["exploding"].state_dict()["norms"][: len(saved["detectors"]["exploding"]["norms"])] == saved["detectors"]["exploding"]["norms"]
    logged = scalars(tmp_path / "b")
    assert [s for s, _ in logged["hessdiag/lambda_max"]] == [30, 40]


class NaNAfter(Classifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= 12 else loss


def test_fault_nan_loss_is_flagged_and_training_completes(tmp_path):
    pl.seed_everything(0)
    callback = HessianDiagnostics(check_every=10)
    with pytest.warns(UserWarning, match="curvature check at step 20 failed"):
        trainer(tmp_path, [callback], max_steps=25).fit(NaNAfter(), loader())
    assert callback.monitor.step == 25
    assert any(e.name == "exploding" and e.kind == "onset" and e.severity == "critical" for e in callback.monitor.events)
    logged = scalars(tmp_path)
    assert dict(logged["hessdiag/flags/exploding"])[15] == 1.0
    assert dict(logged["hessdiag/check_failed"])[20] == 1.0
    accumulator = EventAccumulator(glob.glob(str(tmp_path / "**" / "events.out.*"), recursive=True)[0].rsplit("/", 1)[0])
    accumulator.Reload()
    texts = set(accumulator.Tags()["tensors"])
    assert {"hessdiag/events/exploding/text_summary", "hessdiag/events/check_failed/text_summary"} <= texts


class WithCTC(Classifier):
    """A loss with an op that has no second derivative (CTC)."""

    def training_step(self, batch, batch_idx):
        log_probs = self.net(batch[0]).log_softmax(-1).unsqueeze(0).expand(4, -1, -1)
        targets = batch[1].clamp(min=1).unsqueeze(1)
        n = batch[0].shape[0]
        return F.ctc_loss(log_probs, targets, torch.full((n,), 4), torch.full((n,), 1))


def test_fault_op_without_second_derivative_backs_off(tmp_path):
    pl.seed_everything(0)
    callback = HessianDiagnostics(check_every=5, hvp_method="double_backward")  # "auto" measures CTC by finite differences
    with pytest.warns(UserWarning, match="_ctc_loss_backward"):
        trainer(tmp_path, [callback], max_steps=30).fit(WithCTC(), loader())
    assert callback.monitor.step == 30 and callback.monitor.checks == []
    failed = [s for s, v in scalars(tmp_path)["hessdiag/check_failed"] if v == 1.0]
    assert failed == [5, 10, 20]  # exponential back-off: after 5, 5 x 1, then 5 x 2 steps


def test_fault_raising_closure_with_strict_reraises(tmp_path):
    def broken(module, batch):
        raise KeyError("no such input")

    pl.seed_everything(0)
    with pytest.warns(UserWarning, match="KeyError"):
        trainer(tmp_path / "soft", [HessianDiagnostics(check_every=5, loss_fn=broken)], max_steps=10).fit(Classifier(), loader())
    with pytest.raises(hessdiag.LossClosureError, match="KeyError"):
        trainer(tmp_path / "strict", [HessianDiagnostics(check_every=5, loss_fn=broken, strict=True)], max_steps=10).fit(
            Classifier(), loader()
        )


def test_zero_observer_effect(tmp_path):
    def run(callbacks, directory):
        pl.seed_everything(0)
        model = Classifier(dropout=0.2)
        fit = trainer(directory, callbacks, max_steps=25)
        fit.fit(model, loader())
        return model, fit.optimizers[0], torch.get_rng_state()

    plain_model, plain_optimizer, plain_rng = run([], tmp_path / "plain")
    model, optimizer, rng = run([HessianDiagnostics(check_every=4, log_every=3)], tmp_path / "watched")
    assert torch.equal(rng, plain_rng)
    for (name, a), b in zip(plain_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(plain_optimizer.state.values(), optimizer.state.values()):
        assert all(torch.equal(a[key], b[key]) for key in a)


class LayerNormClassifier(Classifier):
    """Samples independent (LayerNorm, dropout): a check's products can be taken on parts of the batch."""

    def __init__(self):
        super().__init__(dropout=0.2)
        self.net = nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 3))


def test_products_on_parts_of_the_batch_leave_no_trace_in_a_lightning_run(tmp_path):
    """What ``product_parts="auto"`` does on an accelerator, here asked for on the CPU: the comparison
    of the step loss with its parts' (dropout off) and the products part by part leave the run as
    it is without hessdiag."""

    def run(callbacks, directory):
        pl.seed_everything(0)
        model = LayerNormClassifier()
        fit = trainer(directory, callbacks, max_steps=25)
        fit.fit(model, loader())
        return model, fit.optimizers[0], torch.get_rng_state()

    plain_model, plain_optimizer, plain_rng = run([], tmp_path / "plain")
    diagnostics = HessianDiagnostics(check_every=4, log_every=3, product_parts=4)
    model, optimizer, rng = run([diagnostics], tmp_path / "watched")
    assert diagnostics.monitor.probe.parts_reason.startswith("4 parts of 8 samples")
    assert len(diagnostics.monitor.checks) == 6
    assert torch.equal(rng, plain_rng)
    for (name, a), b in zip(plain_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(plain_optimizer.state.values(), optimizer.state.values()):
        assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"check_every": -1}, "`check_every` must be an int >= 0 or 'auto', got -1"),
        ({"log_every": -2}, "`log_every` must be a positive int or None"),
        ({"loss_fn": 3}, "`loss_fn` must be callable"),
        ({"tol": 2.0}, r"`tol` must be a number in \(0, 1\)"),
        ({"sub_batch": -1}, "`sub_batch` must be a positive int or None"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HessianDiagnostics(**kwargs)


class TaskByBatchIdx(Classifier):
    """A multi-task module that picks its task from `batch_idx`: odd batches train a second head on a
    loss ten times larger."""

    def __init__(self):
        super().__init__()
        self.other = nn.Linear(32, 3)

    def training_step(self, batch, batch_idx):
        head = self.net if batch_idx % 2 == 0 else nn.Sequential(self.net[:-1], self.other)
        return 10.0 ** (batch_idx % 2) * F.cross_entropy(head(batch[0]), batch[1])


class StepLossAfterTheStep(pl.Callback):
    """The step's own loss at the parameters the check sees (placed before the diagnostics)."""

    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with torch.no_grad():
            self.losses[trainer.global_step] = float(pl_module.training_step(batch, batch_idx))


def test_a_check_measures_the_loss_of_the_steps_own_batch_idx(tmp_path):
    pl.seed_everything(0)
    recorder, diagnostics = StepLossAfterTheStep(), HessianDiagnostics(check_every=3, log_every=3)
    trainer(tmp_path, [recorder, diagnostics], max_steps=12).fit(TaskByBatchIdx(), loader())
    checks = diagnostics.monitor.checks
    assert [check.step for check in checks] == [3, 6, 9, 12]  # batch_idx 2, 5, then 0, 3 (8 batches an epoch)
    for check in checks:
        assert check.loss == pytest.approx(recorder.losses[check.step], rel=1e-5)


def test_check_every_zero_means_no_checks_as_in_the_monitor(tmp_path):
    diagnostics = HessianDiagnostics(check_every=0, log_every=5)
    trainer(tmp_path, [diagnostics], max_steps=10).fit(Classifier(), loader())
    assert diagnostics.monitor.checks == [] and diagnostics.monitor.failed_checks == []
    assert "hessdiag/grad_norm" in diagnostics.monitor.latest  # the per-step statistics still run


class PlateauScheduled(Classifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "hessdiag/lambda_max"}}


def test_a_scheduler_monitoring_a_hessdiag_key_finds_it_at_the_first_epoch_end(tmp_path):
    diagnostics = HessianDiagnostics(check_every=100, log_every=100)  # no check before the epoch ends
    trainer(tmp_path, [diagnostics], max_steps=12).fit(PlateauScheduled(), loader())  # 8 steps an epoch
    assert diagnostics.monitor.checks[0].step == 1  # the first values, out of cadence


def test_model_checkpoint_on_the_hessdiag_loss_saves(tmp_path):
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="hessdiag/loss")
    diagnostics = HessianDiagnostics(check_every=100, log_every=4)
    trainer(tmp_path, [diagnostics, checkpoint], max_steps=16, enable_checkpointing=True).fit(Classifier(), loader())
    assert checkpoint.best_model_path and os.path.exists(checkpoint.best_model_path)
    assert checkpoint.best_model_score is not None
