"""The saddle rule's verdict in words: the one-sentence summary of a check's classification and the
remedy, each matching the numbers in the evidence (the rule itself is
:class:`~hessdiag.detectors.saddle.SaddleDetector`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hessdiag.detectors.saddle import SaddleDetector


def escape_remedy(remedy: str, loss_change_along_bottom: float | None) -> str:
    """The detector's `remedy`, or, where the check measured an escape, that escape (never one it did not)."""
    if loss_change_along_bottom is None or not loss_change_along_bottom < 0:
        return remedy
    return (
        f"Keep or add momentum or gradient noise: a step along the bottom eigenvector (escape direction) "
        f"lowered the loss by {-loss_change_along_bottom:.3g} at this check."
    )


def describe(
    detector: SaddleDetector,
    grad_norm: float,
    lambda_min: float,
    lambda_max: float,
    negative_certified: bool,
    loss_change_along_bottom: float | None,
) -> str:
    """One sentence that says why the point got the `detector`'s classification, in words that match
    its evidence."""
    share = abs(detector.evidence["curvature_ratio"])
    numbers = f"gradient norm {grad_norm:.2g}, lambda_min {lambda_min:.4g}, lambda_max {lambda_max:.4g}"
    progress = progress_in_words(detector.evidence, detector.window)
    classification = detector.classification
    if classification in ("saddle", "no escape"):
        curvature = f"certified negative curvature: |lambda_min| is {100 * share:.3g}% of the spectral norm"
        if loss_change_along_bottom is None:
            return f"Slowed near a point with {curvature} ({progress}; {numbers})."
        if classification == "saddle":
            return (
                f"Slowed near a point with {curvature}; a step along the bottom eigenvector lowers the loss by "
                f"{-loss_change_along_bottom:.3g} ({progress}; {numbers})."
            )
        return (
            f"Slowed near a point with {curvature}, but a step along the bottom eigenvector raises the loss by "
            f"{loss_change_along_bottom:.3g}: no escape direction at that scale, not a saddle flag ({progress}; {numbers})."
        )
    if classification == "progressing" and detector.too_noisy:
        return (
            f"Not called stalled: the loss is too noisy to measure its pace to {detector.progress_fraction:.2g} of "
            f"the loss left ({progress}; {numbers}); a longer `window` can judge it."
        )
    if classification == "progressing":
        return f"The run is making progress: {progress} ({numbers})."
    if classification == "not critical":
        return f"Not near a critical point: a gradient step would still remove a real share of the loss ({numbers})."
    if classification == "degenerate":
        return (
            f"Slowed near a point with no curvature to speak of in any direction: the spectral norm is below "
            f"{detector.flat_tol:g} x the loss left ({numbers})."
        )
    if lambda_min < 0 and not negative_certified:
        reason = "negative curvature is not certified beyond rounding"
    elif lambda_min < 0:
        reason = f"the negative curvature is small: |lambda_min| is {100 * share:.3g}% of the spectral norm"
    else:
        reason = "no negative curvature found"
    return f"Slowed near a point that is not a saddle: {reason} ({numbers})."


def progress_in_words(evidence: Mapping[str, float], window: int) -> str:
    """What the loss history says, e.g. 'the loss fell by 0.02% of the loss left over 50 steps'."""
    if "loss_drop_over_window" not in evidence:
        return "no loss history: judged by the quadratic model along the gradient"
    drop = evidence["loss_drop_over_window"]
    words = f"the loss {'fell' if drop >= 0 else 'rose'} by {100 * abs(drop):.2g}% of the loss left over the last {window} steps"
    if "pace_ratio" in evidence:
        words += f", {evidence['pace_ratio']:.2g}x its earlier pace"
    return words
