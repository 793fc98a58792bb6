"""Fan-out of what the Monitor found to every writer, over the :class:`DiagnosticsWriter` protocol.

Writers are resolved once, at construction: a SummaryWriter is wrapped into a
:class:`~hessdiag.reporting.tensorboard.TensorBoardWriter`, a :class:`DiagnosticsWriter` is used as it is.
A failing writer (a full disk, say) is reported once and does not stop the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hessdiag.reporting.dashboard import LayerValues
from hessdiag.flags import FlagEvent
from hessdiag.monitor.faults import FaultPolicy
from hessdiag.estimators.spectrum import SpectralDensity
from hessdiag.reporting.tensorboard import DiagnosticsWriter, SummaryWriterLike, TensorBoardWriter


def resolve_writers(writer: Any) -> list[DiagnosticsWriter]:
    """The writers for `writer`: None, a SummaryWriter, a :class:`DiagnosticsWriter`, or a list of them.

    Raises:
        ValueError: anything else, named in the message.
    """
    if writer is None:
        return []
    items = writer if isinstance(writer, (list, tuple)) else [writer]
    resolved: list[DiagnosticsWriter] = []
    for item in items:
        if isinstance(item, SummaryWriterLike):
            resolved.append(TensorBoardWriter(item))
        elif isinstance(item, DiagnosticsWriter):
            resolved.append(item)
        else:
            raise ValueError(
                f"`writer` must be a SummaryWriter, a DiagnosticsWriter or a list of them, got {type(item).__name__}."
            )
    return resolved


class WriterFanOut:
    """Sends each call to every writer, each under the fault policy's guard.

    Args:
        writers: the resolved writers (see :func:`resolve_writers`).
        faults: the policy that reports a failing writer once.

    Attributes:
        latest: the last value of every scalar tag sent (host floats), whether or not a writer took it.
    """

    def __init__(self, writers: Sequence[DiagnosticsWriter], faults: FaultPolicy) -> None:
        self.writers = list(writers)
        self._faults = faults
        self.latest: dict[str, float] = {}

    def remember(self, values: Mapping[str, float]) -> None:
        """Take `values` as the latest without writing them (the flags before the first read-back)."""
        self.latest.update(values)

    def emit(
        self,
        step: int,
        scalars: Mapping[str, float],
        layers: LayerValues,
        events: Sequence[FlagEvent] = (),
        density: SpectralDensity | None = None,
    ) -> None:
        """What one read-back or check found: its scalars, per-layer values, new events and density."""
        self.scalars(step, scalars, layers)
        if events:
            self.events(step, events)
        if density is not None:
            self.density(step, density)

    def _guard(self, writer: DiagnosticsWriter, method: str):
        return self._faults.guard(f"{type(writer).__name__}.{method}")

    def scalars(self, step: int, values: Mapping[str, float], layers: LayerValues) -> None:
        self.latest.update(values)
        for writer in self.writers:
            with self._guard(writer, "scalars"):
                writer.scalars(step, values, layers)

    def events(self, step: int, events: Sequence[FlagEvent]) -> None:
        for writer in self.writers:
            with self._guard(writer, "events"):
                writer.events(step, events)

    def density(self, step: int, density: SpectralDensity) -> None:
        for writer in self.writers:
            with self._guard(writer, "density"):
                writer.density(step, density)

    def text(self, step: int, tag: str, message: str) -> None:
        for writer in self.writers:
            with self._guard(writer, "text"):
                writer.text(step, tag, message)

    def flush(self) -> None:
        for writer in self.writers:
            with self._guard(writer, "flush"):
                writer.flush()
