"""Where the Lanczos vectors live, and the Gram-Schmidt against them.

Memory: the basis costs up to (max_iter + 1) x dim floats, allocated as Lanczos runs: its rows double
from :data:`FIRST_ROWS`, so a warm check that stops after 15 steps holds 16 rows, not max_iter (on a
GPU an allocation up front would hold them all from the start). ``basis="auto"`` keeps it on the
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

#: Rows of the basis allocated at first; each time it fills, its rows double (up to the capacity).
FIRST_ROWS = 8


class Basis:
    """Storage of the Lanczos vectors and the two-pass Gram-Schmidt against them."""

    def __init__(
        self, capacity: int, dim: int, storage: str, device: torch.device, dtype: torch.dtype, shard: VectorShard | None
    ) -> None:
        self.storage = storage
        self.shard = shard
        self.device = device
        self.capacity = capacity
        self.size = 0
        self.recent: list[torch.Tensor] = []
        self.vectors: torch.Tensor | None = None
        if storage != "recurrence":
            self.vectors = self._allocate(min(capacity, FIRST_ROWS), dim, dtype)

    def _allocate(self, rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        where = self.device if self.storage == "device" else torch.device("cpu")
        pin = self.storage == "host" and self.device.type == "cuda"
        return torch.empty(rows, dim, dtype=dtype, device=where, pin_memory=pin)

    def append(self, vector: torch.Tensor) -> None:
        if self.vectors is None:
            self.recent = (self.recent + [vector])[-2:]
        else:
            if self.size == self.vectors.shape[0]:  # full: double its rows (up to the capacity)
                rows, dim = self.vectors.shape
                grown = self._allocate(min(self.capacity, 2 * rows), dim, self.vectors.dtype)
                grown[:rows].copy_(self.vectors)
                self.vectors = grown
            self.vectors[self.size].copy_(vector, non_blocking=False)
        self.size += 1

    def orthogonalise_(self, w: torch.Tensor, read_with: torch.Tensor | None = None) -> tuple[float, list[float]]:
        """Remove from `w` its components along the basis, in place; returns the norm of what is left
        and the values of `read_with` (a 1-dim tensor on w's device the caller needs on the host),
        read back together.

        Classical Gram-Schmidt, repeated only when a pass cancelled more than 1 - 1/sqrt(2) of the
        norm (Kahan-Parlett: "twice is enough", and once is enough when little cancels). Each pass
        reads the whole basis, so skipping the second halves the cost outside the HVPs. A pass is two
        matrix-vector products with the preallocated basis matrix; the squared norm before it is
        summed over processes with its coefficients, so that when one pass suffices the call reads
        back to the host once (a synchronisation on a GPU).
        """
        before, after = self._pass(w)
        values = torch.cat([before, after] if read_with is None else [read_with, before, after])
        *read, before_value, after_value = values.tolist()
        if self.vectors is not None and after_value <= 0.5 * before_value:  # ||after|| <= ||before|| / sqrt(2)
            after_value = float(self._pass(w)[1])
        return math.sqrt(after_value), read

    def _pass(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One Gram-Schmidt pass on `w`, in place; returns its squared norms before and after, shape (1,)
        each, on w's device (whole vectors: summed over processes). A handful of tensor calls: on a
        small model each costs a noticeable share of a product."""
        sums = partial_sums(self.shard)
        if self.vectors is None:
            before = sums(torch.dot(w, w).reshape(1))
            for q in self.recent:
                w.sub_(q, alpha=dot(q, w, self.shard))
            return before, sums(torch.dot(w, w).reshape(1))
        basis = self.vectors[: self.size]
        if self.storage == "host":
            coefficients = torch.mv(basis, w.cpu()).to(w.device)
        else:
            coefficients = torch.mv(basis, w)
        if self.shard is None:
            before = torch.dot(w, w).reshape(1)
        else:
            reduced = self.shard.sum_(torch.cat([coefficients, torch.dot(w, w).reshape(1)]))
            coefficients, before = reduced[:-1], reduced[-1:]
        if self.storage == "host":
            w.sub_(torch.mv(basis.T, coefficients.to(basis.device)).to(w.device))
        else:
            w.sub_(torch.mv(basis.T, coefficients))
        return before, sums(torch.dot(w, w).reshape(1))

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor | None:
        """Rows of ``coefficients.T @ basis``: Ritz vectors from columns of eigenvectors of T."""
        if self.vectors is None:
            return None
        basis = self.vectors[: self.size]
        return (coefficients.T.to(device=basis.device, dtype=basis.dtype) @ basis).to(self.device)


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
