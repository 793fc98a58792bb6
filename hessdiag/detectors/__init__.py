"""One small stateful rule per flag, behind one interface.

The Monitor hands every detector every record (:class:`StepRecord` per optimizer step,
:class:`CheckRecord` per curvature check); ``detector.observe(record)`` returns the `FlagEvent`s it
raised: an empty list, or one event at onset or clear. Each built-in detector also has ``update``,
its rule on plain numbers, which ``observe`` feeds from the records it judges.
"""

from hessdiag.detectors.edge_of_stability import EdgeOfStabilityDetector
from hessdiag.detectors.exploding import ExplodingGradientDetector
from hessdiag.detectors.plateau import PlateauDetector
from hessdiag.detectors.records import CheckRecord, FlagDetector, Record, StepRecord, TrackingRecord
from hessdiag.detectors.saddle import SaddleDetector
from hessdiag.detectors.vanishing import VanishingGradientDetector

__all__ = [
    # the interface and what it observes
    "FlagDetector",
    "Record",
    "StepRecord",
    "CheckRecord",
    "TrackingRecord",
    # judge the per-step gradient statistics
    "ExplodingGradientDetector",
    "VanishingGradientDetector",
    "PlateauDetector",
    # judge the curvature checks
    "SaddleDetector",
    "EdgeOfStabilityDetector",
]
