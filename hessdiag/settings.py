"""The settings of the training diagnostics: declared once, with their defaults, and validated once.

`DiagnosticsSettings` holds what the engine computes and how often. The :class:`~hessdiag.Monitor`
and the Lightning callback take it (the callback's own additions live in
:mod:`hessdiag.callbacks.settings`); their keyword signatures spell the same fields out for users,
and a test holds those signatures to the defaults declared here. Every setting is checked here and
nowhere else.

Construction has no side effects: plain checks only (no module, tensor or random draw is built to
validate an argument), so creating a `Monitor` or a `HessianDiagnostics` before or after seeding
leaves the user's run unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar

import torch

from hessdiag.isolation import MODEL_MODES, ModelMode
from hessdiag.detectors import (
    EdgeOfStabilityDetector,
    ExplodingGradientDetector,
    PlateauDetector,
    SaddleDetector,
    VanishingGradientDetector,
)
from hessdiag.flags import FLAG_NAMES
from hessdiag.operator import HVP_METHODS, HVPMethod
from hessdiag.check.schedule import CheckEvery
from hessdiag.estimators.layer_shares import SHARES_KEPT

#: The parts of the batch a reading's products take (see :class:`hessdiag.Monitor`): a count, or "auto".
ProductParts = int | Literal["auto"]

#: What ``product_parts="auto"`` takes on an accelerator (on a CPU: 1, the whole batch). Measured on
#: the small GPT of ``benchmarks/cost.py``: a tracking reading holds 1.27x a step's peak memory on 4
#: parts, 1.88x on 2, 3.04x on the whole batch.
ACCELERATOR_PARTS = 4


def product_parts_on(setting: ProductParts, device: torch.device) -> int:
    """The parts a reading's products take on `device` for the `product_parts` setting: "auto" takes
    :data:`ACCELERATOR_PARTS` on an accelerator, where a reading's memory is training's, and the
    whole batch on a CPU, where each product's rebuilt graphs cost about half a reading more
    (a CNN's tracking reading 7.4 steps instead of 4.7) and memory is the host's."""
    if setting != "auto":
        return setting
    return 1 if device.type == "cpu" else ACCELERATOR_PARTS


#: How the Hessian of a data-parallel run weights the ranks' losses (see :class:`hessdiag.Monitor`).
RankWeighting = Literal["equal", "samples"]

#: The detector class behind each flag name (``detectors=["plateau", ...]`` builds these with defaults).
DETECTOR_CLASSES: dict[str, type] = {
    "exploding": ExplodingGradientDetector,
    "vanishing": VanishingGradientDetector,
    "plateau": PlateauDetector,
    "saddle": SaddleDetector,
    "edge_of_stability": EdgeOfStabilityDetector,
}


_Settings = TypeVar("_Settings", bound="DiagnosticsSettings")


def is_int(value: Any) -> bool:
    """Whether `value` is an int and not a bool (``True`` is an int to Python, never a count to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DiagnosticsSettings:
    """What the diagnostics compute and how often (see :class:`hessdiag.Monitor` for each field).

    Raises:
        ValueError: a bad value, with the argument's name and what is allowed.
    """

    check_every: CheckEvery = "auto"
    overhead_budget: float = 0.05
    log_every: int = 10
    sub_batch: int | None = None
    product_parts: ProductParts = "auto"
    k: int = 1
    tol: float = 1e-3
    max_iter: int | None = None
    cold_every: int = 5
    density_every: int = 10
    noise_scale_parts: int = 4
    module_sharpness: int = 0
    mode: ModelMode = "as_is"
    hvp_method: HVPMethod = "auto"
    rank_weighting: RankWeighting = "equal"
    update_ratios: bool = False
    strict: bool = False

    def __post_init__(self) -> None:
        if self.check_every != "auto" and (not is_int(self.check_every) or self.check_every < 0):
            raise ValueError(f"`check_every` must be an int >= 0 or 'auto', got {self.check_every!r}.")
        if not isinstance(self.overhead_budget, (int, float)) or not 0 < self.overhead_budget < 1:
            raise ValueError(f"`overhead_budget` must be a number in (0, 1), got {self.overhead_budget!r}.")
        self._validate_log_every()
        if self.sub_batch is not None and (not is_int(self.sub_batch) or self.sub_batch < 1):
            raise ValueError(f"`sub_batch` must be a positive int or None, got {self.sub_batch!r}.")
        if self.product_parts != "auto" and (not is_int(self.product_parts) or self.product_parts < 1):
            raise ValueError(
                f"`product_parts` must be a positive int (1: products on the whole batch) or 'auto', got {self.product_parts!r}."
            )
        if not is_int(self.k) or self.k < 1:
            raise ValueError(f"`k` must be a positive int, got {self.k!r}.")
        if not isinstance(self.tol, (int, float)) or isinstance(self.tol, bool) or not 0 < self.tol < 1:
            raise ValueError(f"`tol` must be a number in (0, 1), got {self.tol!r}.")
        if self.max_iter is not None and (not is_int(self.max_iter) or self.max_iter < 1):
            raise ValueError(f"`max_iter` must be a positive int or None, got {self.max_iter!r}.")
        for name in ("cold_every", "density_every"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"`{name}` must be an int >= 0, got {value!r}.")
        if not is_int(self.noise_scale_parts) or self.noise_scale_parts < 0 or self.noise_scale_parts == 1:
            raise ValueError(
                "`noise_scale_parts` must be 0 (no noise scale) or an int >= 2 (two batch sizes are needed), "
                f"got {self.noise_scale_parts!r}."
            )
        if not is_int(self.module_sharpness) or not 0 <= self.module_sharpness <= SHARES_KEPT:
            raise ValueError(
                f"`module_sharpness` must be an int in [0, {SHARES_KEPT}] (0: off; n: the n modules holding most of "
                f"the top eigenvector), got {self.module_sharpness!r}."
            )
        if self.mode not in MODEL_MODES:
            raise ValueError(f"`mode` must be one of {MODEL_MODES}, got {self.mode!r}.")
        if self.hvp_method not in HVP_METHODS:
            raise ValueError(f"`hvp_method` must be one of {HVP_METHODS}, got {self.hvp_method!r}.")
        if self.rank_weighting not in ("equal", "samples"):
            raise ValueError(f"`rank_weighting` must be 'equal' or 'samples', got {self.rank_weighting!r}.")
        for name in ("update_ratios", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")

    @classmethod
    def from_arguments(cls: type[_Settings], arguments: Mapping[str, Any]) -> _Settings:
        """The settings among `arguments` (a keyword signature's values, ``locals()`` at the top of
        ``__init__``), validated; other keys are ignored. KeyError: a field the signature lacks."""
        return cls(**{field.name: arguments[field.name] for field in fields(cls)})

    def _validate_log_every(self) -> None:
        if not is_int(self.log_every) or self.log_every < 1:
            raise ValueError(f"`log_every` must be an int >= 1, got {self.log_every!r}.")


def resolve_detectors(detectors: Sequence[Any] | None) -> list[Any]:
    """The detectors to run, from `detectors`: None (one of each, default thresholds), flag names
    (``"plateau"``: that detector with defaults) or detector instances (used as they are).

    Raises:
        ValueError: an unknown name, an object that is not a detector, or a flag given twice.
    """
    if detectors is None:
        return [cls() for cls in DETECTOR_CLASSES.values()]
    if isinstance(detectors, (str, bytes)) or not isinstance(detectors, Sequence):
        raise ValueError(f"`detectors` must be a list of flag names or detectors, got {type(detectors).__name__}.")
    resolved = []
    for item in detectors:
        if isinstance(item, str):
            if item not in DETECTOR_CLASSES:
                raise ValueError(f"`detectors`: unknown flag name {item!r}; the names are {FLAG_NAMES}.")
            resolved.append(DETECTOR_CLASSES[item]())
        elif isinstance(getattr(item, "name", None), str) and callable(getattr(item, "observe", None)):
            resolved.append(item)  # a built-in or custom detector (FlagDetector): any flag name
        else:
            raise ValueError(
                f"`detectors` must hold flag names {FLAG_NAMES} or hessdiag detectors (a `name` and an "
                f"`observe(record)` method), got {type(item).__name__}."
            )
    names = [detector.name for detector in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"`detectors` names a flag twice: {names}.")
    return resolved
