"""`LoggerWriter`: the diagnostics' scalars to every logger of a Lightning trainer (TensorBoard, CSV, ...)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from hessdiag.dashboard import LayerValues, shown_scalars
from hessdiag.flags import FlagEvent
from hessdiag.spectrum import SpectralDensity


class LoggerWriter:
    """A :class:`hessdiag.tensorboard.DiagnosticsWriter` over ``trainer.loggers`` (made on rank 0
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
