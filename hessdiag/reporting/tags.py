"""Every TensorBoard / logger tag hessdiag writes, named in one place.

All tags live under ``hessdiag/``. The Monitor, the dashboard layout, the TensorBoard writer and the
CLI's summary read their names from here, so a renamed tag changes in one line. Per-layer values are
not tags until a writer shows them: they travel as ``{quantity: {module: value}}`` (see
:data:`LAYER_FAMILIES`) and only :func:`layer_tag`, :func:`layer_summary_tag` and
:func:`layer_histogram_tag` turn them into names.
"""

from __future__ import annotations

PREFIX = "hessdiag"


def tag(name: str) -> str:
    """``hessdiag/<name>``."""
    return f"{PREFIX}/{name}"


# -- per-step statistics (at each read-back) -------------------------------------------------------
GRAD_NORM = tag("grad_norm")
LOSS = tag("loss")
OVERFLOW_SKIPS = tag("overflow_skips")

# -- curvature checks ---------------------------------------------------------------------------
LAMBDA_MAX = tag("lambda_max")
LAMBDA_MIN = tag("lambda_min")
NEGATIVE_CURVATURE_CERTIFIED = tag("negative_curvature_certified")
RESIDUAL_MAX = tag("residual_max")
RESIDUAL_MIN = tag("residual_min")
NUM_HVPS = tag("num_hvps")
CHECK_SECONDS = tag("check_seconds")
CHECK_LOSS = tag("check_loss")
CHECK_GRAD_NORM = tag("check_grad_norm")
PRODUCT_ERROR = tag("product_error")
CHECK_FAILED = tag("check_failed")
SHARPNESS = tag("sharpness")
STABILITY_THRESHOLD = tag("stability_threshold")
STABILITY_RATIO = tag("stability_ratio")
LOSS_CHANGE_ALONG_BOTTOM = tag("loss_change_along_bottom")
SPECTRAL_DENSITY = tag("spectral_density")
#: What limits the step: g'Hg / ||g||^2, its ratio to the sharpness, the learning-rate headroom.
GRADIENT_CURVATURE = tag("gradient_curvature")
GRADIENT_ALIGNMENT = tag("gradient_alignment")
LR_HEADROOM = tag("lr_headroom")
#: How much batch the run can use: the running noise scale (samples) and its standard error.
NOISE_SCALE = tag("noise_scale")
NOISE_SCALE_SE = tag("noise_scale_se")
#: lambda_max / (trace / n), at density checks.
CONDITIONING = tag("conditioning")
#: With update_ratios: the loss change of the optimizer's update the quadratic model predicts, the
#: observed one on the same batch, and observed / predicted (1: the step stayed quadratic).
UPDATE_LOSS_PREDICTED = tag("update_loss_predicted")
UPDATE_LOSS_OBSERVED = tag("update_loss_observed")
UPDATE_LOSS_RATIO = tag("update_loss_ratio")

# -- proven lower bounds at every curvature reading, full checks and tracking readings alike (one
# sampling: the dense curve through the run); what only tracking readings log (hessdiag.check.tracking)
LAMBDA_MAX_LOWER = tag("lambda_max_lower_bound")
SHARPNESS_LOWER = tag("sharpness_lower_bound")
RATIO_LOWER = tag("stability_ratio_lower_bound")
TRACKING_RESIDUAL = tag("tracking/residual")
TRACKING_NUM_HVPS = tag("tracking/num_hvps")
TRACKING_SECONDS = tag("tracking/seconds")

# -- derived series the dashboard adds (see hessdiag.reporting.dashboard.shown_scalars) -------------------
RATIO_LIMIT = tag("stability_ratio_limit")
HEADROOM_LIMIT = tag("lr_headroom_limit")
#: 1 / lr_headroom: the learning rate in use over the largest stable one along the gradient (>= 1: the
#: step overshoots). Bounded where it matters, so the line at 1 stays readable when the headroom is 300.
LR_FRACTION = tag("lr_fraction_of_stable")

#: The scalar tags of the quantities a check adds beyond the spectrum's ends: a fixed set,
#: whatever the model's depth (module names go to the text card :data:`LAYER_SHARES`).
CHECK_QUANTITY_TAGS = (
    GRADIENT_CURVATURE, GRADIENT_ALIGNMENT, LR_HEADROOM, HEADROOM_LIMIT, LR_FRACTION, NOISE_SCALE, NOISE_SCALE_SE, CONDITIONING,
    UPDATE_LOSS_PREDICTED, UPDATE_LOSS_OBSERVED, UPDATE_LOSS_RATIO,
)  # fmt: skip
CERTIFIED_LAMBDA_MIN = tag("lambda_min_certified")
ACTIVE_FLAGS = tag("active_flags")
FLAG_ONSETS = tag("flag_onsets")

#: The values always put in ``trainer.callback_metrics`` by the Lightning callback (with every flag's
#: :func:`flag_tag`), for EarlyStopping and ModelCheckpoint.
CALLBACK_METRICS: tuple[str, ...] = (LAMBDA_MAX, LAMBDA_MIN, STABILITY_RATIO, GRAD_NORM, LOSS)

# -- text --------------------------------------------------------------------------------------
HVP_METHOD = tag("hvp_method")
EVENT_LOG = tag("event_log")
WORST_LAYERS = tag("worst_layers")
#: Per check: the modules holding most of the top and bottom directions (at most 5 per end), and the
#: sentence naming the first; text, so that module names never become scalar tags.
LAYER_SHARES = tag("layer_shares")
#: Per check with a noise scale: the noise scale against the step's batch, in a sentence.
NOISE_SCALE_VERDICT = tag("noise_scale_verdict")


#: Structured records for programs (``hessdiag summary``), never Markdown: JSON strings in tensors of
#: the :data:`RECORDS_PLUGIN` plugin, which no TensorBoard dashboard shows. One entry per read-back
#: with events (``[{"name", "step", "kind", "summary"}, ...]``) and one per check with layer shares
#: (``{"top": [[module, share], ...], "bottom": [...]}``).
RECORDS_PLUGIN = "hessdiag"
EVENT_RECORDS = tag("records/events")
LAYER_SHARES_RECORD = tag("records/layer_shares")
RECORDS_PREFIX = tag("records/")


def is_hessdiag_tag(name: str) -> bool:
    """Whether `name` is one of hessdiag's tags (under ``hessdiag/``)."""
    return name.startswith(f"{PREFIX}/")


def text_summary_tag(name: str) -> str:
    """The tag under which TensorBoard stores the text written as `name` (``<name>/text_summary``)."""
    return f"{name}/text_summary"


def module_sharpness_tag(module: str) -> str:
    """lambda_max of one module's own diagonal Hessian block, ``hessdiag/module_sharpness/<module>``
    (the module's label, :func:`~hessdiag.estimators.layer_shares.module_label`). Opt-in (``module_sharpness``
    n > 0) and at most n <= 5 per check: the modules holding most of the top eigenvector."""
    return f"{PREFIX}/module_sharpness/{module}"


MODULE_SHARPNESS_PREFIX = module_sharpness_tag("")


def flag_tag(name: str) -> str:
    """0/1 series of a flag: ``hessdiag/flags/<name>``."""
    return f"{PREFIX}/flags/{name}"


FLAGS_PREFIX = flag_tag("")


def event_tag(name: str) -> str:
    """Text cards of a flag's events or of a diagnostics event: ``hessdiag/events/<name>``."""
    return f"{PREFIX}/events/{name}"


def note_tag(key: str) -> str:
    """Text of a fallback reported once: ``hessdiag/notes/<key>``."""
    return f"{PREFIX}/notes/{key}"


#: Per-layer quantities, with their meaning (the keys of ``{quantity: {module: value}}``).
LAYER_FAMILIES: dict[str, str] = {
    "layer_grad_norm": "gradient norm",
    "layer_grad_to_weight": "gradient norm / weight norm",
    "layer_weight_norm": "weight norm",
    "layer_update_ratio": "update norm / weight norm",
}
LAYER_STATISTICS = ("max", "median", "min")


def layer_tag(family: str, module: str) -> str:
    """One layer's scalar (opt-in), e.g. ``hessdiag/layer_grad_norm/<module>``."""
    return f"{PREFIX}/{family}/{module}"


def layer_summary_tag(family: str, statistic: str) -> str:
    """The tag of one summary over layers, e.g. ``hessdiag/layers/grad_norm/max``."""
    return f"{PREFIX}/layers/{family.removeprefix('layer_')}/{statistic}"


def layer_histogram_tag(family: str) -> str:
    """The tag of a histogram over layers, e.g. ``hessdiag/layer_grad_norms``."""
    return f"{PREFIX}/{family}s"
