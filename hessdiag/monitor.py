"""`Monitor`: the diagnostics of hessdiag for a hand-written PyTorch training loop.

It owns the per-step gradient statistics, the periodic curvature check and the five detectors, and
sends what it finds to writers (TensorBoard). A loop calls it at two points::

    monitor = hessdiag.Monitor(model, loss_fn, optimizer=optimizer, writer=SummaryWriter("runs/x"))
    for batch in loader:
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        monitor.after_backward()         # gradient statistics on the device, no host sync
        optimizer.step()
        monitor.after_step(batch, loss)  # every `log_every` steps: read back, detect, log;
                                         # every `check_every` steps: curvature on `batch`

Under gradient accumulation pass the step's micro-batches as ``hessdiag.MicroBatches([...])`` and
the step's mean loss: the check then measures the loss the optimizer steps on.

The per-step path never synchronises host and device: statistics stay on the device and are read
back in one transfer every `log_every` steps. Diagnostics never change the run (parameters,
buffers, optimizer state, RNG, ``.grad``) and never crash it: a failing check is reported once,
backs off, and training goes on; any other fault inside (a writer, a detector, a malformed loss) is
reported once and skipped (``strict=True`` re-raises instead).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hessdiag import _distributed
from hessdiag._isolation import ModelMode, unwrap_model
from hessdiag.batches import MicroBatches
from hessdiag.curvature import CurvatureCheck, CurvatureProbe, RankWeighting
from hessdiag.errors import HessdiagError, HessdiagWarning
from hessdiag.flags import FlagEvent
from hessdiag.gradients import GradientStats
from hessdiag.hvp import LOW_PRECISION_ROUNDING, HVPMethod, LossFn
from hessdiag.schedule import CheckEvery, CheckSchedule
from hessdiag.settings import DiagnosticsSettings, resolve_detectors
from hessdiag.tensorboard import PREFIX, DiagnosticsWriter, TensorBoardWriter

def _require_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


class Monitor:
    """Gradient statistics every step, curvature every `check_every` steps, flags, TensorBoard.

    Args:
        model: the network being trained (a DDP wrapper is fine).
        loss_fn: ``loss_fn(model, batch) -> scalar``, the training loss; needed for curvature checks.
        optimizer: read for the stability threshold (SGD, momentum, Nesterov, Adam, AdamW) and
            Adam's preconditioner; never modified.
        writer: a ``torch.utils.tensorboard.SummaryWriter``, a :class:`DiagnosticsWriter`, a list of
            either, or None.
        check_every: optimizer steps between curvature checks (0: never), or ``"auto"`` (default):
            checks take at most `overhead_budget` of the wall time, at most one per 100 steps
            (see :mod:`hessdiag.schedule`).
        overhead_budget: share of the wall time the checks may take with ``check_every="auto"``.
        log_every: steps between read-backs of the gradient statistics (detection and logging).
        sub_batch: samples of the batch used by a curvature check (default: the whole batch; of each
            micro-batch for :class:`~hessdiag.MicroBatches`). Every tensor of the batch is cut along
            its first dimension; a batch whose tensors differ there is refused (the check fails
            with a warning naming `sub_batch`).
        k, tol, max_iter, cold_every, hvp_method, params: see :class:`CurvatureProbe`.
        mode: the module modes of a check: ``"as_is"`` (default): each module keeps the mode it had
            in the training step (a frozen backbone held in eval stays in eval); ``"train"`` or
            ``"eval"``: the whole model in that mode.
        rank_weighting: under data parallelism, ``"equal"`` (default): the check's loss is the mean
            of the ranks' mean losses, which is what DDP's gradient averaging descends;
            ``"samples"``: the mean over all the ranks' samples.
        density_every: every n-th check also logs the spectral density (0: never).
        detectors: the detectors to run: flag names (defaults) or detector instances (default: one of
            each, with default thresholds).
        grad_scaler: the ``torch.amp.GradScaler`` of an fp16 mixed-precision loop (call
            :meth:`after_backward` after ``scaler.unscale_(optimizer)``). Steps whose gradients
            overflow are then skipped steps of the scaler, not explosions: they are counted
            (``overflow_skips``) and not judged, unless many come in a row (see
            :class:`ExplodingGradientDetector`).
        update_ratios: also log each layer's update-to-weight ratio ||delta theta|| / ||theta|| per
            read-back (the step the optimizer really took; for Adam it is not lr ||g|| / ||theta||).
            Keeps a copy of the parameters on their device.
        strict: re-raise errors of the diagnostics instead of warning and backing off.

    Raises:
        ValueError: a bad argument, named in the message.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        writer: Any = None,
        check_every: CheckEvery = "auto",
        overhead_budget: float = 0.05,
        log_every: int = 10,
        sub_batch: int | None = None,
        k: int = 1,
        tol: float = 1e-3,
        max_iter: int | None = None,
        cold_every: int = 5,
        density_every: int = 10,
        mode: ModelMode = "as_is",
        hvp_method: HVPMethod = "auto",
        params: Iterable[torch.Tensor] | None = None,
        rank_weighting: RankWeighting = "equal",
        detectors: Sequence[Any] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        update_ratios: bool = False,
        strict: bool = False,
    ) -> None:
        _require_module(model)
        settings = DiagnosticsSettings(
            check_every=check_every, overhead_budget=overhead_budget, log_every=log_every, sub_batch=sub_batch, k=k,
            tol=tol, max_iter=max_iter, cold_every=cold_every, density_every=density_every, mode=mode,
            hvp_method=hvp_method, rank_weighting=rank_weighting, update_ratios=update_ratios, strict=strict,
        )  # fmt: skip
        self._build(model, loss_fn, settings, optimizer=optimizer, writer=writer, params=params, detectors=detectors,
                    grad_scaler=grad_scaler)  # fmt: skip

    @classmethod
    def from_settings(
        cls,
        model: nn.Module,
        loss_fn: LossFn | None,
        settings: DiagnosticsSettings,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        writer: Any = None,
        params: Iterable[torch.Tensor] | None = None,
        detectors: Sequence[Any] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> Monitor:
        """A Monitor with `settings` as they are (already validated, shared with the caller)."""
        _require_module(model)
        monitor = cls.__new__(cls)
        monitor._build(model, loss_fn, settings, optimizer=optimizer, writer=writer, params=params,
                       detectors=detectors, grad_scaler=grad_scaler)  # fmt: skip
        return monitor

    def _build(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        settings: DiagnosticsSettings,
        *,
        optimizer: torch.optim.Optimizer | None,
        writer: Any,
        params: Iterable[torch.Tensor] | None,
        detectors: Sequence[Any] | None,
        grad_scaler: torch.amp.GradScaler | None,
    ) -> None:
        self.settings = settings
        check_every, log_every, strict = settings.check_every, settings.log_every, settings.strict
        self.schedule = CheckSchedule(check_every, settings.overhead_budget)
        if self.schedule.enabled and loss_fn is None:
            raise ValueError("`loss_fn` is required for curvature checks (or set `check_every=0`).")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"`loss_fn` must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}.")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        if grad_scaler is not None and not callable(getattr(grad_scaler, "is_enabled", None)):
            raise ValueError(f"`grad_scaler` must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}.")
        self.model = model
        self.optimizer = optimizer
        self.grad_scaler = grad_scaler
        self.overflow_skips = 0
        self.log_every = log_every
        self.strict = strict
        self.writers: list[DiagnosticsWriter] = self._writers(writer)
        self.gradients = GradientStats(unwrap_model(model).named_parameters(), track_updates=settings.update_ratios)
        self.probe = (
            CurvatureProbe(
                model, loss_fn, k=settings.k, tol=settings.tol, max_iter=settings.max_iter,
                cold_every=settings.cold_every, sub_batch=settings.sub_batch, mode=settings.mode,
                hvp_method=settings.hvp_method, params=params, rank_weighting=settings.rank_weighting,
                density_every=settings.density_every,
            )  # fmt: skip
            if loss_fn is not None
            else None
        )
        self.detectors = {d.name: d for d in resolve_detectors(detectors)}
        self.step = 0
        self.events: list[FlagEvent] = []
        self.checks: list[CurvatureCheck] = []
        self.failed_checks: list[tuple[int, str]] = []  # (step, reason) of each check that failed
        self._losses: list[tuple[int, torch.Tensor]] = []  # (step, loss) given since the last read-back
        # The last value of every scalar tag, as written at the last read-back or check (host floats);
        # the flags from the start (0: not raised).
        self.latest: dict[str, float] = self._flag_scalars()
        self._warned: set[str] = set()
        if self.probe is not None and self.schedule.enabled:
            self._warn_low_precision()

    # -- construction helpers ------------------------------------------------------------
    def _warn_low_precision(self) -> None:
        """bfloat16/float16 parameters: every product carries the dtype's rounding, which the proven
        bounds include, so a `tol` below it is never met and each check runs to `max_iter`. Looked at
        on construction and at each check (Lightning's "bf16-true" converts the model after setup)."""
        tol = self.settings.tol
        coarse = {
            p.dtype for p in unwrap_model(self.model).parameters()
            if p.requires_grad and torch.finfo(p.dtype).eps > torch.finfo(torch.float32).eps
        }  # fmt: skip
        if not coarse:
            return
        eps = max(torch.finfo(dtype).eps for dtype in coarse)
        if tol < 4 * LOW_PRECISION_ROUNDING * eps:
            self._warn_once(
                "low precision",
                f"hessdiag: the model's parameters are {sorted(map(str, coarse))}: each Hessian-vector product carries "
                f"their rounding (about {eps:.1g} of ||H||), which the proven bounds include, so `tol`={tol:g} is not "
                f"reached and every check runs to `max_iter`. Keep float32 parameters under autocast (the checks then "
                f"run in float32), or pass `tol` >= {4 * LOW_PRECISION_ROUNDING * eps:.2g}.",
            )

    @staticmethod
    def _writers(writer: Any) -> list[DiagnosticsWriter]:
        if writer is None:
            return []
        items = writer if isinstance(writer, (list, tuple)) else [writer]
        out: list[DiagnosticsWriter] = []
        for item in items:
            if hasattr(item, "add_scalar") and hasattr(item, "add_custom_scalars"):
                out.append(TensorBoardWriter(item))
            elif all(hasattr(item, method) for method in ("scalars", "events", "histograms", "density", "text", "flush")):
                out.append(item)
            else:
                raise ValueError(
                    f"`writer` must be a SummaryWriter, a DiagnosticsWriter or a list of them, got {type(item).__name__}."
                )
        return out

    # -- the loop's two calls --------------------------------------------------------------
    @property
    def active_flags(self) -> list[str]:
        """Names of the flags raised now."""
        return [name for name, detector in self.detectors.items() if detector.active]

    @property
    def last_check(self) -> CurvatureCheck | None:
        return self.checks[-1] if self.checks else None

    def after_backward(self) -> None:
        """Record this step's gradient statistics; call when the gradients are final (accumulated,
        all-reduced, unscaled). No host-device synchronisation: values stay on the device. Calling it
        several times before :meth:`after_step` (an LBFGS closure) still makes one record of the step."""
        with self.guard("the gradient statistics"):
            self.gradients.observe(self.step + 1)

    def after_step(
        self, batch: Any = None, loss: torch.Tensor | float | None = None, *, step: int | None = None
    ) -> list[FlagEvent]:
        """Count an optimizer step and its `loss`; read back, detect and log every `log_every` steps;
        run a curvature check on `batch` every `check_every` steps. Returns the new flag events.

        `step`, when given, is the number of optimizer steps taken including this one (Lightning's
        ``trainer.global_step``): the Monitor adopts it instead of counting.
        `loss` is copied (one kernel, no host read), so a buffer the loop reuses is safe to pass.
        """
        self.step = self.step + 1 if step is None else step
        events: list[FlagEvent] = []
        if loss is not None:
            with self.guard("the per-step statistics"):
                self._losses.append((self.step, self._loss_value(loss)))
        if self.read_back_due(self.step):
            with self.guard("the per-step statistics"):
                events += self._read_back()
        self.schedule.step_finished()
        if self.probe is not None and batch is not None and self.schedule.due(self.step):
            events += self.check_curvature(batch)
        return events

    def use_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Read `optimizer` for the stability threshold from now on (None: no threshold)."""
        self.optimizer = optimizer

    def read_back_due(self, step: int) -> bool:
        """Whether optimizer step `step` ends with a read-back of the gradient statistics."""
        return step % self.log_every == 0

    def check_due(self, step: int) -> bool:
        """Whether a curvature check is due at optimizer step `step`."""
        return self.schedule.due(step)

    def read_back(self) -> list[FlagEvent]:
        """Read back and judge the steps since the last read-back now, out of the `log_every` cadence
        (one transfer); log them. Returns the new flag events."""
        with self.guard("the per-step statistics"):
            return self._read_back()
        return []

    # -- per-step statistics ---------------------------------------------------------------
    def _loss_value(self, loss: torch.Tensor | float) -> torch.Tensor:
        """The step's loss as a 0-d float32 copy, left on its device (no sync)."""
        if not isinstance(loss, torch.Tensor):
            return torch.tensor(float(loss))
        if loss.numel() == 1:
            return loss.detach().to(torch.float32, copy=True).reshape(())
        self._warn_once(
            "loss shape",
            f"hessdiag: `loss` should be the scalar training loss, got shape {tuple(loss.shape)}; its mean is used.",
        )
        return loss.detach().float().mean()

    def _pending_losses(self) -> dict[int, float]:
        """The losses given since the last read-back, by step (one transfer; the rank mean under DDP)."""
        pending, self._losses = self._losses, []
        if not pending:
            return {}
        device = self.gradients_device
        losses = torch.stack([loss.to(device) for _, loss in pending])
        if _distributed.is_data_parallel():  # every rank must decide the same
            losses = _distributed.all_reduce_sum_(losses) / torch.distributed.get_world_size()
        return dict(zip((step for step, _ in pending), losses.cpu().tolist()))

    def _read_back(self) -> list[FlagEvent]:
        """One transfer for everything since the last read-back; feed the per-step detectors.

        Every step's record is fed to the per-step detectors in order (one transfer, no per-step
        sync), so their hysteresis counts optimizer steps, not read-backs: an onset carries the step
        it became true, and is known at the first read-back after it (at most `log_every` - 1 steps
        later). A step is judged on what was measured: without its loss (``after_step(loss=None)``)
        the exploding and plateau rules skip it; without gradients (no :meth:`after_backward`) only a
        non-finite loss is judged. No placeholder value reaches a detector.
        """
        readout = self.gradients.read()
        losses = self._pending_losses()
        if readout is None:
            return self._judge_losses_only(losses)
        if len(losses) < len(readout.steps):
            self._warn_once(
                "no loss",
                "hessdiag: `after_step` was called without the step's `loss`; the exploding and plateau detectors "
                "skip such steps. Pass `monitor.after_step(batch, loss)`.",
            )
        events: list[FlagEvent] = []
        scaling = self.grad_scaler is not None and self.grad_scaler.is_enabled()
        for index, step in enumerate(readout.steps):
            # Every step in order, so that an onset is dated at the step it became true whatever
            # `log_every` is. Weights are read once per read-back: they move little within one.
            events += self._update(
                "vanishing", step, layer_grad_norms=readout.layer_grad_norms[index],
                layer_weight_norms=readout.layer_weight_norms,
            )  # fmt: skip
            loss = losses.get(step)
            if loss is None:
                continue
            overflow_skip = scaling and readout.nonfinite_tensors[index] > 0 and math.isfinite(loss)
            self.overflow_skips += overflow_skip
            events += self._update(
                "exploding", step, loss=loss, grad_norm=readout.grad_norms[index],
                layer_ratios=dict(readout.layer_ratios(index)), nonfinite_count=readout.nonfinite_tensors[index],
                overflow_skip=overflow_skip,
            )  # fmt: skip
            # Non-finite losses and gradients (overflow skips included) are skipped by the detector itself.
            events += self._update(
                "plateau", step, loss=loss, grad_norm=readout.grad_norms[index],
                lambda_max=self.checks[-1].lambda_max if self.checks else None,
            )  # fmt: skip
        step = readout.steps[-1]
        scalars = {f"{PREFIX}/grad_norm": readout.grad_norms[-1]}
        if losses:
            scalars[f"{PREFIX}/loss"] = losses[max(losses)]
        if scaling:
            scalars[f"{PREFIX}/overflow_skips"] = float(self.overflow_skips)
        for name, value in readout.layer_grad_norms[-1]:
            scalars[f"{PREFIX}/layer_grad_norm/{name}"] = value
        for name, value in readout.layer_ratios():
            scalars[f"{PREFIX}/layer_grad_to_weight/{name}"] = value
        for name, value in readout.layer_weight_norms:
            scalars[f"{PREFIX}/layer_weight_norm/{name}"] = value
        for name, value in readout.layer_update_ratios[-1] if readout.layer_update_ratios else []:
            scalars[f"{PREFIX}/layer_update_ratio/{name}"] = value
        scalars |= self._flag_scalars()
        self._emit(step, scalars, events, {})  # the writers show the per-layer values as they see fit
        return events

    def _judge_losses_only(self, losses: Mapping[int, float]) -> list[FlagEvent]:
        """Steps with a loss but no gradient statistics: log the loss, flag it if it is not finite."""
        if not losses:
            return []
        self._warn_once(
            "no after_backward",
            "hessdiag: `after_step` was called without `after_backward`: no gradient statistics, so only the loss "
            "is logged and a non-finite loss flagged. Call `monitor.after_backward()` after `loss.backward()`.",
        )
        events: list[FlagEvent] = []
        for step, loss in losses.items():
            if not math.isfinite(loss):
                events += self._update("exploding", step, loss=loss, grad_norm=math.nan)
        step = max(losses)
        self._emit(step, {f"{PREFIX}/loss": losses[step]} | self._flag_scalars(), events, {})
        return events

    @property
    def gradients_device(self) -> torch.device:
        return self.gradients.params[0].device

    # -- curvature -------------------------------------------------------------------------
    def check_curvature(self, batch: Any) -> list[FlagEvent]:
        """Run a curvature check on `batch` now; feed the saddle and edge-of-stability detectors."""
        assert self.probe is not None, "no loss_fn was given"
        self._warn_low_precision()
        check = self._run_check(batch)
        if check is None:
            return []
        self.checks.append(check)
        self.schedule.check_finished(self.step, check.seconds, self.gradients_device)
        events = self._update(
            "saddle", check.step, grad_norm=check.grad_norm, lambda_max=check.lambda_max, lambda_min=check.lambda_min,
            negative_certified=check.negative_curvature_certified, loss=check.loss,
            loss_change_along_bottom=check.loss_change_along_bottom,
        )  # fmt: skip
        if check.stability is not None:
            events += self._update("edge_of_stability", check.step, sharpness=check.sharpness, threshold=check.stability.threshold)
        scalars = {
            f"{PREFIX}/lambda_max": check.lambda_max,
            f"{PREFIX}/lambda_min": check.lambda_min,
            f"{PREFIX}/negative_curvature_certified": float(check.negative_curvature_certified),
            f"{PREFIX}/residual_max": check.residual_max,
            f"{PREFIX}/residual_min": check.residual_min,
            f"{PREFIX}/num_hvps": float(check.num_hvps),
            f"{PREFIX}/check_seconds": check.seconds,
            f"{PREFIX}/check_loss": check.loss,
            f"{PREFIX}/check_grad_norm": check.grad_norm,
            f"{PREFIX}/product_error": check.product_error,
            f"{PREFIX}/check_failed": 0.0,
        }
        if check.stability is not None:
            scalars[f"{PREFIX}/sharpness"] = check.sharpness
            scalars[f"{PREFIX}/stability_threshold"] = check.stability.threshold
            scalars[f"{PREFIX}/stability_ratio"] = check.stability_ratio
        if check.loss_change_along_bottom is not None:
            scalars[f"{PREFIX}/loss_change_along_bottom"] = check.loss_change_along_bottom
        scalars |= self._flag_scalars()
        self._emit(check.step, scalars, events, {}, density=check.density)
        previous = self.checks[-2] if len(self.checks) > 1 else None
        if previous is None or previous.hvp_method != check.hvp_method:  # the text when the choice changes
            method = f"{check.hvp_method} ({check.hvp_method_reason}); product error {check.product_error:.3g}"
            self._write("text", check.step, f"{PREFIX}/hvp_method", method)
        return events

    def _run_check(self, batch: Any) -> CurvatureCheck | None:
        sub_batch = None
        for attempt in range(3):
            try:
                check = self.probe.run(self.step, batch, self.optimizer, sub_batch=sub_batch)
                if sub_batch is not None:  # keep the size that fits for the next checks
                    self.probe.sub_batch = sub_batch
                return check
            except Exception as error:  # diagnostics must never crash training
                if self.strict:
                    raise
                if _is_out_of_memory(error) and attempt < 2:
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    size = _distributed.infer_batch_size(batch[0] if isinstance(batch, MicroBatches) else batch)
                    sub_batch = max(1, (sub_batch or self.probe.sub_batch or size or 2) // 2)
                    self._warn_once("oom", f"Out of memory in a curvature check; retrying on {sub_batch} samples.")
                    self.probe.warm_vectors = self.probe.warm_preconditioned = None
                    continue
                self._fail(error)
                return None
        return None

    def _fail(self, error: BaseException) -> None:
        """Report a failed check once per kind of error, and back off exponentially."""
        self.schedule.check_failed(self.step)
        kind = type(error).__name__
        expected = isinstance(error, (HessdiagError, ValueError, RuntimeError))
        message = (
            f"hessdiag: the curvature check at step {self.step} failed ({kind}: {error}). Training continues; "
            f"the next check is at step {self.schedule.next_check}."
        )
        self._warn_once(kind if expected else "unexpected", message)
        self.failed_checks.append((self.step, f"{kind}: {error}"))
        scalars = {f"{PREFIX}/check_failed": 1.0} | self._flag_scalars()
        self.latest.update(scalars)
        self._write("scalars", self.step, scalars)
        self._write("text", self.step, f"{PREFIX}/events/check_failed", message)

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Diagnostics never crash training: an error inside is warned about once and skipped
        (``strict=True`` re-raises). Public so that adapters run user hooks (``on_flag``) under it."""
        try:
            yield
        except Exception as error:
            if self.strict:
                raise
            self._warn_once(
                f"{what}:{type(error).__name__}",
                f"hessdiag: {what} failed at step {self.step} ({type(error).__name__}: {error}). "
                "Training continues; so do the other diagnostics.",
            )

    def _write(self, method: str, *args: Any) -> None:
        """Call `method` on every writer; a failing writer (a full disk, say) does not stop the others."""
        for writer in self.writers:
            with self.guard(f"{type(writer).__name__}.{method}"):
                getattr(writer, method)(*args)

    def note(self, key: str, message: str) -> None:
        """Report a fallback once: a warning, and a text entry on the dashboard."""
        if key not in self._warned:
            self._warn_once(key, message)
            self._write("text", self.step, f"{PREFIX}/notes/{key}", message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, HessdiagWarning, stacklevel=3)

    # -- detectors and writers -------------------------------------------------------------
    def _update(self, name: str, step: int, **inputs: Any) -> list[FlagEvent]:
        detector = self.detectors.get(name)
        events: list[FlagEvent] = []
        if detector is not None:
            with self.guard(f"the {name} detector"):
                events = detector.update(step, **inputs)
        self.events.extend(events)
        return events

    def _flag_scalars(self) -> dict[str, float]:
        return {f"{PREFIX}/flags/{name}": float(d.active) for name, d in self.detectors.items()}

    def _emit(
        self,
        step: int,
        scalars: Mapping[str, float],
        events: Sequence[FlagEvent],
        histograms: Mapping[str, torch.Tensor],
        density: Any = None,
    ) -> None:
        self.latest.update(scalars)
        self._write("scalars", step, scalars)
        if events:
            self._write("events", step, events)
        if histograms:
            self._write("histograms", step, histograms)
        if density is not None:
            self._write("density", step, density)

    def flush(self) -> None:
        """Read back pending statistics and flush the writers (call at the end of training)."""
        self.read_back()
        if self.probe is not None and self.schedule.enabled and self.step and not self.checks:
            if self.failed_checks:
                last_step, reason = self.failed_checks[-1]
                message = (
                    f"hessdiag: no curvature check succeeded in these {self.step} steps: {len(self.failed_checks)} "
                    f"failed, the last at step {last_step} ({reason})."
                )
            else:
                message = (
                    f"hessdiag: no curvature check ran in these {self.step} steps (the first was due at step "
                    f"{self.schedule.next_check}). Lower `check_every`, or train longer, to see curvature."
                )
            if "no check" not in self._warned:
                self._write("text", self.step, f"{PREFIX}/events/no_check", message)
            self._warn_once("no check", message)
        self._write("flush")

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step, warm-start vectors, detector windows and the flag history (primitives and tensors)."""
        return {
            "step": self.step,
            "schedule": self.schedule.state_dict(),
            "probe": self.probe.state_dict() if self.probe is not None else {},
            "detectors": {name: d.state_dict() for name, d in self.detectors.items()},
            "events": [event.to_dict() for event in self.events],
            "overflow_skips": self.overflow_skips,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; keys missing in older checkpoints keep their defaults."""
        self.step = int(state.get("step", 0))
        self.schedule.load_state_dict(state.get("schedule", {}))
        self.overflow_skips = int(state.get("overflow_skips", 0))
        if self.probe is not None:
            self.probe.load_state_dict(state.get("probe", {}))
        for name, detector_state in state.get("detectors", {}).items():
            if name in self.detectors:
                self.detectors[name].load_state_dict(detector_state)
        self.events = [FlagEvent(**event) for event in state.get("events", [])]
        self.latest.update(self._flag_scalars())
