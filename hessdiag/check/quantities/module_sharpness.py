"""lambda_max of the own diagonal Hessian blocks of the modules holding most of the top eigenvector.

With ``module_sharpness`` n > 0, the first n modules of the top Ritz vector's layer shares, each by
a Lanczos run on the check's operator restricted to the module, warm-started from the top Ritz
vector's restriction (see :mod:`hessdiag.estimators.module_sharpness`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hessdiag.check.quantity import CheckContext, Quantity
from hessdiag.estimators import module_sharpness as estimator
from hessdiag.estimators.layer_shares import module_label
from hessdiag.estimators.module_sharpness import ModuleSharpness
from hessdiag.reporting.tags import LAYER_SHARES, module_sharpness_tag


class TopModuleSharpness(Quantity):
    """The measured blocks, in the order of the top vector's shares (value: a tuple of
    :class:`~hessdiag.ModuleSharpness`; empty without shares)."""

    name = "module_sharpness"
    needs = ("layer_shares",)

    def due(self, context: CheckContext) -> bool:
        return self.settings.module_sharpness > 0

    def compute(self, context: CheckContext) -> tuple[ModuleSharpness, ...]:
        shares = context.values.get("layer_shares")
        top = shares[0] if isinstance(shares, tuple) else ()
        modules = [module for module, _ in top[: self.settings.module_sharpness]]
        if not modules or context.spectrum.top_vectors is None:
            return ()
        found = estimator.module_sharpness_of(
            context.operator, modules, tol=self.settings.tol, max_iter=self.settings.max_iter, seed=context.seed,
            v0=context.spectrum.top_vectors[0], memory_budget=context.memory_budget,
        )  # fmt: skip
        return tuple(ModuleSharpness.of(module, block) for module, block in found.items())

    @staticmethod
    def scalars(value: tuple[ModuleSharpness, ...], check: Any) -> dict[str, float]:
        return {module_sharpness_tag(module_label(block.module)): block.lambda_max for block in value}

    @staticmethod
    def texts(value: tuple[ModuleSharpness, ...], check: Any) -> dict[str, str]:
        return {LAYER_SHARES: module_sharpness_text(value, check.lambda_max)} if value else {}


def module_sharpness_text(blocks: Sequence[ModuleSharpness], lambda_max: float) -> str:
    """Markdown: "`layer4.1.conv2` alone has lambda_max 380 of the whole 412", then every measured
    module's block lambda_max with its bound (the modules holding most of the top direction)."""
    first = blocks[0]
    head = f"`{module_label(first.module)}` alone has lambda_max {first.lambda_max:.4g} of the whole {lambda_max:.4g}."
    rows = "\n".join(
        f"| `{module_label(b.module)}` | {b.lambda_max:.4g} +- {b.error_bound:.2g} | {b.num_hvps}"
        f"{'' if b.converged else ' (not converged)'} |"
        for b in blocks
    )
    return f"{head}\n\n| module | lambda_max of its own block | products |\n|---|---|---|\n{rows}"
