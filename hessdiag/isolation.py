"""Run a forward pass of the user's loss without leaving a trace on the training run.

A curvature estimate must see the loss the optimizer sees (train mode, the same batch
statistics, dropout on) yet must not change the run it observes: BatchNorm running statistics,
every other buffer (the very tensor objects, also where ``forward`` reassigns one:
``self.running = ...``), the module modes and the caller's RNG streams are put back bit-for-bit.
Inside, autocast is off (bf16 HVPs are off by ~3e-2) and scaled-dot-product attention runs on
the math backend, because the fused flash / memory-efficient kernels have no second derivative.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hessdiag.errors import LossClosureError

ModelMode = Literal["train", "eval", "as_is"]
MODEL_MODES: tuple[str, ...] = ("train", "eval", "as_is")

# Estimates under way in this process. A process-wide count, not a thread-local: autograd runs a
# device's backward, and the hooks that ask, on its own worker thread.
_estimates = 0


def estimating() -> bool:
    """Whether an estimate of hessdiag (inside :func:`isolation`) is running: its backward passes
    are not training's, and hooks that watch training's gradients ignore them."""
    return _estimates > 0


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers.

    Calling a DDP wrapper would arm its gradient reducer for a backward that never comes (the
    engine does its own, explicitly weighted all-reduce instead); a compiled module's graph has no
    double backward, and its parameter names carry an ``_orig_mod.`` prefix.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def seed_rng(seed: int, device: torch.device) -> None:
    """Seed the CPU generator and the generator of `device`, so that every forward of one
    estimate draws the same dropout masks. Only call inside :func:`isolation`, which restores
    the caller's streams."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)


@contextlib.contextmanager
def isolation(model: nn.Module, mode: ModelMode, device: torch.device) -> Iterator[None]:
    """Context for the forward and backward passes of one estimate; leaves no trace.

    The whole estimate (graph included) must live inside it: a saved BatchNorm input restored
    in place while the graph is alive would fail autograd's version check.

    Args:
        model: the (unwrapped) model; its modes and buffers (objects and values) are restored on exit.
        mode: ``"train"`` (the loss the optimizer sees), ``"eval"``, or ``"as_is"``.
        device: the parameters' device, whose generator is forked along with the CPU one.
    """
    modes = [(module, module.training) for module in model.modules()]
    # The slots too: a forward that assigns a new tensor to a buffer leaves the old one untouched.
    slots = [(module, dict(module._buffers)) for module in model.modules()]
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    cuda_devices = [device] if device.type == "cuda" else []
    global _estimates
    _estimates += 1
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=cuda_devices))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            if hasattr(torch.compiler, "set_stance"):  # torch >= 2.6
                # Compiled graphs have no double backward: run torch.compile'd code eagerly here.
                stack.enter_context(torch.compiler.set_stance("force_eager"))
            if mode == "train":
                model.train()
            elif mode == "eval":
                model.eval()
            yield
    finally:
        _estimates -= 1
        for module, training in modes:
            module.training = training
        for module, saved_slots in slots:
            module._buffers.clear()
            module._buffers.update(saved_slots)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


#: Parameters outside the Hessian's set are copied before a check (so a loss closure that updates
#: them, e.g. an EMA teacher, can be undone) while they hold at most this many times the elements of
#: the set; the check's Lanczos basis already holds tens of vectors of that size. Beyond it they are
#: only watched, through their version counters, and a change is refused.
SNAPSHOT_BUDGET = 8

_PRIMITIVES = (bool, int, float, str, bytes, type(None))


@contextlib.contextmanager
def preserved_state(model: nn.Module, hessian_params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Undo what a loss closure did to the model's state during a check, bit for bit.

    A training step used as the check's loss may update state: an EMA teacher's parameters, a
    step counter. On exit this puts back every parameter object (reassigned ones included, new ones
    dropped), the values of the parameters outside `hessian_params` (within :data:`SNAPSHOT_BUDGET`),
    and every module attribute of a primitive type (ints, floats, strings: counters, flags). Buffers
    (objects and values, a reassigned ``self.stat = new`` included) are restored by :func:`isolation`.

    Raises:
        LossClosureError: on exit, if a parameter too large to copy was changed in place: that cannot
            be undone, so this closure must not be the check's loss (define ``hessdiag_loss``).
    """
    chosen = {id(p) for p in hessian_params}
    modules = list(model.modules())
    slots = [(module, dict(module._parameters)) for module in modules]
    attributes = [(module, {k: v for k, v in vars(module).items() if isinstance(v, _PRIMITIVES)}) for module in modules]
    others = [p for p in model.parameters() if id(p) not in chosen]
    copied = sum(p.numel() for p in others) <= SNAPSHOT_BUDGET * sum(p.numel() for p in hessian_params)
    saved = [(p, p.detach().clone() if copied else None, p._version) for p in others]
    try:
        yield
    finally:
        for module, parameters in slots:
            module._parameters.clear()
            module._parameters.update(parameters)
        for module, values in attributes:
            vars(module).update(values)
        changed = [p for p, _, version in saved if p._version != version]
        with torch.no_grad():
            for p, value, version in saved:
                if value is not None and p._version != version:
                    p.copy_(value)
    if changed and not copied:
        raise LossClosureError(
            f"The loss closure changed {len(changed)} parameter tensor(s) outside the Hessian's set in place (an EMA "
            "teacher?), too large to copy and undo. Define `hessdiag_loss(self, batch)` on the LightningModule (or "
            "pass `loss_fn=`) returning the loss without updating state."
        )
