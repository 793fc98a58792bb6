"""Lightning adapters over the hessdiag engine, imported as ``hessdiag.callbacks``."""

from hessdiag.callbacks.hessian_diagnostics import HessianDiagnostics

__all__ = ["HessianDiagnostics"]
