"""Where the curvature lives: the module shares of the top and bottom Ritz vectors (no product)."""

from __future__ import annotations

from typing import Any

from hessdiag.check.quantity import CheckContext, Quantity, Skipped
from hessdiag.estimators.layer_shares import SHARES_KEPT
from hessdiag.reporting.dashboard import layer_shares_record, layer_shares_text
from hessdiag.reporting.tags import LAYER_SHARES, LAYER_SHARES_RECORD

#: ``((module name, share), ...)``, largest share first.
Shares = tuple[tuple[str, float], ...]


class LayerShares(Quantity):
    """``(top, bottom)``: the :data:`SHARES_KEPT` largest module shares of each end's Ritz vector."""

    name = "layer_shares"

    def compute(self, context: CheckContext) -> tuple[Shares, Shares] | Skipped:
        result = context.spectrum
        if result.top_vectors is None or result.bottom_vectors is None:
            return Skipped(
                "No layer shares: the Lanczos basis ran as a three-vector recurrence (it did not fit in memory), "
                "which keeps no eigenvectors."
            )
        ends = ("top", "bottom") if context.bottom else ("top",)
        shares = [tuple(result.layer_shares(end).items())[:SHARES_KEPT] for end in ends]
        return shares[0], shares[1] if context.bottom else ()

    @staticmethod
    def texts(value: tuple[Shares, Shares], check: Any) -> dict[str, str]:
        top, bottom = value
        if not top and not bottom:
            return {}
        return {LAYER_SHARES: layer_shares_text(top, bottom), LAYER_SHARES_RECORD: layer_shares_record(top, bottom)}
