"""The quantities of a curvature check, one module each (see :mod:`hessdiag.check.quantity`).

Importing this package registers every module's quantity; :func:`build_quantities` makes one
instance of each for a probe, in the order the checks compute them.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from hessdiag.check.quantity import Quantity, ordered_quantities

if TYPE_CHECKING:
    from hessdiag.settings import DiagnosticsSettings

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_quantities(settings: DiagnosticsSettings) -> list[Quantity]:
    """One instance of every registered quantity, each after those it needs."""
    return [cls(settings) for cls in ordered_quantities()]
