"""What the dashboard shows: which scalars become TensorBoard tags, and the charts they go in.

Detectors decide, writers show. A `Monitor` hands its writers every value it has, per-layer ones
included; this module decides what of it a person can read. Per-layer values become three scalars
per quantity (the largest, the median and the smallest over layers), a histogram over layers and a
table of the worst layers by name, so the number of scalar tags does not grow with depth (all
per-layer scalars are an opt-in). A few derived series make the charts readable: the line at 1 of the
stability ratio, the certified part of lambda_min, the count of active flags and the flag onsets.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping

from hessdiag.flags import FLAG_NAMES

PREFIX = "hessdiag"

#: Per-layer quantities the Monitor logs as ``hessdiag/<family>/<module name>``, with their meaning.
LAYER_FAMILIES: dict[str, str] = {
    "layer_grad_norm": "gradient norm",
    "layer_grad_to_weight": "gradient norm / weight norm",
    "layer_weight_norm": "weight norm",
    "layer_update_ratio": "update norm / weight norm",
}
LAYER_STATISTICS = ("max", "median", "min")
_LAYER_TAG = re.compile(rf"{PREFIX}/({'|'.join(LAYER_FAMILIES)})/(.+)")

#: Derived series: the reference line of the stability ratio, lambda_min where its sign is
#: certified (0 elsewhere), the number of flags raised, and a spike of 1 at each flag onset.
RATIO_LIMIT = f"{PREFIX}/stability_ratio_limit"
CERTIFIED_LAMBDA_MIN = f"{PREFIX}/lambda_min_certified"
ACTIVE_FLAGS = f"{PREFIX}/active_flags"
FLAG_ONSETS = f"{PREFIX}/flag_onsets"


def layer_summary_tag(family: str, statistic: str) -> str:
    """The tag of one summary over layers, e.g. ``hessdiag/layers/grad_norm/max``."""
    return f"{PREFIX}/layers/{family.removeprefix('layer_')}/{statistic}"


def layer_histogram_tag(family: str) -> str:
    """The tag of a histogram over layers, e.g. ``hessdiag/layer_grad_norms``."""
    return f"{PREFIX}/{family}s"


def split_layer_values(values: Mapping[str, float]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Separate the per-layer values (by family, then module name) from the others."""
    others: dict[str, float] = {}
    layers: dict[str, dict[str, float]] = {}
    for tag, value in values.items():
        match = _LAYER_TAG.fullmatch(tag)
        if match:
            layers.setdefault(match[1], {})[match[2]] = value
        else:
            others[tag] = value
    return others, layers


def shown_scalars(values: Mapping[str, float], *, per_layer_scalars: bool = False) -> dict[str, float]:
    """The scalars to log for the `values` a Monitor hands its writers at one step.

    Per-layer values become their largest, median and smallest finite value over layers (non-finite
    ones are counted by the explosion detector and would hide the rest); with `per_layer_scalars`
    they are logged one by one as well. Derived series are added where their inputs are present.
    """
    shown, layers = split_layer_values(values)
    for family, by_layer in layers.items():
        finite = [v for v in by_layer.values() if math.isfinite(v)]
        if finite:
            summary = {"max": max(finite), "median": statistics.median(finite), "min": min(finite)}
            shown |= {layer_summary_tag(family, name): summary[name] for name in LAYER_STATISTICS}
        if per_layer_scalars:
            shown |= {f"{PREFIX}/{family}/{name}": value for name, value in by_layer.items()}
    if f"{PREFIX}/stability_ratio" in values:
        shown[RATIO_LIMIT] = 1.0
    lambda_min, certified = values.get(f"{PREFIX}/lambda_min"), values.get(f"{PREFIX}/negative_curvature_certified")
    if lambda_min is not None and certified is not None:
        shown[CERTIFIED_LAMBDA_MIN] = min(lambda_min, 0.0) if certified else 0.0
    flags = [values[f"{PREFIX}/flags/{name}"] for name in FLAG_NAMES if f"{PREFIX}/flags/{name}" in values]
    if flags:
        shown[ACTIVE_FLAGS] = float(sum(flags))
    return shown


def worst_layers(layers: Mapping[str, Mapping[str, float]], k: int) -> str:
    """Markdown: per quantity, the `k` layers with the largest and the smallest values, by name."""
    rows = []
    for family, by_layer in layers.items():
        ranked = sorted(((v, name) for name, v in by_layer.items() if math.isfinite(v)), reverse=True)
        if not ranked:
            continue
        largest = ", ".join(f"{name} {v:.3g}" for v, name in ranked[:k])
        smallest = ", ".join(f"{name} {v:.3g}" for v, name in reversed(ranked[-k:]))
        rows.append(f"| {LAYER_FAMILIES[family]} | {largest} | {smallest} |")
    if not rows:
        return ""
    return f"| per layer | largest {k} | smallest {k} |\n|---|---|---|\n" + "\n".join(rows)


_Chart = tuple[str, list[str]]  # title, tags (regular expressions for per-layer scalars)


def _charts() -> dict[str, list[_Chart]]:
    p = PREFIX
    layer_charts: list[_Chart] = []
    for family, meaning in LAYER_FAMILIES.items():
        layer_charts.append(
            (f"{meaning} over layers: max, median, min", [layer_summary_tag(family, s) for s in LAYER_STATISTICS])
        )
        layer_charts.append((f"{meaning}, every layer ({p}/{family}/<module>)", [f"{p}/{family}/.*"]))
    onsets = f"spikes of {FLAG_ONSETS}: flag onsets"
    return {
        f"{p}: curvature": [
            (
                f"sharpness ({p}/sharpness: lambda_max, preconditioned for Adam) vs. its stability threshold "
                f"({p}/stability_threshold)",
                [f"{p}/sharpness", f"{p}/stability_threshold"],
            ),
            (
                f"sharpness / threshold ({p}/stability_ratio); >= the line at 1: edge of stability; {onsets}",
                [f"{p}/stability_ratio", RATIO_LIMIT, FLAG_ONSETS],
            ),
            (
                f"lambda_min; {CERTIFIED_LAMBDA_MIN} below 0: negative curvature certified; {onsets}",
                [f"{p}/lambda_min", CERTIFIED_LAMBDA_MIN, FLAG_ONSETS],
            ),
            (f"Hessian extremes of the loss: {p}/lambda_max, {p}/lambda_min", [f"{p}/lambda_max", f"{p}/lambda_min"]),
            (f"loss change along the bottom eigenvector ({p}/loss_change_along_bottom)", [f"{p}/loss_change_along_bottom"]),
        ],
        f"{p}: flags (0 = clear, 1 = raised; set smoothing to 0)": [
            (f"active flags ({ACTIVE_FLAGS}) and {onsets}", [ACTIVE_FLAGS, FLAG_ONSETS]),
            *[(f"{name} ({p}/flags/{name})", [f"{p}/flags/{name}"]) for name in FLAG_NAMES],
        ],
        f"{p}: gradients": [
            (f"gradient norm ({p}/grad_norm)", [f"{p}/grad_norm"]),
            (f"training loss ({p}/loss)", [f"{p}/loss"]),
            *layer_charts,
            (f"fp16 steps skipped for overflow ({p}/overflow_skips)", [f"{p}/overflow_skips"]),
        ],
        f"{p}: cost of the curvature checks": [
            (f"Hessian-vector products per check ({p}/num_hvps)", [f"{p}/num_hvps"]),
            (f"seconds per check ({p}/check_seconds)", [f"{p}/check_seconds"]),
            (f"failed checks (1 = failed; {p}/check_failed)", [f"{p}/check_failed"]),
            (f"Ritz residual bounds ({p}/residual_max, {p}/residual_min)", [f"{p}/residual_max", f"{p}/residual_min"]),
        ],
    }


def layout(tags: Iterable[str]) -> dict[str, dict[str, list]]:
    """The custom-scalars layout for the scalar `tags` logged so far: only charts with data, only
    the tags each has (so a chart never names a series that does not exist), no empty category."""
    tags = set(tags)
    result: dict[str, dict[str, list]] = {}
    for category, charts in _charts().items():
        shown = {}
        for title, patterns in charts:
            present = [p for p in patterns if any(re.fullmatch(p, tag) for tag in tags)]
            if present:
                shown[title] = ["Multiline", present]
        if shown:
            result[category] = shown
    return result
