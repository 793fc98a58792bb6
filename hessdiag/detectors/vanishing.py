"""Vanishing gradients: gradient-to-weight ratios collapsing from the output back to the input."""

from __future__ import annotations

import functools
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from hessdiag.detectors._common import Detector, require_positive
from hessdiag.detectors.records import Record, StepRecord
from hessdiag.flags import FlagEvent

#: The factors of an adapter, as peft names them (``q_proj.lora_A.default``, ``q_proj.lora_B.default``,
#: DoRA's ``q_proj.lora_magnitude_vector.default``): together they are the adapted layer ``q_proj``.
_ADAPTER_FACTOR = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)(?:\.[^.]+)?$")


def depth_units(norms: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """``[(layer, norm), ...]`` with an adapter's factors merged into the layer they adapt (the root
    of their squared norms), in order of first appearance.

    LoRA starts with B = 0: A's gradient is then zero and B's weight tiny, so judged apart the factors
    look starving and racing by turns (under warm-up the depth rule fired within 5 steps of a healthy
    run); what trains is their product, one layer at one depth.
    """
    merged: dict[str, float] = {}
    for name, norm in norms:
        unit = _adapted_layer(name)
        merged[unit] = math.hypot(merged.get(unit, 0.0), norm)
    return list(merged.items())


@functools.lru_cache(maxsize=65536)
def _adapted_layer(name: str) -> str:
    """`name` without an adapter factor's suffix; cached: every step record names the same layers."""
    return _ADAPTER_FACTOR.sub("", name)


class VanishingGradientDetector(Detector):
    """Raises ``vanishing`` when the shallow layers stop learning.

    Per layer the ratio r = ||grad|| / ||weight|| is the relative change one SGD step of unit learning
    rate would make to it; unlike raw gradient norms it does not depend on the layer's size or scale.
    An update triggers when

    * across depth: the median ratio of the shallowest quarter of the layers (at least one) is below
      `depth_ratio` x that of the deepest quarter: the signal dies on its way back through the
      network (needs at least 2 layers); or
    * everywhere: the global ratio ||grad|| / ||weights|| (over all layers) is below `min_ratio` x
      the largest global ratio seen so far; or
    * dead layers: some layer with non-zero weights gets a gradient of exactly 0. That is not a
      gradient that faded but units that never fire (ReLUs whose input is negative for every sample:
      after a large step, a large negative bias, or a bad initialisation) or a layer cut off from the
      loss; its remedy differs (``dead_remedy``). Parameters that get no gradient at all (None, e.g. an
      unused head) are not zero gradients and must not be passed as such.

    Units: the gradient/weight ratios scale with the loss, but every test compares them with each
    other (shallow with deep, now with the peak, zero with non-zero), so multiplying the loss by a
    constant changes no verdict, and adding one changes no gradient.

    An adapter's factors (LoRA's A and B) count as the one layer they adapt (:func:`depth_units`).
    Layers whose weights are all zero (a zero-initialised output layer, say) have no ratio and are left
    out rather than divided by an epsilon, which would make them look infinitely fast and every other
    layer vanishing by comparison. Non-finite gradients are the exploding detector's business.

    Args:
        depth_ratio: shallow / deep ratio below which gradients count as vanishing (default 1e-3:
            three orders of magnitude, well beyond the spread between the layers of a healthy network).
        min_ratio: fraction of its largest value so far below which the global gradient/weight ratio
            counts as negligible (default 1e-8; converged runs have small gradients too, so this is
            deliberately tiny).
        onset: consecutive updates that raise the flag (default 5; :class:`hessdiag.Monitor` feeds
            one update per optimizer step, so 5 steps).
        clear: consecutive updates that clear it (default 5).

    Raises:
        ValueError: a threshold out of range, named in the message.

    Evidence: ``shallow_ratio`` and ``deep_ratio`` (median gradient/weight ratios of the shallowest and
    deepest layers), ``depth_ratio`` (shallow / deep), ``global_ratio``, ``peak_global_ratio``,
    ``dead_layers`` (how many layers get exactly zero gradient; they are named in the summary).
    """

    name = "vanishing"
    remedy = (
        "Use a better-scaled initialisation (Kaiming/Xavier), non-saturating activations (ReLU/GELU), "
        "normalisation layers, or residual connections."
    )
    dead_remedy = (
        "Dead units (e.g. ReLUs that output 0 for every input): lower the learning rate or add warm-up, use "
        "LeakyReLU/GELU, check the initialisation and the biases (a large negative bias kills units), add "
        "normalisation before the activation; or check that the layer is connected to the loss."
    )

    def __init__(self, depth_ratio: float = 1e-3, min_ratio: float = 1e-8, onset: int = 5, clear: int = 5) -> None:
        super().__init__(onset, clear)
        self.depth_ratio = require_positive("depth_ratio", depth_ratio, upper=1.0)
        self.min_ratio = require_positive("min_ratio", min_ratio, upper=1.0)
        self.peak_global_ratio = 0.0

    def observe(self, record: Record) -> list[FlagEvent]:
        """Judge a step with gradient statistics; other records say nothing."""
        if not isinstance(record, StepRecord) or record.grad_norm is None:
            return []
        return self.update(record.step, record.layer_grad_norms, record.layer_weight_norms)

    def update(
        self,
        step: int,
        layer_grad_norms: Sequence[tuple[str, float]],
        layer_weight_norms: Sequence[tuple[str, float]],
    ) -> list[FlagEvent]:
        """Judge one read-back of per-layer norms, both ordered from the input (shallow) to the output (deep).

        Args:
            step: the optimizer step.
            layer_grad_norms: ``[(layer, gradient L2 norm), ...]``.
            layer_weight_norms: ``[(layer, parameter L2 norm), ...]``.
        """
        weights = dict(depth_units(layer_weight_norms))
        grads = [(name, g) for name, g in depth_units(layer_grad_norms) if math.isfinite(g)]
        ratios = [g / weights[name] for name, g in grads if weights.get(name, 0.0) > 0]
        if not ratios:
            return []
        quarter = max(1, len(ratios) // 4)
        shallow, deep = statistics.median(ratios[:quarter]), statistics.median(ratios[-quarter:])
        weight_norm = math.sqrt(sum(weights.get(name, 0.0) ** 2 for name, _ in grads))
        global_ratio = math.sqrt(sum(g * g for _, g in grads)) / weight_norm
        self.peak_global_ratio = max(self.peak_global_ratio, global_ratio)
        dead = [name for name, g in grads if g == 0 and weights.get(name, 0.0) > 0]
        across_depth = len(ratios) >= 2 and deep > 0 and shallow < self.depth_ratio * deep
        negligible = global_ratio <= self.min_ratio * self.peak_global_ratio
        self.evidence = {
            "shallow_ratio": shallow,
            "deep_ratio": deep,
            "depth_ratio": shallow / deep if deep > 0 else math.nan,
            "global_ratio": global_ratio,
            "peak_global_ratio": self.peak_global_ratio,
            "dead_layers": float(len(dead)),
        }
        if dead:
            named = ", ".join(dead[:5]) + (f" and {len(dead) - 5} more" if len(dead) > 5 else "")
            self.summary = (
                f"{len(dead)} of {len(grads)} layers get exactly zero gradient ({named}): their units are dead "
                "(inactive for every input) or cut off from the loss."
            )
            return self._decide(step, True, "warning", remedy=self.dead_remedy)
        if negligible and not across_depth:
            self.summary = f"Gradients are negligible against the weights (gradient/weight {global_ratio:.2g})."
        else:
            self.summary = (
                f"Shallow layers get {self.evidence['depth_ratio']:.2g}x the relative gradient of the deep ones "
                f"(gradient/weight {shallow:.2g} vs. {deep:.2g})."
            )
        return self._decide(step, across_depth or negligible, "warning")

    def state_dict(self) -> dict[str, Any]:
        """Hysteresis, evidence and the peak global ratio (primitives)."""
        return super().state_dict() | {"peak_global_ratio": self.peak_global_ratio}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; missing keys keep their defaults."""
        super().load_state_dict(state)
        self.peak_global_ratio = float(state.get("peak_global_ratio", 0.0))
