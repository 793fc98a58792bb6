"""Lanczos for both ends of a symmetric spectrum, from one Krylov run.

Works on any symmetric operator given as ``matvec(v) -> A v`` on flat vectors (it imports nothing
from :mod:`hessdiag.operator`), so it is tested on explicit matrices and used on Hessians alike.

* :mod:`~hessdiag.lanczos.recurrence`: the recurrence with full reorthogonalisation (:func:`lanczos`).
* :mod:`~hessdiag.lanczos.certificates`: the stopping rule on proven bounds and the probable
  (Christoffel) limits of the whole spectrum.
* :mod:`~hessdiag.lanczos.start`: random and warm start vectors.
* :mod:`~hessdiag.lanczos.basis`: where the Lanczos vectors live (device, spilling to host, or none).
* :mod:`~hessdiag.lanczos.result`: :class:`LanczosResult`.

Vector plumbing shared with the operator (:class:`~hessdiag.vectors.VectorShard`, norms, random
draws) lives in :mod:`hessdiag.vectors`.
"""

from hessdiag.lanczos.basis import BASIS_STORAGES, BasisStorage, MemoryBudget, choose_basis_storage
from hessdiag.lanczos.certificates import MISS_PROBABILITY, christoffel_sums, probable_limits
from hessdiag.lanczos.recurrence import WHICH, Which, lanczos
from hessdiag.lanczos.result import LanczosResult
from hessdiag.lanczos.start import start_vector

__all__ = [
    # the solver
    "lanczos",
    "LanczosResult",
    "Which",
    "WHICH",
    # certificates and limits
    "MISS_PROBABILITY",
    "probable_limits",
    "christoffel_sums",
    # start vectors and basis storage
    "start_vector",
    "BasisStorage",
    "BASIS_STORAGES",
    "MemoryBudget",
    "choose_basis_storage",
]
