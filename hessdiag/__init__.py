"""hessdiag: why is the loss doing what it does? Hessian curvature and training-health flags.

The engine (this package) depends on torch only; the Lightning adapters live in
``hessdiag.callbacks``. Exported here: what a user calls or receives. Low-level pieces stay in their
subpackages: the solver (:mod:`hessdiag.lanczos`), the trace and density estimators
(:mod:`hessdiag.estimators.spectrum`), module names (:mod:`hessdiag.estimators.layer_shares`), the
noise scale from squared norms (:mod:`hessdiag.noise.noise_scale`), the curvature along a given
direction (:mod:`hessdiag.estimators.gradient_curvature`).
"""

from hessdiag.batches import MicroBatches
from hessdiag.check.record import CurvatureCheck
from hessdiag.check.tracking import TrackingReading
from hessdiag.errors import (
    CoarseFiniteDifferenceError,
    HessdiagError,
    HessdiagWarning,
    LossClosureError,
    NonFiniteGradientError,
    NonFiniteLossError,
    NonSmoothLossError,
    SecondDerivativeError,
    UnrecordedGradientError,
)
from hessdiag.estimators.eigen import HessianEigenvalues, hessian_eigenvalues
from hessdiag.estimators.gradient_curvature import GradientCurvature, gradient_curvature
from hessdiag.estimators.layer_shares import layer_shares
from hessdiag.estimators.module_sharpness import ModuleSharpness, module_sharpness
from hessdiag.estimators.spectrum import SpectralDensity, TraceEstimate, hessian_spectral_density, hessian_trace
from hessdiag.flags import FlagEvent
from hessdiag.monitor import Monitor
from hessdiag.monitor.readout import StepOutcome
from hessdiag.noise.noise_scale import NoiseScaleEstimate, gradient_noise_scale
from hessdiag.noise.running import RunningNoiseScale
from hessdiag.operator import HessianOperator, hessian_vector_product
from hessdiag.reporting.tensorboard import DiagnosticsWriter
from hessdiag.settings import DiagnosticsSettings

__version__ = "0.1.0"

__all__ = [
    # training diagnostics: a hand-written loop (the Lightning callback is hessdiag.callbacks)
    "Monitor",
    "DiagnosticsSettings",
    "MicroBatches",
    "StepOutcome",
    "FlagEvent",
    "CurvatureCheck",
    "TrackingReading",
    "DiagnosticsWriter",
    # curvature
    "hessian_eigenvalues",
    "HessianEigenvalues",
    "hessian_vector_product",
    "HessianOperator",
    # where the curvature lives
    "layer_shares",
    "module_sharpness",
    "ModuleSharpness",
    # what limits the step
    "gradient_curvature",
    "GradientCurvature",
    # how much batch the run can use
    "gradient_noise_scale",
    "NoiseScaleEstimate",
    "RunningNoiseScale",
    # whole spectrum
    "hessian_trace",
    "hessian_spectral_density",
    "TraceEstimate",
    "SpectralDensity",
    # errors
    "HessdiagError",
    "HessdiagWarning",
    "LossClosureError",
    "NonFiniteLossError",
    "NonFiniteGradientError",
    "CoarseFiniteDifferenceError",
    "NonSmoothLossError",
    "SecondDerivativeError",
    "UnrecordedGradientError",
]
