"""Which parameters training's backward reached since the last look: a gradient that was not
computed this step is no gradient, even where ``.grad`` holds a tensor.

``optimizer.zero_grad(set_to_none=False)`` leaves a zero-filled ``.grad`` on every parameter; a
parameter the step's loss does not use (an auxiliary head switched off, an expert no sample was
routed to) keeps that zero. Read as a gradient it is a "dead layer". Autograd says what it reached:
a ``register_post_accumulate_grad_hook`` runs after a gradient was accumulated into ``.grad`` (FSDP2
runs these hooks on its sharded parameters after the reduce-scatter too). The hooks only add an
index to a host-side set: no device work, no synchronisation, the gradient untouched.

Backward passes of hessdiag's own estimates (inside :func:`hessdiag.isolation.isolation`) are not
training's and are not counted.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from torch.utils.hooks import RemovableHandle

from hessdiag.isolation import estimating


class BackwardReach:
    """Marks, per parameter, whether a training backward accumulated into its ``.grad`` since the
    last :meth:`take`.

    Where the marks cannot tell, the answer is "it has a gradient if ``.grad`` is not None" (the
    behaviour without hooks): a parameter frozen until now (no hook could be registered on it; it
    gets one at the next :meth:`take`), and an interval in which no hook fired at all (the reach was
    built after the backward, or the gradients were written without ``backward()``, e.g. assigned by
    hand). The hooks are removed by :meth:`close`, or when this object is garbage-collected.

    Args:
        params: the parameters to watch, in the order :meth:`take` answers in.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self._params = list(params)
        self._reached: set[int] = _Marks()
        self._unhooked = list(range(len(self._params)))  # the indices still without a hook
        self._handles: list[RemovableHandle] = []
        # The hooks hold no reference to this object (a weak one): dropping it removes them.
        self._finalizer = weakref.finalize(self, _remove, self._handles)
        self._hook_new()

    def take(self) -> tuple[bool, ...]:
        """Per parameter: whether it has a gradient of the interval since the last call (reached by a
        training backward and ``.grad`` not None, or as described in the class docstring); then starts
        the next interval. Host-side only."""
        reached = self._reached
        present = [p.grad is not None and (i in reached or not reached) for i, p in enumerate(self._params)]
        for index in self._unhooked:  # no hook could be put on it (frozen so far): `.grad` alone says
            present[index] = self._params[index].grad is not None
        reached.clear()
        if self._unhooked:
            self._hook_new()
        return tuple(present)

    def close(self) -> None:
        """Remove every hook (idempotent); :meth:`take` then falls back to ``.grad is not None``."""
        self._finalizer()

    def _hook_new(self) -> None:
        """Hook the parameters that have none yet and can take one (those requiring gradients)."""
        if not self._finalizer.alive:
            return
        marks = weakref.ref(self._reached)
        frozen = []
        for index in self._unhooked:
            if self._params[index].requires_grad:
                self._handles.append(self._params[index].register_post_accumulate_grad_hook(_marker(marks, index)))
            else:
                frozen.append(index)
        self._unhooked = frozen


class _Marks(set):
    """A set that can be referenced weakly (a plain set cannot)."""


def _marker(marks: weakref.ref, index: int) -> Callable[[torch.Tensor], None]:
    def mark(_: torch.Tensor) -> None:
        reached = marks()
        if reached is not None and not estimating():
            reached.add(index)

    return mark


def _remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
