"""The public surface: `hessdiag` exports what a user calls or receives, and the low-level pieces only
from their subpackages."""

import importlib
import inspect

import hessdiag

RECEIVED = ("FlagEvent", "CurvatureCheck", "TrackingReading", "StepOutcome", "DiagnosticsWriter")
LOW_LEVEL = {
    "lanczos": "hessdiag.lanczos",
    "LanczosResult": "hessdiag.lanczos",
    "slq_density": "hessdiag.estimators.spectrum",
    "hutchpp_trace": "hessdiag.estimators.spectrum",
    "module_label": "hessdiag.estimators.layer_shares",
    "noise_scale_from_norms": "hessdiag.noise.noise_scale",
    "gradient_curvature_of": "hessdiag.estimators.gradient_curvature",
}


def test_every_exported_name_exists_once():
    assert len(hessdiag.__all__) == len(set(hessdiag.__all__))
    assert all(hasattr(hessdiag, name) for name in hessdiag.__all__)


def test_what_a_user_calls_or_receives_is_exported():
    # The Monitor returns StepOutcomes and FlagEvents, holds CurvatureChecks and TrackingReadings,
    # takes DiagnosticsSettings and writers of the DiagnosticsWriter protocol, may raise NonFiniteGradientError.
    for name in (*RECEIVED, "Monitor", "DiagnosticsSettings", "NonFiniteGradientError", "hessian_eigenvalues"):
        assert name in hessdiag.__all__, name


def test_low_level_pieces_live_in_their_subpackages_only():
    for name, module in LOW_LEVEL.items():
        assert name not in hessdiag.__all__, name
        attribute = getattr(hessdiag, name, None)
        assert attribute is None or inspect.ismodule(attribute), name  # `hessdiag.lanczos` is the subpackage
        assert hasattr(importlib.import_module(module), name), (name, module)
