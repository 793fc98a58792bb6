"""The writer protocol, and the TensorBoard writer: scalars, the dashboard layout, histograms over
layers, flag events, the density.

The `Monitor` decides; writers show. A writer receives plain data (floats, tensors, `FlagEvent`s,
`SpectralDensity`) and renders it; nothing here computes a diagnostic. What of it becomes a tag
is decided in :mod:`hessdiag.reporting.dashboard`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from hessdiag.reporting.dashboard import LayerValues, layout, markdown_cell, shown_scalars, worst_layers
from hessdiag.flags import FlagEvent
from hessdiag.estimators.spectrum import SpectralDensity
from hessdiag.reporting.tags import (
    EVENT_LOG,
    EVENT_RECORDS,
    FLAG_ONSETS,
    FLAGS_PREFIX,
    PREFIX,
    RECORDS_PLUGIN,
    RECORDS_PREFIX,
    SPECTRAL_DENSITY,
    WORST_LAYERS,
    event_tag,
    layer_histogram_tag,
)

__all__ = ["PREFIX", "DiagnosticsWriter", "SummaryWriterLike", "TensorBoardWriter", "render_event"]

#: Earlier events repeated in each ``hessdiag/event_log`` entry before its new ones: the latest entry
#: reads in context, and every event is written a bounded number of times (the log grows with the run,
#: not with its square).
EVENT_LOG_CONTEXT = 10


@runtime_checkable
class DiagnosticsWriter(Protocol):
    """Where a `Monitor` sends what it found. Every method may be a no-op.

    `scalars` gets the values by tag and the per-layer values as ``{quantity: {module: value}}``
    (see :data:`hessdiag.reporting.dashboard.LayerValues`; empty at a curvature check);
    :func:`hessdiag.reporting.dashboard.shown_scalars` turns both into the tags worth logging.
    """

    def scalars(self, step: int, values: Mapping[str, float], layers: LayerValues) -> None: ...

    def events(self, step: int, events: Sequence[FlagEvent]) -> None: ...

    def density(self, step: int, density: SpectralDensity) -> None: ...

    def text(self, step: int, tag: str, message: str) -> None: ...

    def flush(self) -> None: ...


@runtime_checkable
class SummaryWriterLike(Protocol):
    """What :class:`TensorBoardWriter` calls: ``torch.utils.tensorboard.SummaryWriter`` and
    Lightning's ``TensorBoardLogger.experiment`` have it."""

    def add_scalar(self, tag, scalar_value, global_step=None) -> None: ...

    def add_custom_scalars(self, layout) -> None: ...

    def add_histogram(self, tag, values, global_step=None) -> None: ...

    def add_text(self, tag, text_string, global_step=None) -> None: ...

    def flush(self) -> None: ...


def _log_line(event: FlagEvent) -> str:
    """The event as one item of the event log: a list item, which has no columns to squeeze a flag's
    name into ("sad/dle") and no cell for a ``|`` of the summary to cut."""
    what = "raised" if event.kind == "onset" else "cleared"
    return f"- step {event.step}: `{event.name}` {what}: {event.summary}"


def _record_summary(tag: str, payload: str):
    """A TensorBoard summary holding `payload` (a string) as a tensor of the records plugin, which no
    dashboard shows; None without tensorboard's protos."""
    try:
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    except ImportError:
        return None
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=RECORDS_PLUGIN))
    shape = TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)])
    tensor = TensorProto(dtype=7, tensor_shape=shape, string_val=[payload.encode("utf-8")])  # 7: DT_STRING
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata, tensor=tensor)])


def render_event(event: FlagEvent, raised_at: int | None = None) -> str:
    """Markdown for a flag event: what happened when, what was seen, the evidence, what to do.

    `raised_at`: for a clearance, the step the flag was raised (to say how long it lasted)."""
    if event.kind == "onset":
        heading = f"raised at step {event.step} ({event.severity})"
    else:
        lasted = f" (raised at step {raised_at}, active {event.step - raised_at} steps)" if raised_at is not None else ""
        heading = f"cleared at step {event.step}{lasted}"
    rows = "\n".join(f"| {markdown_cell(name)} | {value:.6g} |" for name, value in event.evidence.items())
    remedy = f"\n\n**Remedy:** {event.remedy}" if event.kind == "onset" and event.remedy else ""
    return f"**{event.name}** {heading}\n\n{event.summary}\n\n| evidence | value |\n|---|---|\n{rows}{remedy}"


class TensorBoardWriter:
    """Writes diagnostics to a `torch.utils.tensorboard.SummaryWriter` (or a compatible one, such as
    Lightning's ``TensorBoardLogger.experiment``).

    Scalars are those of :func:`hessdiag.reporting.dashboard.shown_scalars` (a bounded number of tags, whatever
    the depth). The custom-scalars layout lists only the charts whose tags have been logged, and is
    rewritten when a chart gains data (TensorBoard reads the latest). The Text tab gets a card per
    flag event (``hessdiag/events/<flag>``), the whole story in order (``hessdiag/event_log``) and
    the layers with the most extreme values by name (``hessdiag/worst_layers``).

    Args:
        summary_writer: the writer.
        write_scalars: also write scalars (off when another route, e.g. Lightning's loggers, does;
            that route should log :func:`~hessdiag.reporting.dashboard.shown_scalars` too). The flag-onset
            series is TensorBoard's own and is written either way.
        per_layer_scalars: also one scalar per layer and quantity (tags grow with depth).
        worst_k: layers named per quantity in ``hessdiag/worst_layers`` (0: none).
    """

    def __init__(
        self, summary_writer, *, write_scalars: bool = True, per_layer_scalars: bool = False, worst_k: int = 3
    ) -> None:
        if not isinstance(worst_k, int) or worst_k < 0:
            raise ValueError(f"`worst_k` must be an int >= 0, got {worst_k!r}.")
        self.summary_writer = summary_writer
        self.write_scalars = write_scalars
        self.per_layer_scalars = per_layer_scalars
        self.worst_k = worst_k
        self._tags: set[str] = set()
        self._layout: dict = {}
        self._raised_at: dict[str, int] = {}
        self._log_lines: list[str] = []
        self._last_step: int | None = None  # of the latest flag values, where the onset baseline ends

    def scalars(self, step: int, values: Mapping[str, float], layers: LayerValues) -> None:
        shown = shown_scalars(values, layers, per_layer_scalars=self.per_layer_scalars)
        if self.write_scalars:
            for tag, value in shown.items():
                self.summary_writer.add_scalar(tag, value, step)
        for family, by_layer in layers.items():
            finite = torch.tensor([v for v in by_layer.values()], dtype=torch.float64)
            finite = finite[torch.isfinite(finite)]
            if finite.numel():
                self.summary_writer.add_histogram(layer_histogram_tag(family), finite, step)
        if layers and self.worst_k:
            self.summary_writer.add_text(WORST_LAYERS, worst_layers(layers, self.worst_k), step)
        if any(tag.startswith(FLAGS_PREFIX) for tag in values):
            if self._last_step is None:  # the onset series' baseline starts with the run
                self.summary_writer.add_scalar(FLAG_ONSETS, 0.0, step)
            self._last_step = step
            shown[FLAG_ONSETS] = 0.0
        self._update_layout(shown)

    def _update_layout(self, tags: Mapping[str, float]) -> None:
        if set(tags) <= self._tags:
            return
        self._tags |= set(tags)
        new_layout = layout(self._tags)
        if new_layout != self._layout:
            self._layout = new_layout
            self.summary_writer.add_custom_scalars(new_layout)

    def events(self, step: int, events: Sequence[FlagEvent]) -> None:
        onsets: dict[int, int] = {}
        earlier = len(self._log_lines)
        for event in events:
            raised_at = self._raised_at.pop(event.name, None)
            if event.kind == "onset":
                self._raised_at[event.name] = event.step
                onsets[event.step] = onsets.get(event.step, 0) + 1
            self.summary_writer.add_text(event_tag(event.name), render_event(event, raised_at), event.step)
            self._log_lines.append(_log_line(event))
        # Each onset is a spike 0, n, 0 one step either side. Events of a read-back arrive after a
        # check's may be earlier steps, so points can come out of step order; as every point
        # between spikes is 0, the line between them runs along the baseline either way.
        for onset_step, count in sorted(onsets.items()):
            for offset, value in ((-1, 0.0), (0, float(count)), (1, 0.0)):
                self.summary_writer.add_scalar(FLAG_ONSETS, value, onset_step + offset)
        if events:
            self._write_log(step, earlier)
            records = [{"name": e.name, "step": e.step, "kind": e.kind, "summary": e.summary} for e in events]
            self.text(step, EVENT_RECORDS, json.dumps(records))

    def _write_log(self, step: int, earlier: int) -> None:
        """One entry of ``hessdiag/event_log``: the new events (from line `earlier` on) after at most
        :data:`EVENT_LOG_CONTEXT` earlier ones."""
        first = max(0, earlier - EVENT_LOG_CONTEXT)
        shown, total = self._log_lines[first:], len(self._log_lines)
        span = "so far" if first == 0 else f"{first + 1}-{total} of {total} (the earlier ones in earlier entries)"
        head = f"Flag events {span}, oldest first (each flag's own card: hessdiag/events/<flag>):"
        self.summary_writer.add_text(EVENT_LOG, head + "\n\n" + "\n".join(shown), step)

    def density(self, step: int, density: SpectralDensity) -> None:
        """The smoothed spectral density as a histogram (buckets = grid cells, counts = mass)."""
        low, high = float(density.nodes.min()), float(density.nodes.max())
        margin = 0.05 * (high - low) or 1.0
        edges = torch.linspace(low - margin, high + margin, 201, dtype=torch.float64)
        centers = 0.5 * (edges[1:] + edges[:-1])
        mass = density.density(centers) * (edges[1] - edges[0])
        moments = density.moment(1), density.moment(2)
        self.summary_writer.add_histogram_raw(
            SPECTRAL_DENSITY,
            min=float(edges[0]),
            max=float(edges[-1]),
            num=float(mass.sum()),
            sum=moments[0],
            sum_squares=moments[1],
            bucket_limits=edges[1:].tolist(),
            bucket_counts=mass.tolist(),
            global_step=step,
        )

    def text(self, step: int, tag: str, message: str) -> None:
        """`message` as text of `tag`; a record (a tag under ``hessdiag/records/``) as a tensor of the
        records plugin where the writer has a file writer of tensorboard's (torch's SummaryWriter),
        else as text."""
        file_writer = getattr(self.summary_writer, "_get_file_writer", None)
        summary = _record_summary(tag, message) if tag.startswith(RECORDS_PREFIX) and file_writer else None
        if summary is not None and type(self.summary_writer).__module__.startswith("torch."):
            file_writer().add_summary(summary, step)
        else:
            self.summary_writer.add_text(tag, message, step)

    def flush(self) -> None:
        if self._last_step is not None:
            self.summary_writer.add_scalar(FLAG_ONSETS, 0.0, self._last_step)
        self.summary_writer.flush()
