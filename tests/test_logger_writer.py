"""`hessdiag.callbacks.logger_writer` and `callback_metrics`: what reaches the loggers, the metrics and the bar."""

from types import SimpleNamespace

import pytest
import torch

from hessdiag.callbacks.callback_metrics import (
    CALLBACK_METRICS,
    publish,
    show_in_progress_bar,
    watched_by_another_callback,
)
from hessdiag.callbacks.logger_writer import LoggerWriter
from hessdiag.reporting.dashboard import shown_scalars

VALUES = {
    "hessdiag/lambda_max": 2.5,
    "hessdiag/grad_norm": 0.5,
    "hessdiag/flags/saddle": 1.0,
    "hessdiag/num_hvps": 9.0,
}
LAYERS = {"layer_grad_norm": {"net.weight": 0.25, "net.bias": 0.5}}


def test_scalars_reach_every_logger_as_the_dashboard_shows_them(fake_trainer):
    writer = LoggerWriter(fake_trainer)
    writer.scalars(10, VALUES, LAYERS)
    writer.flush()
    for logger in fake_trainer.loggers:
        assert logger.metrics == [(10, shown_scalars(VALUES, LAYERS))] and logger.saves == 1


def test_the_callback_metrics_are_the_contracts_values_as_float32_tensors(fake_trainer):
    publish(fake_trainer, VALUES)
    assert set(fake_trainer.callback_metrics) == {"hessdiag/lambda_max", "hessdiag/grad_norm", "hessdiag/flags/saddle"}
    assert fake_trainer.callback_metrics["hessdiag/lambda_max"].dtype == torch.float32
    assert float(fake_trainer.callback_metrics["hessdiag/lambda_max"]) == 2.5


@pytest.mark.parametrize(("watched", "expected"), [("hessdiag/lambda_max", True), ("val_loss", False), (None, False)])
def test_a_watching_callback_is_one_that_monitors_our_values(fake_trainer, watched, expected):
    fake_trainer.callbacks = [type("Watcher", (), {"monitor": watched})()]
    assert watched_by_another_callback(fake_trainer) is expected
    assert "hessdiag/stability_ratio" in CALLBACK_METRICS


def test_the_progress_bar_shows_lambda_max_and_the_active_flags_but_no_logger_gets_them():
    trainer = SimpleNamespace(progress_bar_metrics={"loss": 0.3}, loggers=[])
    show_in_progress_bar(trainer, 2.5, 2)
    assert trainer.progress_bar_metrics == {"loss": 0.3, "λmax": 2.5, "flags": 2}  # host numbers, no tensors
    assert isinstance(trainer.progress_bar_metrics["flags"], int)
