"""Per-step gradient statistics, fused and without host-device synchronisation.

Each step, one ``torch._foreach_norm`` per (device, dtype) group of parameters computes the norm of
every gradient tensor on the device; the step's 0-d norms are kept as the kernel returned them and
stacked at the read (one op per read-back rather than one per step: on a CPU each small op after a
backward costs tens of microseconds). Nothing is read back until :meth:`GradientStats.read`, which transfers every step since the
last read, and the current weight norms, in one copy. Measured on an H100 (DESIGN.md): one fused
norm added 0.1-5% to a training step, a ``.item()`` per tensor 18-25%.

FSDP2-sharded parameters and gradients (DTensors): each rank takes the norms of its local shards
per step; :meth:`GradientStats.read` sums their squares over the ranks (one all-reduce per read,
none per step), so every rank reads the norms of the whole tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from hessdiag import _distributed, _sharded
from hessdiag.steps.backward_reach import BackwardReach


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A gradient of an unsharded model, as it is (:func:`hessdiag._sharded.local` without its test)."""
    return tensor


def module_name(parameter_name: str) -> str:
    """The owning module of a parameter: ``"layer1.0.conv1.weight"`` -> ``"layer1.0.conv1"``.

    The last component of a parameter's name is always its attribute on the owning module (``weight``,
    ``bias``, ``in_proj_weight``, ...); a top-level parameter (no dot) is its own group.
    """
    return parameter_name.rsplit(".", 1)[0] if "." in parameter_name else parameter_name


@dataclass
class GradientReadout:
    """Statistics of the steps observed since the last read, and per-module weight norms at read time.

    Modules are in the order of the parameters given to :class:`GradientStats` (for ``named_parameters``
    of a sequential model: from the input, shallow, to the output, deep). Norms are L2 norms in the
    units of the parameters' gradients; ratios are dimensionless.

    Attributes:
        steps: the steps observed, in order.
        grad_norms: global gradient norm of each step.
        nonfinite_tensors: per step, the number of gradient tensors whose norm is not finite (a NaN or
            infinite entry, or, in float16, a norm beyond its range); exact entry counts would need
            another pass over every gradient.
        layer_grad_norms: per step, ``[(module, norm), ...]``.
        layer_weight_norms: ``[(module, norm), ...]`` of the parameters at read time.
        layer_update_ratios: with ``track_updates=True``, per step ``[(module, ||Δθ|| / ||θ||), ...]``:
            the relative change of the module's parameters since the previous observe (the update of
            the optimizer step in between); NaN at the first observe. None without tracking.
    """

    steps: list[int]
    grad_norms: list[float]
    nonfinite_tensors: list[int]
    layer_grad_norms: list[list[tuple[str, float]]]
    layer_weight_norms: list[tuple[str, float]]
    layer_update_ratios: list[list[tuple[str, float]]] | None = None

    def layer_ratios(self, index: int = -1) -> list[tuple[str, float]]:
        """Gradient-to-weight norm ratio per module at step `index` (a module with zero weights: its
        gradient norm, as if divided by 1)."""
        weights = dict(self.layer_weight_norms)
        return [(name, g / weights[name] if weights[name] > 0 else g) for name, g in self.layer_grad_norms[index]]


class GradientStats:
    """Gradient norms of every parameter tensor at every observed step, grouped by module on read.

    :meth:`observe` runs in the per-step path and never synchronises host and device: no ``.item()``,
    no ``float()``, no copy to the host; it only launches fused reductions whose results stay on the
    device. :meth:`read` is the one place that waits for the device. Memory: one 0-d tensor per
    parameter tensor per observed step until the next read (and two floats more per tensor with
    `track_updates`). Neither the parameters
    nor their ``.grad`` are ever modified.

    A parameter that the backward did not reach since the previous observe (frozen, or unused in this
    step's loss: an auxiliary head) has *no* gradient, which is not a zero gradient, also where
    ``zero_grad(set_to_none=False)`` left a zero-filled ``.grad`` on it: it is left out of that step's
    norms, and a module none of whose parameters has a gradient is left out of the step's per-module
    norms. Reach is marked by hooks on the parameters (:class:`~hessdiag.steps.backward_reach.BackwardReach`;
    host-side, the gradients untouched), removed by :meth:`close`. Under data parallelism a parameter
    reached on any rank counts on every rank (DDP fills in the gradient of one unused on this rank):
    one small all-reduce per :meth:`read`. Every parameter of the model is watched, so a layer unfrozen
    mid-run enters the statistics at its first gradient. Several observes of one step (an LBFGS closure
    evaluated several times, manual optimisation stepping several optimizers) make one record: per
    tensor, the last gradient seen in that step.

    Args:
        named_parameters: ``model.named_parameters()``. Their order is the depth order of the readout.
        track_updates: also measure the update-to-weight ratio ||Δθ|| / ||θ|| per module, the
            relative step the optimizer actually took (for Adam it differs from lr ||g|| / ||θ||).
            Costs a copy of the parameters kept on their device, and two passes over them per step.

    Raises:
        ValueError: no parameters.

    Example::

        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> model(torch.ones(1, 3)).sum().backward()
        >>> stats = GradientStats(model.named_parameters())
        >>> stats.observe(step=1)  # on the device; nothing read back
        >>> readout = stats.read()  # one transfer
        >>> readout.steps, [name for name, _ in readout.layer_grad_norms[0]]
        ([1], ['0', '2'])
    """

    def __init__(self, named_parameters: Iterable[tuple[str, nn.Parameter]], track_updates: bool = False) -> None:
        named = list(named_parameters)
        if not named:
            raise ValueError("No parameters to watch: the model has none.")
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.modules: list[str] = list(dict.fromkeys(module_name(name) for name in self.names))
        self._module_list = [self.modules.index(module_name(name)) for name in self.names]  # each tensor's module
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, p in enumerate(self.params):
            groups.setdefault((p.device, p.dtype), []).append(index)
        self._groups = list(groups.values())
        # foreach_norm needs a tensor for every slot: a missing gradient gets a zero scalar, and is
        # masked out on read (the mask lives on the host: `p.grad is None` needs no device read).
        self._zeros = [torch.zeros((), device=device, dtype=dtype) for device, dtype in groups]
        self._order_list = [index for group in self._groups for index in group]  # the column of each tensor
        self._in_order = self._order_list == list(range(len(self.params)))  # one group: the identity
        self._device = self.params[0].device
        self._one_device = all(device == self._device for device, _ in groups)
        # Which norms are of local shards, per column in group order (summed over ranks on read).
        self._sharded_columns = torch.tensor([_sharded.is_sharded([self.params[i]]) for i in self._order_list])
        self._local = _sharded.local if bool(self._sharded_columns.any()) else _plain
        self._reach = BackwardReach(self.params)
        self.track_updates = track_updates
        self._previous: list[list[torch.Tensor]] | None = None  # parameters at the previous observe, per group
        # (step, which tensors had a gradient, the row of norms on the device: one tensor, or the
        # 0-d norms as foreach_norm returned them, stacked at the read)
        self._history: list[tuple[int, tuple[bool, ...], list[torch.Tensor]]] = []

    @torch.no_grad()
    def observe(self, step: int) -> None:
        """Record the norms of the gradients the backward reached since the previous observe (the
        others are left out). No host sync."""
        present = self._reach.take()
        if not any(present):
            return  # nothing to measure: no placeholder row
        repeat = bool(self._history) and self._history[-1][0] == step
        row: list[torch.Tensor] = []
        for group, zero in zip(self._groups, self._zeros):
            norms = torch._foreach_norm([self._local(self.params[i].grad) if present[i] else zero for i in group])
            # on one device the 0-d norms wait for the read, stacked there (one op per read-back, not per step)
            row.extend(norms if self._one_device else [self._stacked(norms)])
        if self.track_updates:
            # A repeated observe of one step: the update was measured at its first observe.
            row += [torch.full((2 * len(self.params),), math.nan, device=self._device)] if repeat else self._update_norms()
        self._history.append((step, present, row))

    def close(self) -> None:
        """Remove the hooks that mark which parameters the backward reached (idempotent). Observes
        after it count every ``.grad`` that is not None."""
        self._reach.close()

    def _stacked(self, norms: list[torch.Tensor]) -> torch.Tensor:
        """One float32 row on the statistics' device from 0-d norms."""
        return torch.stack(norms).to(device=self._device, dtype=torch.float32)

    def _rows(self, history: list[tuple[int, tuple[bool, ...], list[torch.Tensor]]]) -> torch.Tensor:
        """The observed rows as one (steps x values) float32 tensor on the device: the per-tensor
        gradient norms (0-d tensors on one device, else a stacked row per group), then with
        `track_updates` the update norms. Every row has the same layout."""
        grads = len(self.params) if self._one_device else len(self._groups)
        flat = [value for _, _, row in history for value in row[:grads]]
        rows = (torch.stack(flat) if self._one_device else torch.cat(flat)).to(torch.float32).view(len(history), -1)
        if not self.track_updates:
            return rows
        updates = [value for _, _, row in history for value in row[grads:]]
        return torch.cat([rows, torch.cat(updates).view(len(history), -1)], dim=1)

    def _update_norms(self) -> list[torch.Tensor]:
        """Norms of the parameters at the previous observe and of the change since, per tensor."""
        current = [[_sharded.local(self.params[i].detach()) for i in group] for group in self._groups]
        if self._previous is None:
            self._previous = [[p.clone() for p in tensors] for tensors in current]
            return [torch.full((2 * len(self.params),), float("nan"), device=self._device)]
        weight_norms, change_norms = [], []
        for previous, tensors in zip(self._previous, current):
            weight_norms.append(self._stacked(torch._foreach_norm(previous)))
            torch._foreach_sub_(previous, tensors)  # in place: no second copy of the parameters
            change_norms.append(self._stacked(torch._foreach_norm(previous)))
            torch._foreach_copy_(previous, tensors)
        return [torch.cat(weight_norms), torch.cat(change_norms)]

    @torch.no_grad()
    def read(self) -> GradientReadout | None:
        """Everything since the last read in one device-to-host transfer; ``None`` if nothing new."""
        if not self._history:
            return None
        history, self._history = self._history, []
        per_row = self._rows(history)
        weights = [[_sharded.local(self.params[i].detach()) for i in group] for group in self._groups]
        weight_norms = torch.cat([self._stacked(torch._foreach_norm(tensors)) for tensors in weights])
        norms = torch.cat([per_row.flatten(), weight_norms])
        if bool(self._sharded_columns.any()):  # every block of the row holds one norm per tensor
            sharded = self._sharded_columns.repeat(norms.numel() // len(self.params))
            norms = _sharded.norms_over_ranks(norms, sharded, self.params)
        host = norms.cpu().double()  # the one transfer
        width = per_row.shape[1]
        values = host.tolist()  # the bookkeeping below is a few values per tensor: plain Python
        rows = [self._in_parameter_order(values[i * width : (i + 1) * width]) for i in range(len(history))]
        steps, grads, present, updates = self._merge_steps(history, rows)
        if _distributed.is_data_parallel():  # reached on any rank: every rank judges the same layers
            reached = _distributed.all_reduce_max_(torch.tensor(present, device=self._device, dtype=torch.int32))
            present = [[bool(flag) for flag in row] for row in reached.tolist()]
        per_module = [self._per_module(row, mask) for row, mask in zip(grads, present)]
        weights = self._per_module(self._in_parameter_order(values[len(history) * width :]))
        return GradientReadout(
            steps=steps,
            grad_norms=[math.sqrt(sum(g * g for g, has in zip(row, mask) if has)) for row, mask in zip(grads, present)],
            nonfinite_tensors=[sum(has and not math.isfinite(g) for g, has in zip(row, mask)) for row, mask in zip(grads, present)],
            layer_grad_norms=[[(name, norm) for name, norm in zip(self.modules, norms) if norm is not None] for norms in per_module],
            layer_weight_norms=list(zip(self.modules, weights)),
            layer_update_ratios=[self._update_ratios(row) for row in updates] if self.track_updates else None,
        )

    def _update_ratios(self, updates: list[float]) -> list[tuple[str, float]]:
        """Per module ||delta theta|| / ||theta|| from one row of update norms (the parameters' norms
        at the previous observe, then the change's)."""
        count = len(self.params)
        weights, changes = self._per_module(updates[:count]), self._per_module(updates[count:])
        return [(name, _divide(change, weight)) for name, change, weight in zip(self.modules, changes, weights)]

    def _merge_steps(
        self, history: list[tuple[int, tuple[bool, ...], list[torch.Tensor]]], rows: list[list[float]]
    ) -> tuple[list[int], list[list[float]], list[list[bool]], list[list[float]]]:
        """One row per step: per tensor, its last gradient norm in the step; the update norms of the
        step's first observe. Returns steps, gradient norms, presence masks and update norms."""
        count = len(self.params)
        steps: list[int] = []
        grads: list[list[float]] = []
        present: list[list[bool]] = []
        updates: list[list[float]] = []
        for (step, mask, _), row in zip(history, rows):
            if steps and steps[-1] == step:
                grads[-1] = [g if has else last for g, has, last in zip(row, mask, grads[-1])]
                present[-1] = [has or had for has, had in zip(mask, present[-1])]
            else:
                steps.append(step)
                grads.append(row[:count])
                present.append(list(mask))
                updates.append(row[count:])
        return steps, grads, present, updates

    def _in_parameter_order(self, values: list[float]) -> list[float]:
        """A row from (device, dtype) group order back to parameter order, block by block of one value
        per tensor (grad norms; then, with `track_updates`, weight norms and change norms)."""
        if self._in_order:
            return values
        count, ordered = len(self.params), list(values)
        for start in range(0, len(values), count):
            for column, index in enumerate(self._order_list):
                ordered[start + index] = values[start + column]
        return ordered

    def _per_module(self, norms: list[float], present: list[bool] | None = None) -> list[float | None]:
        """Per-tensor norms to per-module norms (root of summed squares) over the tensors `present`
        (default all); None for a module none of whose tensors is present."""
        squares: list[float | None] = [None] * len(self.modules)
        for index, (norm, module) in enumerate(zip(norms, self._module_list)):
            if present is None or present[index]:
                squares[module] = (squares[module] or 0.0) + norm * norm
        return [None if total is None else math.sqrt(total) for total in squares]



def _divide(a: float | None, b: float | None) -> float:
    """a / b as a float64 tensor division gives it (x / 0: inf or NaN); NaN where either is missing."""
    if a is None or b is None:
        return math.nan
    if b == 0:
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b
