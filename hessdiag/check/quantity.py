"""A quantity of a curvature check: its name, when it is due, what it needs, how it is computed, and
what it logs (Cockpit's should-compute / compute / save cycle).

A check first runs Lanczos for both ends of the spectrum; every quantity then reads what the check
holds (:class:`CheckContext`: the open operator, the Lanczos result with its Ritz vectors, the
optimizer, the batch, the values of the quantities computed before it) and returns its value,
:class:`Skipped` with a reason a user should hear, or None where it is undefined (nothing to say).

Each quantity is one module of :mod:`hessdiag.check.quantities`, a subclass of :class:`Quantity`
registered by its definition: adding a quantity to every check is adding that module (and its test
and docs). The check runs them in an order where each comes after the quantities it `needs`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from hessdiag.batches import CheckBatch
    from hessdiag.check.record import CurvatureCheck
    from hessdiag.check.starts import CheckStarts
    from hessdiag.estimators.eigen import HessianEigenvalues
    from hessdiag.operator import HessianOperator, LossFn
    from hessdiag.settings import DiagnosticsSettings


@dataclass(frozen=True)
class Skipped:
    """A quantity not measured at this check, and why (said once to the user); `value`: what could
    still be said (the noise scale's running mean when this check's estimate failed), or None."""

    reason: str
    value: Any = None


@dataclass
class CheckContext:
    """What one check holds for its quantities.

    Attributes:
        step: the optimizer step of the check.
        number: the check's index in the run (0 for the first).
        settings: the diagnostics' settings (tolerance, cadences, sizes).
        model, loss_fn, params: the network, the check's loss closure and the parameters the
            Hessian is over (None: every trainable one).
        operator: the check's open Hessian operator (its gradient graph reused by every product);
            None for the quantities computed after it closed (`Quantity.uses_operator` False).
        spectrum: the Lanczos run of both ends (Ritz values, vectors, bounds, loss, gradient norm).
        optimizer: the training's optimizer, or None.
        batch: the check batch, cut to the check's sub-batch, with its samples and the step's.
        seed: the check's seed (every random draw of the check derives from it).
        cold: the Lanczos run started from a random vector.
        bottom: the Lanczos run measured the bottom end too (else it stopped with the top).
        starts: the run's warm-start vectors (a quantity with its own Lanczos run keeps its own).
        values: the values of the quantities computed so far in this check, by name.
        memory_budget: what a Lanczos basis of the check may still add on the device (the
            `memory_budget` of :func:`~hessdiag.lanczos.lanczos`: what training leaves free, see
            :mod:`hessdiag.check.footprint`), or None for the solver's default.
    """

    step: int
    number: int
    settings: DiagnosticsSettings
    model: nn.Module
    loss_fn: LossFn
    params: list[torch.Tensor] | None
    operator: HessianOperator | None
    spectrum: HessianEigenvalues
    optimizer: torch.optim.Optimizer | None
    batch: CheckBatch
    seed: int
    cold: bool
    bottom: bool
    starts: CheckStarts
    values: dict[str, Any] = field(default_factory=dict)
    memory_budget: Callable[[], float] | None = None


#: Every quantity class, by name, in the order of definition (see :func:`ordered_quantities`).
REGISTRY: dict[str, type[Quantity]] = {}


class Quantity:
    """One quantity of a curvature check. Subclasses set :attr:`name` and override :meth:`compute`;
    they may override :meth:`due`, :meth:`scalars`, :meth:`texts` and keep state across checks
    (with :meth:`state_dict` / :meth:`load_state_dict`).

    Attributes:
        name: the key of its value in :attr:`CurvatureCheck.values` and of its reason in `skipped`.
        needs: the quantities whose values :meth:`compute` reads (computed before it).
        uses_operator: computed while the check's operator is open (its products reuse the gradient
            graph); False: after it closed (a quantity with its own forwards and backwards).
    """

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    uses_operator: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        REGISTRY[cls.name] = cls

    def __init__(self, settings: DiagnosticsSettings) -> None:
        self.settings = settings

    def due(self, context: CheckContext) -> bool:
        """Whether this check measures the quantity (default: every check)."""
        return True

    def compute(self, context: CheckContext) -> Any:
        """The value; :class:`Skipped` with the reason it could not be measured; None where it is undefined."""
        raise NotImplementedError

    @staticmethod
    def scalars(value: Any, check: CurvatureCheck) -> dict[str, float]:
        """The scalars its value logs, by tag (default: none)."""
        return {}

    @staticmethod
    def texts(value: Any, check: CurvatureCheck) -> dict[str, str]:
        """The text cards its value writes, by tag (default: none)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What it keeps across checks (primitives and tensors)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; missing keys keep their defaults."""


def ordered_quantities() -> list[type[Quantity]]:
    """The registered quantities, each after those it needs (otherwise in the order of definition).

    Raises:
        ValueError: a quantity needs one that is not registered, or the needs form a cycle.
    """
    ordered: list[type[Quantity]] = []
    placing: set[str] = set()

    def place(name: str) -> None:
        if any(cls.name == name for cls in ordered):
            return
        if name not in REGISTRY:
            raise ValueError(f"a check quantity needs {name!r}, which is not registered")
        if name in placing:
            raise ValueError(f"the check quantities' needs form a cycle through {name!r}")
        placing.add(name)
        for need in REGISTRY[name].needs:
            place(need)
        ordered.append(REGISTRY[name])

    for name in REGISTRY:
        place(name)
    return ordered
