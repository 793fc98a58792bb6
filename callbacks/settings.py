"""The settings of :class:`~hessdiag.callbacks.HessianDiagnostics`: the engine's
:class:`~hessdiag.settings.DiagnosticsSettings` plus what only the callback uses (its loss closure,
detectors, stopping and hooks), validated once, with no side effects.

:data:`MAX_MICRO_BATCHES` bounds the micro-batches of one step that the callback hands a check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from hessdiag.flags import FLAG_NAMES
from hessdiag.settings import DiagnosticsSettings, is_int, resolve_detectors

#: The most micro-batches of one step a check keeps (the callback keeps the last ones beyond it, with
#: a note): a check holds the graphs of all of them at once, so its memory grows as a batch of their
#: total size would.
MAX_MICRO_BATCHES = 16


@dataclass(frozen=True)
class CallbackSettings(DiagnosticsSettings):
    """The settings of :class:`hessdiag.callbacks.HessianDiagnostics`: those of the engine, plus what
    only the callback uses (see its docstring for each field). `log_every` None means the trainer's
    ``log_every_n_steps``; `check_every` 0 means no curvature checks, as for the Monitor.

    Raises:
        ValueError: a bad value, with the argument's name and what is allowed.
    """

    log_every: int | None = None  # type: ignore[assignment]
    loss_fn: Callable[..., Any] | None = None
    detectors: Sequence[Any] | None = None
    progress_bar: bool = True
    stop_on: Sequence[str] = ()
    on_flag: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ValueError(
                f"`loss_fn` must be callable as loss_fn(pl_module, batch), got {type(self.loss_fn).__name__}."
            )
        super().__post_init__()
        resolve_detectors(self.detectors)  # validated now; built afresh for every fit
        if self.on_flag is not None and not callable(self.on_flag):
            raise ValueError(
                f"`on_flag` must be callable as on_flag(event, trainer, pl_module), got {type(self.on_flag).__name__}."
            )
        object.__setattr__(self, "stop_on", validate_flag_names("stop_on", self.stop_on))

    def _validate_log_every(self) -> None:
        if self.log_every is not None and (not is_int(self.log_every) or self.log_every < 1):
            raise ValueError(f"`log_every` must be a positive int or None, got {self.log_every!r}.")

    def diagnostics(self, trainer_log_every: int) -> DiagnosticsSettings:
        """The engine's part, for the Monitor of one fit; `log_every` None becomes `trainer_log_every`."""
        values = {field.name: getattr(self, field.name) for field in fields(DiagnosticsSettings)}
        return DiagnosticsSettings(**values | {"log_every": self.log_every or trainer_log_every})


def validate_flag_names(argument: str, names: Any) -> tuple[str, ...]:
    """`names` as a tuple of flag names, or a ValueError naming `argument` and the allowed names."""
    if isinstance(names, str) or not isinstance(names, (Sequence, set, frozenset)):
        raise ValueError(f"`{argument}` must be a sequence of flag names {FLAG_NAMES}, got {names!r}.")
    unknown = [name for name in names if name not in FLAG_NAMES]
    if unknown:
        raise ValueError(f"`{argument}`: unknown flag name(s) {unknown}; the names are {FLAG_NAMES}.")
    return tuple(names)
