"""The gradient noise scale under gradient accumulation, from the micro-batches' own gradients.

An optimizer step that accumulates m micro-batches of b samples holds gradients at two batch sizes
for free: each micro-batch's (b samples) and their sum (m b). A micro-batch's gradient reaches each
parameter as the incoming gradient of its backward, before autograd adds it to ``.grad``: a tensor
hook (``Tensor.register_hook``) takes its squared norm there, on the device, without copying it.
Against the accumulated gradient's squared norm, :func:`~hessdiag.noise.noise_scale.noise_scale_from_norms`
gives the unbiased two-size estimates.

Why hooks and not differences of ``.grad`` after each micro-batch: a difference needs a copy of the
gradient (one parameter-sized buffer) and a subtraction per micro-batch; the hook needs neither.

Cost, on the step it is armed for (a check's, see :meth:`hessdiag.Monitor.begin_micro_batch`): one
squared-norm reduction per parameter tensor per micro-batch and one over the accumulated gradient,
on the device; one transfer of m + 1 floats at the check. The check's split instead runs the parts'
forwards and backwards (about one gradient of the first micro-batch) and holds that many flat float64
gradients; this costs no forward, backward or copy, and counts every micro-batch of the step (m b
samples) instead of the first one. Needs equal micro-batches (the sizes are checked) and gradients
that are not loss-scaled (an fp16 scaler's ``.grad`` is unscaled only after accumulation).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from hessdiag.noise.noise_scale import NoiseScaleEstimate, noise_scale_from_norms


def _squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(tensor).double().square()


class MicroBatchNoise:
    """Squared norms of each micro-batch's gradient (tensor hooks) and of the accumulated one.

    Example (a step of micro-batches whose losses are divided by their number)::

        noise = MicroBatchNoise()
        for micro in micro_batches:
            noise.begin(params, samples=len(micro[0]), loss_scale=1 / len(micro_batches))
            (loss_fn(model, micro) / len(micro_batches)).backward()
        noise.close(params)       # device values only
        estimate = noise.estimate()  # one transfer; None with fewer than two micro-batches
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._current: list[torch.Tensor] = []  # the running micro-batch's tensors' squared norms
        self._micro: list[torch.Tensor] = []  # one squared norm per finished micro-batch
        self._sizes: list[int | None] = []
        self._loss_scale = 1.0
        self._closed: tuple[list[torch.Tensor], torch.Tensor, list[int | None], float] | None = None

    @property
    def armed(self) -> bool:
        """Whether the hooks are registered (between the first :meth:`begin` and :meth:`close`)."""
        return bool(self._handles)

    def begin(self, params: Iterable[torch.Tensor], samples: int | None, loss_scale: float) -> None:
        """A micro-batch of `samples` starts; the first call of a step registers the hooks on the
        `params` that require a gradient. `loss_scale`: the factor its loss is multiplied by before
        the backward (1 / the number of micro-batches, as Lightning does)."""
        if not self._handles:
            self._closed = None
            self._handles = [p.register_hook(self._record) for p in params if p.requires_grad]
        else:
            self._finish_micro_batch()
        self._sizes.append(samples)
        self._loss_scale = loss_scale

    def _record(self, grad: torch.Tensor) -> None:
        self._current.append(_squared_norm(grad.detach()))  # the gradient itself is left as it is

    def _finish_micro_batch(self) -> None:
        if self._current:
            self._micro.append(torch.stack(self._current).sum())
        self._current = []

    def close(self, params: Iterable[torch.Tensor]) -> None:
        """The step's gradients are final: remove the hooks and keep the accumulated ``.grad``'s
        squared norm over `params` (device only). Nothing when not armed."""
        if not self._handles:
            return
        self._finish_micro_batch()
        for handle in self._handles:
            handle.remove()
        grads = [p.grad for p in params if p.requires_grad and p.grad is not None]
        big = torch.stack([_squared_norm(g) for g in grads]).sum() if grads else None
        if big is not None and len(self._micro) == len(self._sizes):
            self._closed = (self._micro, big, self._sizes, self._loss_scale)
        self._handles, self._micro, self._sizes = [], [], []

    def estimate(self) -> tuple[NoiseScaleEstimate | None, str]:
        """The closed step's estimate (one transfer) and why not when None: fewer than two
        micro-batches, unequal or unknown sizes, a micro-batch without gradient. Forgets the step."""
        closed, self._closed = self._closed, None
        if closed is None:
            return None, "no accumulated step was measured"
        micro, big, sizes, scale = closed
        count = len(micro)
        if count < 2:
            return None, "the step has one micro-batch"
        if None in sizes or len(set(sizes)) != 1:
            return None, f"the micro-batches' sizes {sizes} are not all equal and known"
        host = torch.stack([*micro, big]).cpu().tolist()
        size = int(sizes[0])  # type: ignore[arg-type]
        # Each micro-batch's gradient is `scale` times its mean-loss gradient; the accumulated one is
        # `scale` times the sum of `count` of them, so `scale * count` times the mean over the step.
        small = [value / scale**2 for value in host[:-1]]
        return noise_scale_from_norms(small, size, host[-1] / (scale * count) ** 2, size * count), ""
