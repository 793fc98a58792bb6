"""What the diagnostics show in TensorBoard: scalars, a ready dashboard, histograms, flag events.

The `Monitor` decides; writers show. A writer receives plain data (floats, tensors, `FlagEvent`s,
`SpectralDensity`) and renders it; nothing here computes a diagnostic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from hessdiag.flags import FLAG_NAMES, FlagEvent
from hessdiag.spectrum import SpectralDensity

PREFIX = "hessdiag"

#: The dashboard: one custom-scalars category, charts by the question they answer.
LAYOUT: dict[str, dict[str, list]] = {
    PREFIX: {
        "sharpness vs. stability threshold": ["Multiline", [f"{PREFIX}/lambda_max", f"{PREFIX}/stability_threshold"]],
        "sharpness / threshold (>= 1: edge of stability)": ["Multiline", [f"{PREFIX}/stability_ratio"]],
        "lambda_min (negative: certified negative curvature)": ["Multiline", [f"{PREFIX}/lambda_min"]],
        "gradient norm": ["Multiline", [f"{PREFIX}/grad_norm"]],
        "gradient norm by layer": ["Multiline", [f"{PREFIX}/layer_grad_norm/.*"]],
        "gradient / weight by layer": ["Multiline", [f"{PREFIX}/layer_grad_to_weight/.*"]],
        "weight norm by layer": ["Multiline", [f"{PREFIX}/layer_weight_norm/.*"]],
        "update / weight by layer (update_ratios=True)": ["Multiline", [f"{PREFIX}/layer_update_ratio/.*"]],
        "flags": ["Multiline", [f"{PREFIX}/flags/{name}" for name in FLAG_NAMES]],
        "check cost": ["Multiline", [f"{PREFIX}/num_hvps", f"{PREFIX}/check_seconds"]],
    }
}


class DiagnosticsWriter(Protocol):
    """Where a `Monitor` sends what it found. Every method may be a no-op."""

    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...

    def events(self, step: int, events: Sequence[FlagEvent]) -> None: ...

    def histograms(self, step: int, values: Mapping[str, torch.Tensor]) -> None: ...

    def density(self, step: int, density: SpectralDensity) -> None: ...

    def text(self, step: int, tag: str, message: str) -> None: ...

    def flush(self) -> None: ...


def render_event(event: FlagEvent) -> str:
    """Markdown for a flag event: what was seen, the evidence, what to do."""
    heading = "raised" if event.kind == "onset" else "cleared"
    rows = "\n".join(f"| {name} | {value:.6g} |" for name, value in event.evidence.items())
    return (
        f"**{event.name}** {heading} at step {event.step} ({event.severity})\n\n{event.summary}\n\n"
        f"| evidence | value |\n|---|---|\n{rows}\n\n**Remedy:** {event.remedy}"
    )


class TensorBoardWriter:
    """Writes diagnostics to a `torch.utils.tensorboard.SummaryWriter` (or a compatible one, such as
    Lightning's ``TensorBoardLogger.experiment``).

    Args:
        summary_writer: the writer.
        write_scalars: also write scalars (off when another route, e.g. Lightning's loggers, does).
    """

    def __init__(self, summary_writer, *, write_scalars: bool = True) -> None:
        self.summary_writer = summary_writer
        self.write_scalars = write_scalars
        summary_writer.add_custom_scalars(LAYOUT)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self.write_scalars:
            for tag, value in values.items():
                self.summary_writer.add_scalar(tag, value, step)

    def events(self, step: int, events: Sequence[FlagEvent]) -> None:
        for event in events:
            self.summary_writer.add_text(f"{PREFIX}/events/{event.name}", render_event(event), event.step)

    def histograms(self, step: int, values: Mapping[str, torch.Tensor]) -> None:
        for tag, tensor in values.items():
            if tensor.numel() and torch.isfinite(tensor).all():
                self.summary_writer.add_histogram(tag, tensor.detach().float().cpu(), step)

    def density(self, step: int, density: SpectralDensity) -> None:
        """The smoothed spectral density as a histogram (buckets = grid cells, counts = mass)."""
        low, high = float(density.nodes.min()), float(density.nodes.max())
        margin = 0.05 * (high - low) or 1.0
        edges = torch.linspace(low - margin, high + margin, 201, dtype=torch.float64)
        centers = 0.5 * (edges[1:] + edges[:-1])
        mass = density.density(centers) * (edges[1] - edges[0])
        moments = density.moment(1), density.moment(2)
        self.summary_writer.add_histogram_raw(
            f"{PREFIX}/spectral_density",
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
        self.summary_writer.add_text(tag, message, step)

    def flush(self) -> None:
        self.summary_writer.flush()
