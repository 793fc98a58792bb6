"""The rounding that products of a model with parameters coarser than float32 carry.

A bfloat16 or float16 model's Hessian-vector products are taken in its dtype, so each carries that
dtype's rounding: the products' error grows with the largest ||H v|| seen, and the bounds Lanczos
proves from it cannot go below a floor of a few eps of the dtype (:class:`ProductRounding`).
"""

from __future__ import annotations

import torch

#: Rounding of one product of a bfloat16/float16 model, in units of its dtype's eps times ||H||:
#: measured up to 0.34 (double backward, small MLP, GELU/LayerNorm MLP and CNN, both dtypes, against
#: float64 Hessians at the same parameters) plus up to 0.5 from rounding the input vector to the dtype.
LOW_PRECISION_ROUNDING = 2.0
#: The relative tolerance a low-precision model's bounds can reach, in units of its dtype's eps: the
#: bound of a Ritz value includes the products' rounding times ||s||_1 of its Ritz vector in the
#: Lanczos basis (see :mod:`hessdiag.lanczos.certificates`), measured 1.3-1.8 at the top on MLPs and
#: up to 3.6 at the bottom after 64 steps, so 4 x LOW_PRECISION_ROUNDING eps is reached where the
#: Krylov part converged.
PRECISION_FLOOR = 4 * LOW_PRECISION_ROUNDING


def is_coarse(dtype: torch.dtype) -> bool:
    """Whether `dtype` is coarser than float32 (bfloat16, float16)."""
    return torch.finfo(dtype).eps > torch.finfo(torch.float32).eps


class ProductRounding:
    """The modelled rounding of products in a parameter `dtype`: ``LOW_PRECISION_ROUNDING`` eps of the
    dtype times the largest ||H v|| / ||v|| seen (a lower bound of ||H||, as Lanczos' own rounding
    model uses max |theta|). Nothing for float32 and finer (`eps` is 0 there).

    Attributes:
        eps: the dtype's eps for a coarse dtype, else 0.
        floor: the smallest relative tolerance the bounds can prove (``PRECISION_FLOOR`` eps).
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.eps = torch.finfo(dtype).eps if is_coarse(dtype) else 0.0
        self.floor = PRECISION_FLOOR * self.eps
        self._largest = 0.0

    def raised(self, product_error: float, vector_norm: float, product_norm: float) -> float:
        """`product_error` raised by the growth of the modelled rounding that a product of these
        norms brings (none unless its ratio is the largest yet)."""
        if vector_norm <= 0:
            return product_error
        largest = max(self._largest, product_norm / vector_norm)
        before = LOW_PRECISION_ROUNDING * self.eps * self._largest
        after = LOW_PRECISION_ROUNDING * self.eps * largest
        self._largest = largest
        return product_error - before + after
