"""Exploding gradients: non-finite values, or norms far above their own recent median."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

from hessdiag.detectors._common import Detector, check_count, check_positive
from hessdiag.flags import FlagEvent


class ExplodingGradientDetector(Detector):
    """Raises ``exploding`` when gradients blow up.

    Triggers on a step when the loss or the gradient is non-finite (raised at once, critical), or,
    while the loss is rising (above `loss_factor` x the median of its recent values), when the global
    gradient norm exceeds `factor` x the median of the last `window` normal steps, or a layer's
    gradient-to-weight ratio exceeds `layer_factor` x its own median. The loss condition keeps
    benign growth out (escaping a saddle from a tiny initialisation grows the gradient by orders of
    magnitude while the loss falls; at the edge of stability it jumps 10-30x and stays bounded while
    the loss keeps falling on average). Outliers are kept out of the medians, so a sustained explosion
    does not become the new normal.

    Args:
        factor: global-norm multiple of the median that counts as a spike (default 10).
        layer_factor: per-layer ratio multiple of its median (default 100).
        window: steps in the running medians (default 50).
        loss_factor: loss multiple of its recent median that counts as rising (default 1.1).
        min_history: normal steps needed before spikes are judged (default 10).
        onset: consecutive spiking steps that raise the flag (default 8: a spike, or the 4-6 step
            "catapult" of gradient descent at the edge of stability, recovers on its own).
        clear: consecutive normal steps that clear it (default 20).

    Evidence: ``grad_norm``, ``median_grad_norm``, ``ratio`` (grad_norm / median), ``loss``,
    ``nonfinite_tensors``, and ``layer_ratio_multiple`` for the worst layer.
    """

    name = "exploding"
    remedy = "Clip gradients (clip_grad_norm_ at ~1-5x the typical norm), lower the learning rate, or add warm-up."

    def __init__(
        self,
        factor: float = 10.0,
        layer_factor: float = 100.0,
        loss_factor: float = 1.1,
        window: int = 50,
        min_history: int = 10,
        onset: int = 8,
        clear: int = 20,
    ) -> None:
        super().__init__(onset, clear)
        self.factor = check_positive("factor", factor)
        self.layer_factor = check_positive("layer_factor", layer_factor)
        self.loss_factor = check_positive("loss_factor", loss_factor)
        self.window = check_count("window", window, 2)
        self.min_history = check_count("min_history", min_history)
        if self.min_history > self.window:
            raise ValueError(f"`min_history` ({min_history}) must be at most `window` ({window}).")
        self.norms: deque[float] = deque(maxlen=self.window)
        self.losses: deque[float] = deque(maxlen=self.window)
        self.layer_history: dict[str, deque[float]] = {}

    def update(
        self,
        step: int,
        loss: float,
        grad_norm: float,
        layer_ratios: Mapping[str, float] | None = None,
        nonfinite_count: int = 0,
    ) -> list[FlagEvent]:
        nonfinite = nonfinite_count > 0 or not math.isfinite(grad_norm) or not math.isfinite(loss)
        median = statistics.median(self.norms) if len(self.norms) >= self.min_history else math.nan
        rising = not self.losses or loss > self.loss_factor * statistics.median(self.losses)
        spike = not nonfinite and rising and median > 0 and grad_norm > self.factor * median
        worst_layer, worst_multiple = self._worst_layer(layer_ratios or {}) if not nonfinite else ("", 0.0)
        layer_spike = rising and worst_multiple > self.layer_factor
        if not nonfinite:
            self.losses.append(loss)
        if not (nonfinite or spike or layer_spike):
            self.norms.append(grad_norm)
            for layer, ratio in (layer_ratios or {}).items():
                self.layer_history.setdefault(layer, deque(maxlen=self.window)).append(ratio)
        self.evidence = {
            "grad_norm": grad_norm,
            "median_grad_norm": median,
            "ratio": grad_norm / median if median > 0 else math.nan,
            "loss": loss,
            "nonfinite_tensors": float(nonfinite_count),
            "layer_ratio_multiple": worst_multiple,
        }
        if nonfinite:
            self.summary = f"Non-finite loss or gradients (loss {loss:.4g}, {nonfinite_count} tensors non-finite)."
        elif spike:
            self.summary = f"Gradient norm {grad_norm:.4g} is {grad_norm / median:.1f}x its recent median {median:.4g}."
        else:
            self.summary = f"Layer {worst_layer}: gradient/weight ratio {worst_multiple:.1f}x its median."
        severity = "critical" if nonfinite else "warning"
        return self._decide(step, nonfinite or spike or layer_spike, severity, immediate=nonfinite)

    def _worst_layer(self, ratios: Mapping[str, float]) -> tuple[str, float]:
        worst, multiple = "", 0.0
        for layer, ratio in ratios.items():
            history = self.layer_history.get(layer)
            if history is None or len(history) < self.min_history:
                continue
            median = statistics.median(history)
            if median > 0 and ratio / median > multiple:
                worst, multiple = layer, ratio / median
        return worst, multiple

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {
            "norms": list(self.norms),
            "losses": list(self.losses),
            "layer_history": {layer: list(values) for layer, values in self.layer_history.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.norms = deque(state.get("norms", []), maxlen=self.window)
        self.losses = deque(state.get("losses", []), maxlen=self.window)
        self.layer_history = {k: deque(v, maxlen=self.window) for k, v in state.get("layer_history", {}).items()}
