"""`LoggerWriter`: the diagnostics' scalars to every logger of a Lightning trainer (TensorBoard, CSV, ...);
:func:`trainer_writers`: the writers of a trainer (with the dashboard's own TensorBoard writer)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info

from hessdiag.reporting.dashboard import LayerValues, shown_scalars
from hessdiag.flags import FlagEvent
from hessdiag.estimators.spectrum import SpectralDensity
from hessdiag.reporting.tensorboard import TensorBoardWriter

_TENSORBOARD_LOGGERS: tuple[type, ...] = (TensorBoardLogger,)
try:  # the unified `lightning` package's logger too, when it is installed beside pytorch_lightning
    from lightning.pytorch.loggers import TensorBoardLogger as _UnifiedTensorBoardLogger

    if _UnifiedTensorBoardLogger is not TensorBoardLogger:
        _TENSORBOARD_LOGGERS += (_UnifiedTensorBoardLogger,)
except ImportError:
    pass


def trainer_writers(trainer: pl.Trainer) -> list[Any]:
    """The writers of `trainer` (on rank 0; none elsewhere): a :class:`LoggerWriter` for the scalars,
    and for each TensorBoard logger a TensorBoard writer for what loggers cannot show (the layout,
    histograms, flag events, the density, text)."""
    writers: list[Any] = []
    if trainer.is_global_zero:
        writers.append(LoggerWriter(trainer))
        for logger in trainer.loggers:
            if isinstance(logger, _TENSORBOARD_LOGGERS):
                writers.append(TensorBoardWriter(logger.experiment, write_scalars=False))
    return writers


class LoggerWriter:
    """A :class:`hessdiag.reporting.tensorboard.DiagnosticsWriter` over ``trainer.loggers`` (made on rank 0
    only): scalars to every logger, each flag onset as an info line; densities and text
    are left to the TensorBoard writer, which loggers cannot show."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer

    def scalars(self, step: int, values: Mapping[str, float], layers: LayerValues) -> None:
        for logger in self.trainer.loggers:
            logger.log_metrics(shown_scalars(values, layers), step=step)

    def events(self, step: int, events: Sequence[FlagEvent]) -> None:
        for event in events:
            if event.kind == "onset":
                rank_zero_info(f"hessdiag: {event.name} at step {event.step}: {event.summary} Remedy: {event.remedy}")

    def density(self, step: int, density: SpectralDensity) -> None:
        pass

    def text(self, step: int, tag: str, message: str) -> None:
        pass

    def flush(self) -> None:
        for logger in self.trainer.loggers:
            logger.save()
