"""What the dashboard shows: which scalars become TensorBoard tags, and the charts they go in.

Detectors decide, writers show. A `Monitor` hands its writers every value it has, per-layer ones
included; this module decides what of it a person can read. Per-layer values become three scalars
per quantity (the largest, the median and the smallest over layers), a histogram over layers and a
table of the worst layers by name, so the number of scalar tags does not grow with depth (all
per-layer scalars are an opt-in). A few derived series make the charts readable: the lines at 1 of the
stability ratio and of the learning-rate headroom, the certified part of lambda_min, the count of
active flags and the flag onsets. The texts of a check (where its directions live, the modules'
own sharpness, the noise scale against the batch) are worded by the quantities that own them
(:mod:`hessdiag.check.quantities`, :mod:`hessdiag.noise.verdict`); the writers only pass them on.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping

from hessdiag.flags import FLAG_NAMES
from hessdiag.reporting.tags import (
    TRACKING_NUM_HVPS,
    TRACKING_RESIDUAL,
    TRACKING_SECONDS,
    LAMBDA_MAX_LOWER,
    RATIO_LOWER,
    ACTIVE_FLAGS,
    CERTIFIED_LAMBDA_MIN,
    CHECK_FAILED,
    CHECK_SECONDS,
    CONDITIONING,
    FLAG_ONSETS,
    GRAD_NORM,
    GRADIENT_ALIGNMENT,
    GRADIENT_CURVATURE,
    HEADROOM_LIMIT,
    LAMBDA_MAX,
    LAMBDA_MIN,
    LAYER_FAMILIES,
    LAYER_STATISTICS,
    LOSS,
    LOSS_CHANGE_ALONG_BOTTOM,
    LR_FRACTION,
    LR_HEADROOM,
    NEGATIVE_CURVATURE_CERTIFIED,
    NOISE_SCALE,
    NOISE_SCALE_SE,
    NUM_HVPS,
    OVERFLOW_SKIPS,
    PREFIX,
    RATIO_LIMIT,
    RESIDUAL_MAX,
    RESIDUAL_MIN,
    SHARPNESS,
    STABILITY_RATIO,
    STABILITY_THRESHOLD,
    UPDATE_LOSS_OBSERVED,
    UPDATE_LOSS_PREDICTED,
    UPDATE_LOSS_RATIO,
    flag_tag,
    layer_summary_tag,
    layer_tag,
    module_sharpness_tag,
)

#: Per-layer values as the Monitor hands them to its writers: ``{quantity: {module name: value}}``,
#: the quantities those of :data:`hessdiag.reporting.tags.LAYER_FAMILIES`, modules from the input to the output.
LayerValues = Mapping[str, Mapping[str, float]]


def shown_scalars(
    values: Mapping[str, float], layers: LayerValues | None = None, *, per_layer_scalars: bool = False
) -> dict[str, float]:
    """The scalars to log for what a Monitor hands its writers at one step: `values` by tag and the
    per-layer `layers`.

    Per-layer values become their largest, median and smallest finite value over layers (non-finite
    ones are counted by the explosion detector and would hide the rest); with `per_layer_scalars`
    they are logged one by one as well. Derived series are added where their inputs are present.
    """
    shown = dict(values)
    for family, by_layer in (layers or {}).items():
        finite = [v for v in by_layer.values() if math.isfinite(v)]
        if finite:
            summary = {"max": max(finite), "median": statistics.median(finite), "min": min(finite)}
            shown |= {layer_summary_tag(family, name): summary[name] for name in LAYER_STATISTICS}
        if per_layer_scalars:
            shown |= {layer_tag(family, name): value for name, value in by_layer.items()}
    if STABILITY_RATIO in values or RATIO_LOWER in values:
        shown[RATIO_LIMIT] = 1.0
    if LR_HEADROOM in values:
        shown[HEADROOM_LIMIT] = 1.0
        if 0 < values[LR_HEADROOM] < math.inf:
            shown[LR_FRACTION] = 1.0 / values[LR_HEADROOM]
    lambda_min, certified = values.get(LAMBDA_MIN), values.get(NEGATIVE_CURVATURE_CERTIFIED)
    if lambda_min is not None and certified is not None:
        shown[CERTIFIED_LAMBDA_MIN] = min(lambda_min, 0.0) if certified else 0.0
    flags = [values[flag_tag(name)] for name in FLAG_NAMES if flag_tag(name) in values]
    if flags:
        shown[ACTIVE_FLAGS] = float(sum(flags))
    return shown


def markdown_cell(text: str) -> str:
    """`text` safe inside a Markdown table cell: a ``|`` would end the cell (and cut the row) there."""
    return text.replace("|", "\\|").replace("\n", " ")


def worst_layers(layers: Mapping[str, Mapping[str, float]], k: int) -> str:
    """Markdown: per quantity, the `k` layers with the largest and the smallest values, by name."""
    rows = []
    for family, by_layer in layers.items():
        ranked = sorted(((v, name) for name, v in by_layer.items() if math.isfinite(v)), reverse=True)
        if not ranked:
            continue
        largest = markdown_cell(", ".join(f"{name} {v:.3g}" for v, name in ranked[:k]))
        smallest = markdown_cell(", ".join(f"{name} {v:.3g}" for v, name in reversed(ranked[-k:])))
        rows.append(f"| {LAYER_FAMILIES[family]} | {largest} | {smallest} |")
    if not rows:
        return ""
    return f"| per layer | largest {k} | smallest {k} |\n|---|---|---|\n" + "\n".join(rows)


_Chart = tuple[str, list[str]]  # title, tags (regular expressions for per-layer scalars)


def _charts() -> dict[str, list[_Chart]]:
    """The dashboard's categories and their charts, in order.

    Each chart holds series of one scale, sampled alike: TensorBoard joins a sparse series' points
    across a denser one's (the per-step onset spikes drew diagonals over the per-check curves), and a
    threshold of 4e4 beside a sharpness of 100 (Adam) flattens the sharpness onto 0.
    """
    p = PREFIX
    return {
        f"{p}: curvature": _curvature_charts(),
        f"{p}: what limits the step, where the curvature lives, how much batch": _quantity_charts(),
        f"{p}: flags (0 = clear, 1 = raised; smoothing 0 shows them as steps)": _flag_charts(),
        f"{p}: gradients": _gradient_charts(),
        f"{p}: cost of the curvature readings": _cost_charts(),
    }


def _curvature_charts() -> list[_Chart]:
    """The proven lower bounds at every reading first, then the full checks' values."""
    return [
        (
            f"all through the run: a proven lower bound on sharpness / threshold at every reading ({RATIO_LOWER}: "
            "full checks and tracking readings); at or above the line at 1 the edge of stability is crossed",
            [RATIO_LOWER, RATIO_LIMIT],
        ),
        (f"all through the run: a proven lower bound on lambda_max ({LAMBDA_MAX_LOWER}) at every reading", [LAMBDA_MAX_LOWER]),
        (f"sharpness / threshold ({STABILITY_RATIO}) at full checks; >= the line at 1: edge of stability", [STABILITY_RATIO, RATIO_LIMIT]),
        (f"sharpness ({SHARPNESS}: lambda_max, preconditioned for Adam) at full checks", [SHARPNESS]),
        (f"stability threshold of the sharpness ({STABILITY_THRESHOLD}; from the optimizer)", [STABILITY_THRESHOLD]),
        (f"lambda_min; {CERTIFIED_LAMBDA_MIN} below 0: negative curvature certified", [LAMBDA_MIN, CERTIFIED_LAMBDA_MIN]),
        (f"Hessian extremes of the loss: {LAMBDA_MAX}, {LAMBDA_MIN}", [LAMBDA_MAX, LAMBDA_MIN]),
        (f"loss change along the bottom eigenvector ({LOSS_CHANGE_ALONG_BOTTOM})", [LOSS_CHANGE_ALONG_BOTTOM]),
    ]


def _quantity_charts() -> list[_Chart]:
    """What a full check adds beyond the spectrum's ends."""
    return [
        (
            f"curvature along the gradient ({GRADIENT_CURVATURE}, preconditioned for Adam) vs. the sharpness "
            f"({SHARPNESS}, the same operator)",
            [GRADIENT_CURVATURE, SHARPNESS],
        ),
        (
            f"lr in use / the largest stable lr along the gradient ({LR_FRACTION} = 1 / {LR_HEADROOM}); "
            "at or above the line at 1 the step overshoots",
            [LR_FRACTION, HEADROOM_LIMIT],
        ),
        (f"learning-rate headroom ({LR_HEADROOM}: the largest stable lr along the gradient / the lr in use)", [LR_HEADROOM]),
        (
            f"lambda_max of the top modules' own Hessian blocks ({module_sharpness_tag('<module>')}, with "
            f"module_sharpness) vs. the whole {LAMBDA_MAX}",
            [module_sharpness_tag(".*"), LAMBDA_MAX],
        ),
        (f"alignment of the gradient with the sharpest direction ({GRADIENT_ALIGNMENT})", [GRADIENT_ALIGNMENT]),
        (
            f"gradient noise scale ({NOISE_SCALE}, samples; against the batch in the text tab) and its "
            f"standard error ({NOISE_SCALE_SE})",
            [NOISE_SCALE, NOISE_SCALE_SE],
        ),
        (f"conditioning lambda_max / (trace / n) at density checks ({CONDITIONING})", [CONDITIONING]),
        (
            f"loss change of the step's update: the quadratic model's ({UPDATE_LOSS_PREDICTED}) and the observed "
            f"({UPDATE_LOSS_OBSERVED}), with update_ratios",
            [UPDATE_LOSS_PREDICTED, UPDATE_LOSS_OBSERVED],
        ),
        (f"observed / predicted loss change of the update ({UPDATE_LOSS_RATIO}; 1: the step stayed quadratic)", [UPDATE_LOSS_RATIO]),
    ]


def _flag_charts() -> list[_Chart]:
    onsets = f"spikes of {FLAG_ONSETS}: flag onsets"
    return [
        (f"active flags ({ACTIVE_FLAGS}) and {onsets}", [ACTIVE_FLAGS, FLAG_ONSETS]),
        *[(f"{name} ({flag_tag(name)})", [flag_tag(name)]) for name in FLAG_NAMES],
    ]


def _gradient_charts() -> list[_Chart]:
    layer_charts: list[_Chart] = []
    for family, meaning in LAYER_FAMILIES.items():
        layer_charts.append(
            (f"{meaning} over layers: max, median, min", [layer_summary_tag(family, s) for s in LAYER_STATISTICS])
        )
        layer_charts.append((f"{meaning}, every layer ({layer_tag(family, '<module>')})", [layer_tag(family, ".*")]))
    return [
        (f"gradient norm ({GRAD_NORM})", [GRAD_NORM]),
        (f"training loss ({LOSS})", [LOSS]),
        *layer_charts,
        (f"fp16 steps skipped for overflow ({OVERFLOW_SKIPS})", [OVERFLOW_SKIPS]),
    ]


def _cost_charts() -> list[_Chart]:
    return [
        (f"Hessian-vector products per full check ({NUM_HVPS})", [NUM_HVPS]),
        (f"seconds per full check ({CHECK_SECONDS})", [CHECK_SECONDS]),
        (f"Hessian-vector products per tracking reading ({TRACKING_NUM_HVPS})", [TRACKING_NUM_HVPS]),
        (f"seconds per tracking reading ({TRACKING_SECONDS})", [TRACKING_SECONDS]),
        (f"failed readings (1 = failed; {CHECK_FAILED})", [CHECK_FAILED]),
        (f"Ritz residual bounds ({RESIDUAL_MAX}, {RESIDUAL_MIN})", [RESIDUAL_MAX, RESIDUAL_MIN]),
        (f"tracking readings' residual: an eigenvalue lies within it of the Ritz value ({TRACKING_RESIDUAL})", [TRACKING_RESIDUAL]),
    ]


def _anchored(pattern: str) -> str:
    """A tag as the exact series it names (TensorBoard searches chart patterns as regular expressions:
    unanchored, `hessdiag/loss` would also draw `hessdiag/loss_change_along_bottom`)."""
    return pattern if pattern.endswith(".*") else f"^{re.escape(pattern)}$"


def layout(tags: Iterable[str]) -> dict[str, dict[str, list]]:
    """The custom-scalars layout for the scalar `tags` logged so far.

    A chart is shown once its headline series (its first) has data, and always with the same content
    (every series of its title, each pattern anchored): runs that share a log directory then register
    identical charts, which TensorBoard merges into one, and a run without curvature checks registers
    no curvature chart. No empty category."""
    tags = set(tags)
    result: dict[str, dict[str, list]] = {}
    for category, charts in _charts().items():
        shown = {}
        for title, patterns in charts:
            if any(re.fullmatch(patterns[0], tag) for tag in tags):
                shown[title] = ["Multiline", [_anchored(p) for p in patterns]]
        if shown:
            result[category] = shown
    return result
