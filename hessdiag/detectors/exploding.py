"""Exploding gradients: non-finite values, or norms far above their own recent median while the loss rises."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

from hessdiag.detectors._common import Detector, require_count, require_positive
from hessdiag.detectors.records import CheckRecord, Record, StepRecord
from hessdiag.flags import FlagEvent
from hessdiag.estimators.layer_shares import module_label


class ExplodingGradientDetector(Detector):
    """Raises ``exploding`` when gradients blow up.

    A step triggers when

    * the loss or the gradient norm is non-finite, or some gradient tensor is (`nonfinite_count` > 0):
      the flag is raised on that very step, severity ``critical``; or
    * the loss is rising (above its recent median by more than `loss_spread` x its recent median
      absolute deviation, and by more than `min_rise` x the range the run's loss has spanned) and
      either the global gradient norm exceeds `factor` x the median of the last `window` normal steps,
      or some layer's ratio (gradient- or update-to-weight) exceeds `layer_factor` x its own median;
      `onset` such steps in a row raise the flag, severity ``warning``.

    Mixed precision with a loss scaler (fp16 AMP): a step whose gradients overflow is skipped by the
    scaler, which then lowers the scale; a few such steps (most at the start, while the scale
    settles) are how it works, not an explosion. Such a step (`overflow_skip=True`) is not judged
    and leaves the histories alone; only `max_overflow_skips` skipped steps in a row (the scale cut
    by 2^`max_overflow_skips`) raise the flag, critical.

    The rise must be significant (beyond the loss's noise) and material (a share of the run's own
    loss range): a nearly deterministic loss (full-batch gradient descent) has almost no spread, so
    a catapult at the edge of stability that lifts the loss by 0.5% of the way it has come down is
    many MADs but no explosion (measured on the edge-of-stability demo: 0.17 -> 0.18 after a descent
    from 2.3).

    Every test is a ratio of like quantities or a comparison with the loss's own spread, so the
    verdicts do not depend on the loss's units: multiplying the loss by a constant or adding one
    changes none (a rise of 1 -> 6 and of 100 -> 105 from a steady loss are alike).

    Why the loss must rise: large gradients alone are not an explosion. Escaping a saddle from a tiny
    initialisation grows the gradient by orders of magnitude while the loss falls, and at the edge of
    stability gradient descent "catapults": the gradient jumps 10-30x for 4-6 steps and the loss
    recovers on its own (Lewkowycz et al., 2020), hence the default `onset` of 8. Values of triggering
    steps never enter the medians, so a sustained explosion does not become the new normal.

    Args:
        factor: multiple of the median global gradient norm that counts as a spike (default 10).
        layer_factor: multiple of a layer's median ratio that counts as a spike (default 100: per-layer
            ratios are noisier than the global norm).
        loss_spread: the loss counts as rising above ``median + loss_spread x MAD`` of the recent normal
            losses (default 3: uniform noise never exceeds 2 MADs, Gaussian noise only 0.1% of the time).
        min_rise: the rise must also exceed this fraction of the range (highest - lowest finite loss
            seen so far) the run's loss has spanned (default 0.05).
        window: normal steps in the running medians (default 50).
        min_history: normal steps needed before spikes are judged (default 10).
        onset: consecutive spiking steps that raise the flag (default 8; non-finite values: at once).
        clear: consecutive normal steps that clear it (default 20).
        max_overflow_skips: consecutive loss-scaler skips that raise the flag (default 20).

    Raises:
        ValueError: a threshold out of range, named in the message.

    Evidence: ``grad_norm`` (global L2 norm), ``median_grad_norm`` (median of the normal history;
    NaN before `min_history` steps), ``ratio`` (grad_norm / median), ``loss``, ``median_loss``,
    ``loss_spread`` (median absolute deviation of the recent normal losses, loss units),
    ``nonfinite_tensors`` (gradient tensors with a non-finite norm), ``layer_ratio_multiple`` (the worst
    layer's ratio over its own median, 0 while the loss is not rising; the layer is named in the
    summary); for a run of loss-scaler skips, ``loss`` and ``consecutive_overflow_skips``. Once a
    curvature check has said where the top eigenvector lives, ``top_module_share``: the share of it in
    the module the summary and the remedy name (a spike along the sharpest direction starts there).

    Example::

        >>> detector = ExplodingGradientDetector()
        >>> detector.update(0, loss=float("nan"), grad_norm=1.0)[0].severity
        'critical'
    """

    name = "exploding"
    remedy = "Clip gradients (clip_grad_norm_ at ~1-5x the typical norm), lower the learning rate, or add warm-up."

    def __init__(
        self,
        factor: float = 10.0,
        layer_factor: float = 100.0,
        loss_spread: float = 3.0,
        min_rise: float = 0.05,
        window: int = 50,
        min_history: int = 10,
        onset: int = 8,
        clear: int = 20,
        max_overflow_skips: int = 20,
    ) -> None:
        super().__init__(onset, clear)
        self.max_overflow_skips = require_count("max_overflow_skips", max_overflow_skips)
        self.overflow_skips = 0  # consecutive steps the loss scaler skipped
        self.factor = require_positive("factor", factor)
        self.layer_factor = require_positive("layer_factor", layer_factor)
        self.loss_spread = require_positive("loss_spread", loss_spread)
        self.min_rise = require_positive("min_rise", min_rise, upper=1.0)
        self.loss_range = (math.inf, -math.inf)  # lowest and highest finite loss seen
        self.window = require_count("window", window, 2)
        self.min_history = require_count("min_history", min_history)
        if self.min_history > self.window:
            raise ValueError(f"`min_history` ({min_history}) must be at most `window` ({window}).")
        self.norms: deque[float] = deque(maxlen=self.window)
        self.losses: deque[float] = deque(maxlen=self.window)
        self.layer_history: dict[str, deque[float]] = {}
        self.top_module: tuple[str, float] | None = None  # (module, share) of the latest check's top vector

    def observe(self, record: Record) -> list[FlagEvent]:
        """Judge a step with its loss. Without gradient statistics only a non-finite loss is judged
        (as critical, at once); a curvature check tells where its top eigenvector lives (named in
        later evidence); other records say nothing."""
        if isinstance(record, CheckRecord) and record.top_module is not None and record.top_module_share is not None:
            self.top_module = (record.top_module, record.top_module_share)
        if not isinstance(record, StepRecord) or record.loss is None:
            return []
        if record.grad_norm is None:
            return [] if math.isfinite(record.loss) else self.update(record.step, record.loss, math.nan)
        return self.update(
            record.step, record.loss, record.grad_norm, layer_ratios=dict(record.layer_ratios),
            nonfinite_count=record.nonfinite_tensors, overflow_skip=record.overflow_skip,
        )  # fmt: skip

    def update(
        self,
        step: int,
        loss: float,
        grad_norm: float,
        layer_ratios: Mapping[str, float] | None = None,
        nonfinite_count: int = 0,
        overflow_skip: bool = False,
    ) -> list[FlagEvent]:
        """Judge one optimizer step.

        Args:
            step: the optimizer step.
            loss: the training loss of the step.
            grad_norm: the global gradient L2 norm.
            layer_ratios: per layer, its gradient-to-weight (or update-to-weight) norm ratio.
            nonfinite_count: gradient tensors with a NaN or infinite entry.
            overflow_skip: a loss scaler skipped this step because its gradients overflowed.
        """
        if overflow_skip:
            return self._overflow_skipped(step, loss)
        self.overflow_skips = 0
        layer_ratios = layer_ratios or {}
        nonfinite = nonfinite_count > 0 or not math.isfinite(grad_norm) or not math.isfinite(loss)
        median = statistics.median(self.norms) if len(self.norms) >= self.min_history else math.nan
        median_loss = statistics.median(self.losses) if self.losses else math.nan
        spread = statistics.median(abs(value - median_loss) for value in self.losses) if self.losses else math.nan
        low, high = self.loss_range
        material = max(high - low, 0.0) * self.min_rise
        rising = not self.losses or loss - median_loss > max(self.loss_spread * spread, material)
        if math.isfinite(loss):
            self.loss_range = (min(low, loss), max(high, loss))
        spike = not nonfinite and rising and median > 0 and grad_norm > self.factor * median
        # Layer medians only matter while the loss rises: skip them otherwise (a median per layer per
        # step is most of this detector's host time, and it runs while the device may wait).
        worst_layer, worst_multiple = self._worst_layer(layer_ratios) if rising and not nonfinite else ("", 0.0)
        layer_spike = not nonfinite and rising and worst_multiple > self.layer_factor
        triggered = nonfinite or spike or layer_spike
        if not triggered:
            self.norms.append(grad_norm)
            self.losses.append(loss)
            for layer, ratio in layer_ratios.items():
                if math.isfinite(ratio):
                    self.layer_history.setdefault(layer, deque(maxlen=self.window)).append(ratio)
        self.evidence = {
            "grad_norm": grad_norm,
            "median_grad_norm": median,
            "ratio": grad_norm / median if median > 0 else math.nan,
            "loss": loss,
            "median_loss": median_loss,
            "loss_spread": spread,
            "nonfinite_tensors": float(nonfinite_count),
            "layer_ratio_multiple": worst_multiple,
        }
        if nonfinite:
            self.summary = f"Non-finite loss or gradients (loss {loss:.4g}, {nonfinite_count} gradient tensors non-finite)."
        elif layer_spike and not spike:
            self.summary = f"Layer {worst_layer}: gradient/weight ratio {worst_multiple:.1f}x its median while the loss rises."
        else:
            self.summary = (
                f"Gradient norm {grad_norm:.4g} is {self.evidence['ratio']:.3g}x its recent median {median:.4g}; "
                f"loss {loss:.4g} vs. median {median_loss:.4g}."
            )
        return self._decide(
            step, triggered, "critical" if nonfinite else "warning", immediate=nonfinite, remedy=self._module_remedy()
        )

    def _module_remedy(self) -> str | None:
        """Name the module holding most of the sharpest direction in the evidence, summary and remedy."""
        if self.top_module is None:
            return None
        module, share = self.top_module
        where = module_label(module)
        self.evidence["top_module_share"] = share
        self.summary += f" The sharpest direction (latest check) lies {share:.0%} in `{where}`."
        return (
            f"{self.remedy} Start with `{where}`, which holds {share:.0%} of the sharpest direction: a lower learning "
            "rate for it (a parameter group of its own), normalisation around it, or a longer warm-up."
        )

    def _overflow_skipped(self, step: int, loss: float) -> list[FlagEvent]:
        self.overflow_skips += 1
        if self.overflow_skips < self.max_overflow_skips:
            return []
        self.evidence = {"loss": loss, "consecutive_overflow_skips": float(self.overflow_skips)}
        self.summary = (
            f"The loss scaler skipped {self.overflow_skips} steps in a row: the gradients overflow even after "
            f"the scale was cut by 2^{self.overflow_skips}."
        )
        return self._decide(step, True, "critical", immediate=True)

    def _worst_layer(self, ratios: Mapping[str, float]) -> tuple[str, float]:
        """The layer whose ratio is the largest multiple of its own median, and that multiple."""
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
        """Hysteresis, evidence, and the normal histories (lists of floats)."""
        return super().state_dict() | {
            "overflow_skips": self.overflow_skips,
            "loss_range": list(self.loss_range),
            "norms": list(self.norms),
            "losses": list(self.losses),
            "layer_history": {layer: list(values) for layer, values in self.layer_history.items()},
            "top_module": None if self.top_module is None else list(self.top_module),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; missing keys keep their defaults (empty histories)."""
        super().load_state_dict(state)
        self.overflow_skips = int(state.get("overflow_skips", 0))
        self.loss_range = tuple(state.get("loss_range", (math.inf, -math.inf)))
        self.norms = deque(state.get("norms", []), maxlen=self.window)
        self.losses = deque(state.get("losses", []), maxlen=self.window)
        self.layer_history = {
            layer: deque(values, maxlen=self.window) for layer, values in state.get("layer_history", {}).items()
        }
        top = state.get("top_module")
        self.top_module = None if top is None else (str(top[0]), float(top[1]))
