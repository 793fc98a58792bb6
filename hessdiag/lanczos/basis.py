"""Where the Lanczos vectors live, and the Gram-Schmidt against them.

Memory: the basis costs up to (max_iter + 1) x dim floats, allocated as Lanczos runs in blocks of
:data:`BLOCK_ROWS` rows, so a warm check that stops after 15 steps holds 16 rows, not max_iter (on a
GPU an allocation up front would hold them all from the start), and no row is ever copied (a matrix
grown by reallocation would hold its old and new rows at once). ``basis="auto"`` keeps it on the
device when the whole capacity fits the budget, else in host memory, else falls back to the
three-vector recurrence (extreme eigenvalues only, no Ritz vectors; duplicate "ghost" copies of
converged values are harmless for the extremes; without reorthogonalisation the rounding model of
:mod:`hessdiag.lanczos.certificates` is optimistic, and so are the probable limits, which assume the
exact Lanczos polynomials).
"""

from __future__ import annotations

import math
import os
from typing import Literal

import torch

from hessdiag.vectors import VectorShard, dot, partial_sums

BasisStorage = Literal["auto", "device", "host", "recurrence"]
BASIS_STORAGES: tuple[str, ...] = ("auto", "device", "host", "recurrence")

_DEVICE_BUDGET_FRACTION = 0.3  # of free accelerator memory; the HVPs need the rest
_HOST_BUDGET_FRACTION = 0.5  # of available host memory
_KAHAN_PARLETT = 2**-0.5

#: Rows per block of the basis (see the module docstring).
BLOCK_ROWS = 8


class Basis:
    """Storage of the Lanczos vectors and the two-pass Gram-Schmidt against them."""

    def __init__(
        self, capacity: int, dim: int, storage: str, device: torch.device, dtype: torch.dtype, shard: VectorShard | None
    ) -> None:
        self.storage = storage
        self.shard = shard
        self.device = device
        self.capacity, self.dim, self.dtype = capacity, dim, dtype
        self.size = 0
        self.stored = storage != "recurrence"  # every vector kept (else the last two, in `recent`)
        self.recent: list[torch.Tensor] = []
        self.blocks: list[torch.Tensor] = []

    def append(self, vector: torch.Tensor) -> None:
        if not self.stored:
            self.recent = (self.recent + [vector])[-2:]
        else:
            row = self.size % BLOCK_ROWS
            if row == 0:  # the last block is full: a new one
                rows = min(BLOCK_ROWS, max(self.capacity - self.size, 1))
                where = self.device if self.storage == "device" else torch.device("cpu")
                pin = self.storage == "host" and self.device.type == "cuda"
                self.blocks.append(torch.empty(rows, self.dim, dtype=self.dtype, device=where, pin_memory=pin))
            self.blocks[-1][row].copy_(vector, non_blocking=False)
        self.size += 1

    def _written(self) -> list[torch.Tensor]:
        """The blocks' written rows, in order."""
        return [block[: self.size - i * BLOCK_ROWS] for i, block in enumerate(self.blocks)]

    def orthogonalise_(self, w: torch.Tensor, read_with: torch.Tensor | None = None) -> tuple[float, list[float]]:
        """Remove from `w` its components along the basis, in place; returns the norm of what is left
        and the values of `read_with` (a 1-dim tensor on w's device the caller needs on the host),
        read back together.

        Classical Gram-Schmidt, repeated only when a pass cancelled more than 1 - 1/sqrt(2) of the
        norm (Kahan-Parlett: "twice is enough", and once is enough when little cancels). Each pass
        reads the whole basis, so skipping the second halves the cost outside the HVPs. A pass is two
        matrix-vector products per block of the basis; the squared norm before it is
        summed over processes with its coefficients, so that when one pass suffices the call reads
        back to the host once (a synchronisation on a GPU).
        """
        before, after = self._pass(w)
        values = torch.cat([before, after] if read_with is None else [read_with, before, after])
        *read, before_value, after_value = values.tolist()
        if self.stored and after_value <= 0.5 * before_value:  # ||after|| <= ||before|| / sqrt(2)
            after_value = float(self._pass(w)[1])
        return math.sqrt(after_value), read

    def _pass(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One Gram-Schmidt pass on `w`, in place; returns its squared norms before and after, shape (1,)
        each, on w's device (whole vectors: summed over processes). A handful of tensor calls: on a
        small model each costs a noticeable share of a product."""
        sums = partial_sums(self.shard)
        if not self.stored or not self.blocks:
            before = sums(torch.dot(w, w).reshape(1))
            for q in self.recent:
                w.sub_(q, alpha=dot(q, w, self.shard))
            return before, sums(torch.dot(w, w).reshape(1))
        blocks = self._written()
        read = w.cpu() if self.storage == "host" else w
        coefficients = torch.cat([torch.mv(block, read) for block in blocks]).to(w.device)
        if self.shard is None:
            before = torch.dot(w, w).reshape(1)
        else:
            reduced = self.shard.sum_(torch.cat([coefficients, torch.dot(w, w).reshape(1)]))
            coefficients, before = reduced[:-1], reduced[-1:]
        pieces = coefficients.to(blocks[0].device).split([len(block) for block in blocks])
        correction = torch.mv(blocks[0].T, pieces[0])
        for block, piece in zip(blocks[1:], pieces[1:]):
            correction.addmv_(block.T, piece)
        w.sub_(correction.to(w.device))
        return before, sums(torch.dot(w, w).reshape(1))

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor | None:
        """Rows of ``coefficients.T @ basis``: Ritz vectors from columns of eigenvectors of T."""
        if not self.stored or not self.blocks:
            return None
        blocks = self._written()
        weights = coefficients.T.to(device=blocks[0].device, dtype=blocks[0].dtype).split([len(b) for b in blocks], dim=1)
        combined = weights[0] @ blocks[0]
        for block, weight in zip(blocks[1:], weights[1:]):
            combined.addmm_(weight, block)
        return combined.to(self.device)


def choose_basis_storage(
    storage: BasisStorage, capacity: int, dim: int, dtype: torch.dtype, device: torch.device, memory_budget: int | None
) -> str:
    """Where the basis of `capacity` vectors lives (see the module docstring)."""
    if storage != "auto":
        return storage
    need = capacity * dim * torch.finfo(dtype).bits // 8
    if device.type == "cuda":
        budget = memory_budget if memory_budget is not None else _DEVICE_BUDGET_FRACTION * torch.cuda.mem_get_info(device)[0]
        if need <= budget:
            return "device"
        return "host" if need <= _host_budget() else "recurrence"
    budget = memory_budget if memory_budget is not None else _host_budget()
    return "device" if need <= budget else "recurrence"


def _host_budget() -> float:
    try:
        return _HOST_BUDGET_FRACTION * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return float("inf")
