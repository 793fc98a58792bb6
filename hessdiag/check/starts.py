"""What each curvature check of a run starts from.

The vectors a run keeps from one reading to the next (each a parameter-sized vector, up to five of
them under Adam) are kept in host memory: between readings the accelerator's memory is training's,
whose peak they would otherwise raise at every step (by as much as Adam's state), and a reading
copies back the one or two it starts from.

A check starts warm, from the previous check's Ritz vectors (and the preconditioned run's), or
cold: the first, every `cold_every`-th, after a failed check, and whenever the trainable parameters
changed. With ``hvp_method="auto"`` only cold checks cross-check double backward against finite
differences; a warm one reuses the last approval (the same model and loss run the same ops).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from hessdiag.operator import HessianOperator, HVPMethod


def on_host(vector: torch.Tensor | None) -> torch.Tensor | None:
    """`vector` detached, in host memory (itself where it is there already), or None."""
    return None if vector is None else vector.detach().to("cpu")


class CheckStarts:
    """The warm-start vectors of a run's checks, the cold cadence and the cross-check's verdict.

    Args:
        hvp_method: the product method the checks ask for.
        cold_every: every n-th check starts from a random vector (0: never after the first).

    Attributes (vectors in host memory, set through :func:`on_host`):
        warm_vectors: the last check's Ritz vectors (its warm start), or None.
        warm_preconditioned: the last preconditioned (Adam) run's top vectors, or None.
        verified_step: the step of the last cold check whose cross-check ("auto") chose double
            backward, else None.
        method: the product method the last check used (a tracking reading uses it too), or None.
        tracked, tracked_preconditioned: the top vectors the tracking readings follow (set from each
            check's top Ritz vectors, moved by each reading; :mod:`hessdiag.check.tracking`), or None.
        tracked_residual: the last reading's residual relative to its value (how close the tracked
            vector is to an eigenvector; None after a check).
        tracked_ratio: the last curvature point's sharpness over its stability threshold (a lower
            bound's, after a tracking reading), or None: how near the edge the next reading reads.
    """

    def __init__(self, hvp_method: HVPMethod, cold_every: int) -> None:
        self.hvp_method: HVPMethod = hvp_method
        self.cold_every = cold_every
        self.warm_vectors: torch.Tensor | None = None
        self.warm_preconditioned: torch.Tensor | None = None
        self.verified_step: int | None = None
        self.method: HVPMethod | None = None
        self.tracked: torch.Tensor | None = None
        self.tracked_preconditioned: torch.Tensor | None = None
        self.tracked_residual: float | None = None
        self.tracked_ratio: float | None = None

    def open(self, num_checks: int, operator_for: Callable[[HVPMethod], HessianOperator]) -> tuple[HessianOperator, bool, bool]:
        """The next check's operator (built by `operator_for(method)`, not entered yet), whether the
        check starts cold, and whether it reuses the last cross-check's approval of double backward."""
        cold = self.warm_vectors is None or (self.cold_every > 0 and num_checks % self.cold_every == 0)
        # "auto"'s cross-check (about four gradients and two products) runs on cold checks only.
        reuse = self.hvp_method == "auto" and self.verified_step is not None and not cold
        operator = operator_for("double_backward" if reuse else self.hvp_method)
        if self.warm_vectors is not None and self.warm_vectors.shape[-1] != operator.size:
            self.forget()  # the trainable parameters changed
            cold = True
            if reuse:  # parameters that were not cross-checked: check them
                reuse, operator = False, operator_for(self.hvp_method)
        return operator, cold, reuse

    def method_reason(self, step: int, operator: HessianOperator, reuse: bool) -> str:
        """Why the check's product method; with "auto", remember a cold check's approval."""
        if reuse:
            return f"cross-checked against finite differences at step {self.verified_step} (again at every cold check)"
        if self.hvp_method == "auto":
            self.verified_step = step if operator.method == "double_backward" else None
        self.method = operator.method
        return operator.method_reason

    def forget(self) -> None:
        """Start the next check cold (the vectors belong to a check that did not finish, or to other
        parameters)."""
        self.warm_vectors = self.warm_preconditioned = self.method = None
        self.tracked = self.tracked_preconditioned = None

    def state_dict(self) -> dict[str, Any]:
        """The warm-start vectors (in host memory, as they are kept)."""
        return {
            "warm_vectors": self.warm_vectors,
            "warm_preconditioned": self.warm_preconditioned,
            "method": self.method,
            "tracked": self.tracked,
            "tracked_preconditioned": self.tracked_preconditioned,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (missing keys: a cold start)."""
        self.warm_vectors = on_host(state.get("warm_vectors"))
        self.warm_preconditioned = on_host(state.get("warm_preconditioned"))
        self.method = state.get("method")
        self.tracked = on_host(state.get("tracked"))
        self.tracked_preconditioned = on_host(state.get("tracked_preconditioned"))
