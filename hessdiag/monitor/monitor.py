"""`Monitor`: the diagnostics of hessdiag for a hand-written PyTorch training loop.

It conducts the parts that do the work (built in :mod:`.parts`): the per-step statistics
(:mod:`hessdiag.steps.statistics`), the curvature readings (:mod:`.check_runner`), the detectors
(every record to every detector, :mod:`.detection`), the fault policy (:mod:`.faults`) and the
writers (:mod:`hessdiag.reporting.writers`).
A loop calls it at two points::

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hessdiag._distributed import is_data_parallel
from hessdiag.isolation import ModelMode
from hessdiag.batches import batch_size

from hessdiag.flags import FlagEvent
from hessdiag.operator import HVPMethod, LossFn
from hessdiag.monitor.parts import MonitorParts, build_parts, validate_arguments
from hessdiag.monitor.checkpoint import monitor_state, restore_monitor_state
from hessdiag.monitor.readout import MonitorView, StepOutcome
from hessdiag.check.schedule import CheckEvery, ReadingKind
from hessdiag.settings import DiagnosticsSettings, ProductParts, RankWeighting


class Monitor(MonitorView):
    """Gradient statistics every step, curvature every `check_every` steps, flags, TensorBoard.

    Args:
        model: the network being trained (a DDP wrapper is fine).
        loss_fn: ``loss_fn(model, batch) -> scalar``, the training loss; needed for curvature checks.
        optimizer: read for the stability threshold (SGD, momentum, Nesterov, Adam, AdamW) and
            Adam's preconditioner; never modified.
        writer: a ``torch.utils.tensorboard.SummaryWriter``, a :class:`DiagnosticsWriter`, a list of
            either, or None.
        check_every: optimizer steps between full curvature checks of both ends (0: never), or
            ``"auto"`` (default): readings at steps 10, 40, 160, then every 100-250 steps within
            `overhead_budget`, a full check where the budget pays for it and else a
            tracking reading (a proven lower bound on the sharpness from the tracked top vector; see
            :mod:`hessdiag.check.schedule` and :mod:`hessdiag.check.tracking`).
        overhead_budget: with ``check_every="auto"``, the share of the training time hessdiag may add:
            the per-step statistics' measured time first, the readings the rest (at least half); the
            schedule plans 90% of it, the rest a margin for the error of its own timing.
        log_every: steps between read-backs of the gradient statistics (detection and logging).
        sub_batch: samples of the batch used by a curvature check (default: all; of each micro-batch for
            :class:`~hessdiag.MicroBatches`). Every tensor is cut along its first dimension; a batch whose
            tensors differ there is refused (the check fails with a warning naming `sub_batch`).
        product_parts: each product on this many parts of the batch, one part's gradient graph at a
            time, where the Hessian stays exact (:mod:`hessdiag.operator.sample_parts`; 1: the whole
            batch); ``"auto"`` (default): 4 on an accelerator, the whole batch on a CPU
            (:func:`~hessdiag.settings.product_parts_on`). ``monitor.probe.parts_reason`` says why.
        k, tol, max_iter, cold_every, hvp_method, params: see :class:`CurvatureProbe`.
        mode: the module modes of a check: ``"as_is"`` (default): each keeps its mode of the training
            step (a frozen backbone in eval stays in eval); ``"train"`` / ``"eval"``: the whole model.
        rank_weighting: under data parallelism, ``"equal"`` (default): the check's loss is the mean of
            the ranks' mean losses, what DDP's gradient averaging descends; ``"samples"``: the mean
            over all the ranks' samples.
        density_every: every n-th check also logs the spectral density (0: never).
        noise_scale_parts: each check also estimates the gradient noise scale from its batch cut in
            this many parts (0: none; default 4; cost: see :class:`CurvatureProbe`); under DDP from every
            step's local and all-reduced gradients instead (:meth:`watch_ranks`).
        module_sharpness: each check also measures lambda_max of the own diagonal Hessian block of this
            many modules, those holding most of the top eigenvector (0, the default: none; at most 5),
            as ``hessdiag/module_sharpness/<module>``; each costs about a warm check's products
            (:mod:`hessdiag.estimators.module_sharpness`).
        detectors: the detectors to run: flag names or detector instances (default: one of each, with
            default thresholds).
        grad_scaler: the ``torch.amp.GradScaler`` of an fp16 loop (call :meth:`after_backward` after
            ``scaler.unscale_(optimizer)``): steps whose gradients overflow are the scaler's skipped
            steps, counted (``overflow_skips``), not judged as explosions unless many come in a row
            (:class:`ExplodingGradientDetector`).
        update_ratios: also log each layer's update-to-weight ratio ||delta theta|| / ||theta|| (the
            step the optimizer took; for Adam not lr ||g|| / ||theta||) per read-back, and at each
            check the quadratic model's predicted loss change of the step's update against the
            observed one (:mod:`hessdiag.estimators.update_prediction`: one product, one forward, a parameter copy).
        strict: re-raise errors of the diagnostics instead of warning and backing off.

    :meth:`from_settings` builds one from a :class:`~hessdiag.settings.DiagnosticsSettings` already
    validated (the Lightning callback shares its own).

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
        product_parts: ProductParts = "auto",
        k: int = 1,
        tol: float = 1e-3,
        max_iter: int | None = None,
        cold_every: int = 5,
        density_every: int = 10,
        noise_scale_parts: int = 4,
        module_sharpness: int = 0,
        mode: ModelMode = "as_is",
        hvp_method: HVPMethod = "auto",
        params: Iterable[torch.Tensor] | None = None,
        rank_weighting: RankWeighting = "equal",
        detectors: Sequence[Any] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        update_ratios: bool = False,
        strict: bool = False,
    ) -> None:
        settings = DiagnosticsSettings.from_arguments(locals())  # the signature's settings, validated once
        self._assemble(model, settings, optimizer, lambda current_step: build_parts(
            model, loss_fn, settings, optimizer=optimizer, writer=writer, params=params, detectors=detectors,
            grad_scaler=grad_scaler, current_step=current_step,
        ))  # fmt: skip

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
        """A Monitor computing what `settings` says (validated when they were built, not again)."""
        monitor = cls.__new__(cls)
        monitor._assemble(model, settings, optimizer, lambda current_step: build_parts(
            model, loss_fn, settings, optimizer=optimizer, writer=writer, params=params, detectors=detectors,
            grad_scaler=grad_scaler, current_step=current_step,
        ))  # fmt: skip
        return monitor

    def _assemble(
        self,
        model: nn.Module,
        settings: DiagnosticsSettings,
        optimizer: torch.optim.Optimizer | None,
        build: Callable[[Callable[[], int]], MonitorParts],
    ) -> None:
        """Set the Monitor's parts, `build(current_step)` (the step for their messages)."""
        self.settings, self.model, self._optimizer, self._step = settings, model, optimizer, 0
        parts = build(lambda: self._step)
        self.schedule, self.faults, self.writers = parts.schedule, parts.faults, parts.writers
        self.statistics, self.probe, self.noise, self.detection = parts.statistics, parts.probe, parts.noise, parts.detection
        self._runner, self._reporting, self._readings = parts.runner, parts.reporting, parts.readings
        if isinstance(model, nn.parallel.DistributedDataParallel):
            self.watch_ranks(model)

    # -- what the adapters tell it ------------------------------------------------------------
    def use_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Read `optimizer` for the stability threshold from now on (never modified)."""
        validate_arguments(self.model, None, optimizer, None, curvature=False)
        self._optimizer = optimizer

    def watch_ranks(self, ddp: nn.Module) -> None:
        """The noise scale from every step's local gradients against DDP's all-reduced one (a
        communication hook reducing as DDP does; no extra backward), not the checks' split; see
        :mod:`hessdiag.noise.ranks`. Called for a DDP `model`, and by the callback. A DDP that
        has its own hook keeps it, and the split stays (said once)."""
        if not self.settings.noise_scale_parts:
            return
        why_not = self.noise.watch(ddp)
        if why_not is None and self.probe is not None:
            self.probe.skip_noise_scale_parts()
        elif why_not is not None and isinstance(ddp, nn.parallel.DistributedDataParallel):
            self.note("rank noise scale", f"hessdiag: no noise scale from the ranks' gradients: {why_not}; checks split their batch.")

    def begin_micro_batch(self, samples: int | None = None, loss_scale: float = 1.0) -> None:
        """Under gradient accumulation, call before each micro-batch's backward (`samples`: its
        samples; `loss_scale`: its loss's factor, 1 / micro-batches): a check after this step takes
        the noise scale from the micro-batches' gradients (:mod:`hessdiag.noise.micro_batches`, no
        extra backward), not its split. Not under data parallelism (DDP's ranks give the noise scale
        there, and `.grad` holds more samples than the micro-batches) nor an fp16 loss scaler."""
        scaled = self.grad_scaler is not None and self.grad_scaler.is_enabled()
        if self.settings.noise_scale_parts and not is_data_parallel() and not scaled and self.check_due(self._step + 1):
            with self.guard("the noise scale from the micro-batches"):
                self.noise.begin_micro_batch(samples, loss_scale)

    # -- the loop's two calls ----------------------------------------------------------------
    def after_backward(self) -> None:
        """Record this step's gradient statistics; call when the gradients are final (accumulated,
        all-reduced, unscaled). No host-device synchronisation: values stay on the device. Calling it
        several times before :meth:`after_step` (an LBFGS closure) still makes one record of the step."""
        with self.schedule.statistics_time(), self.guard("the gradient statistics"):
            self.statistics.observe_gradients(self._step + 1)
            self.noise.gradients_final()
            if self.settings.update_ratios and self.check_due(self._step + 1):
                self.probe.remember_update_start(self._step + 1)  # a check follows: measure its update

    def after_step(
        self,
        batch: Any = None,
        loss: torch.Tensor | float | None = None,
        *,
        step: int | None = None,
        samples: int | None = None,
    ) -> StepOutcome:
        """Count an optimizer step and its `loss`; read back, detect and log every `log_every` steps
        and before each curvature reading, which runs on `batch` when one is due. Returns what the
        step did (:class:`~hessdiag.monitor.readout.StepOutcome`: iterating it yields the new flag
        events).

        `step`: the optimizer steps taken including this one (Lightning's ``trainer.global_step``
        at ``on_train_batch_end``), adopted instead of counting. `loss` is copied (one kernel, no
        host read), so a buffer the loop reuses is safe to pass. `samples`: this rank's samples of the
        step (default: those of `batch`), for the noise scale under DDP.
        """
        self._step = self._step + 1 if step is None else step
        with self.schedule.statistics_time():
            if self.noise.from_ranks:
                with self.guard("the noise scale from the ranks"):
                    self.noise.close_step(samples if samples is not None else batch_size(batch))
            if loss is not None:
                with self.guard("the per-step statistics"):
                    self.statistics.add_loss(self._step, loss)
        reading_due = batch is not None and self.check_due(self._step)
        # A reading reads back first (it waits for the device anyway), so that its detectors judge it
        # with every step's loss up to it, not only those of the last `log_every` read-back.
        read_back = reading_due or self.read_back_due(self._step)
        events = self.read_back() if read_back else []
        self.schedule.step_finished()
        reading: ReadingKind | None = None
        if reading_due:
            assert self._readings is not None, "no loss_fn was given"
            reading, found = self._readings.read(self._step, batch, self._optimizer)
            events += found
        return StepOutcome(tuple(events), read_back, reading)

    def read_back(self) -> list[FlagEvent]:
        """Read back and judge the steps since the last read-back now (one transfer); log them.
        Returns the new flag events.

        Every step's record goes to the detectors in order, so their hysteresis counts optimizer
        steps, not read-backs: an onset carries the step it became true, and is known at the first
        read-back after it (at most `log_every` - 1 steps later).
        """
        events: list[FlagEvent] = []
        if self.statistics.device.type == "cuda":  # the step's own kernels first: they are not the statistics' time
            torch.cuda.current_stream(self.statistics.device).synchronize()  # the stream the transfer waits on anyway
        with self.schedule.statistics_time(), self.guard("the per-step statistics"):
            readout = self.statistics.read(self.checks[-1].lambda_max if self.checks else None)
            if readout is not None:
                events = self.detection.observe(readout.records)
                values = readout.values | self.noise.read() | self.detection.flag_scalars()
                self.writers.emit(readout.step, values, readout.layers, events)
        return events

    # -- curvature ---------------------------------------------------------------------------
    def check_curvature(self, batch: Any, *, bottom: bool = True) -> list[FlagEvent]:
        """Run a curvature check on `batch` now (`bottom` False: the top end only, see
        :meth:`~hessdiag.check.probe.CurvatureProbe.run`); every detector observes it. A check that
        fails is reported once per kind of error and backs off; training goes on."""
        assert self._readings is not None, "no loss_fn was given"
        return self._readings.check(self._step, batch, self._optimizer, bottom=bottom)

    # -- faults and writers --------------------------------------------------------------------
    def guard(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Diagnostics never crash training: an error inside is warned about once and skipped
        (``strict=True`` re-raises). Public so that adapters run user hooks (``on_flag``) under it."""
        return self.faults.guard(what)

    def note(self, key: str, message: str) -> None:
        """Report a fallback once: a warning, and a text entry on the dashboard."""
        self._reporting.note(key, message)

    def flush(self) -> None:
        """Read back pending statistics and flush the writers (call at the end of training)."""
        self.read_back()
        if self.checks_enabled and self._step and not self.checks and not self.readings:
            self._reporting.no_check(self._step, self._runner.no_check_message(self._step))
        self.writers.flush()

    def close(self) -> None:
        """Remove the hooks the Monitor put on the model's parameters (they mark which parameters
        each backward reaches; they never change a gradient). Call when the Monitor is done with the
        model; dropping the Monitor removes them too. Idempotent."""
        self.statistics.close()

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step, warm-start vectors, detector windows and the flag history (primitives and tensors)."""
        return monitor_state(self._step, self.schedule, self.probe, self.detection, self.statistics, self.noise)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; keys missing in older checkpoints keep their defaults."""
        self._step = restore_monitor_state(state, self.schedule, self.probe, self.detection, self.statistics, self.noise)
        self.writers.remember(self.detection.flag_scalars())
