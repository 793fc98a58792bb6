"""Where the curvature lives: the module shares of the top and bottom Ritz vectors (no product)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hessdiag.check.quantity import CheckContext, Quantity, Skipped
from hessdiag.estimators.layer_shares import SHARES_KEPT, module_label
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


def direction_sentence(shares: Sequence[tuple[str, float]], end: str = "top") -> str:
    """"the sharpest direction lies 71% in `layer4.1.conv2`" for the largest of `shares`
    (``((module, share), ...)``, largest first); ``end="bottom"``: the most negative direction."""
    if not shares:
        return ""
    module, share = shares[0]
    which = "sharpest direction" if end == "top" else "direction of lowest curvature"
    return f"the {which} lies {share:.0%} in `{module_label(module)}`"


def layer_shares_text(top: Sequence[tuple[str, float]], bottom: Sequence[tuple[str, float]]) -> str:
    """Markdown: the sentence for the top direction, then per end the modules holding most of it."""
    if not top and not bottom:
        return ""
    rows = [
        f"| {end} | " + ", ".join(f"`{module_label(name)}` {share:.0%}" for name, share in shares) + " |"
        for end, shares in (("top (lambda_max)", top), ("bottom (lambda_min)", bottom)) if shares
    ]  # fmt: skip
    sentence = direction_sentence(top)
    sentence = sentence[:1].upper() + sentence[1:] + "." if sentence else ""
    return f"{sentence}\n\n| eigenvector | modules holding most of its squared norm |\n|---|---|\n" + "\n".join(rows)


def layer_shares_record(top: Sequence[tuple[str, float]], bottom: Sequence[tuple[str, float]]) -> str:
    """The layer shares for programs (:data:`~hessdiag.reporting.tags.LAYER_SHARES_RECORD`): JSON
    ``{"top": [[module, share], ...], "bottom": [...]}``, modules by their label, largest share first."""
    return json.dumps({end: [[module_label(name), float(share)] for name, share in shares] for end, shares in (("top", top), ("bottom", bottom))})
