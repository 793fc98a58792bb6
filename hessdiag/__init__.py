"""hessdiag: why is the loss doing what it does? Hessian curvature and training-health flags.

The engine (this package) depends on torch only; the Lightning adapters live in
``hessdiag.callbacks``.
"""

from hessdiag.batches import MicroBatches
from hessdiag.estimators.eigen import HessianEigenvalues, hessian_eigenvalues
from hessdiag.errors import (
    CoarseFiniteDifferenceError,
    HessdiagError,
    HessdiagWarning,
    LossClosureError,
    NonFiniteLossError,
    NonSmoothLossError,
    SecondDerivativeError,
    UnrecordedGradientError,
)
from hessdiag.estimators.gradient_curvature import GradientCurvature, gradient_curvature, gradient_curvature_of
from hessdiag.lanczos import LanczosResult, lanczos
from hessdiag.estimators.layer_shares import layer_shares, module_label
from hessdiag.estimators.module_sharpness import ModuleSharpness, module_sharpness
from hessdiag.monitor import Monitor
from hessdiag.noise.noise_scale import NoiseScaleEstimate, gradient_noise_scale, noise_scale_from_norms
from hessdiag.noise.running import RunningNoiseScale
from hessdiag.operator import HessianOperator, hessian_vector_product
from hessdiag.estimators.spectrum import (
    SpectralDensity,
    TraceEstimate,
    hessian_spectral_density,
    hessian_trace,
    hutchpp_trace,
    slq_density,
)

__version__ = "0.1.0"

__all__ = [
    # curvature
    "hessian_eigenvalues",
    "HessianEigenvalues",
    "hessian_vector_product",
    "HessianOperator",
    "lanczos",
    "LanczosResult",
    # where the curvature lives
    "layer_shares",
    "module_label",
    "module_sharpness",
    "ModuleSharpness",
    # what limits the step
    "gradient_curvature",
    "gradient_curvature_of",
    "GradientCurvature",
    # how much batch the run can use
    "gradient_noise_scale",
    "noise_scale_from_norms",
    "NoiseScaleEstimate",
    "RunningNoiseScale",
    # training diagnostics
    "Monitor",
    "MicroBatches",
    # whole spectrum
    "hessian_trace",
    "hessian_spectral_density",
    "hutchpp_trace",
    "slq_density",
    "TraceEstimate",
    "SpectralDensity",
    # errors
    "HessdiagError",
    "HessdiagWarning",
    "LossClosureError",
    "NonFiniteLossError",
    "CoarseFiniteDifferenceError",
    "NonSmoothLossError",
    "SecondDerivativeError",
    "UnrecordedGradientError",
]
