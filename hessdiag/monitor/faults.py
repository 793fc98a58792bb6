"""The fault policy of the diagnostics: they never crash training, and say so once.

An error inside the diagnostics (a writer on a full disk, a detector, a malformed loss) is warned
about once per kind and skipped, so training and the other diagnostics go on; ``strict=True``
re-raises instead (for tests and debugging).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

from hessdiag.errors import HessdiagWarning


class FaultPolicy:
    """Guards the diagnostics' own code and reports each kind of problem once.

    Args:
        strict: re-raise errors instead of warning and going on.
        current_step: the optimizer step, for the messages.
    """

    def __init__(self, *, strict: bool, current_step: Callable[[], int]) -> None:
        self.strict = strict
        self._current_step = current_step
        self._warned: set[str] = set()

    def warned(self, key: str) -> bool:
        """Whether the problem `key` was reported already."""
        return key in self._warned

    def warn_once(self, key: str, message: str) -> bool:
        """Warn `message` (a :class:`HessdiagWarning`) unless `key` was warned about; True if it warned."""
        if key in self._warned:
            return False
        self._warned.add(key)
        warnings.warn(message, HessdiagWarning, stacklevel=4)
        return True

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run the block; an error inside is warned about once per (`what`, kind) and skipped."""
        try:
            yield
        except Exception as error:
            if self.strict:
                raise
            self.warn_once(
                f"{what}:{type(error).__name__}",
                f"hessdiag: {what} failed at step {self._current_step()} ({type(error).__name__}: {error}). "
                "Training continues; so do the other diagnostics.",
            )
