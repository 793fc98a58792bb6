"""Vanishing gradients: gradient-to-weight ratios collapsing from the output back to the input."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from hessdiag.detectors._common import Detector, check_positive
from hessdiag.flags import FlagEvent


class VanishingGradientDetector(Detector):
    """Raises ``vanishing`` when the shallow layers stop learning.

    Per layer the ratio r = ||grad|| / ||weight|| is the relative change one SGD step of unit
    learning rate would make. Triggers when the median ratio of the shallowest quarter of the layers
    is below `depth_ratio` x that of the deepest quarter (the signal dies on its way back through the
    network), or when the global ratio is below `min_ratio` (gradients negligible everywhere).

    Args:
        depth_ratio: shallow / deep ratio below which gradients count as vanishing (default 1e-3).
        min_ratio: global gradient/weight ratio below which they count as negligible (default 1e-8;
            converged runs have small gradients too, so this is deliberately tiny).
        onset: consecutive read-backs that raise the flag (default 5).
        clear: consecutive read-backs that clear it (default 5).

    Evidence: ``shallow_ratio``, ``deep_ratio``, ``depth_ratio`` (shallow / deep), ``global_ratio``.
    """

    name = "vanishing"
    remedy = (
        "Use a better-scaled initialisation (Kaiming/Xavier), non-saturating activations (ReLU/GELU), "
        "normalisation layers, or residual connections."
    )

    def __init__(self, depth_ratio: float = 1e-3, min_ratio: float = 1e-8, onset: int = 5, clear: int = 5) -> None:
        super().__init__(onset, clear)
        self.depth_ratio = check_positive("depth_ratio", depth_ratio, upper=1.0)
        self.min_ratio = check_positive("min_ratio", min_ratio, upper=1.0)

    def update(
        self,
        step: int,
        layer_grad_norms: Sequence[tuple[str, float]],
        layer_weight_norms: Sequence[tuple[str, float]],
    ) -> list[FlagEvent]:
        weights = dict(layer_weight_norms)
        ratios = [g / weights[name] for name, g in layer_grad_norms if weights.get(name, 0) > 0 and math.isfinite(g)]
        if not ratios:
            return []
        quarter = max(1, len(ratios) // 4)
        shallow, deep = statistics.median(ratios[:quarter]), statistics.median(ratios[-quarter:])
        grads = math.sqrt(sum(g * g for _, g in layer_grad_norms))
        weight = math.sqrt(sum(w * w for w in weights.values()))
        global_ratio = grads / weight if weight > 0 else math.nan
        across_depth = len(ratios) >= 2 and deep > 0 and shallow < self.depth_ratio * deep
        negligible = global_ratio < self.min_ratio
        self.evidence = {
            "shallow_ratio": shallow,
            "deep_ratio": deep,
            "depth_ratio": shallow / deep if deep > 0 else math.nan,
            "global_ratio": global_ratio,
        }
        if across_depth:
            self.summary = (
                f"Shallow layers get {shallow / deep:.2g}x the relative gradient of the deep ones "
                f"(gradient/weight {shallow:.2g} vs {deep:.2g})."
            )
        else:
            self.summary = f"Gradients are negligible against the weights (ratio {global_ratio:.2g})."
        return self._decide(step, across_depth or negligible, "warning")
