"""Per-step statistics: gradient norms and the step's loss, buffered on the device between read-backs.

The per-step path (:meth:`StepStatistics.observe_gradients`, :meth:`StepStatistics.add_loss`) never
synchronises host and device: the gradient norms stay on the device (see
:class:`~hessdiag.steps.gradients.GradientStats`) and the loss is copied there (one kernel). A read-back
transfers everything since the last one at once, takes the rank mean of the losses under data
parallelism (every rank must judge the same numbers), and turns each step into a
:class:`~hessdiag.detectors.StepRecord`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hessdiag import _distributed
from hessdiag.isolation import unwrap_model
from hessdiag.reporting.dashboard import LayerValues
from hessdiag.detectors import StepRecord
from hessdiag.steps.gradients import GradientReadout, GradientStats
from hessdiag.monitor.faults import FaultPolicy
from hessdiag.reporting.tags import GRAD_NORM, LOSS, OVERFLOW_SKIPS


@dataclass
class StepReadout:
    """What one read-back found: a record per step, and the values of the last step to log.

    Attributes:
        records: one per step since the last read-back, in step order.
        step: the step the values belong to (the last one read).
        values: scalars by tag (gradient norm, loss, overflow skips).
        layers: per-layer values, ``{quantity: {module: value}}``.
    """

    records: list[StepRecord]
    step: int
    values: dict[str, float]
    layers: dict[str, dict[str, float]] = field(default_factory=dict)


class StepStatistics:
    """Gradient statistics and losses of every optimizer step, read back together.

    Args:
        model: the network (a DDP wrapper is fine: its module's parameters are read).
        track_updates: also measure each layer's update-to-weight ratio.
        grad_scaler: the fp16 loss scaler, if any: its skipped steps are counted, not judged.
        faults: reports a malformed input once.
    """

    def __init__(
        self, model: nn.Module, *, track_updates: bool, grad_scaler: torch.amp.GradScaler | None, faults: FaultPolicy
    ) -> None:
        self._model, self._track_updates = model, track_updates
        self.gradients = GradientStats(unwrap_model(model).named_parameters(), track_updates=track_updates)
        self.grad_scaler = grad_scaler
        self.overflow_skips = 0
        self._faults = faults
        self._losses: list[tuple[int, torch.Tensor]] = []  # (step, loss) given since the last read-back

    @property
    def device(self) -> torch.device:
        """Where the statistics are kept (that of the first parameter)."""
        return self.gradients.params[0].device

    def observe_gradients(self, step: int) -> None:
        """Record the gradients of `step` on the device (no host read)."""
        self.gradients.observe(step)

    def add_loss(self, step: int, loss: torch.Tensor | float | Mapping[str, Any]) -> None:
        """Keep `step`'s loss as a 0-d float32 copy on its device (no host read): a scalar tensor, a
        number, or a mapping whose ``"loss"`` entry is one (what a training step often returns).
        Anything else is warned about once, naming these forms, and the step has no loss."""
        if isinstance(loss, Mapping) and "loss" in loss:
            loss = loss["loss"]
        if isinstance(loss, (bool, Mapping)) or not isinstance(loss, (torch.Tensor, int, float)):
            shown = f"a mapping with keys {sorted(map(str, loss))}" if isinstance(loss, Mapping) else type(loss).__name__
            self._faults.warn_once(
                "loss type",
                f"hessdiag: `after_step`'s `loss` must be the step's scalar loss: a tensor, a float, or a mapping with "
                f"a 'loss' entry; got {shown}. Those steps have no loss for the detectors.",
            )
            return
        if not isinstance(loss, torch.Tensor):
            value = torch.tensor(float(loss))
        elif loss.numel() == 1:
            value = loss.detach().to(torch.float32, copy=True).reshape(())
        else:
            self._faults.warn_once(
                "loss shape",
                f"hessdiag: `loss` should be the scalar training loss, got shape {tuple(loss.shape)}; its mean is used.",
            )
            value = loss.detach().float().mean()
        self._losses.append((step, value))

    def read(self, lambda_max: float | None) -> StepReadout | None:
        """Everything since the last read-back in one transfer; None when there is nothing.

        `lambda_max`: the latest curvature check's, handed on in the records. A step is recorded with
        what was measured: no loss (``after_step(loss=None)``) or no gradients (no ``after_backward``)
        leave that field None, never a placeholder.
        """
        replaced = self._follow_replaced_parameters()
        readout = self.gradients.read()
        losses = self._pending_losses()
        if readout is None:
            return self._losses_only(losses, warn=not replaced)
        if any(step not in losses for step in readout.steps):
            self._faults.warn_once(
                "no loss",
                "hessdiag: some steps have no loss (`after_step` was called without the step's `loss`, or with one it "
                "could not read); the exploding and plateau detectors skip such steps. Pass `monitor.after_step(batch, loss)`.",
            )
        records = [self._record(readout, index, losses.get(step), lambda_max) for index, step in enumerate(readout.steps)]
        # A step with a loss but no gradient statistics (its backward skipped, e.g. on a NaN loss): a
        # record of the loss alone, so that a non-finite loss is still judged.
        with_gradients = set(readout.steps)
        records += [StepRecord(step=step, loss=loss) for step, loss in losses.items() if step not in with_gradients]
        records.sort(key=lambda record: record.step)
        values = {GRAD_NORM: readout.grad_norms[-1]}
        if losses:
            values[LOSS] = losses[max(losses)]
        if self._scaling:
            values[OVERFLOW_SKIPS] = float(self.overflow_skips)
        return StepReadout(records, readout.steps[-1], values, _layer_values(readout))

    @property
    def _scaling(self) -> bool:
        return self.grad_scaler is not None and self.grad_scaler.is_enabled()

    def _record(self, readout: GradientReadout, index: int, loss: float | None, lambda_max: float | None) -> StepRecord:
        nonfinite = readout.nonfinite_tensors[index]
        overflow_skip = loss is not None and self._scaling and nonfinite > 0 and math.isfinite(loss)
        self.overflow_skips += overflow_skip
        return StepRecord(
            step=readout.steps[index],
            loss=loss,
            grad_norm=readout.grad_norms[index],
            nonfinite_tensors=nonfinite,
            overflow_skip=overflow_skip,
            layer_grad_norms=tuple(readout.layer_grad_norms[index]),
            # Weights are read once per read-back: they move little within one.
            layer_weight_norms=tuple(readout.layer_weight_norms),
            layer_ratios=tuple(readout.layer_ratios(index)),
            lambda_max=lambda_max,
        )

    def _follow_replaced_parameters(self) -> bool:
        """Whether the model's parameters are no longer those the statistics hold (a layer replaced
        after the Monitor was built): then the statistics follow the new ones from now on, with a
        warning; the steps since the last read-back keep their losses but lose their gradient
        statistics (measured on parameters that no longer train). Looked at once per read-back."""
        current = list(unwrap_model(self._model).named_parameters())
        held = self.gradients.params
        if len(current) == len(held) and all(p is q for (_, p), q in zip(current, held)):
            return False
        self._faults.warn_once(
            "parameters replaced",
            "hessdiag: the model's parameters changed since the Monitor was built (a layer replaced or added?); "
            "the gradient statistics now follow the new parameters, from the next step on.",
        )
        self.gradients.close()
        self.gradients = GradientStats(current, track_updates=self._track_updates)
        return True

    def close(self) -> None:
        """Remove the hooks the gradient statistics put on the parameters (idempotent)."""
        self.gradients.close()

    def _losses_only(self, losses: Mapping[int, float], warn: bool = True) -> StepReadout | None:
        """Steps with a loss but no gradient statistics: records of the loss alone."""
        if not losses:
            return None
        if warn:
            self._faults.warn_once(
                "no after_backward",
                "hessdiag: `after_step` was called without `after_backward`: no gradient statistics, so only the "
                "loss is logged and a non-finite loss flagged. Call `monitor.after_backward()` after `loss.backward()`.",
            )
        step = max(losses)
        return StepReadout([StepRecord(step=s, loss=loss) for s, loss in losses.items()], step, {LOSS: losses[step]})

    def _pending_losses(self) -> dict[int, float]:
        """The losses given since the last read-back, by step (one transfer; the rank mean under DDP)."""
        pending, self._losses = self._losses, []
        if not pending:
            return {}
        losses = torch.stack([loss.to(self.device) for _, loss in pending])
        if _distributed.is_data_parallel():  # every rank must decide the same
            losses = _distributed.all_reduce_sum_(losses) / torch.distributed.get_world_size()
        return dict(zip((step for step, _ in pending), losses.cpu().tolist()))

    def state_dict(self) -> dict[str, int]:
        return {"overflow_skips": self.overflow_skips}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.overflow_skips = int(state.get("overflow_skips", 0))


def _layer_values(readout: GradientReadout) -> LayerValues:
    """The last step's per-layer values by quantity (only the quantities that have values)."""
    layers = {
        "layer_grad_norm": dict(readout.layer_grad_norms[-1]),
        "layer_grad_to_weight": dict(readout.layer_ratios()),
        "layer_weight_norm": dict(readout.layer_weight_norms),
        "layer_update_ratio": dict(readout.layer_update_ratios[-1]) if readout.layer_update_ratios else {},
    }
    return {family: by_layer for family, by_layer in layers.items() if by_layer}
