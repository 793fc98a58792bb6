"""The gradient noise scale under DDP from the ranks' local gradients: no extra forward or backward.

Under data parallelism each rank's gradient before DDP's all-reduce is the mean-loss gradient of its
own b samples, and the all-reduced one that of the R b samples of all R ranks. With
E||g_local||^2 = ||G||^2 + tr(Sigma) / b and E||g_global||^2 = ||G||^2 + tr(Sigma) / (R b)
(McCandlish et al., 2018, appendix A), with m the mean over ranks of ||g_local||^2:

    ||G||^2   ~ (R ||g_global||^2 - m) / (R - 1)
    tr(Sigma) ~ b R (m - ||g_global||^2) / (R - 1)

both unbiased (:func:`~hessdiag.noise.noise_scale.noise_scale_from_norms` with one small-batch norm, m).

How: :class:`RankNoiseScale` registers a DDP communication hook that does DDP's own reduction (the
bucket multiplied by 1 / R, as DDP's reducer does without a hook, then a SUM all-reduce): on entry it
takes the bucket's squared norm (this rank's gradient, undivided), and on the reduced bucket (a
``then`` on the all-reduce's future) the global one. Both stay on the device; the optimizer receives
the same gradient as without the hook. :meth:`RankNoiseScale.close_step` files the step's pair;
:meth:`RankNoiseScale.read`, at a read-back, sums the ranks' local squares in one all-reduce, brings
every step's pair back in one transfer and adds one estimate per step to a
:class:`~hessdiag.noise.running.RunningNoiseScale` (the ratio of running means).

Cost per optimizer step: two squared-norm reductions over the gradient buckets on the device (one
before, one after the all-reduce), no host read; per read-back one all-reduce of one float per step
and one transfer. The gradient is the one DDP all-reduces: every parameter DDP reduces, whatever the
checks' `params`. Assumes equal local batches (DistributedSampler) and one all-reduce per optimizer
step: under gradient accumulation the micro-batches before the last run under ``no_sync`` (as
Lightning does), so b is the rank's samples of the whole step. A backward all-reduced several times
in one step (an LBFGS closure) counts as the mean of its passes.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from hessdiag.noise.noise_scale import NoiseScaleEstimate, noise_scale_from_norms
from hessdiag.noise.running import RunningNoiseScale


def _squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    """||tensor||^2 as a 0-d float64 tensor on its device (the reduction in the tensor's dtype, as
    the per-step gradient norms; no float64 copy of a bucket)."""
    return torch.linalg.vector_norm(tensor).double().square()


class RankNoiseScale:
    """The noise scale of a DDP run from every step's local and all-reduced gradient norms.

    Example::

        ranks = RankNoiseScale()
        ranks.attach(ddp_model)                  # before training; replaces DDP's reduction by its own
        for batch in loader:
            loss_fn(ddp_model, batch).backward()  # the hook measures both norms on the device
            optimizer.step(); optimizer.zero_grad()
            ranks.close_step(samples=len(batch[0]))
            if step % 10 == 0:
                ranks.read()                      # every rank, at the same steps (one all-reduce)
                ranks.running.noise_scale, ranks.running.noise_scale_se

    Attributes:
        running: the :class:`~hessdiag.RunningNoiseScale` over the steps read so far.
        world_size: R, the ranks of the DDP's process group (1 before :meth:`attach`).
    """

    def __init__(self, decay: float = 1.0) -> None:
        self.running = RunningNoiseScale(decay)
        self.world_size = 1
        self._group: dist.ProcessGroup | None = None
        self._local: list[torch.Tensor] = []  # this step's buckets: squared norms before the all-reduce
        self._reduced: list[torch.Tensor] = []  # and after it
        self._passes = 0  # backward passes all-reduced in this step (their last buckets)
        self._pending: list[tuple[int, torch.Tensor]] = []  # (local samples, [local, global]) per step

    @property
    def attached(self) -> bool:
        """Whether the hook is registered on a DDP model."""
        return self._group is not None

    def attach(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        """Register the hook on `ddp` (before its first backward, or between steps).

        Raises:
            ValueError: `ddp` is not a DistributedDataParallel.
            RuntimeError: `ddp` already has a communication hook (DDP allows one), or it is attached.
        """
        if not isinstance(ddp, nn.parallel.DistributedDataParallel):
            raise ValueError(f"`ddp` must be a DistributedDataParallel, got {type(ddp).__name__}.")
        if self.attached:
            raise RuntimeError("This RankNoiseScale is already attached to a DDP model.")
        group = ddp.process_group
        ddp.register_comm_hook(group, self._hook)
        self._group, self.world_size = group, group.size()

    def _hook(self, process_group, bucket):  # no annotations: DDP compares them with the real classes
        """DDP's reduction of one bucket, measuring its squared norm before and after (device only)."""
        buffer = bucket.buffer()
        self._local.append(_squared_norm(buffer))
        if bucket.is_last():
            self._passes += 1
        buffer.mul_(1.0 / self.world_size)  # what DDP's reducer does without a hook (a wrapped 1 / R)
        work = dist.all_reduce(buffer, group=process_group, async_op=True)
        return work.get_future().then(self._measure_reduced)

    def _measure_reduced(self, future: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        reduced = future.value()[0]
        self._reduced.append(_squared_norm(reduced))  # list.append: safe from the communication threads
        return reduced

    def close_step(self, samples: int | None) -> None:
        """File this optimizer step's norms with `samples`, this rank's samples of the step (None:
        unknown, the step is left out of the estimate but still takes part in the collective). Call
        after the step's backward passes, on every rank. No host read."""
        local, reduced, passes = self._local, self._reduced, self._passes
        self._local, self._reduced, self._passes = [], [], 0
        if not passes:  # no all-reduce in this step (no backward, or only no_sync micro-batches)
            return
        pair = torch.stack([torch.stack(local).sum(), torch.stack(reduced).sum()]) / passes
        self._pending.append((samples or 0, pair))

    def read(self) -> NoiseScaleEstimate | None:
        """Add every filed step's estimate to :attr:`running`; the last step's estimate, or None when
        no step is filed. One all-reduce (call on every rank at the same steps) and one transfer."""
        pending, self._pending = self._pending, []
        if not pending:
            return None
        pairs = torch.stack([pair for _, pair in pending])
        local = pairs[:, 0].contiguous()
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=self._group)
        host = torch.stack([local / self.world_size, pairs[:, 1]], dim=1).cpu().tolist()
        estimate = None
        for (samples, _), (mean_local, global_sq) in zip(pending, host):
            if samples < 1 or self.world_size < 2 or not (math.isfinite(mean_local) and math.isfinite(global_sq)):
                continue
            estimate = noise_scale_from_norms([mean_local], samples, global_sq, samples * self.world_size)
            self.running.update(estimate)
        return estimate

    def state_dict(self) -> dict[str, float | int]:
        """The running means (primitives)."""
        return self.running.state_dict()

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.running.load_state_dict(state)
