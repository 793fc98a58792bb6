"""The callback acts, as a Lightning user relies on: ``trainer.callback_metrics`` for EarlyStopping
and ModelCheckpoint, ``stop_on`` (one process and DDP), ``on_flag``."""

import json
import os

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from hessdiag.callbacks import HessianDiagnostics
from hessdiag.errors import HessdiagWarning
from hessdiag.flags import FLAG_NAMES, FlagEvent
from spawned import fit_spawned

DIVERGE_AT = 30  # the optimizer step from which the learning rate makes the run diverge


def loader(n=128, batch_size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


class Classifier(pl.LightningModule):
    """A small MLP; with `diverge_at`, its learning rate jumps to 1e3 from that optimizer step on."""

    def __init__(self, diverge_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.diverge_at = diverge_at
        self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))

    def on_train_batch_start(self, batch, batch_idx):
        if self.diverge_at is not None and self.trainer.global_step + 1 == self.diverge_at:
            self.optimizers().param_groups[0]["lr"] = 1e3

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def trainer(tmp_path, callbacks, max_steps=60, **kwargs):
    options = dict(
        accelerator="cpu", max_steps=max_steps, limit_val_batches=0, log_every_n_steps=1,
        logger=TensorBoardLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    return pl.Trainer(**(options | kwargs))


class RecordMetrics(pl.Callback):
    """What a user's callback sees in ``trainer.callback_metrics`` after each training batch."""

    def __init__(self):
        self.at_start, self.by_step = None, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.at_start is None:
            self.at_start = dict(trainer.callback_metrics)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.by_step[trainer.global_step] = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("hessdiag/")}


def test_callback_metrics_hold_the_latest_values_as_tensors(tmp_path):
    diagnostics, record = HessianDiagnostics(check_every=4, log_every=3), RecordMetrics()
    trainer(tmp_path, [diagnostics, record], max_steps=12).fit(Classifier(), loader())
    flags = {f"hessdiag/flags/{name}" for name in FLAG_NAMES}
    # Before anything is measured: the flags only (none raised), so EarlyStopping on a flag finds its key.
    assert {k for k in record.at_start if k.startswith("hessdiag/")} == flags
    assert set(record.by_step[2]) == flags  # no read-back yet
    assert set(record.by_step[3]) == flags | {"hessdiag/grad_norm", "hessdiag/loss"}  # the first read-back
    after_check = record.by_step[4]
    assert set(after_check) == flags | {"hessdiag/grad_norm", "hessdiag/loss", "hessdiag/lambda_max", "hessdiag/lambda_min", "hessdiag/stability_ratio"}
    for value in after_check.values():
        assert isinstance(value, torch.Tensor) and value.shape == () and value.device.type == "cpu"
    checks = diagnostics.monitor.checks
    assert [c.step for c in checks] == [4, 8, 12]
    for check in checks:
        metrics = record.by_step[check.step]
        assert metrics["hessdiag/lambda_max"].item() == pytest.approx(check.lambda_max, rel=1e-6)
        assert metrics["hessdiag/lambda_min"].item() == pytest.approx(check.lambda_min, rel=1e-6, abs=1e-9)
        assert metrics["hessdiag/stability_ratio"].item() == pytest.approx(check.stability_ratio, rel=1e-6)
    assert record.by_step[11]["hessdiag/lambda_max"] == record.by_step[8]["hessdiag/lambda_max"]  # held between checks


def test_early_stopping_on_the_exploding_flag_stops_a_diverging_run(tmp_path):
    stopper = EarlyStopping(monitor="hessdiag/flags/exploding", mode="min", divergence_threshold=0.5, patience=1000)
    diagnostics = HessianDiagnostics(check_every=1000)
    run = trainer(tmp_path, [diagnostics, stopper], max_steps=200, limit_train_batches=4)  # an epoch: 4 steps
    with pytest.warns(HessdiagWarning):  # the non-finite steps, and no curvature check in the run
        run.fit(Classifier(diverge_at=DIVERGE_AT), loader())
    (onset,) = [e for e in diagnostics.monitor.events if e.name == "exploding" and e.kind == "onset"]
    assert DIVERGE_AT <= onset.step and run.global_step == 4 * -(-onset.step // 4)  # the epoch end after it
    assert run.global_step < 200 and stopper.stopped_epoch > 0


def test_early_stopping_on_lambda_max_stops_when_the_curvature_passes_a_threshold(tmp_path):
    stopper = EarlyStopping(monitor="hessdiag/lambda_max", mode="min", divergence_threshold=1e-9, patience=1000)
    diagnostics = HessianDiagnostics(check_every=4)
    run = trainer(tmp_path, [diagnostics, stopper], max_steps=40, limit_train_batches=4)
    run.fit(Classifier(), loader())
    assert run.global_step == 4 and diagnostics.monitor.checks[0].lambda_max > 1e-9  # the first check stops it


def test_a_healthy_run_is_not_stopped_by_early_stopping_on_a_flag(tmp_path):
    stopper = EarlyStopping(monitor="hessdiag/flags/exploding", mode="min", divergence_threshold=0.5, patience=1000)
    run = trainer(tmp_path, [HessianDiagnostics(check_every=10), stopper], max_steps=24, limit_train_batches=4)
    run.fit(Classifier(), loader())  # the first epoch ends before any read-back: the flag's key is there
    assert run.global_step == 24


def test_model_checkpoint_keeps_the_flattest_check(tmp_path):
    diagnostics = HessianDiagnostics(check_every=4)
    keeper = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="hessdiag/lambda_max", mode="min", save_top_k=1, every_n_train_steps=4)
    trainer(tmp_path, [diagnostics, keeper], max_steps=16, enable_checkpointing=True).fit(Classifier(), loader())
    assert [c.step for c in diagnostics.monitor.checks] == [1, 4, 8, 12, 16]  # the watched value exists from step 1
    flattest = min(diagnostics.monitor.checks[1:], key=lambda c: c.lambda_max)  # those at the saving steps
    assert keeper.best_model_score.item() == pytest.approx(flattest.lambda_max, rel=1e-6)
    assert f"step={flattest.step}" in keeper.best_model_path


def test_stop_on_stops_a_diverging_run_at_the_onset_step_with_the_evidence(tmp_path):
    seen = []
    diagnostics = HessianDiagnostics(check_every=1000, stop_on=("exploding",), on_flag=lambda e, t, m: seen.append((e, t.global_step)))
    run = trainer(tmp_path, [diagnostics], max_steps=200)
    with pytest.warns(HessdiagWarning, match=r"stopping at step \d+: `exploding` \(in stop_on\) raised at step \d+"):
        run.fit(Classifier(diverge_at=DIVERGE_AT), loader())
    (event, called_at), *_ = seen
    assert isinstance(event, FlagEvent) and event.name == "exploding" and event.kind == "onset"
    assert DIVERGE_AT <= event.step == called_at == run.global_step  # log_every 1: stopped at the onset step
    assert run.should_stop and "Evidence: grad_norm=" in diagnostics.stop_reason and event.remedy in diagnostics.stop_reason


def test_stop_on_is_known_at_the_first_read_back_after_the_onset(tmp_path):
    diagnostics = HessianDiagnostics(check_every=1000, log_every=8, stop_on=["exploding", "vanishing"])
    run = trainer(tmp_path, [diagnostics], max_steps=200)
    with pytest.warns(HessdiagWarning, match="stopping at step"):
        run.fit(Classifier(diverge_at=DIVERGE_AT), loader())
    (onset,) = [e for e in diagnostics.monitor.events if e.kind == "onset"]
    assert onset.name == "exploding" and run.global_step == 8 * -(-onset.step // 8)
    assert f"raised at step {onset.step}" in diagnostics.stop_reason


def test_a_healthy_run_is_not_stopped_by_stop_on(tmp_path):
    diagnostics = HessianDiagnostics(check_every=5, stop_on=FLAG_NAMES)
    run = trainer(tmp_path, [diagnostics], max_steps=30)
    run.fit(Classifier(), loader())
    assert run.global_step == 30 and diagnostics.stop_reason is None


def test_on_flag_receives_onsets_and_clearances_and_its_errors_do_not_stop_training(tmp_path):
    calls = []

    def on_flag(event, trainer, pl_module):
        calls.append((event.name, event.kind, event.step))
        raise RuntimeError("the user's hook is broken")

    diagnostics = HessianDiagnostics(check_every=1000, log_every=5, on_flag=on_flag)
    run = trainer(tmp_path, [diagnostics], max_steps=60)
    with pytest.warns(HessdiagWarning, match="the `on_flag` callable failed at step .*RuntimeError: the user's hook is broken"):
        run.fit(Classifier(diverge_at=DIVERGE_AT), loader())
    assert run.global_step == 60  # training went on
    assert calls == [(e.name, e.kind, e.step) for e in diagnostics.monitor.events] and calls


def test_on_flag_errors_are_raised_with_strict(tmp_path):
    def on_flag(event, trainer, pl_module):
        raise RuntimeError("the user's hook is broken")

    diagnostics = HessianDiagnostics(check_every=1000, on_flag=on_flag, strict=True)
    with pytest.raises(RuntimeError, match="the user's hook is broken"):
        trainer(tmp_path, [diagnostics], max_steps=60).fit(Classifier(diverge_at=DIVERGE_AT), loader())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(stop_on=("exploding", "explosion")), r"`stop_on`: unknown flag name\(s\) \['explosion'\]; the names are \("),
        (dict(stop_on="exploding"), r"`stop_on` must be a sequence of flag names"),
        (dict(on_flag="print"), r"`on_flag` must be callable as on_flag\(event, trainer, pl_module\), got str"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HessianDiagnostics(**kwargs)


class WriteEvents:
    """An `on_flag` that survives spawning: each rank appends what it saw to its own file."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def __call__(self, event, trainer, pl_module):
        with open(os.path.join(self.out_dir, f"flags{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps({"name": event.name, "kind": event.kind, "step": event.step, "at": trainer.global_step}) + "\n")


class WriteStop(pl.Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        diagnostics = next(c for c in trainer.callbacks if isinstance(c, HessianDiagnostics))
        with open(os.path.join(self.out_dir, f"stop{trainer.global_rank}.json"), "w") as f:
            json.dump({"step": trainer.global_step, "reason": diagnostics.stop_reason}, f)


def test_stop_on_under_ddp_stops_both_ranks_at_the_same_step(tmp_path):
    out = str(tmp_path)
    callbacks = [HessianDiagnostics(check_every=1000, stop_on=("exploding",), on_flag=WriteEvents(out)), WriteStop(out)]
    run = trainer(tmp_path, callbacks, max_steps=200, strategy="ddp_spawn", devices=2)
    fit_spawned(run, Classifier(diverge_at=DIVERGE_AT), loader(), finished=[os.path.join(out, f"stop{rank}.json") for rank in (0, 1)])
    stops = [json.load(open(os.path.join(out, f"stop{rank}.json"))) for rank in (0, 1)]
    events = [[json.loads(line) for line in open(os.path.join(out, f"flags{rank}.jsonl"))] for rank in (0, 1)]
    onset = events[0][0]
    assert onset["name"] == "exploding" and onset["kind"] == "onset" and onset["step"] >= DIVERGE_AT
    assert stops[0]["step"] == stops[1]["step"] == onset["step"] == onset["at"]  # at the onset, on both ranks
    assert f"raised at step {onset['step']}" in stops[0]["reason"] and stops[1]["reason"]


@pytest.mark.parametrize("watched", ["hessdiag/lambda_max", "hessdiag/grad_norm"])
def test_watching_a_value_before_its_first_check_or_read_back_does_not_stop_the_run(tmp_path, watched):
    """Epochs of 4 steps with validation, checks every 10 steps, read-backs every 6: Lightning's
    ModelCheckpoint and EarlyStopping raise when the key they watch is missing at the first epoch's
    end. The callback measures it at the first optimizer step instead (found by trying it)."""

    class Validated(Classifier):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    diagnostics = HessianDiagnostics(check_every=10, log_every=6)
    keeper = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=watched, mode="min", save_top_k=1)
    stopper = EarlyStopping(monitor=watched, mode="min", patience=1000)
    run = trainer(tmp_path, [stopper, diagnostics, keeper], max_steps=12, limit_train_batches=4, limit_val_batches=2,
                  enable_checkpointing=True)  # fmt: skip
    run.fit(Validated(), loader(), loader(64))
    assert run.global_step == 12 and keeper.best_model_score is not None
    # a curvature value needs a check at the first step; a per-step statistic only the read-back
    assert [c.step for c in diagnostics.monitor.checks] == ([1, 10] if watched == "hessdiag/lambda_max" else [10])
