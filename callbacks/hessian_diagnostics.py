r"""
Hessian diagnostics
===================

Attach hessdiag to a Lightning run in one line::

    trainer = Trainer(callbacks=[HessianDiagnostics()])

A thin adapter over :class:`hessdiag.Monitor`: it feeds the monitor at the hooks where Lightning's
gradients are final and unscaled, routes scalars through the trainer's loggers (TensorBoard, CSV,
...) and, with a TensorBoard logger, adds the dashboard layout, histograms, flag events and the
spectral density.

The hooks only route: the settings are checked by :class:`~hessdiag.callbacks.settings.CallbackSettings`; the
loss of a check is chosen in :mod:`~hessdiag.callbacks.loss_closure`, the step's micro-batches are
gathered in :mod:`~hessdiag.callbacks.micro_batches`, `stop_on` and `on_flag` act in
:mod:`~hessdiag.callbacks.flag_stopping`, scalars reach the loggers through
:mod:`~hessdiag.callbacks.logger_writer` and ``trainer.callback_metrics`` through
:mod:`~hessdiag.callbacks.callback_metrics`, and :mod:`~hessdiag.callbacks.strategies` refuses the
strategies that hide the Hessian.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from typing_extensions import override

from hessdiag.isolation import ModelMode
from hessdiag.batches import batch_size
from hessdiag.callbacks.callback_metrics import (
    first_values,
    publish,
    show_in_progress_bar,
    watched_by_another_callback,
    watches_curvature,
)
from hessdiag.callbacks.flag_stopping import FlagHook, FlagStopping
from hessdiag.callbacks.logger_writer import trainer_writers
from hessdiag.callbacks.loss_closure import LossHook, loss_closure
from hessdiag.callbacks.micro_batches import StepMicroBatches
from hessdiag.callbacks.strategies import refuse_unsupported_strategy
from hessdiag.operator import HVPMethod
from hessdiag.monitor import Monitor
from hessdiag.check.schedule import CheckEvery
from hessdiag.settings import ProductParts, RankWeighting
from hessdiag.callbacks.settings import MAX_MICRO_BATCHES, CallbackSettings

_CALLBACK_BASES: tuple[type, ...] = (pl.Callback,)
try:  # one class that both Trainers accept, when the unified `lightning` package is installed too
    import lightning.pytorch as _lightning

    if _lightning.Callback is not pl.Callback:
        _CALLBACK_BASES += (_lightning.Callback,)
except ImportError:
    pass


class HessianDiagnostics(*_CALLBACK_BASES):  # type: ignore[misc]
    r"""Curvature, training-health flags and a TensorBoard dashboard for a Lightning run.

    Every optimizer step it records per-layer gradient statistics (on the device, no host sync);
    every `check_every` optimizer steps (by default as often as 5% of the wall time allows) it estimates the top and bottom Hessian eigenvalues of the
    training loss of the optimizer step (all its micro-batches under ``accumulate_grad_batches``, up to
    :data:`hessdiag.callbacks.settings.MAX_MICRO_BATCHES`; or their first `sub_batch` samples), warm-started from
    the last check; detectors raise flags (exploding, vanishing, plateau, saddle, edge_of_stability).
    One record per optimizer step, however often the gradient hook fires (LBFGS closures, several
    optimizers under manual optimisation). Constructing it has no side effect (no RNG draw); the check
    leaves the run as it was, and undoes what a ``training_step`` used as its loss changes in the
    model's state (an EMA teacher, a counter, a reassigned buffer).

    The loss of a check is, in this order: `loss_fn(pl_module, batch)` if given; the module's
    ``hessdiag_loss(batch)`` method if it defines one; else the output of ``training_step(batch, 0)``
    (a tensor or ``{"loss": ...}``) with ``self.log`` muted. Manual optimisation needs one of the first
    two, since its ``training_step`` steps the optimizer.

    The loss of a step (for the exploding and plateau detectors) is what ``training_step`` returns;
    under manual optimisation, when it returns none, the one loss it logged in that step with
    ``self.log`` (``"loss"`` among several), averaged over the batches of one optimizer step. With
    several optimizers under manual optimisation (a GAN) a step is a training step that stepped any
    of them, as Lightning's loggers count, not ``trainer.global_step``, which counts each.

    Args:
        check_every: optimizer steps between full curvature checks of both ends (0: never), or ``"auto"``
            (default): a reading every 100-250 steps within `overhead_budget`, a full check
            where the budget pays for it and else a tracking reading (see :class:`hessdiag.Monitor`).
        overhead_budget: with ``check_every="auto"``, the share of the training time hessdiag may add:
            the per-step statistics' measured time first, the readings the rest, at least half (0.05);
            the schedule plans 90% of it, the rest a margin for the error of its own timing.
        log_every: optimizer steps between read-backs of the gradient statistics (default: the
            trainer's ``log_every_n_steps``).
        sub_batch: samples of the batch used by a check (default: all; per micro-batch under
            accumulation): every tensor is cut along its first dimension and a list of one tensor per
            sample by element (see :func:`hessdiag.batches.leading_sizes`), or the check is refused.
        product_parts, k, tol, max_iter, cold_every, density_every, noise_scale_parts, module_sharpness,
            hvp_method: see :class:`hessdiag.Monitor`.
        mode: ``"as_is"`` (default): each module keeps its mode of the training step (a backbone
            frozen in eval stays in eval); ``"train"`` / ``"eval"``: the whole model in that mode.
        rank_weighting: under DDP, ``"equal"`` (default: the mean of the ranks' mean losses, what
            DDP's gradient averaging descends) or ``"samples"`` (the mean over all samples).
        loss_fn: ``loss_fn(pl_module, batch) -> scalar`` to use instead of the module's own loss.
        detectors: detectors to run (default: all five with default thresholds).
        update_ratios: also log per-layer update-to-weight ratios (see :class:`hessdiag.Monitor`).
        progress_bar: show lambda_max and the number of active flags in the progress bar, as of the
            last read-back (logged only then, so that the bar adds no host read per step).
        stop_on: flag names whose onset stops training (default: none): ``trainer.should_stop`` is
            set, agreed across ranks (any rank's onset stops all), with a warning naming the flag, its
            onset step and its evidence (also kept in :attr:`stop_reason`). The stop comes at the
            read-back or check that sees the onset: at most ``log_every - 1`` steps after it for the
            per-step flags (exploding, vanishing, plateau), at the check for saddle and
            edge_of_stability.
        on_flag: ``on_flag(event, trainer, pl_module)``, called on every rank for every
            :class:`~hessdiag.flags.FlagEvent`, onsets and clearances alike (``event.kind`` tells), in the
            order they happened, right after the read-back or check that produced them (so
            ``trainer.global_step`` may be past ``event.step`` by up to ``log_every - 1``). An error
            inside is a diagnostics fault: a warning once, training goes on (`strict` re-raises).
        strict: re-raise errors of the diagnostics instead of warning and backing off.

    ``trainer.callback_metrics`` (for ``EarlyStopping`` and ``ModelCheckpoint``), 0-d float32 CPU
    tensors made from values already read back (no extra host sync):

    * ``hessdiag/flags/<name>`` (0 or 1) for every detector: from the start of training (0 until
      raised); updated at every read-back and check;
    * ``hessdiag/grad_norm``: from the first read-back (step `log_every`);
    * ``hessdiag/lambda_max``, ``hessdiag/lambda_min``: from the first successful check;
      ``hessdiag/stability_ratio`` (sharpness / its threshold) too, with one optimizer.

    When another callback of the trainer watches one of these keys (``monitor=``), the first
    optimizer step gets a read-back and a check out of cadence, so the key is there before any
    epoch end or validation: Lightning's EarlyStopping and ModelCheckpoint raise on a missing key.

    Raises:
        ValueError: a bad argument, named in the message (checked by :class:`~hessdiag.callbacks.settings.CallbackSettings`).
        MisconfigurationException: in ``setup``, manual optimisation without a loss closure, or an FSDP1 or
            DeepSpeed strategy (see :mod:`~hessdiag.callbacks.strategies`).

    Example::

        from hessdiag.callbacks import HessianDiagnostics
        trainer = Trainer(callbacks=[HessianDiagnostics(check_every=200, stop_on=("exploding",))])
    """

    def __init__(
        self,
        check_every: CheckEvery = "auto",
        overhead_budget: float = 0.05,
        log_every: int | None = None,
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
        rank_weighting: RankWeighting = "equal",
        loss_fn: LossHook | None = None,
        detectors: Sequence[Any] | None = None,
        update_ratios: bool = False,
        progress_bar: bool = True,
        stop_on: Sequence[str] = (),
        on_flag: FlagHook | None = None,
        strict: bool = False,
    ) -> None:
        # Plain checks only (in the settings): building anything here could draw from the RNG.
        self.settings = CallbackSettings.from_arguments(locals())
        self.flags = FlagStopping(self.settings.stop_on, on_flag)
        self.monitor: Monitor | None = None
        self._restored: dict[str, Any] | None = None
        self._stepped = False
        self._step = StepMicroBatches()
        self._counts_steps = False  # see `_steps_done`
        # Another callback (EarlyStopping, ModelCheckpoint) watches one of our values: have them all
        # by the end of the first optimizer step, before any epoch end or validation can ask for them.
        self._first_values_due = False

    @property
    def stop_reason(self) -> str | None:
        """Why `stop_on` stopped the last fit, if it did."""
        return self.flags.stop_reason

    @property
    @override
    def state_key(self) -> str:
        # Not keyed by settings: a run resumed with another `check_every` finds its state.
        return self._generate_state_key()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_unsupported_strategy(trainer)
        writers = trainer_writers(trainer)
        # A fresh fit starts fresh: a checkpoint's state arrives after setup, through load_state_dict.
        self._restored = None
        self._step, self._stepped = StepMicroBatches(manual=not pl_module.automatic_optimization), False
        self.flags = FlagStopping(self.settings.stop_on, self.settings.on_flag)
        self.monitor = Monitor.from_settings(
            pl_module,
            loss_closure(pl_module, self.settings.loss_fn),
            self.settings.diagnostics(trainer.log_every_n_steps),
            writer=writers,
            # a detector instance must not carry one fit's windows into the next
            detectors=copy.deepcopy(self.settings.detectors),
            grad_scaler=getattr(trainer.precision_plugin, "scaler", None),  # fp16 AMP: overflow skips
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is None:
            return
        # Flags exist from the start (none raised yet), so EarlyStopping on one never misses its key.
        publish(trainer, self.monitor.latest)
        self._first_values_due = watched_by_another_callback(trainer)
        # The strategy's DDP wrapper exists from here on: the noise scale comes from its ranks' gradients.
        self.monitor.watch_ranks(trainer.strategy.model)
        self._counts_steps = not pl_module.automatic_optimization and len(trainer.optimizers) > 1
        if len(trainer.optimizers) == 1:
            self.monitor.use_optimizer(trainer.optimizers[0])
        elif trainer.optimizers:
            # Each optimizer steps on its own parameters with its own rule (a GAN): no single
            # threshold applies to the Hessian over all of them.
            rank_zero_info(
                f"hessdiag: {len(trainer.optimizers)} optimizers: no edge-of-stability threshold (it needs one optimizer "
                "stepping all the checked parameters); lambda_max and lambda_min are still logged."
            )

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.monitor is None:
            return
        self._step.count(batch)
        if self._step.logged is not None:  # manual optimisation: what the step logs may be its loss
            self._step.logged.before_step(trainer.callback_metrics)
        if trainer.accumulate_grad_batches > 1 and pl_module.automatic_optimization:
            # Lightning divides each micro-batch loss by accumulate_grad_batches.
            self.monitor.begin_micro_batch(batch_size(batch), 1.0 / trainer.accumulate_grad_batches)
        if not (self._first_values_due or self.monitor.check_due(self._steps_done(trainer) + 1)):
            return
        # A check follows this optimizer step: keep its micro-batches (references, no copy).
        if self._step.keep(batch, batch_idx):
            self.monitor.note(
                "micro-batches",
                f"hessdiag: the check covers the last {MAX_MICRO_BATCHES} micro-batches of the step "
                f"(accumulate_grad_batches={trainer.accumulate_grad_batches}), not all of them: "
                "the memory budget of a check (hessdiag.callbacks.settings.MAX_MICRO_BATCHES).",
            )

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Here gradients are final: accumulated, all-reduced under DDP, unscaled under AMP. It may
        # fire several times per step (LBFGS closures, several optimizers): the monitor makes one
        # record of the step.
        if self.monitor is not None:
            self.monitor.after_backward()
            self._stepped = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor is None:
            return
        self._step.add_loss(outputs, trainer.callback_metrics if self._step.logged is not None else None)
        if not self._stepped:
            return  # an accumulation step: no optimizer step yet
        step = self._steps_done(trainer)
        self._stepped = False
        check_batch, step_loss, samples = self._step.finish(batch, batch_idx)
        if step_loss is None and self._step.logged is not None:
            # Said in Lightning's terms under the key of the Monitor's own warning, which advises
            # `monitor.after_step(batch, loss)`: a call a Lightning user never writes.
            self.monitor.note("no loss", self._step.logged.advice())
        outcome = self.monitor.after_step(check_batch, step_loss, step=step, samples=samples)
        events, read_back = list(outcome), outcome.read_back
        if self._first_values_due:
            self._first_values_due = False
            events += first_values(self.monitor, check_batch, outcome, watches_curvature(trainer))
            read_back = True
        # Every rank reads back at the same steps (every `log_every` and before every due reading:
        # the schedule is agreed): the steps where the ranks may meet in a collective to agree on
        # stopping. Values and flags change only there.
        if not read_back:
            return
        publish(trainer, self.monitor.latest)
        self.flags.call_on_flag(events, trainer, pl_module, self.monitor.guard)
        reason = self.flags.stop_if_flagged(trainer, events)
        if reason is not None:
            self.monitor.note("stop_on", reason)
        if self.settings.progress_bar and self.monitor.last_check is not None:
            show_in_progress_bar(trainer, self.monitor.last_check.lambda_max, len(self.monitor.active_flags))

    def _steps_done(self, trainer: pl.Trainer) -> int:
        """Optimizer steps done so far (this batch's included once it stepped), as hessdiag counts
        them: one per training step that stepped. Lightning's ``global_step`` counts every
        ``optimizer.step()``, several per training step with several optimizers under manual
        optimisation (a GAN): there hessdiag counts its records itself (restored on resume), as
        Lightning's own loggers count batches."""
        assert self.monitor is not None
        return self.monitor.step + self._stepped if self._counts_steps else trainer.global_step

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.flush()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor is not None:
            self.monitor.close()  # the hooks on the parameters go; the monitor's state stays readable

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict() if self.monitor is not None else dict(self._restored or {})

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.monitor is not None:
            self.monitor.load_state_dict(state_dict)
        else:  # restored outside a fit: kept as is, so that state_dict() returns it
            self._restored = dict(state_dict)
