"""One small stateful rule per flag. Each `update(step, ...)` returns the `FlagEvent`s it raised."""

from hessdiag.detectors.edge_of_stability import EdgeOfStabilityDetector
from hessdiag.detectors.exploding import ExplodingGradientDetector
from hessdiag.detectors.plateau import PlateauDetector
from hessdiag.detectors.saddle import SaddleDetector
from hessdiag.detectors.vanishing import VanishingGradientDetector

__all__ = [
    # per-step gradient statistics
    "ExplodingGradientDetector",
    "VanishingGradientDetector",
    "PlateauDetector",
    # curvature checks
    "SaddleDetector",
    "EdgeOfStabilityDetector",
]
