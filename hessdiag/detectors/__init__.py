"""One small stateful rule per flag. Each ``update(step, ...)`` returns the `FlagEvent`s it raised:
an empty list, or one event at onset or clear."""

from hessdiag.detectors.edge_of_stability import EdgeOfStabilityDetector
from hessdiag.detectors.exploding import ExplodingGradientDetector
from hessdiag.detectors.plateau import PlateauDetector
from hessdiag.detectors.saddle import SaddleDetector
from hessdiag.detectors.vanishing import VanishingGradientDetector

__all__ = [
    # fed by the per-step gradient statistics
    "ExplodingGradientDetector",
    "VanishingGradientDetector",
    "PlateauDetector",
    # fed by the curvature checks
    "SaddleDetector",
    "EdgeOfStabilityDetector",
]
