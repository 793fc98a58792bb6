"""What training itself reaches on the accelerator, so that a check's Lanczos basis is placed by what
training leaves free, not by what the allocator happens to have free when the check starts.

Between steps the allocator holds little (parameters, optimizer state), so the free memory at a check
says nothing about the activations of the next step: a basis sized by it could lift the device's
peak to several times a step's. Instead the check's basis may fill the device only up to the peak
training itself reached (:meth:`TrainingFootprint.room`: that peak less what is allocated now);
its further rows go to host memory (:mod:`hessdiag.lanczos.basis`), so a check adds to a step's
peak little more than its own products' working memory.

The peak is read from the allocator's counter (``torch.cuda.max_memory_allocated``), which is the
user's and is never reset here. Before each reading: a counter that moved since the end of the last
reading moved by the run alone (up: a new peak; down: someone reset it, and what it shows since is
the run's), so it is training's; one that did not move says nothing new (the run stayed below the
readings' own peak). Only on CUDA; elsewhere there is no room to report (the basis follows the
defaults of :func:`~hessdiag.lanczos.lanczos`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


class TrainingFootprint:
    """The peak device memory of the training run around the readings.

    Attributes:
        peak: the largest allocation of the run seen outside the readings, in bytes (0: none seen).
    """

    def __init__(self) -> None:
        self.peak = 0
        self._after_reading: int | None = None

    @contextmanager
    def reading(self, device: torch.device) -> Iterator[Callable[[], float] | None]:
        """Around one reading on `device`: learns the run's peak before it, and yields the basis's
        room (:meth:`room`) or None (not CUDA, or no peak seen yet)."""
        if device.type != "cuda":
            yield None
            return
        self.saw(torch.cuda.max_memory_allocated(device), since_last_reading=True)
        try:
            yield (lambda: self.room(device)) if self.peak > 0 else None
        finally:
            self._after_reading = torch.cuda.max_memory_allocated(device)

    def saw(self, peak: int, *, since_last_reading: bool = False) -> None:
        """A peak of the run, in bytes. With `since_last_reading` it is the allocator's counter read
        before a reading, which is the run's own only where it moved since the last reading ended."""
        if not since_last_reading or peak != self._after_reading:
            self.peak = max(self.peak, int(peak))

    def room(self, device: torch.device) -> float:
        """Bytes a basis may still add on `device`: the run's peak less what is allocated now."""
        return float(self.peak - torch.cuda.memory_allocated(device))
