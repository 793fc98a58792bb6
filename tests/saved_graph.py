"""How much autograd graphs hold saved for backward at once: the memory an estimate's graphs take,
measured on any device (a CPU has no allocator peak to read)."""

from __future__ import annotations

import torch


class SavedGraph:
    """The bytes that autograd graphs hold saved for backward at once, at their peak
    (`saved_tensors_hooks`: counted when saved, uncounted when the graph that saved them is freed)."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def __enter__(self) -> SavedGraph:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._hooks.__exit__(*exc_info)

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        return _Saved(tensor, self)


class _Saved:
    def __init__(self, tensor: torch.Tensor, count: SavedGraph) -> None:
        # Detached: a saved output holding itself through its grad_fn would never be freed (autograd
        # gives the unpacked tensor its grad_fn back).
        self.tensor, self.count, self.size = tensor.detach(), count, tensor.numel() * tensor.element_size()
        count.live += self.size
        count.peak = max(count.peak, count.live)

    def __del__(self) -> None:
        self.count.live -= self.size
