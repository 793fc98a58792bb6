"""Where the Lanczos vectors live, and the Gram-Schmidt against them.

Memory: the basis costs up to (max_iter + 1) x dim floats, allocated as Lanczos runs in blocks of
:data:`BLOCK_ROWS` rows, so a warm check that stops after 15 steps holds 16 rows, not max_iter (on a
GPU an allocation up front would hold them all from the start), and no row is ever copied (a matrix
grown by reallocation would hold its old and new rows at once).

``basis="auto"`` places each block as it is allocated. On an accelerator a block goes to the device
while `memory_budget` has room for it, and once one did not fit, it and every later block go to host
memory (pinned): the basis *spills*, and its Gram-Schmidt runs on each block where the block lives.
The budget is a number of bytes (default: 30% of the device's free memory when the run starts), or a
callable asked before each block for the bytes the basis may still add (the Monitor's: what training
itself reached on the device, less what is allocated now, so that a check is placed by what training
leaves free, not by what the allocator happens to have free at that moment). Under data parallelism
with whole vectors every process places each block as the most constrained one does, so that their
Gram-Schmidt rounds alike and their recurrences stay identical. On a CPU the device is the host: the
basis stays there while the whole capacity fits the budget (default: half the available memory).
Where even host memory cannot hold the capacity, Lanczos falls back to the three-vector recurrence
(extreme eigenvalues only, no Ritz vectors; duplicate "ghost" copies of converged values are harmless
for the extremes; without reorthogonalisation the rounding model of
:mod:`hessdiag.lanczos.certificates` is optimistic, and so are the probable limits, which assume the
exact Lanczos polynomials).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Literal, Union

import torch

from hessdiag import _distributed
from hessdiag.vectors import VectorShard, dot, partial_sums

BasisStorage = Literal["auto", "device", "host", "recurrence"]
BASIS_STORAGES: tuple[str, ...] = ("auto", "device", "host", "recurrence")
#: Bytes the basis may take on the device, or a callable returning the bytes it may still add there.
MemoryBudget = Union[int, Callable[[], float], None]

_DEVICE_BUDGET_FRACTION = 0.3  # of free accelerator memory; the HVPs need the rest
_HOST_BUDGET_FRACTION = 0.5  # of available host memory
_KAHAN_PARLETT = 2**-0.5

#: Rows per block of the basis (see the module docstring).
BLOCK_ROWS = 8


class Basis:
    """Storage of the Lanczos vectors and the two-pass Gram-Schmidt against them.

    `storage`: "device", "host", "recurrence" (only the last two vectors kept), or "spill" (each block
    on the device while `memory_budget` has room for it, then on the host: module docstring).
    """

    def __init__(
        self,
        capacity: int,
        dim: int,
        storage: str,
        device: torch.device,
        dtype: torch.dtype,
        shard: VectorShard | None,
        memory_budget: MemoryBudget = None,
    ) -> None:
        self.storage = storage
        self.shard = shard
        self.device = device
        self.capacity, self.dim, self.dtype = capacity, dim, dtype
        self.memory_budget = memory_budget
        self.size = 0
        self.stored = storage != "recurrence"  # every vector kept (else the last two, in `recent`)
        self.recent: list[torch.Tensor] = []
        self.blocks: list[torch.Tensor] = []
        self.placed: list[str] = []  # "device" or "host", one per block
        self._spilled = storage == "host"

    @property
    def where(self) -> str:
        """Where the vectors lived: "device", "host", "device+host" (a spilled basis) or "recurrence"."""
        if not self.stored:
            return "recurrence"
        places = set(self.placed) or {"host" if self._spilled else "device"}
        return "device+host" if len(places) > 1 else places.pop()

    def append(self, vector: torch.Tensor) -> None:
        if not self.stored:
            self.recent = (self.recent + [vector])[-2:]
        else:
            row = self.size % BLOCK_ROWS
            if row == 0:  # the last block is full: a new one
                rows = min(BLOCK_ROWS, max(self.capacity - self.size, 1))
                on_host = self._on_host(rows)
                where = torch.device("cpu") if on_host else self.device
                pin = on_host and self.device.type == "cuda"
                self.blocks.append(torch.empty(rows, self.dim, dtype=self.dtype, device=where, pin_memory=pin))
                self.placed.append("host" if on_host else "device")
            self.blocks[-1][row].copy_(vector, non_blocking=False)
        self.size += 1

    def _on_host(self, rows: int) -> bool:
        """Whether the next block of `rows` rows goes to host memory (a spilled basis stays spilled:
        the blocks on the device come first, in the order Gram-Schmidt reads them)."""
        if self.storage != "spill" or self._spilled:
            return self._spilled
        need = rows * self.dim * self.dtype.itemsize
        room = self.memory_budget() if callable(self.memory_budget) else self._fixed_room()
        fits = room >= need
        if self.shard is None and _distributed.is_data_parallel():  # whole vectors: every process alike
            agreed = _distributed.all_reduce_min_(torch.tensor([float(fits)], dtype=torch.float64, device=self.device))
            fits = bool(agreed.item())
        self._spilled = not fits
        return self._spilled

    def _fixed_room(self) -> float:
        """A budget in bytes less what the basis already holds on the device."""
        held = sum(block.nbytes for block, at in zip(self.blocks, self.placed) if at == "device")
        return float(self.memory_budget if self.memory_budget is not None else math.inf) - held

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
        matrix-vector products per block of the basis, each where its block lives; the squared norm
        before it is summed over processes with its coefficients, so that when one pass suffices the
        call reads back to the host once (a synchronisation on a GPU).
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
        copies = {w.device: w}  # w where each block lives (one copy to the host for a spilled basis)
        for block in blocks:
            if block.device not in copies:
                copies[block.device] = w.to(block.device)
        coefficients = torch.cat([torch.mv(block, copies[block.device]).to(w.device) for block in blocks])
        if self.shard is None:
            before = torch.dot(w, w).reshape(1)
        else:
            reduced = self.shard.sum_(torch.cat([coefficients, torch.dot(w, w).reshape(1)]))
            coefficients, before = reduced[:-1], reduced[-1:]
        pieces = coefficients.split([len(block) for block in blocks])
        for correction in _sums_by_device(blocks, pieces, lambda block, piece: (block.T, piece)):
            w.sub_(correction.to(w.device))
        return before, sums(torch.dot(w, w).reshape(1))

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor | None:
        """Rows of ``coefficients.T @ basis``: Ritz vectors from columns of eigenvectors of T."""
        if not self.stored or not self.blocks:
            return None
        blocks = self._written()
        weights = coefficients.T.to(dtype=blocks[0].dtype).split([len(b) for b in blocks], dim=1)
        parts = _sums_by_device(blocks, weights, lambda block, weight: (weight, block))
        combined = parts[0].to(self.device)
        for part in parts[1:]:
            combined += part.to(self.device)
        return combined


def _sums_by_device(
    blocks: list[torch.Tensor],
    pieces: tuple[torch.Tensor, ...],
    factors: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> list[torch.Tensor]:
    """sum over the blocks of a @ b, (a, b) = factors(block, piece), summed where the blocks live (one
    sum per device, each piece moved to its block first): the products of a spilled basis stay where
    its rows are."""
    sums: dict[torch.device, torch.Tensor] = {}
    for block, piece in zip(blocks, pieces):
        a, b = factors(block, piece.to(block.device))
        if block.device not in sums:
            sums[block.device] = a @ b
        elif b.dim() == 1:
            sums[block.device].addmv_(a, b)
        else:
            sums[block.device].addmm_(a, b)
    return list(sums.values())


def choose_basis_storage(
    storage: BasisStorage, capacity: int, dim: int, dtype: torch.dtype, device: torch.device, memory_budget: MemoryBudget
) -> str:
    """Where the basis of `capacity` vectors lives (see the module docstring): `storage` unless
    "auto"; then on an accelerator "spill" where the device's budget and host memory together hold the
    capacity, on a CPU "device" where the budget does; else "recurrence"."""
    if storage != "auto":
        return storage
    need = capacity * dim * torch.finfo(dtype).bits // 8
    budget = device_budget(memory_budget, device)
    room = budget() if callable(budget) else budget
    if device.type == "cuda":
        return "spill" if need <= max(room, 0.0) + _host_budget() else "recurrence"
    return "device" if need <= (room if room is not None else _host_budget()) else "recurrence"


def placed_basis(
    storage: BasisStorage,
    capacity: int,
    size: int,
    device: torch.device,
    dtype: torch.dtype,
    shard: VectorShard | None,
    memory_budget: MemoryBudget,
) -> Basis:
    """An empty basis for `capacity` vectors of `size` coordinates, stored where
    :func:`choose_basis_storage` puts it, the same on every process of a `shard` or of a
    data-parallel group (whose processes must run identical recurrences), its default budget
    resolved once."""
    budget = device_budget(memory_budget, device)
    chosen = choose_basis_storage(storage, capacity, size, dtype, device, budget)
    if shard is not None or _distributed.is_data_parallel():
        # Without a basis the run takes other steps: the recurrence on one process means on all.
        votes = torch.tensor([float(chosen == "recurrence")], dtype=torch.float64, device=device)
        votes = shard.sum_(votes) if shard is not None else _distributed.all_reduce_sum_(votes)
        chosen = "recurrence" if float(votes) > 0 else chosen
    return Basis(capacity, size, chosen, device, dtype, shard, budget)


def device_budget(memory_budget: MemoryBudget, device: torch.device) -> MemoryBudget:
    """`memory_budget` with its default resolved: on an accelerator 30% of the device's free memory now."""
    if memory_budget is None and device.type == "cuda":
        return int(_DEVICE_BUDGET_FRACTION * torch.cuda.mem_get_info(device)[0])
    return memory_budget


def _host_budget() -> float:
    try:
        return _HOST_BUDGET_FRACTION * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return float("inf")
